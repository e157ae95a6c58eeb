"""The real runs behind tests/test_e2e_cpu.py, as one command: ``python tests/e2e_runs.py ROOT``.

In two chains side by side (this process: V, A, C, B, S, two launch scripts and the kit; a second process with its
own Ray instance: E, the other seven launch scripts, M1 and M4), so that both cores have work once the other tests
are done; V first in its chain, so that no other engine's lines can reach its log:

* V, the main job with verl's vLLM rollout (``actor_rollout_ref.rollout.name=vllm``, vLLM's CPU wheel): validation,
  2 steps, a checkpoint at step 2.
* A, the README's main job: validation, 3 steps, a checkpoint at step 2 (and at the end), a token view at step 2.
* C resumes from A's step-2 checkpoint alone, in a fresh directory, for step 3.
* Two ranks (``trainer.n_gpus_per_node=2``), 1 step each (the update, then the weights' sync to the rollout), one rollout replica over both ranks (rollout tensor
  parallel 2, so that they sample what the one-rank run A samples): B, data parallel 2 with the recipe's defaults;
  S, Ulysses sequence parallel 2.
* L, the nine launch scripts shrunk for CPU (``CPU_SMOKE=1``, ``scripts/launch/common.sh``), one step each, two
  ranks: dynamic batching with a budget that gives rows micro-batches of their own, LoRA with the initial teacher
  and a distillation horizon (SETUP=reported), parameter and optimizer offload on the 8B scripts. Each script
  composes its overrides itself (``DRY_RUN=args``: the exact argument list it would ``exec`` main_ppo with);
  they are run as written.
* M1 and M4, the main job's step 1 at learning rate 0 with one and with four mini-batches (ppo_mini_batch_size 8
  and 2 prompts): the policy cannot move inside the step, so every ``ssopd/*`` and ``degeneration/*`` metric must
  read the same.
* The kit (K): two shrunk launch scripts that train 2 steps and save, with greedy validation on all 128
  validation problems: ``kit_lora`` (SETUP=reported: LoRA, the initial teacher, a distillation horizon; two ranks)
  and ``kit_full`` (SETUP=full: full fine-tuning, the live teacher; one rank). Each final checkpoint is then
  evaluated by ``scripts/evaluate.py`` (vLLM backend, greedy, on the validation parquet: the trainer's own prompts)
  into ``ROOT/kit/<run>-eval``, and ``scripts/report.py`` builds the table and curves of both into
  ``ROOT/kit/report``.
* E, the experiment command (``scripts/experiment_cpu.py``) at 2 steps for ``ssopd-initial`` (LoRA, initial
  teacher, a distillation horizon), with dynamic batching that counts the teacher tokens: a process of its own
  (the runner starts its own Ray, with its own tracker folder), started alongside the others.

All runs but E go through ``main_ppo`` in their chain's process with one Ray instance
(:func:`ssopd_verl.glue.in_process.main_ppo`: Hydra's composition and start-up callbacks, verl's ``run_ppo``, fresh
actors per run): a run spends ~30 s importing verl and starting Ray, once here. Every run's Ray workers are forked
from a process that has imported verl (:func:`forked_workers`, ``tests/fork_server.py``): a launch script's
run takes ~35 s instead of ~2 minutes, ~15 s of imports saved on each of its ~10 actors. They therefore
share ``ray_kwargs`` (:data:`SHARED`: two logical GPUs, so that the two-rank runs fit; the file tracker's root).

Each run writes its log to ``ROOT/<run>.log`` (runs: v, a, c, b, s, e and the launch scripts' names) and verl's file tracker to ``ROOT/logs/<project>/<run>.jsonl``; a
failed run writes ``ROOT/failed/<run>.txt`` (the error and the log's tail) and the others still run, so that each
test reports its own run. ``tests/conftest.py`` starts this in a background process when the e2e tests are
collected (after building the tiny default), so that the runs overlap the other tests instead of following them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = "ssopd-tiny"
REUSE_ENV = "SSOPD_E2E_ROOT"  # tests/test_e2e_cpu.py reads the runs already in this folder instead of running them
TOKEN_BUDGET = 512  # E's dynamic-batching budget (ppo_max_token_len_per_gpu), teacher tokens included
EXPERIMENT_TRACKER = Path("e") / "trackers" / "experiment" / "ssopd-initial-s0.jsonl"
LAUNCH = REPO / "scripts" / "launch"
LAUNCH_SCRIPTS = [f"qwen3_{size}_{method}" for size in ("1.7b", "4b", "8b") for method in ("grpo", "opsd", "ssopd")]
LAUNCH_PROJECT = "ssopd"  # the launch scripts' PROJECT_NAME; each run is named after its script
# one rollout replica over both ranks: it samples what the one-rank run samples (ssopd_verl.cpu.rollout)
TWO_RANKS = ("trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.tensor_model_parallel_size=2")
ULYSSES = ("actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",
           "actor_rollout_ref.model.override_config.attn_implementation=ulysses_sdpa")  # fmt: skip
# The reward workers' math-verify budget (ssopd_verl.evaluation.grading): a loaded CI machine must not turn a grade
# into a timeout (the runs assert reward/grading_timeout == 0); one grading process per reward worker instead of 4
# (each imports sympy; a step grades 64 short answers). Ray workers inherit the driver's environment.
GRADING_ENV = {"SSOPD_GRADING_TIMEOUT_S": "600", "SSOPD_GRADING_WORKERS": "1"}


def forked_workers(root: Path) -> list[str]:
    """Ray workers forked from a process that has imported verl (tests/fork_server.py): a run's ~10 actors
    start in ~1 s each instead of ~15 s of imports; the code they run is the same."""
    from fork_client import runtime_env_overrides

    return runtime_env_overrides(root / "fork")


def shared_ray_kwargs(root: Path) -> tuple[str, ...]:
    """What every run of this process passes, because one Ray instance serves them all: 2 logical GPUs (the
    CPU overlay's default is one per rank of *this* run), the file tracker's root (as the launch scripts set
    it, from $LOG_DIR) and the forked workers."""
    return ("ray_kwargs.ray_init.num_gpus=2",
            f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_ROOT={root / 'logs'}",
            *forked_workers(root))  # fmt: skip


def main_job(root: Path, name: str, *overrides: str) -> list[str]:
    """The README's main job, named ``name`` (its tracker: ROOT/logs/ssopd-tiny/<name>.jsonl)."""
    return ["+recipe=ssopd", "+platform=cpu", "+tiny=default", f"trainer.project_name={PROJECT}",
            f"trainer.experiment_name={name}", f"trainer.default_local_dir={root / name / 'checkpoints'}",
            *overrides, *shared_ray_kwargs(root)]  # fmt: skip


def launch_script_overrides(root: Path, name: str, knobs: dict | None = None, extra: tuple = ()) -> list[str]:
    """The Hydra overrides one of the nine launch scripts runs main_ppo with, shrunk for CPU (CPU_SMOKE=1), with
    ``knobs`` in its environment and ``extra`` overrides after its own (as a user's command-line arguments)."""
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    env.update(CPU_SMOKE="1", DRY_RUN="args", LOG_DIR=str(root / "logs"), CKPT_ROOT=str(root / "launch"))
    env.update(knobs or {})
    proc = subprocess.run(["bash", str(LAUNCH / f"{name}.sh"), *extra], env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip
    overrides = proc.stdout.splitlines()
    return [*overrides, "ray_kwargs.ray_init.num_gpus=2", *forked_workers(root)]


def kit_checkpoint(root: Path, run: str) -> Path:
    return root / "launch" / LAUNCH_PROJECT / run / f"global_step_{KIT_STEPS}"


def run_kit(root: Path) -> None:
    """K: train and save (each kit run), evaluate each checkpoint with evaluate.py (vLLM, greedy, the validation
    parquet), then report.py over both; a failure is written down under the run's or step's name."""
    from ssopd_verl.tiny_default import get_tiny_default

    val_file = get_tiny_default().val_file
    for run, (script, knobs) in KIT_RUNS.items():
        knobs = {**KIT_ENV, **knobs, "EXPERIMENT_NAME": run}
        run_in_process(root, run, launch_script_overrides(root, script, knobs, KIT_OVERRIDES))
    evals = []
    for run in KIT_RUNS:
        out = root / "kit" / f"{run}-eval"
        evals.append(f"{run}={out}")
        if failure(root, run) is not None:
            continue
        run_command(root, f"{run}-eval", [
            sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model", str(kit_checkpoint(root, run)),
            "--benchmarks", val_file, "--n", "1", "--temperature", "0", "--max-new-tokens", str(KIT_MAX_NEW_TOKENS),
            "--backend", "vllm", "--dtype", "float32", "--out", str(out), "--n-boot", "200"])  # fmt: skip
    trackers = [f"{run}={root / 'logs' / LAUNCH_PROJECT / f'{run}.jsonl'}" for run in KIT_RUNS]
    run_command(root, "kit-report", [sys.executable, str(REPO / "scripts" / "report.py"), "--out",
                                     str(root / "kit" / "report"), "--benchmarks", Path(val_file).stem,
                                     "--eval", *evals, "--tracker", *trackers])  # fmt: skip


def run_command(root: Path, name: str, command: list[str]) -> None:
    """A command of the kit, its output in ROOT/<name>.log; a non-zero exit is written down as the name's failure."""
    log = root / f"{name}.log"
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=root).returncode
    if code != 0:
        (root / "failed").mkdir(exist_ok=True)
        tail = log.read_text(errors="replace")[-6000:]
        (root / "failed" / f"{name}.txt").write_text(f"{' '.join(command)}\nexited {code}\n--- log tail ---\n{tail}")
    (root / f"{name}.done").touch()
    print(f"{name}: {'FAILED' if code else 'ok'}", flush=True)


def run_mini_batch_pair(root: Path) -> None:
    """M1 and M4: step 1 of the main job at learning rate 0, one mini-batch and four."""
    for name, prompts in MINI_BATCH_RUNS.items():
        run_in_process(root, name, main_job(root, name, "trainer.total_training_steps=1", "trainer.save_freq=-1",
                       "trainer.test_freq=-1", "trainer.val_before_train=false", "actor_rollout_ref.rollout.seed=0",
                       "actor_rollout_ref.actor.optim.lr=0", f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
                       "ssopd.token_view_every=0"))  # fmt: skip


# The kit runs: (launch script, its knobs); the rest of KIT_ENV and KIT_OVERRIDES apply to both. The learning rates
# are high enough to move the tiny default's greedy validation by many problems in 2 steps (the test needs a
# trained checkpoint that scores unlike the base model).
KIT_RUNS = {
    "kit_lora": ("qwen3_1.7b_ssopd", {"SETUP": "reported", "LR": "1e-2"}),
    "kit_full": ("qwen3_1.7b_ssopd", {"SETUP": "full", "LR": "2e-3", "N_GPUS_PER_NODE": "1"}),
}
KIT_STEPS = 2
KIT_ENV = {"TOTAL_STEPS": str(KIT_STEPS), "SAVE_FREQ": str(KIT_STEPS), "TEST_FREQ": str(KIT_STEPS), "VAL_N": "1"}
# greedy validation on every validation problem: one score per checkpoint, comparable with evaluate.py's
KIT_OVERRIDES = ("data.val_max_samples=-1", "actor_rollout_ref.rollout.val_kwargs.do_sample=False",
                 "actor_rollout_ref.rollout.val_kwargs.temperature=0",
                 "actor_rollout_ref.rollout.val_kwargs.top_p=1.0")  # fmt: skip
KIT_MAX_NEW_TOKENS = 48  # CPU_SMOKE's MAX_RESPONSE_LENGTH
MINI_BATCH_RUNS = {"m1": 8, "m4": 2}  # run -> ppo_mini_batch_size (prompts) on the main job's 8 prompts


def tracker(path: Path) -> dict[int, dict]:
    """verl's `file` logger: one JSON line {step, data} per log call; merged per step."""
    steps: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], {}).update(row["data"])
    return steps


def failure(root: Path, name: str):
    path = root / "failed" / f"{name}.txt"
    return path.read_text() if path.exists() else None


def metrics(root: Path, name: str) -> dict[int, dict]:
    """What run ``name`` logged, by step; raises with the run's error when it failed."""
    error = failure(root, name)
    if error is not None:
        raise AssertionError(f"run {name} failed:\n{error}")
    if name == "e":
        return tracker(root / EXPERIMENT_TRACKER)
    project = LAUNCH_PROJECT if name in LAUNCH_SCRIPTS or name in KIT_RUNS else PROJECT
    return tracker(root / "logs" / project / f"{name}.jsonl")


def run_in_process(root: Path, name: str, overrides: list[str]) -> None:
    """One main_ppo run in this process; its failure is written down, not raised."""
    from ssopd_verl.glue.in_process import main_ppo, output_to

    log = root / f"{name}.log"
    try:
        with output_to(log):
            print("main_ppo " + " ".join(overrides), flush=True)
            main_ppo(overrides)
            wait_for_text(log, PROGRESS_DONE)
    except Exception:  # noqa: BLE001 - every run is reported by its own test
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        (root / "failed").mkdir(exist_ok=True)
        (root / "failed" / f"{name}.txt").write_text(f"{traceback.format_exc()}\n--- log tail ---\n{tail}")
    (root / f"{name}.done").touch()
    print(f"{name}: {'FAILED' if failure(root, name) else 'ok'}", flush=True)


# verl's progress bar at the end of training, printed by the TaskRunner: Ray forwards a worker's lines to this
# process asynchronously, so a run's last lines may arrive after main_ppo returned
PROGRESS_DONE = "Training Progress: 100%"


def wait_for_text(path: Path, text: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)


def start_experiment(root: Path) -> subprocess.Popen:
    """E in a process of its own (see the module docstring)."""
    (root / "e").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "scripts" / "experiment_cpu.py"), "--out", str(root / "e"),
               "--methods", "ssopd-initial", "--lora-rank", "8", "--seeds", "1", "--steps", "2", "--test-freq", "2",
               "--doc", str(root / "evidence.md"), "ssopd.max_distill_tokens=16",
               "actor_rollout_ref.actor.use_dynamic_bsz=true",
               f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={TOKEN_BUDGET}", *forked_workers(root)]  # fmt: skip
    log = open(root / "e.log", "w")
    return subprocess.Popen(command, cwd=root / "e", stdout=log, stderr=subprocess.STDOUT)


def finish_experiment(root: Path, proc: subprocess.Popen) -> None:
    code = proc.wait(timeout=3600)
    if code != 0:
        (root / "failed").mkdir(exist_ok=True)
        tail = (root / "e.log").read_text(errors="replace")[-6000:]
        (root / "failed" / "e.txt").write_text(f"scripts/experiment_cpu.py exited {code}\n--- log tail ---\n{tail}")
    (root / "e.done").touch()
    print(f"e: {'FAILED' if code else 'ok'}", flush=True)


def prepare_process() -> None:
    from ssopd_verl.tiny_default import get_tiny_default

    os.environ.pop("VERL_PLATFORM", None)  # the +platform=cpu overlay selects it (in Ray's runtime env)
    os.environ.update(GRADING_ENV)
    # Ray lowers its workers' priority to nice 15 (RAY_worker_niceness): beside the other tests (nice 0) the runs
    # would get the cores only when those tests leave them idle, and end long after them
    os.environ.setdefault("RAY_worker_niceness", "0")
    get_tiny_default()  # the shipped copy, its files' hashes checked


# The chains' shares of the launch scripts: about the same time each (both chains side by side on an idle 2-core
# machine: V, A, C, B, S 5.3 min, E 2.2 min, a launch script ~20-35 s; the chains ended 30 s apart)
FIRST_CHAIN_SCRIPTS, SECOND_CHAIN_SCRIPTS = LAUNCH_SCRIPTS[7:], LAUNCH_SCRIPTS[:7]


def run_second_chain(root: Path) -> None:
    """E, seven of the launch scripts, M1 and M4 (in this process, with its own Ray instance)."""
    prepare_process()
    finish_experiment(root, start_experiment(root))
    for name in SECOND_CHAIN_SCRIPTS:
        run_in_process(root, name, launch_script_overrides(root, name))
    run_mini_batch_pair(root)


def run_all(root: Path) -> None:
    """Two chains side by side, so that both cores have work once the other tests are done: this process runs V,
    A, C, B, S, two launch scripts and the kit; a second process (its own Ray instance) runs E, the other seven
    launch scripts, M1 and M4."""
    prepare_process()
    second = subprocess.Popen([sys.executable, __file__, str(root), "--second-chain"])
    # V first: its log must hold vLLM's lines and no other engine's (a run's last forwarded lines can reach the
    # next run's log)
    run_in_process(root, "v", main_job(root, "v", "actor_rollout_ref.rollout.name=vllm",
                   "trainer.total_training_steps=2", "trainer.save_freq=2", "trainer.test_freq=2",
                   "trainer.val_before_train=true"))  # fmt: skip
    run_in_process(root, "a", main_job(root, "a", "trainer.total_training_steps=3", "trainer.save_freq=2",
                   "trainer.test_freq=2", "trainer.val_before_train=true", "actor_rollout_ref.rollout.seed=0"))  # fmt: skip
    if failure(root, "a") is None:
        checkpoints = root / "c" / "checkpoints"  # a fresh directory holding only A's step-2 checkpoint
        shutil.copytree(root / "a" / "checkpoints" / "global_step_2", checkpoints / "global_step_2")
        (checkpoints / "latest_checkpointed_iteration.txt").write_text("2")
        run_in_process(root, "c", main_job(root, "c", "trainer.total_training_steps=3", "trainer.save_freq=-1",
                       "trainer.test_freq=-1", "trainer.val_before_train=false", "trainer.resume_mode=auto",
                       "actor_rollout_ref.rollout.seed=0"))  # fmt: skip
    for name, extra in (("b", ()), ("s", ULYSSES)):
        run_in_process(root, name, main_job(root, name, "trainer.total_training_steps=1", "trainer.save_freq=-1",
                       "trainer.test_freq=-1", "trainer.val_before_train=false", "actor_rollout_ref.rollout.seed=0",
                       *TWO_RANKS, *extra))  # fmt: skip
    for name in FIRST_CHAIN_SCRIPTS:
        run_in_process(root, name, launch_script_overrides(root, name))
    run_kit(root)
    code = second.wait()
    for name in ["e", *LAUNCH_SCRIPTS, *MINI_BATCH_RUNS]:  # a run the second process never reported (it died) fails its test
        if code != 0 and failure(root, name) is None and not (root / f"{name}.done").exists():
            (root / "failed").mkdir(exist_ok=True)
            (root / "failed" / f"{name}.txt").write_text(f"the second chain's process exited with {code}")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # whatever a run writes relative to its working directory stays with the runs
    if sys.argv[2:] == ["--second-chain"]:
        run_second_chain(out.resolve())
    elif sys.argv[2:3] == ["--only"]:  # e.g. --only kit,mini: those groups alone, in this process (debugging)
        prepare_process()
        groups = {"kit": run_kit, "mini": run_mini_batch_pair}
        for group in sys.argv[3].split(","):
            groups[group](out.resolve())
    else:
        run_all(out.resolve())
