#!/usr/bin/env bash
# Every GPU figure in one call: the gpu-marked tests, a layout sweep, the published model against
# the grid fast path, a timed training run and its per-minute summary, all into OUT_DIR/report.md
# within --budget seconds (default 480).
#   scripts/gpu_check.sh OUT_DIR [--budget S] [--dry-run]
# On a machine without network, wheels for what it lacks may sit in .whl/ (see the docs'
# "Measuring on a GPU machine", docs/throughput.md): they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -lt 1 ]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR [--budget S] [--dry-run]" >&2
  exit 2
fi
export SDL_VIDEODRIVER=dummy SDL_AUDIODRIVER=dummy PYGAME_HIDE_SUPPORT_PROMPT=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" -m ppo_tbptt.gpu_check "$@"
