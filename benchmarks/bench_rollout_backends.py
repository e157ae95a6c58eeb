"""Step time of the tiny default's main job with verl's vLLM rollout vs the transformers rollout, on CPU.

One command runs the README's main job twice, one backend after the other, with the same settings (``--steps``
training steps, no validation, no checkpoint, rollout seed 0), and reads verl's ``file`` tracker: per step
``timing_s/step`` (the whole step) and ``timing_s/gen`` (the rollout inside it). Step 1 is left out of the medians
(the first generation warms the engine up). Reported: per backend the median step and generation times and the
run's wall time (Ray and engine start-up included), and the ratios vLLM / transformers; ``--json PATH`` writes them
with the command and the machine's load. The two runs share the machine with whatever else runs on it: compare the
ratio, not the absolute seconds, and only between runs on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_rollout_backends.py --steps 6 --json benchmarks/results/rollout_backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("hf", "vllm")  # actor_rollout_ref.rollout.name


def run_main_job(workdir: Path, backend: str, steps: int) -> dict:
    """The main job with ``backend`` for ``steps`` steps; its per-step timings and wall time."""
    workdir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=ssopd", "+platform=cpu", "+tiny=default",
           f"actor_rollout_ref.rollout.name={backend}", f"trainer.total_training_steps={steps}",
           "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
           "actor_rollout_ref.rollout.seed=0", "trainer.project_name=bench", f"trainer.experiment_name={backend}",
           f"trainer.default_local_dir={workdir / 'checkpoints'}", "ssopd.token_view_every=0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}  # the +platform=cpu overlay selects it
    start = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.time() - start
    (workdir / "main_ppo.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the {backend} run failed (log: {workdir / 'main_ppo.log'}):\n{proc.stderr[-3000:]}")
    steps_logged: dict[int, dict] = {}
    for line in (workdir / "bench" / f"{backend}.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps_logged.setdefault(row["step"], {}).update(row["data"])
    timed = [steps_logged[s] for s in sorted(steps_logged) if s >= 2 and "timing_s/step" in steps_logged[s]]
    return {
        "wall_s": wall,
        "steps": steps,
        "step_s": [round(d["timing_s/step"], 3) for d in timed],
        "gen_s": [round(d["timing_s/gen"], 3) for d in timed],
        "median_step_s": statistics.median(d["timing_s/step"] for d in timed),
        "median_gen_s": statistics.median(d["timing_s/gen"] for d in timed),
        "first_step_s": steps_logged[1]["timing_s/step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (>= 3; step 1 is warm-up)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--workdir", default=None, help="where the runs write (default: a temporary directory)")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("argument --steps: must be >= 3 (step 1 is left out as warm-up)")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rollout-"))
    load_before = os.getloadavg()
    results = {backend: run_main_job(root / backend, backend, args.steps) for backend in BACKENDS}
    hf, vllm = results["hf"], results["vllm"]
    record = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
        "step_time_ratio_vllm_over_hf": vllm["median_step_s"] / hf["median_step_s"],
        "gen_time_ratio_vllm_over_hf": vllm["median_gen_s"] / hf["median_gen_s"],
        "wall_time_ratio_vllm_over_hf": vllm["wall_s"] / hf["wall_s"],
    }
    for backend in BACKENDS:
        r = results[backend]
        print(f"{backend:5s} median step {r['median_step_s']:.2f} s (generation {r['median_gen_s']:.2f} s), "
              f"first step {r['first_step_s']:.1f} s, run {r['wall_s']:.0f} s")  # fmt: skip
    print(f"vllm / hf: step time {record['step_time_ratio_vllm_over_hf']:.2f}, generation "
          f"{record['gen_time_ratio_vllm_over_hf']:.2f}, whole run {record['wall_time_ratio_vllm_over_hf']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
