"""Methods compared over seeds: validation-accuracy curves, their mean and spread, a table and a figure.

Input: for each method, one verl tracker file (``file`` logger JSONL) per seed. A run's validation accuracy at a
step is the mean over data sources of ``val-core/<source>/acc/mean@k`` (the number the console's ``val`` shows).
Over seeds, at every step that *all* of a method's seeds validated (a crashed or shorter seed never silently
shrinks the mean), the curve is the mean with the min-max range and the sample standard deviation.

The table, per method: the seed-mean accuracy at the steps asked for, the best seed-mean accuracy and its step, and
the first step at which the seed-mean reaches a threshold (``–`` if never). Pure: no verl, no training.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ssopd_verl.reporting import load_tracker

Curve = list[tuple[int, float]]  # (step, accuracy), sorted by step


def validation_accuracy(path: str | Path) -> Curve:
    """One run's validation curve: per step, the mean of its ``val-core/*/acc/mean@*`` series."""
    per_step: dict[int, list[float]] = {}
    for key, points in load_tracker(path).items():
        if key.startswith("val-core/") and "/acc/mean@" in key:
            for step, value in points:
                per_step.setdefault(step, []).append(value)
    return sorted((step, sum(v) / len(v)) for step, v in per_step.items())


@dataclass(frozen=True)
class SeedBand:
    """A method's curve over seeds at one step."""

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
            raise ValueError(f"non-finite validation accuracy at step {step}: {values}")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        bands.append(SeedBand(step, statistics.fmean(values), min(values), max(values), std, len(values)))
    return bands


def first_step_reaching(bands: Sequence[SeedBand], threshold: float) -> Optional[int]:
    return next((b.step for b in bands if b.mean >= threshold), None)


def comparison_table(
    methods: Mapping[str, Sequence[SeedBand]], at_steps: Sequence[int], threshold: float
) -> str:
    """Markdown: seed-mean accuracy (± std) at ``at_steps``, best, and the first step reaching ``threshold``."""
    head = ["method", "seeds"] + [f"step {s}" for s in at_steps] + ["best (step)", f"first step >= {threshold:.2f}"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for name, bands in methods.items():
        by_step = {b.step: b for b in bands}
        cells = [name, str(bands[0].seeds) if bands else "0"]
        for step in at_steps:
            b = by_step.get(step)
            cells.append("–" if b is None else f"{b.mean:.3f} ± {b.std:.3f}")
        best = max(bands, key=lambda b: (b.mean, -b.step), default=None)
        cells.append("–" if best is None else f"{best.mean:.3f} ({best.step})")
        reached = first_step_reaching(bands, threshold)
        cells.append("–" if reached is None else str(reached))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_seed_bands(methods: Mapping[str, Sequence[SeedBand]], out_png: str | Path, title: str) -> None:
    """Accuracy vs step: the seed mean as a line, the min-max range over seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, bands) in enumerate(methods.items()):
        if not bands:
            continue
        steps = [b.step for b in bands]
        ax.plot(steps, [b.mean for b in bands], color=f"C{i}", marker="o", markersize=3,
                label=f"{name} (n={bands[0].seeds})")  # fmt: skip
        ax.fill_between(steps, [b.low for b in bands], [b.high for b in bands], color=f"C{i}", alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (greedy)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
