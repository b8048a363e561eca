#!/usr/bin/env bash
# Run here, before a GPU check: downloads into .whl/ the wheels of our dependencies that the lent NVIDIA
# machine's image lacks (it has jax, flax, optax, orbax-checkpoint, chex, numpy, scikit-learn, ... but no
# distrax, TensorFlow Probability or tensorflow-datasets, and it cannot reach PyPI).
#   bash experiments/device/fetch_wheels.sh [python version, default 3.12 (the image's)] [folder, default .whl]
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${1:-3.12}
folder=${2:-.whl}
# Ours at the versions requirements.txt pins; the dependencies of theirs that the image lacks, at their
# newest versions.
mapfile -t pinned < <(grep -E '^(distrax|tfp-nightly|tensorflow-datasets|array_record)==' requirements.txt)
[ "${#pinned[@]}" -eq 4 ] || { echo "fetch_wheels.sh: requirements.txt no longer pins all four" >&2; exit 1; }
wheels=(
  "${pinned[@]}"
  dm-tree gast decorator immutabledict simple_parsing docstring-parser tensorflow-metadata
  googleapis-common-protos termcolor toml
)
# Published as source only (pure Python): built into a wheel here.
sources=(promise)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$folder"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$folder" "${wheels[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
python3 -m pip wheel --quiet --no-deps -w "$folder" "${sources[@]}"
if [ "$folder" = .whl ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo /.whl/ >> .git/info/exclude  # carried to the device, never committed
fi
du -sh "$folder"
