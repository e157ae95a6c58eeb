"""The real trainer end to end on CPU: `python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default`.

Everything runs for real: Hydra + our overlays, Ray, TransferQueue, the agent loop with our transformers rollout
backend, verl's reward loop with the bounded grader, the SSOPD trainer, worker and loss, checkpointing and resume.
The embedded tiny default (built once into the user cache) gives mixed groups, so SSOPD has pairs.

The runs (``tests/e2e_runs.py``: all but E in one process with one Ray instance, E alongside in its own;
``conftest.py`` starts them in the background at collection, so that they overlap the other tests) share the
work of several checks:

* A, the README's main job (full fine-tuning, live teacher): validation, 3 steps, a checkpoint at step 2 (and at
  the end), a token view at step 2.
* C resumes from A's step-2 checkpoint alone, in a fresh directory, and must log A's step 3: the rollout's samples
  are a pure function of (seed, step, request) (``ssopd_verl.cpu.rollout``), the checkpoint holds the weights, the
  optimizer and the dataloader position, and the trainer orders a step's rows by content, so every metric is
  equal, the losses and the gradient norm to the bit.
* E, the experiment command (`scripts/experiment_cpu.py`) at 2 steps for `ssopd-initial`: the reported setup's
  shape (LoRA actor merged into the rollout's weights; ``ssopd.teacher=initial``, the base model with the adapters
  disabled; ``ssopd.max_distill_tokens``), with dynamic batching that counts the teacher tokens. LoRA starts as
  the identity (B = 0), so with A's seed its step 1 samples exactly what A's step 1 sampled, and its step-0
  validation scores the start checkpoint exactly as A's did.
* B and S, two ranks (data parallel 2 with the recipe's defaults; Ulysses sequence parallel 2) with one rollout
  replica over both, so that their step 1 samples A's step 1: every ssopd/* metric must read what A's reads.
* L, the nine launch scripts, shrunk for CPU (``CPU_SMOKE=1``), one step each on two ranks.
* V, the main job with verl's vLLM rollout and weight sync (``actor_rollout_ref.rollout.name=vllm`` on vLLM's CPU
  wheel) for 2 steps: what A asserts, plus the weights vLLM samples with at step 2 are the actor's weights after the
  step-1 update (vLLM's log-probs equal the actor's recomputed ones).
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import e2e_runs
from e2e_runs import LAUNCH_SCRIPTS, TOKEN_BUDGET

# decided by the samples alone: must be equal between runs that sampled the same completions
SAMPLE_METRICS = ("ssopd/pairs", "ssopd/frontier_frac", "ssopd/witness_len_mean", "ssopd/target_len_mean",
                  "ssopd/teacher_len_mean", "critic/score/mean", "critic/score/min", "critic/score/max",
                  "response_length/mean", "response_length/max", "response_length/min")  # fmt: skip
# Means of per-token terms of order 1 that nearly cancel: a different order of the float32 sums would move them by
# ~1e-8; the trainer sorts a step's rows by content, so the same samples give the same bits.
LOSS_METRICS = ("actor/pg_loss", "ssopd/distill_loss", "actor/grad_norm", "actor/entropy")
# Means over the distilled positions, the same whatever the layout (sums and counts, ssopd_verl.glue.actor_loss)
POSITION_MEANS = ("ssopd/kl_unclipped", "ssopd/clipped_teacher_mass", "ssopd/teacher_logp_sampled",
                  "ssopd/student_logp_sampled", "ssopd/teacher_argmax_differs", "ssopd/teacher_argmax_reversed",
                  "ssopd/reversed_teacher_mass")  # fmt: skip
SHARES = ("ssopd/frontier_frac", "ssopd/teacher_argmax_differs", "ssopd/clipped_teacher_mass",
          "ssopd/teacher_argmax_reversed", "ssopd/reversed_teacher_mass", "ssopd/truncated_frac",
          "degeneration/length_limit_frac", "degeneration/repetition_loop_frac")  # fmt: skip


def assert_shares_in_unit_interval(metrics: dict) -> None:
    for key in SHARES:
        if key in metrics:
            assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])


def validation(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("val-core/") and "/acc/" in k}


def assert_same_samples(want: dict, got: dict, ignore: tuple = ()) -> None:
    assert want["ssopd/pairs"] >= 1  # the step had something to distil: the comparison is not vacuous
    for key in set(SAMPLE_METRICS) - set(ignore):
        assert got[key] == want[key], (key, want[key], got[key])


class Runs:
    """The runs of tests/e2e_runs.py, by name (v, a, c, b, s, e and the launch scripts'): ``runs[name]`` is what
    the run logged, by step; a failed run's test fails with the run's error."""

    def __init__(self, root):
        self.root = root

    def __getitem__(self, name: str) -> dict:
        return e2e_runs.metrics(self.root, name)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Started in the background by conftest.py at collection (waited for here), or run here when nothing started
    them; with SSOPD_E2E_ROOT set, the runs an earlier ``python tests/e2e_runs.py ROOT`` left there (to re-check
    the assertions without running anything)."""
    background = getattr(request.config, "_e2e_runs", None)
    if os.environ.get(e2e_runs.REUSE_ENV):
        root = Path(os.environ[e2e_runs.REUSE_ENV])
    elif background is None:
        root = tmp_path_factory.mktemp("e2e")
        subprocess.run([sys.executable, e2e_runs.__file__, str(root)], check=True)
    else:
        proc, root = background
        proc.wait(timeout=3600)
        assert proc.returncode == 0, f"the e2e runner itself failed: see {root / 'runs.log'}"
    return Runs(root)


def test_main_job_logs_pairs_distillation_validation_and_checkpoints(runs):
    steps, root = runs["a"], runs.root
    assert {0, 1, 2, 3} <= set(steps)
    for step in (1, 2, 3):
        ssopd = {k: v for k, v in steps[step].items() if k.startswith("ssopd/")}
        assert all(math.isfinite(v) for v in ssopd.values()), ssopd
        assert ssopd["ssopd/pairs"] >= 1 and ssopd["ssopd/frontier_frac"] > 0
        # distilled: the pointwise-clipped loss can be slightly negative (only positive entries are capped)
        assert ssopd["ssopd/distill_loss"] != 0 and ssopd["ssopd/kl_unclipped"] > 0
        for key in ("ssopd/kl_unclipped", "ssopd/clipped_teacher_mass", "ssopd/witness_len_mean",
                    "ssopd/target_len_mean", "ssopd/witness_truncations", "ssopd/teacher_logp_sampled",
                    "ssopd/student_logp_sampled", "ssopd/teacher_argmax_differs", "timing_s/ssopd_teacher"):  # fmt: skip
            assert key in steps[step], key
        assert "actor/pg_loss" in steps[step]
        # the grader's flags, counted per training step (verl logs them for validation only)
        assert steps[step]["reward/grading_timeout"] == steps[step]["reward/grading_error"] == 0
        assert "reward/grading_skipped" in steps[step]
    assert validation(steps[0]) and validation(steps[2])  # before training and at test_freq
    # the console: one compact line per step (ssopd_verl.console), validation in the lines of validated steps
    log = re.sub(r"\x1b\[[0-9;]*m", "", runs.log("a"))
    lines = [line.split(") ", 1)[-1] for line in log.splitlines() if re.search(r"ssopd +\[[#-]+\] +\d/3 ", line)]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"], lines
    assert all(" reward " in line and " pairs " in line and " teacher-student " in line for line in lines)
    assert " val " in lines[1] and " val " not in lines[0]
    assert "ssopd validation at step 0: accuracy" in log
    assert (root / "a" / "checkpoints" / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").exists()
    assert (root / "a" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_token_view_of_step_two(runs):
    """The tiny default asks for a token view every 2 steps (ssopd.token_view_every): step 2's page holds up to
    4 distilled targets, each with its tokens coloured by loss and the teacher's prompt beside them."""
    root = runs.root
    pages = sorted((root / "a" / "checkpoints" / "token_view").glob("*.html"))
    assert [p.name for p in pages] == ["step_000002.html"]
    page = pages[0].read_text()
    assert 1 <= page.count('<div class="record"') <= 4
    assert "The teacher's prompt (problem, template and witness" in page
    assert "Here is a reference solution to this problem" in page  # the template, in the teacher's prompt
    assert "boxed{" in page  # the witness's answer
    assert "reward target 0.0000 / witness 1.0000" in page  # a wrong target, a correct witness
    assert '<span class="t' in page and 'style="background:rgb(' in page  # tokens coloured by their loss
    assert "ssopd: token view of step 2:" in runs.log("a")


def test_resumed_step_three_equals_the_uninterrupted_one(runs):
    main, resumed = runs["a"], runs["c"]
    assert sorted(s for s, data in resumed.items() if "ssopd/pairs" in data) == [3]  # it really resumed
    assert_same_samples(main[3], resumed[3])
    for key in LOSS_METRICS:
        assert resumed[3][key] == main[3][key], (key, main[3][key], resumed[3][key])


def test_experiment_command_with_lora_initial_teacher_and_a_distillation_horizon(runs):
    main, lora = runs["a"], runs["e"]
    assert validation(lora[0]) == validation(main[0])  # greedy on all 128 problems: one score per checkpoint
    # LoRA starts as the identity: the same seed samples the same step 1 (the teacher sequences are shorter: their
    # targets are cut to 16 tokens)
    assert_same_samples(main[1], lora[1], ignore=("ssopd/teacher_len_mean",))
    assert lora[1]["ssopd/teacher_len_mean"] < main[1]["ssopd/teacher_len_mean"]
    # the PPO loss is the same too (same samples, same log-probs): the LoRA actor's forward equals the full one's
    assert math.isclose(lora[1]["actor/pg_loss"], main[1]["actor/pg_loss"], rel_tol=1e-5, abs_tol=1e-6)
    # at step 1 the initial teacher is the live one: the same targets, cut to their first 16 tokens
    assert lora[1]["ssopd/distilled_tokens"] <= 16 * lora[1]["ssopd/pairs"] < main[1]["ssopd/distilled_tokens"]
    assert lora[1]["ssopd/distill_loss"] != 0 and lora[2]["ssopd/kl_unclipped"] > 0
    # E batches dynamically: no micro-batch's student + teacher tokens exceed the budget (A: one micro-batch)
    assert lora[1]["ssopd/micro_batch_tokens_max"] <= TOKEN_BUDGET < main[1]["ssopd/micro_batch_tokens_max"]
    assert validation(lora[2])
    text = (runs.root / "evidence.md").read_text()
    assert "| ssopd-initial | 1 |" in text and (runs.root / "e" / "figures" / "val_acc.png").exists()


@pytest.mark.parametrize("layout", ["b", "s"], ids=["dp2", "sp2"])
def test_two_ranks_log_what_one_rank_logs_on_the_same_batch(runs, layout):
    """B (data parallel 2, the recipe's defaults: it crashed at the first update before) and S (Ulysses sequence
    parallel 2) sample what the one-rank main job A samples at step 1 (one rollout replica), so every ssopd/*
    metric of that step must read the same: the sample-derived ones exactly, the losses and the per-position means
    to fp32 summation order (rel 1e-4: the micro-batches and their packing differ)."""
    one, two = runs["a"], runs[layout]
    assert sorted(s for s, data in two.items() if "ssopd/pairs" in data) == [1]
    assert_same_samples(one[1], two[1])
    for key in LOSS_METRICS + POSITION_MEANS + ("ssopd/teacher_nonfinite", "degeneration/repetition_loop_frac"):
        assert math.isclose(two[1][key], one[1][key], rel_tol=1e-4, abs_tol=1e-6), (key, one[1][key], two[1][key])
    ssopd = {k: v for k, v in two[1].items() if k.startswith(("ssopd/", "degeneration/"))}
    assert all(math.isfinite(v) for v in ssopd.values()), ssopd
    assert ssopd["ssopd/pairs"] >= 1 and ssopd["ssopd/distill_loss"] != 0
    assert "timing_s/update_weights" in two[1]  # the updated weights reached the rollout replica over both ranks
    assert_shares_in_unit_interval(two[1])
    assert_shares_in_unit_interval(one[1])


@pytest.mark.parametrize("name", LAUNCH_SCRIPTS)
def test_launch_script_runs_shrunk_on_two_cpu_ranks(runs, name):
    """Each launch script through main_ppo on two CPU ranks (CPU_SMOKE=1: only what cannot run on CPU substituted;
    its dynamic batching, LoRA + initial teacher + distillation horizon, offload on the 8B scripts kept): validation
    before training and one step with the method's terms."""
    steps = runs[name]
    assert validation(steps[0]) and 1 in steps
    step = steps[1]
    assert math.isfinite(step["actor/pg_loss"]) and step["ssopd/groups"] == 4  # CPU_SMOKE: 4 prompts
    assert_shares_in_unit_interval(step)
    if name.endswith("_grpo"):  # ssopd.lambda=0: GRPO through the same trainer, nothing distilled
        assert "ssopd/distill_loss" not in step
        return
    assert step["ssopd/pairs"] >= 1 and math.isfinite(step["ssopd/distill_loss"]) and step["ssopd/distill_loss"] != 0
    assert step["ssopd/distilled_tokens"] <= 16 * step["ssopd/pairs"]  # the shrunk distillation horizon


# verl's `training/rollout_probs_diff_max`: the largest |p_rollout - p_actor| over the step's response tokens, the
# rollout's probability of each sampled token against the actor's recomputation (old_log_probs) with the weights it
# just synced. Measured with vLLM on CPU, both in fp32: ~5e-6 (rollout_corr/kl ~5e-8). Negative control (a one-off
# run whose vLLM worker dropped every sync after the first, docs/vllm_cpu.md): at step 2, 0.18 (kl 3e-4).
SYNC_TOLERANCE = 1e-4


def test_vllm_rollout_run_trains_validates_checkpoints_and_samples_with_the_synced_weights(runs):
    steps, main, root = runs["v"], runs["a"], runs.root
    assert {0, 1, 2} <= set(steps)
    for step in (1, 2):
        ssopd = {k: v for k, v in steps[step].items() if k.startswith("ssopd/")}
        assert all(math.isfinite(v) for v in ssopd.values()), ssopd
        assert ssopd["ssopd/pairs"] >= 1 and ssopd["ssopd/distill_loss"] != 0 and ssopd["ssopd/kl_unclipped"] > 0
        assert steps[step]["training/rollout_probs_diff_max"] < SYNC_TOLERANCE, steps[step]
        assert abs(steps[step]["rollout_corr/kl"]) < 1e-6, steps[step]  # measured ~1e-7
    assert validation(steps[0]) and validation(steps[2])
    # the same start checkpoint, greedy, fp32 in both engines: vLLM scores it as the hf rollout does, up to a near
    # tie that vLLM's batch composition (which requests share a forward) may flip: at most 2 of the 128 problems
    for key, value in validation(main[0]).items():
        assert abs(validation(steps[0])[key] - value) <= 2 / 128, (key, value, validation(steps[0])[key])
    log = runs.log("v")
    assert "vLLMHttpServer" in log and "HFRolloutServer" not in log  # vLLM served the run; no other engine did
    assert (root / "v" / "checkpoints" / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").exists()


# The per-step ssopd/* keys that hold an average over the step (every other ssopd/* key is a count, a share, a
# mean or a total of the step, which the mini-batch split must not change). distill_loss is verl's
# mean-over-mini-batches of each mini-batch's `sum_g w L_g / G` (as actor/pg_loss): the same at learning rate 0
# too, since each mini-batch's G is its own prompt count.
TIMINGS = ("timing_s/ssopd_teacher", "ssopd/teacher_time_share")


def test_every_ssopd_and_degeneration_metric_is_the_same_with_one_and_four_mini_batches(runs):
    """M1 and M4: the main job's step 1 at learning rate 0 with 1 and 4 mini-batches. The policy cannot move inside
    the step, so each ssopd/* and degeneration/* metric is a property of the step's samples and the fixed policy,
    whatever the split (before: teacher_argmax_differs 0.054 vs 0.118, teacher time 1/4; verl's reduce_metrics
    took the max of every key with "max" in its name and averaged the per-mini-batch teacher times)."""
    one, four = runs["m1"][1], runs["m4"][1]
    keys = sorted(k for k in one if k.startswith(("ssopd/", "degeneration/")) and k not in TIMINGS)
    assert {"ssopd/teacher_argmax_differs", "ssopd/teacher_argmax_reversed", "ssopd/kl_unclipped",
            "ssopd/micro_batch_tokens_max", "degeneration/repetition_loop_frac"} <= set(keys)  # fmt: skip
    assert keys == sorted(k for k in four if k.startswith(("ssopd/", "degeneration/")) and k not in TIMINGS)
    assert one["ssopd/pairs"] >= 1 and one["ssopd/distilled_tokens"] > 0  # not vacuous
    for key in keys:  # micro_batch_tokens_max too: 16-row micro-batches either way (ppo_micro_batch_size_per_gpu)
        assert math.isclose(four[key], one[key], rel_tol=1e-5, abs_tol=1e-7), (key, one[key], four[key])
    # the teacher's time is a share of the update in both (that it is the step's sum over mini-batches, not their
    # mean, is tested without timing in tests/test_metric_reduction.py: timings compared across runs are noise)
    for step in (one, four):
        assert 0 < step["ssopd/teacher_time_share"] <= 1
        assert step["timing_s/ssopd_teacher"] == pytest.approx(step["ssopd/teacher_time_share"]
                                                               * step["timing_s/update_actor"])  # fmt: skip


def kit_validation(runs, run: str) -> tuple[float, float]:
    """The kit run's greedy validation accuracy before training and at its last step (the saved checkpoint)."""
    steps = runs[run]
    (before,) = validation(steps[0]).values()
    (after,) = validation(steps[e2e_runs.KIT_STEPS]).values()
    return before, after


@pytest.mark.parametrize("run", list(e2e_runs.KIT_RUNS))
def test_evaluate_scores_the_trained_checkpoint_as_the_trainer_did(runs, run):
    """The kit end to end: a shrunk launch script trains and saves (kit_lora: LoRA adapters, the initial teacher, a
    distillation horizon, two ranks; kit_full: full fine-tuning, one rank); scripts/evaluate.py (vLLM, greedy, the
    validation parquet: the trainer's prompts) scores the saved checkpoint as the trainer's own validation did,
    within one problem, and unlike the untrained model (before: a LoRA checkpoint was evaluated as its base model)."""
    root = runs.root
    before, after = kit_validation(runs, run)
    assert abs(after - before) > 4 / 128, (before, after)  # training moved the model: the check can tell them apart
    if (root / "failed" / f"{run}-eval.txt").exists():
        raise AssertionError((root / "failed" / f"{run}-eval.txt").read_text())
    out = root / "kit" / f"{run}-eval"
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["benchmarks"].values()
    assert entry["num_problems"] == 128
    assert abs(entry["avg@1"]["value"] / 100 - after) <= 1 / 128 + 1e-9, (entry["avg@1"]["value"], after)
    evaluated = json.loads((out / "run_config.json").read_text())["evaluated"]
    lora = e2e_runs.KIT_RUNS[run][1]["SETUP"] == "reported"
    ranks = 2 if lora else 1
    assert evaluated["kind"] == "verl_fsdp" and evaluated["step"] == e2e_runs.KIT_STEPS
    assert evaluated["world_size"] == ranks and evaluated["lora_merged"] is lora
    assert len(evaluated["weights_sha256"]) == 64
    if lora:
        assert evaluated["lora"]["r"] == 64 and evaluated["lora"]["lora_alpha"] == 128  # the launch scripts' LoRA
    md = (out / "summary.md").read_text()
    assert f"step {e2e_runs.KIT_STEPS}, saved by {ranks} rank" in md and evaluated["weights_sha256"][:16] in md
    assert ("LoRA adapters merged (r=64, alpha=128)" in md) is lora


def test_report_builds_the_table_and_curves_of_the_kit(runs):
    if (runs.root / "failed" / "kit-report.txt").exists():
        raise AssertionError((runs.root / "failed" / "kit-report.txt").read_text())
    report = runs.root / "kit" / "report"
    table = (report / "results.md").read_text()
    for run in e2e_runs.KIT_RUNS:
        summary = json.loads((runs.root / "kit" / f"{run}-eval" / "summary.json").read_text())
        (entry,) = summary["benchmarks"].values()
        row = next(line for line in table.splitlines() if line.startswith(f"| {run} "))
        assert row.count(f"{entry['avg@1']['value']:.1f} [") == 2, row  # the benchmark and the macro average
        assert f"- {run}: " in table and summary["run"]["evaluated"]["weights_sha256"][:16] in table
    assert (report / "results.csv").exists() and (report / "training_curves.png").stat().st_size > 10_000
