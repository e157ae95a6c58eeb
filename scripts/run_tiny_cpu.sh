#!/usr/bin/env bash
# The README's main job: SSOPD through verl's own entry point, on the embedded tiny default, on CPU.
#
#   python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default [overrides]
#
# Installs into .venv first if needed; builds the tiny default on first use (~1 minute, cached in
# ~/.cache/ssopd_verl); logs to the console and to ssopd-tiny/<experiment>.jsonl (verl's `file` logger);
# checkpoints to checkpoints/ssopd-tiny/<experiment>. Extra arguments are Hydra overrides, e.g.
# `trainer.total_training_steps=10` or `ssopd.lambda=0` (plain GRPO through the same path).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
[ -x .venv/bin/python ] && .venv/bin/python -c "import ssopd_verl, verl" 2>/dev/null || bash scripts/install.sh
.venv/bin/python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default "$@"
echo "ssopd: main job finished in $(( $(date +%s) - start )) s (metrics: ssopd-tiny/*.jsonl, checkpoints: checkpoints/ssopd-tiny/)"
