"""Results reporting: the paper-style table from evaluation summaries, training curves from verl's tracker files.

Table: one row per evaluated run (``summary.json`` written by ``scripts/evaluate.py``), one column per benchmark
plus the macro average, Avg@k (the paper's metric) with its bootstrap CI; markdown and CSV.

Curves: verl's ``file`` logger (``trainer.logger=['console','file']``) writes one JSON object per ``log`` call,
``{"step": <int>, "data": {<metric>: <value>, ...}}``, to ``$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl``
(or ``$VERL_FILE_LOGGER_PATH``); the launch scripts set the root to ``$LOG_DIR``. Several runs (GRPO / OPSD / SSOPD)
are drawn on the same axes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

from ssopd_verl.evaluation.benchmarks import PAPER_BENCHMARKS
from ssopd_verl.evaluation.checkpoint import describe_evaluated

COLUMN_TITLES = {"aime24": "AIME24", "aime25": "AIME25", "hmmt25_feb": "HMMT25", "amc23": "AMC23", "math500": "MATH500"}

# The only numbers the paper's abstract gives: Qwen3-8B, macro Avg@12 over AIME24/AIME25/HMMT25.
PAPER_MACRO_AVG12 = {"Qwen3-8B SSOPD (paper)": 65.6, "Qwen3-8B GRPO (paper)": 64.0, "Qwen3-8B OPSD (paper)": 64.8}

# (panel title, metric-name pattern); a pattern may match several series (e.g. one per validation set).
PANELS = (
    ("reward (critic/score/mean)", r"^critic/score/mean$"),
    ("validation accuracy", r"^val-core/.+/acc/mean@\d+$"),
    ("response length (mean)", r"^response_length/mean$"),
    ("truncated responses (clip ratio)", r"^response_length/clip_ratio$"),
    ("ssopd/frontier_frac", r"^ssopd/frontier_frac$"),
    ("ssopd/pairs", r"^ssopd/pairs$"),
    ("ssopd/distill_loss", r"^ssopd/distill_loss$"),
    ("ssopd/kl_unclipped", r"^ssopd/kl_unclipped$"),
    ("ssopd/clipped_teacher_mass", r"^ssopd/clipped_teacher_mass$"),
    ("teacher vs student log p (target tokens)", r"^ssopd/(teacher|student)_logp_sampled$"),
)


# ---------------------------------------------------------------------------------------------------- table


def load_summary(path: str | Path) -> dict:
    """A ``summary.json`` (or the evaluation directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    return json.loads(path.read_text())


def _avg_key(entry: dict) -> Optional[str]:
    return next((k for k in entry if k.startswith("avg@")), None)


def table_rows(
    summaries: Sequence[tuple[Optional[str], dict]], benchmarks: Sequence[str] = PAPER_BENCHMARKS
) -> list[dict]:
    """One row per (label, summary): ``{"run", "k", <bench>: (value, lo, hi) or None, "macro": ...}``.

    The macro average is recomputed over ``benchmarks`` (mean of their Avg@k; CI only when the summary's own macro
    covers exactly these benchmarks), so runs evaluated on extra sets still compare on the paper's three.
    """
    rows = []
    for label, summary in summaries:
        label = label or summary.get("run", {}).get("label") or "run"
        row = {"run": label, "k": None, "evaluated": summary.get("run", {}).get("evaluated")}
        values = []
        for bench in benchmarks:
            entry = summary["benchmarks"].get(bench)
            key = _avg_key(entry) if entry else None
            if key is None:
                row[bench] = None
                continue
            row["k"] = int(key.split("@")[1])
            metric = entry[key]
            row[bench] = (metric["value"], *metric["ci"])
            values.append(metric["value"])
        macro = summary.get("macro", {})
        key = _avg_key(macro)
        if len(values) == len(benchmarks) and key and list(macro.get("benchmarks", [])) == list(benchmarks):
            row["macro"] = (macro[key]["value"], *macro[key]["ci"])
        elif len(values) == len(benchmarks):
            row["macro"] = (sum(values) / len(values), math.nan, math.nan)
        else:
            row["macro"] = None
        rows.append(row)
    return rows


def _fmt(cell, ci: bool) -> str:
    if cell is None:
        return "–"
    value, lo, hi = cell
    if ci and not math.isnan(lo):
        return f"{value:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{value:.1f}"


def markdown_table(
    rows: list[dict], benchmarks: Sequence[str] = PAPER_BENCHMARKS, ci: bool = True, paper: bool = False
) -> str:
    ks = {row["k"] for row in rows if row["k"]}
    metric = f"Avg@{ks.pop()}" if len(ks) == 1 else "Avg@k"
    titles = [COLUMN_TITLES.get(b, b) for b in benchmarks]
    lines = [
        "| Model / method | " + " | ".join(titles) + " | Avg. |",
        "|---|" + "---:|" * (len(benchmarks) + 1),
    ]
    for row in rows:
        cells = [_fmt(row[b], ci) for b in benchmarks] + [_fmt(row["macro"], ci)]
        lines.append(f"| {row['run']} | " + " | ".join(cells) + " |")
    if paper and list(benchmarks) == list(PAPER_BENCHMARKS):
        for label, value in PAPER_MACRO_AVG12.items():
            lines.append(f"| {label} | " + " | ".join("–" for _ in benchmarks) + f" | {value:.1f} |")
    note = f"{metric} in %, 95% bootstrap CI over problems in brackets" if ci else f"{metric} in %"
    # what each row's evaluation loaded (scripts/evaluate.py records it): the step, merged adapters, the weights' hash
    evaluated = [f"- {row['run']}: {describe_evaluated(row['evaluated'])}" for row in rows if row.get("evaluated")]
    footer = "\n\nEvaluated:\n\n" + "\n".join(evaluated) if evaluated else ""
    return f"{note}.\n\n" + "\n".join(lines) + footer + "\n"


def csv_table(rows: list[dict], benchmarks: Sequence[str] = PAPER_BENCHMARKS) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["run", "k"]
    for col in [*benchmarks, "macro"]:
        header += [col, f"{col}_ci_lo", f"{col}_ci_hi"]
    writer.writerow(header)
    for row in rows:
        out = [row["run"], row["k"]]
        for col in [*benchmarks, "macro"]:
            cell = row[col]
            out += ["", "", ""] if cell is None else [f"{x:.4f}" if not math.isnan(x) else "" for x in cell]
        writer.writerow(out)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- curves

STYLES = ("-", "--", ":", "-.")


def load_tracker(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """verl file-logger JSONL -> {metric: [(step, value), ...]} sorted by step.

    Non-numeric values are skipped; a torn last line is ignored; if a step is logged again (a resumed run appends
    to a new file, but a restarted one may repeat steps), the last value wins.
    """
    series: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = record.get("step")
            for key, value in (record.get("data") or {}).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or step is None:
                    continue
                series.setdefault(key, {})[int(step)] = float(value)
    return {key: sorted(points.items()) for key, points in series.items()}


def plot_training_curves(
    runs: Sequence[tuple[str, str | Path]], out_png: str | Path, panels=PANELS, title: Optional[str] = None
) -> dict[str, list[str]]:
    """Draw the panels for every run (label, tracker file) into one PNG; returns {panel: [series drawn]}."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    data = [(label, load_tracker(path)) for label, path in runs]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    drawn: dict[str, list[str]] = {}
    for ax, (panel, pattern) in zip(axes.flat, panels):
        regex = re.compile(pattern)
        drawn[panel] = []
        for run_idx, (label, series) in enumerate(data):
            keys = sorted(k for k in series if regex.search(k))
            for key_idx, key in enumerate(keys):
                steps, values = zip(*series[key])
                name = label if len(keys) == 1 else f"{label}: {_short(key)}"
                # one colour per run, one line style per series of the run (e.g. per validation set)
                ax.plot(steps, values, color=f"C{run_idx % 10}", linestyle=STYLES[key_idx % len(STYLES)],
                        marker="o" if len(steps) < 20 else None, markersize=3, label=name)
                drawn[panel].append(f"{label}:{key}")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn[panel]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn


def _short(key: str) -> str:
    """val-core/aime24/acc/mean@4 -> aime24 mean@4."""
    parts = key.split("/")
    return f"{parts[1]} {parts[-1]}" if key.startswith("val-") and len(parts) >= 4 else key
