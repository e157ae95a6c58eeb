#!/usr/bin/env bash
# Install ssopd-verl and its CPU dependencies into .venv in the repo (idempotent; ~2 minutes on a fresh machine).
# GPU clusters install with `pip install -e ".[gpu]"` in their own environment instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# constraints-cpu.txt pins torch to the CPU wheel (an unpinned torch pulls several GB of CUDA wheels).
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[cpu,test]"
