"""One compact console line per training step, from the metrics verl logs.

verl's console logger prints every metric of a step on one line (about 3,000 characters); the numbers a person
watches are a dozen. The SSOPD trainer prints this line after each step whatever the loggers are, so the
CPU main job can turn verl's console logger off and keep its full log in a file.

    ssopd [####----]  4/8  reward 0.41  val 0.38  pairs 5  distill 0.0123  kl 1.92  teacher-student +0.84 nats  argmax!= 0.31  skipped 0  loop 0.00  cut 0.02  step 6.1 s (teacher 18%)

Pure module: no verl import.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

PREFIX = "ssopd"


def validation_accuracy(metrics: Mapping[str, float]) -> Optional[float]:
    """Mean over data sources of verl's validation accuracy (`val-core/<source>/acc/mean@k`); None if absent."""
    values = [float(v) for k, v in metrics.items() if k.startswith("val-core/") and "/acc/" in k and "mean@" in k]
    return sum(values) / len(values) if values else None


def _bar(step: int, total: int, width: int = 10) -> str:
    if total <= 0:
        return ""
    done = min(width, round(width * step / total))
    return "[" + "#" * done + "-" * (width - done) + "]"


def _number(metrics, key, fmt):
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return "nan" if math.isnan(value) else format(value, fmt)


def step_line(metrics: Mapping[str, float], step: int, total_steps: int) -> str:
    """The step's line; a field whose metric is absent (e.g. no validation this step, lambda = 0) is left out."""
    width = len(str(total_steps))
    parts = [PREFIX, _bar(step, total_steps), f"{step:>{width}}/{total_steps}"]

    def add(label, key, fmt, suffix=""):
        text = _number(metrics, key, fmt)
        if text is not None:
            parts.append(f"{label} {text}{suffix}")

    add("reward", "critic/score/mean", ".3f")
    accuracy = validation_accuracy(metrics)
    if accuracy is not None:
        parts.append(f"val {accuracy:.3f}")
    add("pairs", "ssopd/pairs", ".0f")
    add("distill", "ssopd/distill_loss", ".4f")
    add("kl", "ssopd/kl_unclipped", ".3f")
    if "ssopd/teacher_logp_sampled" in metrics and "ssopd/student_logp_sampled" in metrics:
        # How much more likely the teacher finds the sampled tokens than the student does: > 0 when the witness
        # helps the teacher read the target (on wrong targets a good teacher often finds them *less* likely).
        gain = float(metrics["ssopd/teacher_logp_sampled"]) - float(metrics["ssopd/student_logp_sampled"])
        parts.append(f"teacher-student {gain:+.3f} nats")
    add("argmax!=", "ssopd/teacher_argmax_differs", ".2f")
    add("skipped", "ssopd/targets_skipped", ".0f")
    # degeneration of the step's completions: share that ended in a repetition loop, share cut at the length limit
    add("loop", "degeneration/repetition_loop_frac", ".2f")
    add("cut", "degeneration/length_limit_frac", ".2f")
    step_time = _number(metrics, "timing_s/step", ".1f")
    if step_time is not None:
        share = metrics.get("ssopd/teacher_time_share")
        parts.append(f"step {step_time} s" + (f" (teacher {100 * float(share):.0f}%)" if share is not None else ""))
    return "  ".join(p for p in parts if p)


def validation_line(metrics: Mapping[str, float], step: int) -> str:
    accuracy = validation_accuracy(metrics)
    shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
    return f"{PREFIX} validation at step {step}: accuracy {shown}"
