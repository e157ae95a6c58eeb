r"""Which completions of a GRPO group teach which: frontier weights and witness/target pairing.

GRPO samples ``n`` completions ``y_1..y_n`` per prompt ``x`` (one *group*, identified by verl's ``uid``) and
scores them with a verifier. With ``c_i`` = 1 when ``y_i`` is correct, the group accuracy is

    p = (1/n) * sum_i c_i.

A group is on the *frontier* when ``0 < p < 1``: correct and wrong branches coexist, so the group itself holds
a demonstration of what the model got wrong. Only frontier groups get the SSOPD auxiliary loss. In each one:

* the **witness** ``y+`` is the shortest correct completion, ``argmin_{i: c_i = 1} |y_i|``;
* the **target** ``y-`` is the longest wrong completion, ``argmax_{i: c_i = 0} |y_i|``;

and the self-teacher (the policy with ``y+`` in its context) is distilled into the student on the prefixes of
``y-``. The group's loss is scaled by a frontier weight ``w(p)``, zero off the frontier:

    variance:       w(p) = 4 p (1 - p)          (1 at p = 1/2; the Bernoulli variance, rescaled)
    sqrt_variance:  w(p) = 2 sqrt(p (1 - p))    (its standard deviation, rescaled)
    binary, none:   w(p) = 1[0 < p < 1]

Stopping-time view (why shortest / longest): read each completion as a run that stops when it commits to an
answer. The longest wrong branch is the failure that persisted longest before stopping, so its prefixes contain
the most states where the policy kept choosing failing actions; the shortest correct branch is the fastest
success. Distilling the fastest success into the prefixes of the most persistent failure edits exactly those
persistent failure states toward fast-success actions.

Conventions [our choices where the paper says nothing]: a truncated completion (hit the maximum response
length) counts as wrong even if the verifier accepted it; ties in length go to the completion with the smallest
``tie_keys`` entry (the response token ids, so the choice does not depend on the order in which verl happens to
batch the rows: a resumed run pairs as the uninterrupted one did), then to the lowest batch index; groups are taken
in order of first appearance of their uid. The ablations (random witness/target, the dataset's reference solution
as witness, every wrong completion as target, ``"none"`` weighting) reuse the same frontier filter so that they
differ from SSOPD in one knob only.

Pure module: numpy and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRONTIER_KINDS = ("variance", "sqrt_variance", "binary", "none")
WITNESS_SOURCES = ("shortest_correct", "random_correct", "reference_solution")
TARGET_RULES = ("longest_wrong", "random_wrong", "all_wrong")


def frontier_weight(acc, kind="variance"):
    """Frontier weight ``w(p)`` of a group accuracy (float -> float, array -> float array).

    ``"none"`` means "no frontier shaping": every frontier group weighs 1, which is numerically the same as
    ``"binary"``; it exists as a separate name so ablation configs say what they mean. Every kind is 0 at p = 0
    and p = 1, because those groups have no witness or no target.
    """
    if kind not in FRONTIER_KINDS:
        raise ValueError(f"unknown frontier kind {kind!r}; expected one of {FRONTIER_KINDS}")
    p = np.asarray(acc, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"group accuracy must lie in [0, 1], got {acc!r}")
    if kind == "variance":
        w = 4.0 * p * (1.0 - p)
    elif kind == "sqrt_variance":
        w = 2.0 * np.sqrt(p * (1.0 - p))
    else:  # binary, none
        w = ((p > 0) & (p < 1)).astype(np.float64)
    return float(w) if w.ndim == 0 else w


@dataclass(frozen=True)
class Pair:
    uid: object  # group id (verl's `uid`)
    witness: int | None  # batch index of the witness; None for witness_source="reference_solution"
    target: int  # batch index of the target (wrong) completion
    accuracy: float  # group accuracy p
    weight: float  # frontier_weight(p, kind)
    target_share: float  # 1 / number of targets of this group (all_wrong splits the group's loss; else 1.0)


@dataclass(frozen=True)
class GroupStats:
    num_groups: int
    num_frontier: int  # groups with 0 < p < 1
    accuracy: dict  # uid -> p, in order of first appearance


def _as_bool(values, name):
    """A bool array; numbers are accepted only as 0/1 so that raw rewards (-1/1, 0.5) are not silently truthy."""
    a = np.asarray(values)
    if a.dtype != np.bool_:
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1); threshold the rewards first")
        a = a.astype(bool)
    return a.reshape(-1)


def _effective_correct(uids, correct, truncated):
    """Correctness after the truncation rule, with length checks."""
    ok = _as_bool(correct, "correct")
    if len(ok) != len(uids):
        raise ValueError(f"len(correct)={len(ok)} != len(uids)={len(uids)}")
    if truncated is not None:
        cut = _as_bool(truncated, "truncated")
        if len(cut) != len(uids):
            raise ValueError(f"len(truncated)={len(cut)} != len(uids)={len(uids)}")
        ok = ok & ~cut  # an answer cut off at max length is not a finished answer
    return ok


def _group_members(uids):
    """uid -> list of batch indices, in order of first appearance (dicts keep insertion order)."""
    members: dict = {}
    for i, uid in enumerate(uids):
        members.setdefault(uid, []).append(i)
    return members


def _accuracy(members, ok):
    return {uid: float(ok[idx].sum()) / len(idx) for uid, idx in members.items()}


def group_accuracy(uids, correct, truncated=None) -> dict:
    """uid -> group accuracy p (truncated completions count as wrong), in order of first appearance."""
    uids = list(uids)
    return _accuracy(_group_members(uids), _effective_correct(uids, correct, truncated))


def small_groups(uids) -> int:
    """Groups with fewer than two completions: they can hold no (witness, target) pair."""
    return sum(len(idx) < 2 for idx in _group_members(list(uids)).values())


def group_stats(uids, correct, truncated=None) -> GroupStats:
    acc = group_accuracy(uids, correct, truncated)
    return GroupStats(len(acc), sum(0.0 < p < 1.0 for p in acc.values()), acc)


def select_pairs(
    uids,
    correct,
    lengths,
    *,
    truncated=None,
    witness_source="shortest_correct",
    target_rule="longest_wrong",
    frontier_kind="variance",
    rng=None,
    tie_keys=None,
) -> list[Pair]:
    """Witness/target pairs of the frontier groups of a batch (see the module docstring).

    uids, correct, lengths (response tokens) and truncated are per-completion sequences of length B; tie_keys
    (optional, length B, mutually comparable, e.g. tuples of response token ids) break ties in length, and order
    the candidates of the random variants before the draw.
    ``rng`` (a ``numpy.random.Generator``) is required by the random variants; they draw, per frontier group
    in order, first the witness and then the target, so a seeded generator gives a reproducible pairing.

    A group with a single completion (e.g. its other rows had NaN rewards and were left out by the caller) has
    p = 0 or 1: it is never on the frontier and gets no pair (:func:`small_groups` counts such groups).
    """
    if witness_source not in WITNESS_SOURCES:
        raise ValueError(f"unknown witness_source {witness_source!r}; expected one of {WITNESS_SOURCES}")
    if target_rule not in TARGET_RULES:
        raise ValueError(f"unknown target_rule {target_rule!r}; expected one of {TARGET_RULES}")
    if frontier_kind not in FRONTIER_KINDS:
        raise ValueError(f"unknown frontier_kind {frontier_kind!r}; expected one of {FRONTIER_KINDS}")
    randomised = witness_source == "random_correct" or target_rule == "random_wrong"
    if randomised and rng is None:
        raise ValueError("random_correct / random_wrong need rng=numpy.random.Generator (for reproducibility)")
    if randomised and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    uids = list(uids)
    ok = _effective_correct(uids, correct, truncated)
    lengths = np.asarray(lengths).reshape(-1)
    if len(lengths) != len(uids):
        raise ValueError(f"len(lengths)={len(lengths)} != len(uids)={len(uids)}")

    if tie_keys is None:
        tie_keys = [()] * len(uids)
    elif len(tie_keys) != len(uids):
        raise ValueError(f"len(tie_keys)={len(tie_keys)} != len(uids)={len(uids)}")

    members = _group_members(uids)
    accuracy = _accuracy(members, ok)

    pairs: list[Pair] = []
    for uid, idx in members.items():
        p = accuracy[uid]
        if not 0.0 < p < 1.0:
            continue
        # candidates in tie-key order (then batch index): the random draws and the ties below do not depend on it
        right = sorted((i for i in idx if ok[i]), key=lambda i: (tie_keys[i], i))
        wrong = sorted((i for i in idx if not ok[i]), key=lambda i: (tie_keys[i], i))
        # min over (length key, tie key, index): ties in length go to the smallest tie key, then batch index.
        if witness_source == "shortest_correct":
            witness = min(right, key=lambda i: (lengths[i], tie_keys[i], i))
        elif witness_source == "random_correct":
            witness = right[int(rng.integers(len(right)))]
        else:  # reference_solution: the witness is the dataset's solution text, not a completion
            witness = None
        if target_rule == "longest_wrong":
            targets = [min(wrong, key=lambda i: (-lengths[i], tie_keys[i], i))]
        elif target_rule == "random_wrong":
            targets = [wrong[int(rng.integers(len(wrong)))]]
        else:  # all_wrong: every wrong completion, the group's loss split evenly among them
            targets = wrong
        weight = frontier_weight(p, frontier_kind)
        share = 1.0 / len(targets)
        pairs.extend(Pair(uid, witness, int(t), p, weight, share) for t in targets)
    return pairs
