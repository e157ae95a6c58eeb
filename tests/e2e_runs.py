"""The real runs behind tests/test_e2e_cpu.py, as one command: ``python tests/e2e_runs.py ROOT``.

* A, the README's main job: validation, 3 steps, a checkpoint at step 2 (and at the end), a token view at step 2.
* C resumes from A's step-2 checkpoint alone, in a fresh directory, for step 3.
* E, the experiment command at 2 steps for ``ssopd-initial`` (LoRA, initial teacher, a distillation horizon),
  with dynamic batching that counts the teacher tokens.
* Two ranks (``trainer.n_gpus_per_node=2``), 2 steps each, one rollout replica over both ranks (rollout tensor
  parallel 2, so that they sample what the one-rank run A samples): B, data parallel 2 with the recipe's defaults;
  S, Ulysses sequence parallel 2.
* L, the nine launch scripts shrunk for CPU (``CPU_SMOKE=1``, ``scripts/launch/common.sh``), one step each, two
  ranks: dynamic batching with a budget that gives rows micro-batches of their own, LoRA with the initial teacher
  and a distillation horizon (SETUP=reported), parameter and optimizer offload on the 8B scripts.
* V, the main job with verl's vLLM rollout (``actor_rollout_ref.rollout.name=vllm``, vLLM's CPU wheel): validation,
  2 steps, a checkpoint at step 2.

Each writes its log (``ROOT/<run>/main_ppo.log``) and verl's file tracker under ROOT. ``tests/conftest.py`` starts
this in a background process when the e2e tests are collected (after building the tiny default), so that the runs
overlap the other tests instead of following them; the e2e tests wait for it and read what the runs logged.
A failing run makes the command exit non-zero with the run's output tail in ``ROOT/failure.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT, EXPERIMENT = "ssopd-tiny", "e2e"
TOKEN_BUDGET = 512  # E's dynamic-batching budget (ppo_max_token_len_per_gpu), teacher tokens included
EXPERIMENT_TRACKER = Path("e") / "trackers" / "experiment" / "ssopd-initial-s0.jsonl"


class RunFailed(RuntimeError):
    pass


# The reward workers' math-verify budget (ssopd_verl.evaluation.grading): a loaded CI machine must not turn a grade
# into a timeout (the runs assert reward/grading_timeout == 0). Ray workers inherit the driver's environment.
GRADING_ENV = {"SSOPD_GRADING_TIMEOUT_S": "600"}


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}  # the +platform=cpu overlay selects it
    env.update(GRADING_ENV)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(cmd)}\nexited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")


def main_ppo(workdir: Path, *overrides: str) -> None:
    """The main job in ``workdir`` (verl's file logger writes under it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=ssopd", "+platform=cpu", "+tiny=default",
        f"trainer.project_name={PROJECT}", f"trainer.experiment_name={EXPERIMENT}",
        f"trainer.default_local_dir={workdir / 'checkpoints'}", *overrides,
    ]  # fmt: skip
    run(cmd, workdir, workdir / "main_ppo.log")


def tracker(path: Path) -> dict[int, dict]:
    """verl's `file` logger: one JSON line {step, data} per log call; merged per step."""
    steps: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], {}).update(row["data"])
    return steps


LAUNCH = REPO / "scripts" / "launch"
LAUNCH_SCRIPTS = [f"qwen3_{size}_{method}" for size in ("1.7b", "4b", "8b") for method in ("grpo", "opsd", "ssopd")]
# one rollout replica over both ranks: it samples what the one-rank run samples (ssopd_verl.cpu.rollout)
TWO_RANKS = ("trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.tensor_model_parallel_size=2")
ULYSSES = ("actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",
           "actor_rollout_ref.model.override_config.attn_implementation=ulysses_sdpa")  # fmt: skip


def metrics(root: Path) -> dict:
    """What the runs logged, by step: {"main", "resumed", "experiment", "dp2", "sp2", "vllm", "launch": {script: ...}}."""
    return {
        "main": tracker(root / "a" / PROJECT / f"{EXPERIMENT}.jsonl"),
        "resumed": tracker(root / "c" / PROJECT / f"{EXPERIMENT}.jsonl"),
        "experiment": tracker(root / EXPERIMENT_TRACKER),
        "dp2": tracker(root / "b" / PROJECT / f"{EXPERIMENT}.jsonl"),
        "sp2": tracker(root / "s" / PROJECT / f"{EXPERIMENT}.jsonl"),
        "launch": {name: tracker(root / "launch" / "logs" / "ssopd" / f"{name}.jsonl") for name in LAUNCH_SCRIPTS},
        "vllm": tracker(root / "v" / PROJECT / f"{EXPERIMENT}.jsonl"),
    }


def launch_script(root: Path, name: str) -> None:
    """One of the nine launch scripts, shrunk for CPU (CPU_SMOKE=1), from a directory of its own."""
    workdir = root / "launch" / name
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    env.update(CPU_SMOKE="1", PYTHON=sys.executable, LOG_DIR=str(root / "launch" / "logs"),
               CKPT_ROOT=str(root / "launch" / "checkpoints"), **GRADING_ENV)  # fmt: skip
    proc = subprocess.run(["bash", str(LAUNCH / f"{name}.sh"), f"hydra.run.dir={workdir / 'hydra'}"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    (workdir / "main_ppo.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RunFailed(f"{name} (CPU_SMOKE=1) exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")


def run_all(root: Path) -> None:
    from ssopd_verl.tiny_default import build_tiny_default

    build_tiny_default()  # cached after the first time; under the cache's file lock
    main_ppo(root / "a", "trainer.total_training_steps=3", "trainer.save_freq=2", "trainer.test_freq=2",
             "trainer.val_before_train=true", "actor_rollout_ref.rollout.seed=0")  # the experiment's seed 0
    checkpoints = root / "c" / "checkpoints"  # a fresh directory holding only A's step-2 checkpoint
    shutil.copytree(root / "a" / "checkpoints" / "global_step_2", checkpoints / "global_step_2")
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("2")
    main_ppo(root / "c", "trainer.total_training_steps=3", "trainer.save_freq=-1", "trainer.test_freq=-1",
             "trainer.val_before_train=false", "trainer.resume_mode=auto", "actor_rollout_ref.rollout.seed=0")
    for name, extra in (("b", ()), ("s", ULYSSES)):
        main_ppo(root / name, "trainer.total_training_steps=2", "trainer.save_freq=-1", "trainer.test_freq=-1",
                 "trainer.val_before_train=false", "actor_rollout_ref.rollout.seed=0", *TWO_RANKS, *extra)  # fmt: skip
    for name in LAUNCH_SCRIPTS:
        launch_script(root, name)
    (root / "e").mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(REPO / "scripts" / "experiment_cpu.py"), "--out", str(root / "e"),
         "--methods", "ssopd-initial", "--lora-rank", "8", "--seeds", "1", "--steps", "2", "--test-freq", "2",
         "--doc", str(root / "evidence.md"), "ssopd.max_distill_tokens=16", "actor_rollout_ref.actor.use_dynamic_bsz=true",
         f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={TOKEN_BUDGET}"], root / "e", root / "e" / "experiment.log")  # fmt: skip
    main_ppo(root / "v", "actor_rollout_ref.rollout.name=vllm", "trainer.total_training_steps=2", "trainer.save_freq=2",
             "trainer.test_freq=2", "trainer.val_before_train=true")  # fmt: skip


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_all(out)
    except RunFailed as error:
        (out / "failure.txt").write_text(str(error))
        sys.exit(1)
