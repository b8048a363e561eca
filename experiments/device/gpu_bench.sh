#!/usr/bin/env bash
# The GPU check of issue 7, prepared to run in one call of the `device` tool (its image has JAX, flax,
# optax and orbax but cannot reach PyPI; first `bash experiments/device/fetch_wheels.sh` here):
#   run(command="bash experiments/device/gpu_bench.sh", carry=[".whl"], timeout_s=540)
# WRN-50-2 at 256 px, random encoder weights (speed only), N = 256: scoring images/s, the training step's
# time and the fraction of the chip's measured matmul rate, in float32 and in bfloat16 (encoder, training
# and scoring matmuls; float32 sums). Logs and JSON go to $OUT (default /tmp/gpu_bench).
#   IMAGE_SIZE, BATCH_SIZE, REPEATS, MATMUL_SIZE, PYTHON override the defaults (a CPU dry run:
#   IMAGE_SIZE=64 BATCH_SIZE=2 REPEATS=1 MATMUL_SIZE=512). float32 matmuls run at JAX's default precision,
#   which is TF32 on NVIDIA GPUs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_bench}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then  # the carried wheels of what the image lacks, beside (not over) its own packages
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$OUT/machine.txt"
status=0
for dtype in float32 bfloat16; do
  score_dtype=$([ "$dtype" = float32 ] && echo float32 || echo auto)
  "$PYTHON" experiments/bench/speed.py --backbone=wide_resnet50_2 --random_weights \
    --image_size="${IMAGE_SIZE:-256}" --batch_size="${BATCH_SIZE:-32}" --fiber_batch=256 \
    --encoder_dtype="$dtype" --train_dtype="$dtype" --score_dtype="$score_dtype" \
    --repeats="${REPEATS:-3}" --matmul_size="${MATMUL_SIZE:-8192}" --out="$OUT/wrn50_$dtype.json" 2>&1 | tee "$OUT/wrn50_$dtype.log"
  status=$((status || PIPESTATUS[0]))
done
exit $status
