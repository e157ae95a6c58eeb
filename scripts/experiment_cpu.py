#!/usr/bin/env python
"""SSOPD vs GRPO vs OPSD on the embedded tiny default, on CPU, over seeds: one command, every run through verl.

  .venv/bin/python scripts/experiment_cpu.py --out experiment-cpu --lora-rank 16 --lr 2e-4 --steps 12 \
      --test-freq 3 --doc docs/evidence.md        # the run in docs/evidence.md

Each (method, seed) is one `python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default` run with
the same start checkpoint (the tiny default), data and rollout budget (batch, group size, steps); only the method's
overrides and the seed differ. ``--tiny addition3`` runs them on ``+tiny=addition3`` instead (the harder task:
three-digit addition; build it first with ``python -m ssopd_verl.tiny_default --task addition3``). Methods
(``--methods``, default all four):

  grpo           ssopd.lambda=0: GRPO through the same trainer (the pairing is measured, nothing distilled)
  ssopd          the live self-teacher (current weights), witness = shortest correct completion
  ssopd-initial  ssopd.teacher=initial: the teacher frozen at the start checkpoint (needs LoRA: --lora-rank > 0)
  opsd           ssopd.witness_source=reference_solution: the dataset's worked solution is the witness

The seed sets the training prompts' order (``data.seed``), the rollout's sampling (``actor_rollout_ref.rollout.seed``)
and SSOPD's own random choices (``ssopd.seed``). Validation is greedy on all 128 validation problems, every
``--test-freq`` steps and before training: the same checkpoint scores the same every time.

Outputs in ``--out``: ``runs/<method>-s<seed>/`` (the run's tracker JSONL and full log; a finished run is not
run again, so an interrupted experiment resumes), ``evidence.png`` (accuracy vs step, seed mean and min-max band),
``evidence.md`` (the table, the diagnostics, the command and its wall-clock). With ``--doc``, the same markdown
replaces the text between the experiment markers of that file (prose around them is kept).
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

from ssopd_verl.reporting import load_tracker
from ssopd_verl.seed_comparison import comparison_table, plot_seed_bands, seed_bands, validation_accuracy

METHODS = {
    "grpo": ["ssopd.lambda=0"],
    "ssopd": [],
    "ssopd-initial": ["ssopd.teacher=initial"],
    "opsd": ["ssopd.witness_source=reference_solution"],
}
PROJECT = "experiment"
BEGIN, END = "<!-- experiment:begin -->", "<!-- experiment:end -->"
# per-step diagnostics averaged over steps and seeds in the second table
DIAGNOSTICS = ("ssopd/pairs", "ssopd/distill_loss", "ssopd/teacher_logp_sampled", "ssopd/student_logp_sampled",
               "ssopd/teacher_argmax_differs", "critic/score/mean")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (runs, figure, markdown)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--test-freq", type=int, default=5, help="validate every N steps (and before training)")
    p.add_argument("--save-freq", type=int, default=-1, help="checkpoint every N steps (default: never)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank for every method (0: full fine-tuning)")
    p.add_argument("--lr", type=float, default=None, help="actor learning rate (default: the tiny default's)")
    p.add_argument("--tiny", default="default", help="the tiny overlay, +tiny=<this>: default (2-digit addition) or "
                   "addition3 (the harder 3-digit addition; build it first: python -m ssopd_verl.tiny_default "
                   "--task addition3)")
    p.add_argument("--threshold", type=float, default=None, help="accuracy for 'first step >=' (default: start + 0.1)")
    p.add_argument("--doc", default=None, help="markdown file whose experiment section to replace")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    if "ssopd-initial" in args.methods and args.lora_rank <= 0:
        p.error("ssopd-initial needs a LoRA actor (ssopd.teacher=initial is refused with full fine-tuning): "
                "give --lora-rank > 0, which applies to every method, or leave ssopd-initial out")  # fmt: skip
    if args.seeds < 1 or args.steps < 1 or args.test_freq < 1:
        p.error("--seeds, --steps and --test-freq must be >= 1")
    return args


def run_overrides(args, method: str, seed: int, run_dir: Path) -> list[str]:
    setup = []
    if args.lora_rank > 0:  # the reported setup's LoRA shape, scaled down; merged into the rollout's weights
        setup = [f"actor_rollout_ref.model.lora_rank={args.lora_rank}",
                 f"actor_rollout_ref.model.lora_alpha={2 * args.lora_rank}",
                 "actor_rollout_ref.model.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                 "actor_rollout_ref.model.lora.merge=True"]  # fmt: skip
    if args.lr is not None:
        setup.append(f"actor_rollout_ref.actor.optim.lr={args.lr}")
    return [
        f"trainer.project_name={PROJECT}", f"trainer.experiment_name={method}-s{seed}",
        f"trainer.total_training_steps={args.steps}", f"trainer.test_freq={args.test_freq}",
        "trainer.val_before_train=true", f"trainer.save_freq={args.save_freq}",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}", f"ssopd.seed={seed}",
        *setup, *METHODS[method], *args.overrides,
    ]  # fmt: skip


def run_one(args, method: str, seed: int) -> Path:
    """One main_ppo run in its own directory (verl's file logger writes under the working directory); returns its
    tracker file. A run with a ``done.json`` is not repeated."""
    run_dir = Path(args.out).resolve() / "runs" / f"{method}-s{seed}"
    tracker = run_dir / PROJECT / f"{method}-s{seed}.jsonl"
    command = [sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=ssopd", "+platform=cpu", f"+tiny={args.tiny}",
               *run_overrides(args, method, seed, run_dir)]  # fmt: skip
    if args.dry_run:
        print(shlex.join(command))
        return tracker
    if (run_dir / "done.json").exists():
        print(f"{method} seed {seed}: done before, kept", flush=True)
        return tracker
    if run_dir.exists():  # an interrupted run: start it again from scratch (no checkpoints are kept)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}  # +platform=cpu selects it
    t0 = time.time()
    with open(run_dir / "main_ppo.log", "w") as log:
        proc = subprocess.run(command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = (run_dir / "main_ppo.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{method} seed {seed} failed (exit {proc.returncode}) after {seconds:.0f} s:\n{tail}")
    curve = validation_accuracy(tracker)
    (run_dir / "done.json").write_text(json.dumps({"seconds": seconds, "command": command, "validation": curve}))
    print(f"{method} seed {seed}: {seconds:.0f} s, validation " + " ".join(f"{s}:{a:.3f}" for s, a in curve),
          flush=True)  # fmt: skip
    return tracker


def diagnostics_table(trackers: dict[str, list[Path]]) -> str:
    """Per method: each diagnostic's mean over training steps, then over seeds."""
    head = ["method"] + [k.split("/", 1)[1] for k in DIAGNOSTICS] + ["teacher - student log p"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, paths in trackers.items():
        per_seed = [load_tracker(p) for p in paths]
        cells = [method]

        def mean_of(key):
            means = [statistics.fmean(v for _, v in s[key]) for s in per_seed if s.get(key)]
            return statistics.fmean(means) if means else None

        values = {key: mean_of(key) for key in DIAGNOSTICS}
        cells += ["–" if v is None else f"{v:.4g}" for v in values.values()]
        t, s = values["ssopd/teacher_logp_sampled"], values["ssopd/student_logp_sampled"]
        cells.append("–" if t is None or s is None else f"{t - s:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trackers = {m: [] for m in args.methods}
    for seed in range(args.seeds):  # seed-major: an interrupted experiment has every method for the first seeds
        for method in args.methods:
            trackers[method].append(run_one(args, method, seed))
    if args.dry_run:
        return 0
    wall = time.time() - t0
    bands = {m: seed_bands([validation_accuracy(p) for p in paths]) for m, paths in trackers.items()}
    start = statistics.fmean(b[0].mean for b in bands.values() if b)
    threshold = args.threshold if args.threshold is not None else round(start + 0.1, 2)
    steps = sorted({b.step for bs in bands.values() for b in bs})
    at_steps = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    setup = f"LoRA rank {args.lora_rank}" if args.lora_rank > 0 else "full fine-tuning"
    tiny = "tiny default" if args.tiny == "default" else f"tiny default +tiny={args.tiny}"
    title = f"{tiny}, {setup}: validation accuracy (greedy, 128 problems), mean and range over {args.seeds} seeds"
    plot_seed_bands(bands, out / "evidence.png", title)
    run_seconds = [json.loads((p.parents[1] / "done.json").read_text())["seconds"] for ps in trackers.values() for p in ps]
    command = "python scripts/experiment_cpu.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    figure = os.path.relpath(out.resolve() / "evidence.png", Path(args.doc).resolve().parent) if args.doc else "evidence.png"
    md = "\n".join([
        BEGIN,
        f"Command: `{command}` ({setup}, {args.steps} steps, validation every {args.test_freq}).",
        f"Wall-clock: the {len(run_seconds)} runs took {sum(run_seconds) / 60:.1f} min in all, "
        f"{statistics.fmean(run_seconds):.0f} s per run on average (this invocation: {wall / 60:.1f} min; runs "
        f"finished by an earlier invocation are kept, not repeated).",
        "",
        f"![validation accuracy vs step]({figure})",
        "",
        "Validation accuracy (seed mean ± sample std):",
        "",
        comparison_table(bands, at_steps, threshold),
        "Training diagnostics (mean over steps, then seeds):",
        "",
        diagnostics_table(trackers),
        END,
    ])  # fmt: skip
    (out / "evidence.md").write_text(md + "\n")
    print(md)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text() if doc.exists() else f"# Evidence\n\n{BEGIN}\n{END}\n"
        if text.count(BEGIN) != 1 or text.count(END) != 1:
            raise SystemExit(f"{doc} must hold exactly one {BEGIN} ... {END} section")
        head, rest = text.split(BEGIN)
        doc.write_text(head + md + rest.split(END, 1)[1])
        print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
