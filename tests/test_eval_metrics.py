"""Input checks of the evaluation metrics, and the maj@k rule when samples with the same answer disagree."""

import math
from itertools import permutations

import numpy as np
import pytest

from ssopd_verl.evaluation.metrics import majority_correct, pass_at_k, per_problem_metrics, summarize


@pytest.mark.parametrize(
    "n, c, k, message",
    [
        (4, 5, 1, "0 <= c <= n"),  # more correct samples than samples
        (4, -1, 1, "0 <= c <= n"),
        (4, 1, 5, "1 <= k <= n"),
        (4, 1, 0, "1 <= k <= n"),
        (4, 1, -2, "1 <= k <= n"),
        (0, 0, 1, "1 <= k <= n"),
        (4, 1.0, 1, "c must be an integer"),
        (4, 1, 1.5, "k must be an integer"),
        (True, 1, 1, "n must be an integer"),
    ],
)
def test_pass_at_k_rejects_impossible_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_pass_at_k_edges_and_numpy_ints():
    assert pass_at_k(4, 4, 4) == 1.0 and pass_at_k(4, 0, 1) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(np.int64(12), np.int64(2), np.int32(2)) == pytest.approx(1 - 45 / 66)


def test_majority_answer_correctness_is_the_mean_of_its_samples_whatever_their_order():
    """Samples with the same answer key but different scores (a grading timeout, or spellings that only share a key):
    the answer counts as the mean of its samples' scores, not as whichever sample came first."""
    answers, scores = ["1", "1", "2"], [0.0, 1.0, 1.0]
    for order in permutations(range(3)):
        assert majority_correct([answers[i] for i in order], [scores[i] for i in order]) == 0.5
    assert majority_correct([r"\left(1,2\right)", "(1, 2)", "(1,2)", "3"], [1, 0, 1, 0]) == pytest.approx(2 / 3)
    # consistent groups: exactly the group's score
    assert majority_correct(["7", "7", "8"], [1, 1, 0]) == 1.0
    assert majority_correct(["7", "7", "8"], [0, 0, 1]) == 0.0
    # a tie: mean over the tied answers of each answer's correctness
    assert majority_correct(["1", "1", "2", "2"], [1, 0, 1, 1]) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("bad", [float("nan"), np.float64("nan")])
def test_nan_scores_are_rejected(bad):
    with pytest.raises(ValueError, match="NaN"):
        majority_correct(["1", "2"], [1.0, bad])
    with pytest.raises(ValueError, match="NaN"):
        per_problem_metrics([[1.0, bad]], [["1", "2"]])
    with pytest.raises(ValueError, match="benchmark b: .*NaN"):
        summarize({"b": {"scores": [[1.0, 0.0], [0.0, bad]], "answers": [["1", "2"], ["1", "2"]]}}, n_boot=10)


@pytest.mark.parametrize("bad", [math.inf, -0.5, 1.5, None, "1"])
def test_other_invalid_scores_are_rejected(bad):
    with pytest.raises(ValueError, match="score 1"):
        majority_correct(["1", "2"], [1.0, bad])


def test_answers_and_scores_must_have_the_same_length():
    with pytest.raises(ValueError, match="one answer per score"):
        majority_correct(["1", "2"], [1.0])
    with pytest.raises(ValueError, match="problem 1: 3 scores but 2 answers"):
        per_problem_metrics([[1, 0, 0], [1, 1, 0]], [["1", "2", "3"], ["1", "2"]])
    with pytest.raises(ValueError, match="2 problems have scores but 1 have answers"):
        per_problem_metrics([[1, 0], [1, 1]], [["1", "2"]])
    # summarize used to zip the two silently, dropping the samples without an answer
    data = {"a": {"scores": [[1, 0, 1, 1]], "answers": [["5", "4", "5"]]}}
    with pytest.raises(ValueError, match="benchmark a: problem 0: 4 scores but 3 answers"):
        summarize(data, n_boot=10)
    with pytest.raises(ValueError, match="no samples"):
        per_problem_metrics([[]], [[]])


def test_valid_inputs_still_summarize():
    data = {"a": {"scores": [[1, 0], [True, np.float32(1.0)]], "answers": [["1", "2"], ["3", "3"]]}}
    s = summarize(data, n_boot=50)
    assert s["benchmarks"]["a"]["avg@2"]["value"] == pytest.approx(75.0)
    assert s["benchmarks"]["a"]["maj@2"]["value"] == pytest.approx(75.0)  # 1-1 tie (0.5), then 1.0
