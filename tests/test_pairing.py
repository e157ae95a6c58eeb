import math

import numpy as np
import pytest

from ssopd_verl.pairing import (
    FRONTIER_KINDS,
    GroupStats,
    Pair,
    frontier_weight,
    group_accuracy,
    group_stats,
    select_pairs,
    small_groups,
)


# ---------------------------------------------------------------- frontier_weight


@pytest.mark.parametrize(
    "kind, p, expected",
    [
        ("variance", 0.5, 1.0),
        ("variance", 0.25, 0.75),
        ("sqrt_variance", 0.5, 1.0),
        ("sqrt_variance", 0.1, 2 * math.sqrt(0.09)),
        ("binary", 0.1, 1.0),
        ("none", 0.9, 1.0),
    ],
)
def test_frontier_weight_values(kind, p, expected):
    w = frontier_weight(p, kind)
    assert type(w) is float
    assert w == pytest.approx(expected)


@pytest.mark.parametrize("kind", FRONTIER_KINDS)
@pytest.mark.parametrize("p", [0, 0.0, 1, 1.0])
def test_frontier_weight_zero_off_frontier(kind, p):
    assert frontier_weight(p, kind) == 0.0


def test_frontier_weight_default_is_variance():
    assert frontier_weight(0.25) == pytest.approx(0.75)


def test_frontier_weight_arrays():
    p = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(frontier_weight(p, "variance"), [0, 0.75, 1, 0])
    np.testing.assert_allclose(frontier_weight(p, "sqrt_variance"), [0, 2 * math.sqrt(0.1875), 1, 0])
    np.testing.assert_array_equal(frontier_weight(p, "binary"), [0, 1, 1, 0])
    out = frontier_weight(p, "none")
    assert isinstance(out, np.ndarray) and out.shape == (4,)
    np.testing.assert_array_equal(out, [0, 1, 1, 0])


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), np.array([0.5, 1.5])])
def test_frontier_weight_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        frontier_weight(bad)


def test_frontier_weight_rejects_unknown_kind():
    with pytest.raises(ValueError, match="frontier kind"):
        frontier_weight(0.5, "entropy")


# ---------------------------------------------------------------- group accuracy


def test_group_accuracy_and_stats_order_and_truncation():
    uids = ["b", "a", "b", "a", "c", "c"]
    correct = [True, False, True, True, False, False]
    truncated = [False, False, True, False, False, False]
    acc = group_accuracy(uids, correct, truncated)
    assert list(acc) == ["b", "a", "c"]  # first appearance
    assert acc == {"b": 0.5, "a": 0.5, "c": 0.0}
    assert group_stats(uids, correct, truncated) == GroupStats(3, 2, acc)


# ---------------------------------------------------------------- select_pairs: SSOPD default


def test_shortest_correct_longest_wrong():
    uids = ["g"] * 4
    correct = [True, False, True, False]
    lengths = [30, 50, 10, 40]
    (pair,) = select_pairs(uids, correct, lengths)
    assert pair == Pair(uid="g", witness=2, target=1, accuracy=0.5, weight=1.0, target_share=1.0)


def test_ties_go_to_lowest_index():
    uids = ["g"] * 6
    correct = [False, True, False, True, False, True]
    lengths = [7, 5, 7, 5, 3, 9]
    (pair,) = select_pairs(uids, correct, lengths)
    assert (pair.witness, pair.target) == (1, 0)


def test_truncated_counts_as_wrong():
    uids = ["g"] * 3
    correct = [True, True, False]
    lengths = [100, 20, 50]
    truncated = [True, False, False]  # index 0 hit max length although the verifier accepted it
    (pair,) = select_pairs(uids, correct, lengths, truncated=truncated)
    assert pair.target == 0 and pair.witness == 1
    assert pair.accuracy == pytest.approx(1 / 3)
    assert pair.weight == pytest.approx(4 * (1 / 3) * (2 / 3))
    # without the flag, index 0 counts as correct: p = 2/3 and the target is the other wrong one
    (pair,) = select_pairs(uids, correct, lengths)
    assert (pair.target, pair.accuracy) == (2, pytest.approx(2 / 3))


def test_truncation_can_empty_the_correct_set():
    assert select_pairs(["g", "g"], [True, False], [5, 5], truncated=[True, False]) == []


def test_all_correct_and_all_wrong_groups_give_nothing():
    uids = ["a", "a", "b", "b", "c", "c"]
    correct = [True, True, False, False, True, False]
    pairs = select_pairs(uids, correct, [1, 2, 3, 4, 5, 6])
    assert [p.uid for p in pairs] == ["c"]


def test_interleaved_uids_grouped_and_ordered_by_first_appearance():
    uids = ["x", "y", "x", "z", "y", "x", "z", "y"]
    correct = [1, 0, 0, 1, 1, 0, 1, 0]  # 0/1 ints are accepted
    lengths = [10, 20, 30, 1, 2, 40, 3, 25]
    pairs = select_pairs(uids, correct, lengths)
    assert [(p.uid, p.witness, p.target) for p in pairs] == [("x", 0, 5), ("y", 4, 7)]  # z: all correct
    assert pairs[0].accuracy == pytest.approx(1 / 3)
    assert pairs[1].accuracy == pytest.approx(1 / 3)


def test_numpy_inputs_and_uid_types():
    uids = np.array(["u1", "u1", "u2", "u2"], dtype=object)
    pairs = select_pairs(uids, np.array([True, False, False, True]), np.array([3, 4, 5, 6]))
    assert [(p.uid, p.witness, p.target) for p in pairs] == [("u1", 0, 1), ("u2", 3, 2)]
    assert all(type(p.witness) is int and type(p.target) is int for p in pairs)
    assert select_pairs([], [], []) == []


@pytest.mark.parametrize("kind", FRONTIER_KINDS)
def test_weight_uses_frontier_kind(kind):
    (pair,) = select_pairs(["g"] * 4, [True, False, False, False], [1, 2, 3, 4], frontier_kind=kind)
    assert pair.weight == pytest.approx(frontier_weight(0.25, kind))


# ---------------------------------------------------------------- ablations


def _batch():
    # two frontier groups with several correct and wrong members, one off-frontier group
    uids = ["a"] * 6 + ["b"] * 4 + ["c"] * 2
    correct = [True, False, True, False, True, False] + [False, True, False, False] + [True, True]
    lengths = list(range(12, 0, -1))
    return uids, correct, lengths


def test_reference_solution_witness_is_none():
    uids, correct, lengths = _batch()
    pairs = select_pairs(uids, correct, lengths, witness_source="reference_solution")
    assert [(p.uid, p.witness, p.target) for p in pairs] == [("a", None, 1), ("b", None, 6)]


def test_random_variants_deterministic_and_from_right_set():
    uids, correct, lengths = _batch()
    kw = dict(witness_source="random_correct", target_rule="random_wrong")
    a = select_pairs(uids, correct, lengths, rng=np.random.default_rng(0), **kw)
    b = select_pairs(uids, correct, lengths, rng=np.random.default_rng(0), **kw)
    assert a == b
    seen_w, seen_t = set(), set()
    for seed in range(200):
        for p in select_pairs(uids, correct, lengths, rng=np.random.default_rng(seed), **kw):
            assert correct[p.witness] and not correct[p.target]
            assert uids[p.witness] == uids[p.target] == p.uid
            seen_w.add(p.witness)
            seen_t.add(p.target)
    # every member of the right set gets drawn (uniform, not a fixed pick)
    assert seen_w == {0, 2, 4, 7}
    assert seen_t == {1, 3, 5, 6, 8, 9}


def test_random_witness_with_deterministic_target():
    uids, correct, lengths = _batch()
    pairs = select_pairs(uids, correct, lengths, witness_source="random_correct", rng=np.random.default_rng(1))
    assert [p.target for p in pairs] == [1, 6]  # longest wrong


def test_all_wrong_shares_sum_to_one():
    uids, correct, lengths = _batch()
    pairs = select_pairs(uids, correct, lengths, target_rule="all_wrong")
    assert [(p.uid, p.target) for p in pairs] == [("a", 1), ("a", 3), ("a", 5), ("b", 6), ("b", 8), ("b", 9)]
    for uid in ("a", "b"):
        group = [p for p in pairs if p.uid == uid]
        assert sum(p.target_share for p in group) == pytest.approx(1.0)
        assert len({p.witness for p in group}) == 1  # one witness per group
    assert {p.witness for p in pairs} == {4, 7}  # shortest correct of each group


# ---------------------------------------------------------------- errors


def test_single_completion_group_is_skipped_and_counted():
    # group b kept one usable completion (its others had NaN rewards): no pair, no error; group a still pairs
    pairs = select_pairs(["a", "a", "b"], [True, False, True], [1, 2, 3])
    assert [(p.uid, p.witness, p.target) for p in pairs] == [("a", 0, 1)]
    assert small_groups(["a", "a", "b"]) == 1 and small_groups(["a", "a"]) == 0


@pytest.mark.parametrize(
    "uids, correct, lengths, truncated",
    [
        (["a", "a"], [True], [1, 2], None),
        (["a", "a"], [True, False], [1], None),
        (["a", "a"], [True, False], [1, 2], [False]),
    ],
)
def test_length_mismatch(uids, correct, lengths, truncated):
    with pytest.raises(ValueError, match="len"):
        select_pairs(uids, correct, lengths, truncated=truncated)


def test_raw_rewards_are_not_booleans():
    with pytest.raises(ValueError, match="boolean"):
        select_pairs(["a", "a"], [1.0, -1.0], [1, 2])


@pytest.mark.parametrize(
    "kw",
    [
        dict(witness_source="longest_correct"),
        dict(target_rule="shortest_wrong"),
        dict(frontier_kind="linear"),
        dict(witness_source="random_correct"),  # rng missing
        dict(target_rule="random_wrong"),  # rng missing
    ],
)
def test_bad_options(kw):
    with pytest.raises(ValueError):
        select_pairs(["a", "a"], [True, False], [1, 2], **kw)


def test_rng_must_be_a_generator():
    with pytest.raises(TypeError):
        select_pairs(["a", "a"], [True, False], [1, 2], target_rule="random_wrong", rng=np.random.RandomState(0))


def test_ties_in_length_are_broken_by_content_not_batch_order():
    """A resumed run gets the same completions in another batch order (verl orders rows by completion time): the
    pairing must choose the same witness and target."""
    from ssopd_verl.pairing import select_pairs

    uids = ["g"] * 5
    correct = [1, 0, 1, 0, 0]
    responses = [(5, 6, 7), (9, 9, 9), (1, 2, 3), (4, 4, 4), (8,)]  # two correct and two wrong of length 3
    chosen = set()
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 3, 4, 1]):
        pairs = select_pairs([uids[i] for i in order], [correct[i] for i in order], [len(responses[i]) for i in order],
                             tie_keys=[responses[i] for i in order])  # fmt: skip
        (pair,) = pairs
        chosen.add((responses[order[pair.witness]], responses[order[pair.target]]))
    assert chosen == {((1, 2, 3), (4, 4, 4))}
    with pytest.raises(ValueError, match="tie_keys"):
        select_pairs(uids, correct, [3, 3, 3, 3, 1], tie_keys=responses[:2])
