#!/usr/bin/env bash
# The GPU check (`make gpu-check`): the tiny chain on the GPU, training and generation throughput
# with the paper profile's settings, the projected `make reproduce-paper PROFILE=paper` time and,
# when the offline weights are cached, the offline generator; one JSON, by default
# artifacts/gpu_check/gpu_check.json. Any flag of scripts/gpu_check.py passes through.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export MHS_RAW_DIR="${MHS_RAW_DIR:-$(cd .. && pwd)/shared/data}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' && [[ " $* " != *" --device cpu "* ]]; then
  echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device;" \
       "install a CUDA build of torch on a GPU machine, or pass --device cpu --quick" >&2
  exit 2
fi
exec "$PY" scripts/gpu_check.py "$@"
