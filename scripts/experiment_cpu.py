#!/usr/bin/env python
"""GRPO vs SSOPD variants on the embedded tiny default, on CPU, over seeds: every run through verl's main_ppo.

  .venv/bin/python scripts/experiment_cpu.py --out experiment-cpu --arms study --seeds 5 --steps 20 \
      --test-freq 4 --lora-rank 16 --lr 2e-4 --runs docs/evidence/runs --doc docs/evidence.md   # run + report
  .venv/bin/python scripts/experiment_cpu.py --report-only --runs docs/evidence/runs --doc docs/evidence.md

Each (arm, seed) is one run of ``main_ppo +recipe=ssopd +platform=cpu +tiny=default`` with the same start
checkpoint, data and rollout budget (batch, group size, steps); only the arm's overrides and the seed differ.
``--tiny addition3`` runs them on ``+tiny=addition3`` instead (the harder task: three-digit addition; build it first
with ``python -m ssopd_verl.tiny_default --task addition3``). The
seed sets the training prompts' order (``data.seed``), the rollout's sampling (``actor_rollout_ref.rollout.seed``),
the LoRA adapters' initialisation (``actor_rollout_ref.actor.fsdp_config.seed``) and SSOPD's own random choices
(``ssopd.seed``); the same seed gives the same numbers (docs/evidence.md). Validation is greedy on all 128
validation problems, before training and every ``--test-freq`` steps.

Arms (``--arms``: names, or ``study`` / ``study-initial`` / ``main`` for the groups below):

  study          grpo; ssopd-{pw,token,none}-l{0.5,1}: the clip (pointwise tau 0.05 = the paper; token, tau
                 TOKEN_TAU; none) at lambda 0.5 (the reported value) and 1, the live teacher
  study-initial  the six ssopd arms with the teacher frozen at the start checkpoint (ssopd.teacher=initial; LoRA)
  main           the paper's reported setup (docs/SSOPD_SPEC.md 1b: LoRA, the teacher frozen at the start checkpoint,
                 lambda 0.5, the loss on the first K target tokens, K = FIRST_K) for each clip:
                 ssopd-{pw,token,none}-l0.5-initial-k16, and ssopd-token-l0.5-k16 (the same with the live teacher),
                 beside grpo. Needs --lora-rank > 0. Run it until grpo's validation is flat over the last quarter
                 (the report's plateau table says whether it is).
  earlier        ssopd (= ssopd-pw-l1), ssopd-initial, opsd (witness = the dataset's worked solution)

The runs share one Python process and one Ray instance (``ssopd_verl.glue.in_process``; ``--isolated``: one
``python -m verl.trainer.main_ppo`` process per run). Outputs:

* ``--out``/runs/<arm>-s<seed>/: the run's log and ``done.json`` (a finished run is not run again, so an
  interrupted study resumes); verl's tracker is written under ``--out``/trackers.
* ``--runs`` (default ``--out``/jsonl): each run's tracker, slimmed to the keys the study reads
  (``seed_comparison.KEEP_PREFIXES``), as ``<arm>-s<seed>.jsonl``, and ``manifest.json`` (command, setup, arms,
  seconds per run). The report reads this folder alone: ``--report-only`` regenerates it on any machine.
* the report: figures in ``--figures`` (default: ``figures/`` beside ``--runs``), and the markdown, which replaces
  the text between the experiment markers of ``--doc`` (or goes to ``report.md`` beside the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ssopd_verl import seed_comparison as sc
from ssopd_verl.reporting import load_tracker

TOKEN_TAU = 1.0  # ssopd.clip=token caps each position's KL, min(KL_t, tau): at 0.05 almost every position is capped
CLIPS = {"pw": ["ssopd.clip=pointwise", "ssopd.tau=0.05"], "token": ["ssopd.clip=token", f"ssopd.tau={TOKEN_TAU}"],
         "none": ["ssopd.clip=none"]}  # fmt: skip
ARMS = {"grpo": ["ssopd.lambda=0"]}
for _clip, _overrides in CLIPS.items():
    for _lam in ("0.5", "1"):
        ARMS[f"ssopd-{_clip}-l{_lam}"] = [f"ssopd.lambda={_lam}", *_overrides]
STUDY = list(ARMS)
STUDY_INITIAL = [f"{arm}-initial" for arm in STUDY if arm != "grpo"]
ARMS.update({f"{arm}-initial": [*ARMS[arm], "ssopd.teacher=initial"] for arm in STUDY if arm != "grpo"})
ARMS.update(ssopd=[], **{"ssopd-initial": ["ssopd.teacher=initial"]}, opsd=["ssopd.witness_source=reference_solution"])
# The paper's "first K steps" (K not given) on the tiny default: a 2-digit addition's completion is 24 tokens, its
# think block (both column sums, where every slip is) the first 16, the boxed answer the last 8.
FIRST_K = 16
FIRST_K_OVERRIDE = f"ssopd.max_distill_tokens={FIRST_K}"
MAIN = ["grpo"] + [f"ssopd-{clip}-l0.5-initial-k{FIRST_K}" for clip in CLIPS] + [f"ssopd-token-l0.5-k{FIRST_K}"]
ARMS.update({f"ssopd-{clip}-l0.5-initial-k{FIRST_K}": [*ARMS[f"ssopd-{clip}-l0.5-initial"], FIRST_K_OVERRIDE]
             for clip in CLIPS})  # fmt: skip
ARMS[f"ssopd-token-l0.5-k{FIRST_K}"] = [*ARMS["ssopd-token-l0.5"], FIRST_K_OVERRIDE]
GROUPS = {"study": STUDY, "study-initial": STUDY_INITIAL, "main": MAIN}
BASELINE = "grpo"
# An arm is flat at the end when its seed-mean validation moves by at most this over the last quarter of the steps:
# 0.01 is 1.3 of the 128 validation problems.
FLAT_TOLERANCE = 0.01
PROJECT = "experiment"
BEGIN, END = "<!-- experiment:begin -->", "<!-- experiment:end -->"
# per-step diagnostics averaged over steps and seeds in the last table
DIAGNOSTICS = ("ssopd/pairs", "ssopd/distill_loss", "ssopd/kl_unclipped", "ssopd/clipped_teacher_mass",
               "ssopd/teacher_logp_sampled", "ssopd/student_logp_sampled", "ssopd/teacher_argmax_differs",
               "critic/score/mean")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="working directory (run logs, full trackers); required unless --report-only")
    p.add_argument("--arms", "--methods", dest="arms", default="study",
                   help=f"comma-separated arms or groups {list(GROUPS)}; arms: {list(ARMS)}")  # fmt: skip
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per arm")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--test-freq", type=int, default=5, help="validate every N steps (and before training)")
    p.add_argument("--save-freq", type=int, default=-1, help="checkpoint every N steps (default: never)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank for every arm (0: full fine-tuning)")
    p.add_argument("--lr", type=float, default=None, help="actor learning rate (default: the tiny default's)")
    p.add_argument("--tiny", default="default", help="the tiny overlay, +tiny=<this>: default (2-digit addition) or "
                   "addition3 (the harder 3-digit addition; build it first: python -m ssopd_verl.tiny_default "
                   "--task addition3)")  # fmt: skip
    p.add_argument("--runs", help="folder of the slim trackers and manifest (default: <out>/jsonl)")
    p.add_argument("--figures", help="folder of the figures (default: figures/ beside --runs)")
    p.add_argument("--doc", default=None, help="markdown file whose experiment section to replace")
    p.add_argument("--report-only", action="store_true", help="run nothing: report from --runs alone")
    p.add_argument("--isolated", action="store_true", help="one main_ppo process per run (default: one for all)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    if args.report_only:
        if not args.runs:
            p.error("--report-only needs --runs")
        return args
    if not args.out:
        p.error("--out is required (unless --report-only)")
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.arms = list(dict.fromkeys(arm for a in names for arm in GROUPS.get(a, [a])))
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {list(GROUPS)} and {list(ARMS)}")
    if any("-initial" in a for a in args.arms) and args.lora_rank <= 0:
        p.error("the *-initial arms need a LoRA actor (ssopd.teacher=initial is refused with full fine-tuning): "
                "give --lora-rank > 0, which applies to every arm, or leave them out")  # fmt: skip
    if args.seeds < 1 or args.steps < 1 or args.test_freq < 1:
        p.error("--seeds, --steps and --test-freq must be >= 1")
    args.runs = args.runs or str(Path(args.out) / "jsonl")
    return args


def run_overrides(args, arm: str, seed: int) -> list[str]:
    setup = []
    if args.lora_rank > 0:  # the reported setup's LoRA shape, scaled down; merged into the rollout's weights
        setup = [f"actor_rollout_ref.model.lora_rank={args.lora_rank}",
                 f"actor_rollout_ref.model.lora_alpha={2 * args.lora_rank}",
                 "actor_rollout_ref.model.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                 "actor_rollout_ref.model.lora.merge=True"]  # fmt: skip
    if args.lr is not None:
        setup.append(f"actor_rollout_ref.actor.optim.lr={args.lr}")
    run_dir = Path(args.out).resolve() / "runs" / f"{arm}-s{seed}"
    return [
        "+recipe=ssopd", "+platform=cpu", f"+tiny={args.tiny}",
        f"trainer.project_name={PROJECT}", f"trainer.experiment_name={arm}-s{seed}",
        f"trainer.total_training_steps={args.steps}", f"trainer.test_freq={args.test_freq}",
        "trainer.val_before_train=true", f"trainer.save_freq={args.save_freq}",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        # diagnostics that cost time and feed nothing here: the HTML token view (tiny default: every 2 steps)
        "ssopd.token_view_every=0",
        f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}", f"ssopd.seed={seed}",
        f"actor_rollout_ref.actor.fsdp_config.seed={seed}",
        *setup, *ARMS[arm], *args.overrides,
    ]  # fmt: skip


def run_one(args, arm: str, seed: int) -> None:
    """One run; its tracker is slimmed into ``--runs``. A run with a ``done.json`` is not repeated."""
    name = f"{arm}-s{seed}"
    out = Path(args.out).resolve()
    run_dir, tracker = out / "runs" / name, out / "trackers" / PROJECT / f"{name}.jsonl"
    overrides = run_overrides(args, arm, seed)
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides]
    if args.dry_run:
        print(shlex.join(command))
        return
    done = run_dir / "done.json"
    if not done.exists():
        if run_dir.exists():  # an interrupted run: start it again from scratch (no checkpoints are kept)
            shutil.rmtree(run_dir)
        tracker.unlink(missing_ok=True)
        run_dir.mkdir(parents=True)
        t0 = time.time()
        error = None
        if args.isolated:
            env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_FILE_LOGGER_PATH")}
            env["VERL_FILE_LOGGER_ROOT"] = str(out / "trackers")
            with open(run_dir / "main_ppo.log", "w") as log:
                proc = subprocess.run(command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
            error = f"exit {proc.returncode}" if proc.returncode else None
        else:
            from ssopd_verl.glue.in_process import main_ppo, output_to

            with output_to(run_dir / "main_ppo.log"):
                try:
                    main_ppo(overrides)
                except Exception as e:  # reported below with the log's tail
                    error = repr(e)
        seconds = time.time() - t0
        if error:
            tail = (run_dir / "main_ppo.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"{name} failed ({error}) after {seconds:.0f} s:\n{tail}")
        done.write_text(json.dumps({"seconds": seconds, "command": command}))
    sc.slim_tracker(tracker, Path(args.runs) / f"{name}.jsonl")
    curve = sc.validation_accuracy(Path(args.runs) / f"{name}.jsonl")
    seconds = json.loads(done.read_text())["seconds"]
    print(f"{name}: {seconds:.0f} s, validation " + " ".join(f"{s}:{a:.3f}" for s, a in curve), flush=True)


def write_manifest(args, argv, wall: float) -> None:
    out = Path(args.out).resolve()
    runs = {f"{a}-s{s}": json.loads((out / "runs" / f"{a}-s{s}" / "done.json").read_text())["seconds"]
            for s in range(args.seeds) for a in args.arms}  # fmt: skip
    manifest = {
        "command": "python scripts/experiment_cpu.py " + shlex.join(argv),
        "setup": {"steps": args.steps, "test_freq": args.test_freq, "lora_rank": args.lora_rank, "lr": args.lr,
                  "tiny": args.tiny,
                  "seeds": args.seeds, "overrides": args.overrides, "isolated": args.isolated},
        "arms": {a: ARMS[a] for a in args.arms},
        "seconds": runs,
        "invocation_seconds": wall,
    }  # fmt: skip
    (Path(args.runs) / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- report


def diagnostics_table(series: dict[str, list[dict]]) -> str:
    """Per arm: each diagnostic's mean over training steps, then over seeds."""
    head = ["arm"] + [k.split("/", 1)[1] for k in DIAGNOSTICS] + ["teacher - student log p"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for arm, per_seed in series.items():

        def mean_of(key):
            means = [statistics.fmean(v for _, v in s[key]) for s in per_seed if s.get(key)]
            return statistics.fmean(means) if means else None

        values = {key: mean_of(key) for key in DIAGNOSTICS}
        cells = [arm] + ["–" if v is None else f"{v:.4g}" for v in values.values()]
        t, s = values["ssopd/teacher_logp_sampled"], values["ssopd/student_logp_sampled"]
        cells.append("–" if t is None or s is None else f"{t - s:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(runs_dir: Path, figures: Path, doc) -> str:
    """The markdown and figures from the slim trackers and manifest of ``runs_dir`` alone."""
    runs = sc.load_runs(runs_dir)
    if not runs:
        raise SystemExit(f"no <arm>-s<seed>.jsonl files in {runs_dir}")
    manifest_path = runs_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    order = list(manifest.get("arms", {})) or list(runs)
    runs = {arm: runs[arm] for arm in sorted(runs, key=lambda a: (order.index(a) if a in order else len(order), a))}
    series = {arm: [load_tracker(p) for p in seeds.values()] for arm, seeds in runs.items()}
    curves = {arm: dict(zip(seeds, map(sc.validation_accuracy, series[arm]))) for arm, seeds in runs.items()}
    summaries = {arm: {seed: sc.run_summary(c) for seed, c in per_seed.items()} for arm, per_seed in curves.items()}
    start = {arm: statistics.fmean(c[0][1] for c in per_seed.values()) for arm, per_seed in curves.items()}
    bands = {arm: sc.seed_bands(list(per_seed.values())) for arm, per_seed in curves.items()}
    val_steps = sorted({b.step for bs in bands.values() for b in bs})
    pairs = sc.paired_differences(summaries, BASELINE) if BASELINE in summaries else []
    plateaus = {arm: sc.last_quarter(list(per_seed.values()), FLAT_TOLERANCE) for arm, per_seed in curves.items()}

    setup = manifest.get("setup", {})
    lora = setup.get("lora_rank") or 0
    desc = (f"LoRA rank {lora}" if lora else "full fine-tuning") + (f", lr {setup['lr']}" if setup.get("lr") else "")
    seeds_n = sorted({len(s) for s in runs.values()})
    tiny = setup.get("tiny", "default")
    setup_text = ("tiny default" if tiny == "default" else f"tiny default +tiny={tiny}") + f", {desc}"
    what = f"{setup_text}; mean and min-max range over {'/'.join(map(str, seeds_n))} seeds"
    rel = (lambda p: os.path.relpath(p.resolve(), Path(doc).resolve().parent)) if doc else (
        lambda p: os.path.relpath(p.resolve(), figures.resolve().parent))  # fmt: skip
    sc.plot_seed_bands(bands, figures / "val_acc.png", f"validation accuracy (greedy, 128 problems): {what}")
    parts = [BEGIN]
    if manifest:
        secs = list(manifest["seconds"].values())
        parts += [f"Command: `{manifest['command']}`.",
                  f"Runs: {len(secs)}, {sum(secs) / 60:.1f} min in all, {statistics.fmean(secs):.0f} s per run on "
                  f"average (the last invocation took {manifest['invocation_seconds'] / 60:.1f} min; runs finished by "
                  "an earlier one are kept, not repeated).", ""]  # fmt: skip
    parts += ["Regenerate this section and its figures from the trackers alone: `python scripts/experiment_cpu.py "
              f"--report-only --runs {runs_dir} --figures {figures}" + (f" --doc {doc}`." if doc else "`."), "",
              f"![validation accuracy vs step]({rel(figures / 'val_acc.png')})", "",
              "Validation accuracy per run: start (step 0), final (last validation), best, AUC (trapezoid area under "
              "the validation curve over steps, divided by the step range); seed mean ± sample std:", "",
              sc.summary_table(summaries, start)]  # fmt: skip
    if pairs:
        title = f"per-seed differences vs {BASELINE} (dots), mean, paired t (blue) and bootstrap (orange) 95% CI"
        sc.plot_paired(pairs, figures / "paired_vs_grpo.png", title)
        arms_n, n = len({p.arm for p in pairs}), sorted({len(p.seeds) for p in pairs})
        parts += [f"Paired per-seed differences against {BASELINE} (same seed: same prompts order, same rollout "
                  f"seed, same LoRA init). {len(pairs)} comparisons ({arms_n} arms x {len(sc.SUMMARIES)} summaries; "
                  "final and best are the same number wherever a run ended at its best). Per comparison: the mean "
                  "difference, the seeds where it is positive, the paired t 95% interval (t with n - 1 degrees of "
                  "freedom), the percentile bootstrap 95% interval (10,000 resamples, bootstrap seed 0; with "
                  f"{'/'.join(map(str, n))} seeds it is narrower than the t interval and shown only beside it), the "
                  "paired t-test's and the exact sign-flip test's two-sided p-values, each also Holm-adjusted over "
                  f"all {len(pairs)} comparisons. The intervals are per comparison, not simultaneous. With n seeds "
                  "the sign-flip p-value is at least 2/2^n"
                  + "".join(f" ({k} seeds: {2 / 2**k:.4g})" for k in n) + ".", "",
                  sc.paired_table(pairs, BASELINE),
                  f"![paired differences]({rel(figures / 'paired_vs_grpo.png')})", ""]  # fmt: skip
    parts += ["Is the run at a plateau? Per arm, the seed-mean validation accuracy's change over the last quarter of "
              f"the steps (flat: within ±{FLAT_TOLERANCE:g}, 1.3 of 128 problems) and the seeds whose final "
              "validation is their best. Where the baseline is not flat, `final` measures how fast an arm learns, "
              "not where it ends:", "", sc.plateau_table(plateaus, FLAT_TOLERANCE)]  # fmt: skip
    if BASELINE in plateaus:
        base = plateaus[BASELINE]
        verdict = "cannot tell (too few validations)" if base is None else "met" if base.flat else (
            "**not met**: `final` compares how fast the arms learn, not where they end")  # fmt: skip
        parts += [f"Stopping rule ({BASELINE} flat over the last quarter of the steps): {verdict}.", ""]
    parts += ["Validation accuracy at every validation (seed mean):", "", sc.curve_table(bands, val_steps)]
    degeneration = sc.degeneration_keys(s for per_seed in series.values() for s in per_seed)
    if degeneration:
        parts += ["Degeneration metrics at every validation step (seed mean; `degeneration/*` from that step's "
                  "training rollouts, `val-*` from validation):", ""]  # fmt: skip
        for key in degeneration:
            key_curves = {arm: sc.seed_curves(per_seed, key) for arm, per_seed in series.items()}
            key_bands = {arm: sc.seed_bands(c) for arm, c in key_curves.items() if c}
            if not key_bands:
                continue
            png = figures / sc.figure_name(key)
            sc.plot_seed_bands(key_bands, png, f"{key}: {what}", ylabel=key)
            parts += [f"`{key}` ([figure]({rel(png)})):", "", sc.curve_table(key_bands, val_steps)]
    else:
        parts += ["No degeneration metrics in these trackers (`degeneration/*`, `val-*degeneration*`).", ""]
    parts += ["Training diagnostics (mean over steps, then seeds):", "", diagnostics_table(series), END]
    return "\n".join(parts)


def write_report(md: str, figures: Path, doc) -> None:
    if not doc:
        (figures.parent / "report.md").write_text(md + "\n")
        print(f"wrote {figures.parent / 'report.md'}")
        return
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else f"# Evidence\n\n{BEGIN}\n{END}\n"
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{doc} must hold exactly one {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN)
    doc.write_text(head + md + rest.split(END, 1)[1])
    print(f"wrote {doc}")


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if not args.report_only:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        if not args.isolated:  # verl's file logger in the TaskRunner reads this (Ray workers inherit it)
            os.environ.pop("VERL_FILE_LOGGER_PATH", None)
            os.environ["VERL_FILE_LOGGER_ROOT"] = str(Path(args.out).resolve() / "trackers")
            os.environ.pop("VERL_PLATFORM", None)  # +platform=cpu selects it (in Ray's runtime env)
        t0 = time.time()
        for seed in range(args.seeds):  # seed-major: an interrupted study has every arm for the first seeds
            for arm in args.arms:
                run_one(args, arm, seed)
        if args.dry_run:
            return 0
        write_manifest(args, argv, time.time() - t0)
    runs = Path(args.runs)
    figures = Path(args.figures) if args.figures else runs.parent / "figures"
    md = report(runs, figures, args.doc)
    print(md)
    write_report(md, figures, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
