"""Avg@k, pass@k, maj@k and bootstrap confidence intervals. Pure (numpy only).

Conventions (all values are percentages, 0-100):
* Avg@k: mean over problems of the mean score of the problem's k samples (the paper's headline metric, n = 12).
* pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), from n >= k samples with c correct.
* maj@k: the majority answer of the first k samples (answers grouped by `grading.answer_key`); samples without an
  answer do not vote; a tie counts as the mean correctness of the tied answers (= a random tie-break in expectation).
* CI: percentile bootstrap over problems (problems resampled with replacement, samples kept with their problem).
  The macro average (mean over benchmarks) is bootstrapped by resampling each benchmark's problems independently.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Optional, Sequence

import numpy as np

from ssopd_verl.evaluation.grading import answer_key


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c correct (fraction, 0-1)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: Sequence[Optional[str]], scores: Sequence[float]) -> float:
    """maj@k of one problem, with the k samples' extracted answers and scores (fraction, 0-1)."""
    votes = Counter()
    correct = {}
    for answer, score in zip(answers, scores):
        key = answer_key(answer)
        if key is None:
            continue
        votes[key] += 1
        correct.setdefault(key, float(score))  # equal keys are equal answers: one sample's score stands for all
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [key for key, count in votes.items() if count == top]
    return float(np.mean([correct[key] for key in tied]))


def per_problem_metrics(
    scores: Sequence[Sequence[float]], answers: Sequence[Sequence[Optional[str]]], k: Optional[int] = None
) -> dict:
    """Per-problem arrays (fractions) of avg@k, pass@k and maj@k from each problem's samples in sample order.

    ``k`` defaults to the smallest number of samples any problem has. Avg@k and maj@k use the first k samples;
    pass@k uses all n samples (the unbiased estimator is best with n > k).
    """
    if not scores:
        raise ValueError("no problems")
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
        m = per_problem_metrics(data["scores"], data["answers"], data.get("k"))
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
