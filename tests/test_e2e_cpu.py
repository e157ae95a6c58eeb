"""The real trainer end to end on CPU: `python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default`.

Everything runs for real: Hydra + our overlays, Ray, TransferQueue, the agent loop with our transformers rollout
backend, verl's reward loop with the math-verify grader, the SSOPD trainer, worker and loss, checkpointing and
resume. The embedded tiny default (built once into the user cache) gives mixed groups, so SSOPD has pairs.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT, EXPERIMENT = "ssopd-tiny", "e2e"


def main_ppo(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}  # the +platform=cpu overlay selects it
    cmd = [
        sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=ssopd", "+platform=cpu", "+tiny=default",
        f"trainer.project_name={PROJECT}", f"trainer.experiment_name={EXPERIMENT}",
        "trainer.val_before_train=false", "trainer.test_freq=2", "trainer.save_freq=2",
        f"trainer.default_local_dir={workdir / 'checkpoints'}", *overrides,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    (workdir / "main_ppo.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def tracker(path: Path) -> dict[int, dict]:
    """verl's `file` logger: one JSON line {step, data} per log call; merged per step."""
    steps: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], {}).update(row["data"])
    return steps


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    main_ppo(workdir, "trainer.total_training_steps=2")
    return workdir


def test_two_ssopd_steps_log_pairs_and_distillation(first_run):
    steps = tracker(first_run / PROJECT / f"{EXPERIMENT}.jsonl")
    assert {1, 2} <= set(steps)
    for step in (1, 2):
        ssopd = {k: v for k, v in steps[step].items() if k.startswith("ssopd/")}
        assert all(math.isfinite(v) for v in ssopd.values()), ssopd
        assert ssopd["ssopd/pairs"] >= 1 and ssopd["ssopd/frontier_frac"] > 0
        assert ssopd["ssopd/distill_loss"] > 0
        for key in ("ssopd/kl_unclipped", "ssopd/clipped_teacher_mass", "ssopd/witness_len_mean", "ssopd/target_len_mean",
                    "ssopd/witness_truncations"):
            assert key in ssopd
        assert "actor/pg_loss" in steps[step]
    assert any(k.startswith("val-core/") and "/acc/" in k for k in steps[2])  # validation accuracy at step 2
    checkpoint = first_run / "checkpoints" / "global_step_2" / "actor"
    assert (checkpoint / "model_world_size_1_rank_0.pt").exists()
    assert (first_run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_resume_continues_from_step_two(first_run):
    proc = main_ppo(first_run, "trainer.total_training_steps=3", "trainer.resume_mode=auto")
    assert "global_step_2" in proc.stdout + proc.stderr
    resumed = tracker(first_run / PROJECT / f"{EXPERIMENT}.jsonl")
    train_steps = sorted(s for s, data in resumed.items() if "ssopd/pairs" in data)
    assert train_steps == [3]  # not 1: the run continued after the checkpoint
    # the first run's metrics were kept, not overwritten by verl's file logger
    kept = tracker(first_run / PROJECT / f"{EXPERIMENT}.1.jsonl")
    assert {1, 2} <= set(kept)


def test_lambda_zero_runs_plain_grpo_through_the_same_path(tmp_path):
    main_ppo(tmp_path, "trainer.total_training_steps=1", "ssopd.lambda=0", "trainer.save_freq=-1")
    steps = tracker(tmp_path / PROJECT / f"{EXPERIMENT}.jsonl")
    assert "actor/pg_loss" in steps[1]
    assert steps[1]["ssopd/pairs"] >= 1  # the pairing is still measured...
    assert "ssopd/distill_loss" not in steps[1]  # ...but nothing is distilled
