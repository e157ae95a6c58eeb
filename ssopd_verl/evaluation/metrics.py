"""Avg@k, pass@k, maj@k and bootstrap confidence intervals. Pure (numpy only).

Conventions (all values are percentages, 0-100):
* Avg@k: mean over problems of the mean score of the problem's k samples (the paper's headline metric, n = 12).
* pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), from n >= k samples with c correct
  (a sample is correct when its score is > 0).
* maj@k: the majority answer of the first k samples (answers grouped by `grading.answer_key`); samples without an
  answer do not vote; a tie counts as the mean correctness of the tied answers (= a random tie-break in expectation).
  An answer's correctness is the mean score of the samples that gave it: the same as each sample's score when the
  grader agreed with itself, and the expected score of a random representative when it did not (samples whose
  answers only share a key, e.g. ``\\left(1,2\\right)`` and ``(1,2)``, or a grading timeout on one of them).
* CI: percentile bootstrap over problems (problems resampled with replacement, samples kept with their problem).
  The macro average (mean over benchmarks) is bootstrapped by resampling each benchmark's problems independently.

Inputs are checked: scores must be finite numbers in [0, 1] (NaN raises), every problem needs one answer per score,
and pass@k needs integers 0 <= c <= n and 1 <= k <= n. Violations raise ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter, defaultdict
from math import comb
from typing import Optional, Sequence

import numpy as np

from ssopd_verl.evaluation.grading import answer_key


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"pass@k: {name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c correct (fraction, 0-1)."""
    n, c, k = _int("n", n), _int("c", c), _int("k", k)
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n correct samples, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _check_scores(scores: Sequence[float], where: str = "") -> list[float]:
    out = []
    for i, score in enumerate(scores):
        if not isinstance(score, (numbers.Real, np.bool_)):
            raise ValueError(f"score {i}{where} is not a number: {score!r}")
        value = float(score)
        if math.isnan(value):
            raise ValueError(f"score {i}{where} is NaN (a sample that was never graded?)")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"score {i}{where} is {value}, outside [0, 1]")
        out.append(value)
    return out


def majority_correct(answers: Sequence[Optional[str]], scores: Sequence[float]) -> float:
    """maj@k of one problem, with the k samples' extracted answers and scores (fraction, 0-1).

    The majority answer's correctness is the mean score of the samples that gave it (see the module doc), so the
    result does not depend on the order of the samples.
    """
    if len(answers) != len(scores):
        raise ValueError(f"majority vote needs one answer per score, got {len(answers)} answers, {len(scores)} scores")
    scores = _check_scores(scores)
    group_scores: dict[str, list[float]] = defaultdict(list)
    for answer, score in zip(answers, scores):
        key = answer_key(answer)
        if key is not None:
            group_scores[key].append(score)
    if not group_scores:
        return 0.0
    votes = Counter({key: len(values) for key, values in group_scores.items()})
    top = max(votes.values())
    tied = [key for key, count in votes.items() if count == top]
    return float(np.mean([np.mean(group_scores[key]) for key in tied]))


def per_problem_metrics(
    scores: Sequence[Sequence[float]], answers: Sequence[Sequence[Optional[str]]], k: Optional[int] = None
) -> dict:
    """Per-problem arrays (fractions) of avg@k, pass@k and maj@k from each problem's samples in sample order.

    ``k`` defaults to the smallest number of samples any problem has. Avg@k and maj@k use the first k samples;
    pass@k uses all n samples (the unbiased estimator is best with n > k).
    """
    if not scores:
        raise ValueError("no problems")
    if len(answers) != len(scores):
        raise ValueError(f"{len(scores)} problems have scores but {len(answers)} have answers")
    for i, (s, a) in enumerate(zip(scores, answers)):
        if len(s) != len(a):
            raise ValueError(f"problem {i}: {len(s)} scores but {len(a)} answers")
        if not len(s):
            raise ValueError(f"problem {i} has no samples")
    scores = [_check_scores(s, f" of problem {i}") for i, s in enumerate(scores)]
    n_min = min(len(s) for s in scores)
    k = n_min if k is None else k
    if not 0 < k <= n_min:
        raise ValueError(f"k={k} needs every problem to have >= k samples (smallest has {n_min})")
    avg = np.array([np.mean(s[:k]) for s in scores], dtype=float)
    pss = np.array([pass_at_k(len(s), int(sum(1 for x in s if x > 0)), k) for s in scores], dtype=float)
    maj = np.array([majority_correct(a[:k], s[:k]) for s, a in zip(scores, answers)], dtype=float)
    return {"k": k, "avg": avg, "pass": pss, "maj": maj}


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-problem values."""
    return macro_bootstrap_ci([values], n_boot=n_boot, seed=seed, alpha=alpha)


def macro_bootstrap_ci(
    groups: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over groups (benchmarks) of each group's mean."""
    rng = np.random.default_rng(seed)
    means = np.zeros(n_boot)
    for values in groups:
        v = np.asarray(values, dtype=float)
        idx = rng.integers(0, len(v), size=(n_boot, len(v)))
        means += v[idx].mean(axis=1)
    means /= len(groups)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize(
    benchmarks: dict[str, dict], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """Summary of several benchmarks: ``{name: {"scores": [[...]], "answers": [[...]]}}`` -> metrics in percent.

    Returns ``{"benchmarks": {name: {"num_problems", "n", "k", "avg@k": {"value", "ci"}, "pass@k": ..., "maj@k": ...}},
    "macro": {...}}``; metric names carry the actual k (e.g. ``avg@12``).
    """
    out, per = {}, {}
    for name, data in benchmarks.items():
        try:
            m = per_problem_metrics(data["scores"], data["answers"], data.get("k"))
        except ValueError as e:
            raise ValueError(f"benchmark {name}: {e}") from e
        per[name] = m
        k = m["k"]
        entry = {"num_problems": len(m["avg"]), "n": min(len(s) for s in data["scores"]), "k": k}
        for metric in ("avg", "pass", "maj"):
            values = m[metric]
            lo, hi = bootstrap_ci(values, n_boot, seed, alpha)
            entry[f"{metric}@{k}"] = {"value": 100 * float(values.mean()), "ci": [100 * lo, 100 * hi]}
        out[name] = entry
    macro = {"benchmarks": list(per)}
    ks = {m["k"] for m in per.values()}
    if len(ks) == 1 and per:
        k = ks.pop()
        for metric in ("avg", "pass", "maj"):
            groups = [m[metric] for m in per.values()]
            lo, hi = macro_bootstrap_ci(groups, n_boot, seed, alpha)
            value = float(np.mean([g.mean() for g in groups]))
            macro[f"{metric}@{k}"] = {"value": 100 * value, "ci": [100 * lo, 100 * hi]}
    return {"benchmarks": out, "macro": macro, "ci_level": 1 - alpha, "n_boot": n_boot}
