"""Arms compared over seeds, from verl's tracker files alone: summaries, paired differences, tables, figures.

Input: one verl ``file`` tracker (JSONL) per (arm, seed), named ``<arm>-s<seed>.jsonl`` in one folder
(:func:`load_runs`). A run's validation accuracy at a step is the mean over data sources of
``val-core/<source>/acc/mean@k`` (the number the console's ``val`` shows).

Per run (:func:`run_summary`): ``final`` (the last validation), ``best`` (the highest validation) and ``auc``, the
area under the validation curve by the trapezoid rule over steps, divided by the step range (so a flat curve at
``a`` has ``auc = a``: the mean accuracy over training).

Per arm: the seeds' mean and sample standard deviation of each summary, and its paired difference against the
baseline arm (GRPO): for every seed both arms ran, ``arm - baseline``; their mean with

* the paired t 95% interval (Student's t with n - 1 degrees of freedom: :func:`paired_t_ci`) and the paired t-test's
  two-sided p-value (:func:`paired_t_p`),
* the exact sign-flip permutation p-value (:func:`sign_flip_p`: all 2^n sign patterns of the n differences; with 5
  seeds its smallest two-sided value is 2/32 = 0.0625, so 5 seeds can never reach p < 0.05 with it),
* the percentile bootstrap 95% interval beside them (:func:`bootstrap_ci`; resampling the seeds with a fixed
  bootstrap seed). With 5 seeds it has only 126 distinct resamples and is narrower than the t-interval (it ignores
  that the standard deviation itself is estimated from 5 values): it is shown, not relied on,
* Holm's adjustment of both p-values over the whole family of comparisons made (every arm x every summary:
  :func:`holm`), so the number of comparisons is part of every p-value reported.

Whether a run ended at a plateau (:func:`last_quarter`): the seed-mean validation's change over the last quarter of
the steps, and how many seeds ended at their best validation (final = best: the run was still climbing or flat).

Curves of any metric over seeds (:func:`seed_bands`): at every step that *all* of an arm's seeds logged (a crashed
or shorter seed never silently shrinks the mean), the mean, min-max range and sample standard deviation.
Degeneration metrics (:func:`degeneration_keys`): whatever ``degeneration/*`` (training) or validation keys
(``val-*`` holding ``degeneration``, or the ``ssopd`` reward manager's per-sample flags) the trackers have; none
is fine.

Pure: no verl, no training, no scipy (numpy; the t distribution in closed form; matplotlib for figures).
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


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function for an integer ``df`` >= 1, in closed form (Abramowitz & Stegun 26.7.3-4:
    with theta = atan(|t| / sqrt(df)), P(|T| <= |t|) is a finite series in sin and cos of theta). Seeds give an
    integer df, and the closed form needs no scipy (not a dependency here)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if math.isnan(t):
        raise ValueError("t is NaN")
    return 0.5 + math.copysign(_t_two_sided_mass(abs(t), int(df)), t) / 2


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for t >= 0 (the A(t|df) of A&S 26.7.3-4)."""
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    term, series = 1.0, 1.0
    if df % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        return sin * series
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
        term *= cos2 * (2 * k) / (2 * k + 1)
        series += term
    return 2 / math.pi * (theta + sin * math.sqrt(cos2) * series)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom: :func:`t_cdf` inverted by bisection."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, 2 * high
    for _ in range(200):  # halves [low, high] until float resolution
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2


def paired_t_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The t interval of the mean: mean -+ t_{(1+level)/2, n-1} * s / sqrt(n). Needs at least 2 values."""
    x = [float(v) for v in values]
    if len(x) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(x)}")
    half = t_quantile((1 + level) / 2, len(x) - 1) * statistics.stdev(x) / math.sqrt(len(x))
    mean = statistics.fmean(x)
    return mean - half, mean + half


def paired_t_p(values: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 (on paired differences: the paired t-test). Needs at
    least 2 values; equal nonzero values give 0 (no spread), all zeros give 1."""
    x = [float(v) for v in values]
    if len(x) < 2:
        raise ValueError(f"a t-test needs at least 2 values, got {len(x)}")
    mean, sd = statistics.fmean(x), statistics.stdev(x)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return 1 - _t_two_sided_mass(abs(mean) / (sd / math.sqrt(len(x))), len(x) - 1)


MAX_SIGN_FLIP_VALUES = 16  # 2^16 = 65,536 sign patterns: exact in a blink; more seeds than that is not this study


def sign_flip_p(values: Sequence[float]) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of mean 0: the share of the 2^n sign patterns of the
    differences whose |sum| is at least the observed |sum| (ties count, up to rounding). Under "the arm makes no
    difference" each seed's difference is as likely + as -, so this needs no normality; its smallest value is
    2 / 2^n (every seed the same sign)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or x.size > MAX_SIGN_FLIP_VALUES:
        raise ValueError(f"the exact sign-flip test takes 1 to {MAX_SIGN_FLIP_VALUES} values, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"non-finite differences: {values}")
    signs = 1 - 2 * ((np.arange(2**x.size)[:, None] >> np.arange(x.size)) & 1)  # every +-1 pattern, one per row
    observed = abs(x.sum())
    sums = np.abs(signs @ x)
    return float(np.mean(sums >= observed - 1e-12 * max(1.0, np.abs(x).sum())))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order out): the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). It controls the family-wise error over all m comparisons."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Paired:
    """An arm minus the baseline on one summary, over the seeds both ran. The t fields are None with one seed."""

    arm: str
    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    t_low: Optional[float]  # paired t interval
    t_high: Optional[float]
    boot_low: float  # percentile bootstrap interval
    boot_high: float
    p_t: Optional[float]  # paired t-test, two-sided
    p_flip: float  # exact sign-flip, two-sided
    p_t_holm: Optional[float]  # the same, Holm-adjusted over the family (every pair returned together)
    p_flip_holm: float
    family: int  # the number of comparisons in that family


def paired_differences(
    summaries: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str = "grpo", metrics=SUMMARIES,
    level: float = 0.95, resamples: int = 10_000, seed: int = 0,
) -> list[Paired]:  # fmt: skip
    """Every arm but the baseline, every metric: per-seed ``arm - baseline`` over the common seeds, with the mean,
    its t and bootstrap intervals and its t-test and sign-flip p-values, raw and Holm-adjusted over all the
    comparisons returned (arms x metrics). Arms sharing no seed with the baseline are left out."""
    base = summaries.get(baseline)
    if base is None:
        raise ValueError(f"no runs of the baseline arm {baseline!r}")
    rows = []
    for arm, per_seed in summaries.items():
        common = tuple(s for s in per_seed if s in base)
        if arm == baseline or not common:
            continue
        for metric in metrics:
            diffs = tuple(per_seed[s][metric] - base[s][metric] for s in common)
            rows.append((arm, metric, common, diffs))
    p_t = [paired_t_p(d) if len(d) > 1 else None for *_, d in rows]
    p_flip = [sign_flip_p(d) for *_, d in rows]
    tested = [p for p in p_t if p is not None]
    holm_t = iter(holm(tested))
    p_t_holm = [None if p is None else next(holm_t) for p in p_t]
    out = []
    for (arm, metric, common, diffs), pt, pth, pf, pfh in zip(rows, p_t, p_t_holm, p_flip, holm(p_flip)):
        t_low, t_high = paired_t_ci(diffs, level) if len(diffs) > 1 else (None, None)
        boot_low, boot_high = bootstrap_ci(diffs, level, resamples, seed)
        out.append(Paired(arm, metric, common, diffs, statistics.fmean(diffs), t_low, t_high, boot_low, boot_high,
                          pt, pf, pth, pfh, len(rows)))  # fmt: skip
    return out


@dataclass(frozen=True)
class Plateau:
    """The seed-mean validation curve over the last quarter of the steps, and the seeds that ended at their best."""

    start_step: int  # the first validation in the last quarter
    end_step: int
    change: float  # seed mean at end_step - at start_step
    flat: bool  # |change| <= tolerance
    final_is_best: int  # seeds whose last validation is their highest
    seeds: int


def last_quarter(curves: Sequence[Curve], tolerance: float = 0.01) -> Optional[Plateau]:
    """Is an arm flat at the end? Over the validations at steps >= last - (last - first) / 4 of the steps every seed
    logged, the seed mean's change from the first to the last of them; flat when it is within ``tolerance``. None
    when the last quarter holds fewer than 2 validations (nothing to judge)."""
    bands = seed_bands(curves)
    first, last = bands[0].step, bands[-1].step
    window = [b for b in bands if b.step >= last - (last - first) / 4]
    if len(window) < 2:
        return None
    change = window[-1].mean - window[0].mean
    at_best = sum(1 for c in curves if c[-1][1] >= max(v for _, v in c))
    return Plateau(window[0].step, window[-1].step, change, abs(change) <= tolerance, at_best, len(curves))


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


def _p(p: Optional[float]) -> str:
    return "–" if p is None else f"{p:.3f}" if p >= 0.001 else "<0.001"


def _interval(low: Optional[float], high: Optional[float]) -> str:
    return "–" if low is None else f"[{low:+.3f}, {high:+.3f}]"


def paired_table(pairs: Sequence[Paired], baseline: str = "grpo") -> str:
    """Markdown, one row per (arm, summary): the mean paired difference vs the baseline, how many seeds it is
    positive in, the paired t 95% interval, the bootstrap 95% interval, and both p-values raw and Holm-adjusted."""
    lines = [f"| arm | summary | seeds | mean − {baseline} | seeds > 0 | paired t 95% CI | bootstrap 95% CI | "
             "t-test p | p Holm | sign-flip p | p Holm |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pairs:
        positive = sum(1 for d in p.differences if d > 0)
        cells = [p.arm, p.metric, str(len(p.seeds)), f"{p.mean:+.3f}", f"{positive}/{len(p.differences)}",
                 _interval(p.t_low, p.t_high), _interval(p.boot_low, p.boot_high), _p(p.p_t), _p(p.p_t_holm),
                 _p(p.p_flip), _p(p.p_flip_holm)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plateau_table(plateaus: Mapping[str, Optional[Plateau]], tolerance: float) -> str:
    """Markdown, one row per arm: the seed mean's change over the last quarter of the steps, whether that is flat
    (within ``tolerance``), and the seeds whose last validation is their best."""
    lines = [f"| arm | last quarter | change of the seed mean | flat (within ±{tolerance:g}) | "
             "seeds with final = best |", "|---|---|---:|---|---:|"]
    for arm, q in plateaus.items():
        if q is None:
            lines.append(f"| {arm} | fewer than 2 validations | – | cannot tell | – |")
            continue
        flat = "yes" if q.flat else "no"
        lines.append(f"| {arm} | step {q.start_step} → {q.end_step} | {q.change:+.3f} | {flat} | "
                     f"{q.final_is_best}/{q.seeds} |")  # fmt: skip
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
    """One panel per summary: each arm's per-seed differences vs the baseline (dots), the mean with its paired t
    95% interval (square, thick bar) and its bootstrap 95% interval (thin bar below)."""
    plt = _pyplot()
    arms = list(dict.fromkeys(p.arm for p in pairs))
    fig, axes = plt.subplots(1, len(SUMMARIES), figsize=(4.2 * len(SUMMARIES), 0.5 * len(arms) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], SUMMARIES):
        for y, arm in enumerate(arms):
            p = next((p for p in pairs if p.arm == arm and p.metric == metric), None)
            if p is None:
                continue
            ax.plot(p.differences, [y] * len(p.differences), "o", color="gray", alpha=0.5, markersize=3)
            if p.t_low is not None:
                ax.errorbar(p.mean, y, xerr=[[p.mean - p.t_low], [p.t_high - p.mean]], fmt="s", color="C0",
                            capsize=3, label="paired t 95%" if y == 0 else None)  # fmt: skip
            ax.errorbar(p.mean, y - 0.2, xerr=[[p.mean - p.boot_low], [p.boot_high - p.mean]], fmt="none",
                        color="C1", capsize=2, linewidth=0.8, label="bootstrap 95%" if y == 0 else None)  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(arms)), arms if ax is axes[0][0] else [""] * len(arms), fontsize=7)
        ax.set_xlabel(f"{metric} − {baseline}")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].legend(fontsize=6, loc="lower right")
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
