"""Arms compared over seeds, from verl's tracker files alone: summaries, paired differences, tables, figures.

Input: one verl ``file`` tracker (JSONL) per (arm, seed), named ``<arm>-s<seed>.jsonl`` in one folder
(:func:`load_runs`). A run's validation accuracy at a step is the mean over data sources of
``val-core/<source>/acc/mean@k`` (the number the console's ``val`` shows).

Per run (:func:`run_summary`): ``final`` (the last validation), ``best`` (the highest validation) and ``auc``, the
area under the validation curve by the trapezoid rule over steps, divided by the step range (so a flat curve at
``a`` has ``auc = a``: the mean accuracy over training).

Per arm: the seeds' mean and sample standard deviation of each summary, and its paired difference against the
baseline arm (GRPO): for every seed both arms ran, ``arm - baseline``; their mean with a percentile bootstrap 95%
confidence interval (resampling the seeds, a fixed bootstrap seed: the same files give the same interval).

Curves of any metric over seeds (:func:`seed_bands`): at every step that *all* of an arm's seeds logged (a crashed
or shorter seed never silently shrinks the mean), the mean, min-max range and sample standard deviation.
Degeneration metrics (:func:`degeneration_keys`): whatever ``degeneration/*`` (training) or validation keys
(``val-*`` holding ``degeneration``, or the ``ssopd`` reward manager's per-sample flags) the trackers have; none
is fine.

Pure: no verl, no training (numpy and, for the figures, matplotlib).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from ssopd_verl.degeneration import FLAG_KEYS
from ssopd_verl.reporting import load_tracker

Curve = list[tuple[int, float]]  # (step, value), sorted by step
SUMMARIES = ("final", "best", "auc")
RUN_NAME = re.compile(r"^(?P<arm>.+)-s(?P<seed>\d+)\.jsonl$")
# What a committed tracker keeps (slim_tracker): the study's inputs, not verl's every diagnostic.
KEEP_PREFIXES = ("val-core/", "val-aux/", "degeneration/", "critic/score/", "actor/pg_loss", "actor/loss",
                 "actor/grad_norm", "actor/entropy", "ssopd/", "reward/", "response_length/mean",
                 "response_length/clip_ratio", "timing_s/step", "timing_s/testing", "timing_s/gen",
                 "timing_s/old_log_prob", "timing_s/update_actor", "timing_s/ssopd_teacher")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- runs


def load_runs(folder: str | Path) -> dict[str, dict[int, Path]]:
    """``<arm>-s<seed>.jsonl`` files of a folder -> {arm: {seed: path}}, arms and seeds sorted."""
    runs: dict[str, dict[int, Path]] = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        match = RUN_NAME.match(path.name)
        if match:
            runs.setdefault(match["arm"], {})[int(match["seed"])] = path
    return {arm: dict(sorted(seeds.items())) for arm, seeds in sorted(runs.items())}


def slim_tracker(src: str | Path, dst: str | Path, keep: Sequence[str] = KEEP_PREFIXES) -> Path:
    """Copy a tracker keeping only the keys that start with one of ``keep`` (same lines, same values; a line left
    with no key is dropped). verl logs ~100 keys a step (~4 KB); the study reads ~30."""
    lines = []
    for line in Path(src).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        data = {k: v for k, v in (record.get("data") or {}).items() if k.startswith(tuple(keep))}
        if data:
            lines.append(json.dumps({"step": record.get("step"), "data": data}) + "\n")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text("".join(lines), encoding="utf-8")
    return Path(dst)


def validation_accuracy(path_or_series: str | Path | Mapping) -> Curve:
    """One run's validation curve: per step, the mean of its ``val-core/*/acc/mean@*`` series."""
    series = path_or_series if isinstance(path_or_series, Mapping) else load_tracker(path_or_series)
    per_step: dict[int, list[float]] = {}
    for key, points in series.items():
        if key.startswith("val-core/") and "/acc/mean@" in key:
            for step, value in points:
                per_step.setdefault(step, []).append(value)
    return sorted((step, sum(v) / len(v)) for step, v in per_step.items())


def degeneration_keys(trackers: Iterable[Mapping]) -> list[str]:
    """Training ``degeneration/*`` keys, then validation ``val-*`` keys holding ``degeneration`` or the ``ssopd``
    reward manager's per-sample flags as verl averages them (``val-aux/<source>/<flag>/mean@<n>``, flags
    :data:`ssopd_verl.degeneration.FLAG_KEYS`), sorted."""
    keys = {k for series in trackers for k in series}
    train = sorted(k for k in keys if k.startswith("degeneration/"))
    flags = tuple(f"/{flag}/mean@" for flag in FLAG_KEYS)
    val = sorted(k for k in keys if k.startswith("val-") and ("degeneration" in k or any(f in k for f in flags)))
    return train + val


# ---------------------------------------------------------------------------------------------------- summaries


def area_under_curve(curve: Curve) -> float:
    """Trapezoid rule over steps, divided by the step range; one point: its value."""
    if not curve:
        raise ValueError("empty curve")
    if len(curve) == 1:
        return curve[0][1]
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def run_summary(curve: Curve) -> dict[str, float]:
    """``final``, ``best`` and ``auc`` of one run's validation curve."""
    if not curve:
        raise ValueError("a run without validation")
    if not all(math.isfinite(v) for _, v in curve):
        raise ValueError(f"non-finite validation accuracy: {curve}")
    return {"final": curve[-1][1], "best": max(v for _, v in curve), "auc": area_under_curve(curve)}


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0):
    """Percentile bootstrap interval of the mean: resample ``values`` with replacement ``resamples`` times."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    means = np.random.default_rng(seed).choice(x, size=(resamples, x.size), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@dataclass(frozen=True)
class Paired:
    """An arm minus the baseline on one summary, over the seeds both ran."""

    arm: str
    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    low: float  # bootstrap CI
    high: float


def paired_differences(
    summaries: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str = "grpo", metrics=SUMMARIES,
    level: float = 0.95, resamples: int = 10_000, seed: int = 0,
) -> list[Paired]:  # fmt: skip
    """Every arm but the baseline, every metric: per-seed ``arm - baseline`` over the common seeds, with the mean
    and its bootstrap interval. Arms sharing no seed with the baseline are left out."""
    base = summaries.get(baseline)
    if base is None:
        raise ValueError(f"no runs of the baseline arm {baseline!r}")
    out = []
    for arm, per_seed in summaries.items():
        common = tuple(s for s in per_seed if s in base)
        if arm == baseline or not common:
            continue
        for metric in metrics:
            diffs = tuple(per_seed[s][metric] - base[s][metric] for s in common)
            low, high = bootstrap_ci(diffs, level, resamples, seed)
            out.append(Paired(arm, metric, common, diffs, statistics.fmean(diffs), low, high))
    return out


# ---------------------------------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class SeedBand:
    """An arm's curve over seeds at one step."""

    step: int
    mean: float
    low: float  # min over seeds
    high: float  # max over seeds
    std: float  # sample standard deviation (0 with one seed)
    seeds: int


def seed_bands(curves: Sequence[Curve]) -> list[SeedBand]:
    """Mean and spread over seeds at every step every curve has. Refuses no curves and non-finite values."""
    if not curves:
        raise ValueError("no runs to summarise")
    common = set.intersection(*(set(step for step, _ in curve) for curve in curves))
    bands = []
    for step in sorted(common):
        values = [dict(curve)[step] for curve in curves]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"non-finite value at step {step}: {values}")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        bands.append(SeedBand(step, statistics.fmean(values), min(values), max(values), std, len(values)))
    return bands


# ---------------------------------------------------------------------------------------------------- tables


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def summary_table(summaries: Mapping[str, Mapping[int, Mapping[str, float]]], start: Mapping[str, float]) -> str:
    """Markdown, one row per arm: seeds, the start (step-0 validation) and final / best / AUC, seed mean ± std."""
    lines = ["| arm | seeds | start | final | best | AUC |", "|---|---:|---:|---:|---:|---:|"]
    for arm, per_seed in summaries.items():
        cells = [arm, str(len(per_seed)), f"{start[arm]:.3f}" if arm in start else "–"]
        cells += [_mean_std([s[m] for s in per_seed.values()]) for m in SUMMARIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(pairs: Sequence[Paired], baseline: str = "grpo") -> str:
    """Markdown, one row per arm: for each summary, mean paired difference vs the baseline [95% CI]."""
    head = " | ".join(f"{m} − {baseline}" for m in SUMMARIES)
    lines = [f"| arm | seeds | {head} |", "|---|---:|" + "---:|" * len(SUMMARIES)]
    by_arm: dict[str, dict[str, Paired]] = {}
    for p in pairs:
        by_arm.setdefault(p.arm, {})[p.metric] = p
    for arm, cells in by_arm.items():
        row = [arm, str(len(next(iter(cells.values())).seeds))]
        row += [f"{p.mean:+.3f} [{p.low:+.3f}, {p.high:+.3f}]" if (p := cells.get(m)) else "–" for m in SUMMARIES]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def curve_table(bands: Mapping[str, Sequence[SeedBand]], steps: Sequence[int], digits: int = 3) -> str:
    """Markdown, one row per arm, one column per step: the seed mean (``–`` where not every seed logged it)."""
    lines = ["| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for arm, arm_bands in bands.items():
        by_step = {b.step: b for b in arm_bands}
        row = [f"{by_step[s].mean:.{digits}f}" if s in by_step else "–" for s in steps]
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    return plt


def plot_seed_bands(
    arms: Mapping[str, Sequence[SeedBand]], out_png: str | Path, title: str,
    ylabel: str = "validation accuracy (greedy)",
) -> None:
    """A metric vs step: the seed mean as a line, the min-max range over seeds shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for i, (name, bands) in enumerate(arms.items()):
        if not bands:
            continue
        steps = [b.step for b in bands]
        style = "-" if i < 10 else "--"
        ax.plot(steps, [b.mean for b in bands], color=f"C{i % 10}", linestyle=style, marker="o", markersize=3,
                label=f"{name} (n={bands[0].seeds})")  # fmt: skip
        ax.fill_between(steps, [b.low for b in bands], [b.high for b in bands], color=f"C{i % 10}", alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_paired(pairs: Sequence[Paired], out_png: str | Path, title: str, baseline: str = "grpo") -> None:
    """One panel per summary: each arm's per-seed differences vs the baseline (dots), mean and 95% CI (bar)."""
    plt = _pyplot()
    arms = list(dict.fromkeys(p.arm for p in pairs))
    fig, axes = plt.subplots(1, len(SUMMARIES), figsize=(4.2 * len(SUMMARIES), 0.5 * len(arms) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], SUMMARIES):
        for y, arm in enumerate(arms):
            p = next((p for p in pairs if p.arm == arm and p.metric == metric), None)
            if p is None:
                continue
            ax.plot(p.differences, [y] * len(p.differences), "o", color="gray", alpha=0.5, markersize=3)
            ax.errorbar(p.mean, y, xerr=[[p.mean - p.low], [p.high - p.mean]], fmt="s", color="C0", capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(arms)), arms if ax is axes[0][0] else [""] * len(arms), fontsize=7)
        ax.set_xlabel(f"{metric} − {baseline}")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def figure_name(key: str) -> str:
    """A metric key as a file name: ``val-aux/x/degeneration/y`` -> ``val-aux_x_degeneration_y.png``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") + ".png"


def seed_curves(series_per_seed: Sequence[Mapping], key: str) -> Optional[list[Curve]]:
    """The ``key`` curve of every seed; None when some seed never logged it."""
    curves = [list(s[key]) for s in series_per_seed if s.get(key)]
    return curves if len(curves) == len(series_per_seed) and curves else None
