"""Degeneration metrics (ssopd_verl.degeneration): the terminal-loop definition, checked on constructed loops and
near-misses, against a brute-force transcription of the definition, on 100k-element completions, and the batch
summary."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import pytest

from ssopd_verl.degeneration import (
    TEXT_RULE,
    TOKEN_RULE,
    Loop,
    LoopRule,
    completion_flags,
    degeneration_metrics,
    degeneration_summary,
    find_terminal_loop,
)

EOS, PAD = 151645, 151643


def _distinct(start: int, n: int) -> list:
    """n ids all different from each other (and from any other call's range): no repetition at all."""
    return list(range(start, start + n))


def _reference(seq, rule: LoopRule, end_ids=()):
    """The module docstring's definition, transcribed literally (quadratic; small inputs only)."""
    s = list(seq)
    while s and s[-1] in end_ids:
        s.pop()
    t = s[-rule.window :]
    n = len(t)
    for k in range(1, rule.max_period + 1):
        p_k = max(L for L in range(n + 1) if all(t[j] == t[j + k] for j in range(n - L, n - k)))
        if p_k >= max(rule.min_repeats * k, rule.min_span):
            return Loop(period=k, span=p_k)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Constructed loops


@pytest.mark.parametrize("k", [1, 2, 3, 7, 16, 64, 200, 256])
def test_loops_of_various_periods(k):
    unit = _distinct(1000, k)
    copies = max(3, -(-16 // k))  # 3 copies, or enough to cover the 16-token minimum span
    seq = _distinct(5000, 30) + unit * copies
    assert find_terminal_loop(seq) == Loop(period=k, span=k * copies)
    assert find_terminal_loop(seq).repeats == copies


def test_smallest_period_is_reported():
    # "ab" x 12 is also 4- and 6-periodic: the unit is the shortest one
    assert find_terminal_loop(_distinct(5000, 5) + [1, 2] * 12) == Loop(period=2, span=24)


def test_loop_cut_mid_unit_counts():
    unit = _distinct(1000, 7)
    seq = _distinct(5000, 20) + unit * 3 + unit[:4]  # the length limit cut the 4th copy after 4 of 7 tokens
    loop = find_terminal_loop(seq)
    assert loop == Loop(period=7, span=25) and loop.repeats == pytest.approx(25 / 7)


def test_tiny_default_style_loop():
    # The tiny default's worked completion stuck on a column sum until max_new_tokens = 48 (ids of a 484-token
    # vocabulary: digits, '+', '=', newline); 6-token line, 3.x copies before the cut.
    think, line = [480, 198], [22, 10, 19, 28, 22, 198]  # "<think>\n", "3+4=7\n"
    seq = (think + [22, 10, 23, 28, 16, 20, 198] + line * 7)[:48]
    # 39 tokens of copies, plus the newline before the first copy (it equals the unit's last token)
    assert find_terminal_loop(seq) == Loop(period=6, span=40)


def test_near_misses():
    unit = _distinct(1000, 8)
    prefix = _distinct(5000, 30)
    assert find_terminal_loop(prefix + unit * 2) is None  # 2 copies, m = 3
    assert find_terminal_loop(prefix + unit * 2 + unit[:7]) is None  # 2.875 copies
    assert find_terminal_loop(prefix + unit * 3) == Loop(period=8, span=24)  # the third copy makes it a loop
    # a loop that is not at the end: the completion went on after it
    assert find_terminal_loop(prefix + unit * 10 + _distinct(7000, 5)) is None
    assert find_terminal_loop(prefix + unit * 10 + [unit[0]]) == Loop(period=8, span=81)  # ...but 1 more of it is


def test_short_natural_runs_are_not_loops():
    one, zero = 16, 15  # Qwen's ids of "1" and "0"; digits are single tokens
    prefix = _distinct(5000, 30)
    assert find_terminal_loop(prefix + [one] * 4) is None  # "...1111"
    assert find_terminal_loop(prefix + [zero] * 15) is None  # 15 < min_span 16
    assert find_terminal_loop(prefix + [zero] * 16) == Loop(period=1, span=16)
    assert find_terminal_loop(prefix + [1, 2] * 7) is None  # 14 tokens of "abab..."
    assert find_terminal_loop(prefix + [1, 2] * 8) == Loop(period=2, span=16)
    long = "We add the tens and the units separately, then combine the two partial sums: "  # 78 characters
    for text in ("The answer is 1111", "so x = 0.3333333333", "Done...", "\\frac{1}{\\frac{1}{2}}}}}", "ha ha ha"):
        assert find_terminal_loop(long + text) is None, text


def test_text_loops():
    prefix = "Let x be the number of apples. Then 3x + 2 = 11, so x = 3!\n"
    sentence = "Wait, let me check that again. "
    assert find_terminal_loop(prefix + sentence * 3) == Loop(period=len(sentence), span=3 * len(sentence))
    cut = prefix + sentence * 3 + sentence[:10]
    assert find_terminal_loop(cut) == Loop(period=len(sentence), span=3 * len(sentence) + 10)
    assert find_terminal_loop(prefix + sentence * 2) is None
    assert find_terminal_loop(prefix + "=" * 63) is None and find_terminal_loop(prefix + "=" * 64) == Loop(1, 64)
    # the tiny default's decoded text (a token ~ a character there): the token rule sees its short loops
    # (the run starts at the newline before the first copy: it equals the unit's last character)
    tiny = "<think>\n7+8=15\n" + "3+4=7\n" * 4
    assert find_terminal_loop(tiny) is None and find_terminal_loop(tiny, TOKEN_RULE) == Loop(6, 25)


def test_trailing_end_ids_are_dropped_only_when_asked():
    seq = _distinct(5000, 10) + _distinct(1000, 5) * 4 + [EOS] + [PAD] * 3
    assert find_terminal_loop(seq) is None  # the loop does not end the sequence: eos and padding follow it
    assert find_terminal_loop(seq, end_ids={EOS, PAD}) == Loop(period=5, span=20)


def test_empty_and_short_inputs():
    assert find_terminal_loop([]) is None
    assert find_terminal_loop("") is None
    assert find_terminal_loop([EOS], end_ids={EOS}) is None
    assert find_terminal_loop([7] * 3) is None


def test_other_sequence_types():
    seq = _distinct(5000, 10) + [3, 4, 5] * 6
    assert find_terminal_loop(tuple(seq)) == Loop(3, 18)
    assert find_terminal_loop(np.array(seq + [EOS]), end_ids={EOS}) == Loop(3, 18)


def test_rule_validation():
    with pytest.raises(ValueError):
        LoopRule(max_period=100, min_repeats=3, min_span=16, window=299)  # a 100-token loop would not fit
    with pytest.raises(ValueError):
        LoopRule(max_period=4, min_repeats=1, min_span=16, window=64)
    with pytest.raises(ValueError):
        LoopRule(max_period=4, min_repeats=3, min_span=65, window=64)
    assert TOKEN_RULE.window >= TOKEN_RULE.min_repeats * TOKEN_RULE.max_period
    assert TEXT_RULE.window >= TEXT_RULE.min_repeats * TEXT_RULE.max_period


def test_matches_the_definition_on_random_sequences():
    rng = random.Random(0)
    rules = [
        LoopRule(max_period=5, min_repeats=3, min_span=4, window=20),
        LoopRule(max_period=4, min_repeats=2, min_span=1, window=9),
        LoopRule(max_period=3, min_repeats=3, min_span=9, window=9),
    ]
    outcomes = {True: 0, False: 0}
    for case in range(3000):
        rule = rules[case % len(rules)]
        alphabet = rng.choice((2, 3, 5))
        seq = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 25))]
        if rng.random() < 0.5:  # plant a (possibly cut, possibly too short) loop at the end
            unit = [rng.randrange(alphabet) for _ in range(rng.randint(1, 6))]
            seq += (unit * 8)[: rng.randint(1, 8 * len(unit))]
        if rng.random() < 0.2:
            seq += [9] * rng.randint(1, 3)  # trailing end ids
        expected = _reference(seq, rule, end_ids={9})
        assert find_terminal_loop(seq, rule, end_ids={9}) == expected, (seq, rule)
        outcomes[expected is not None] += 1
    assert min(outcomes.values()) > 500  # both outcomes are well exercised


# ---------------------------------------------------------------------------------------------------------------
# Long completions: the tail window only


class _Spy(Sequence):
    """A sequence that records which positions were read (single items and slice bounds)."""

    def __init__(self, data):
        self.data, self.lowest = data, len(data)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        lo = i.start if isinstance(i, slice) else i
        self.lowest = min(self.lowest, lo if lo >= 0 else len(self.data) + lo)
        return self.data[i]


def test_100k_token_completions():
    rng = random.Random(1)
    natural = [rng.randrange(100_000) for _ in range(100_000)]
    assert find_terminal_loop(natural) is None
    looping = (natural[:95_000] + _distinct(1000, 37) * 200)[:100_000]  # 5,000 looping tokens, cut mid-unit
    assert len(looping) == 100_000
    assert find_terminal_loop(looping) == Loop(period=37, span=TOKEN_RULE.window)  # the span is capped
    assert degeneration_summary([natural, looping], max_length=100_000)["repetition_loop_frac"] == 0.5
    spy = _Spy(looping + [EOS] * 5)
    assert find_terminal_loop(spy, end_ids={EOS}) == Loop(period=37, span=TOKEN_RULE.window)
    assert spy.lowest >= len(spy) - 5 - TOKEN_RULE.window  # never read before the window


def test_100k_character_completions():
    rng = random.Random(2)
    words = ["the", "sum", "of", "x", "and", "y", "is", "so", "we", "get", "=", "+", "3", "17", "check"]
    natural = ""
    while len(natural) < 100_000:
        natural += rng.choice(words) + rng.choice((" ", " ", ", ", ".\n"))
    natural = natural[:100_000]
    assert find_terminal_loop(natural) is None
    sentence = "Hmm, so the answer is 42? Let me verify the computation once more. "
    looping = (natural[:90_000] + sentence * 200)[:100_000]
    assert find_terminal_loop(looping) == Loop(period=len(sentence), span=TEXT_RULE.window)


# ---------------------------------------------------------------------------------------------------------------
# Batch summary


def _batch():
    loop_cut = (_distinct(5000, 12) + _distinct(1000, 6) * 10)[:48]  # looped until the limit
    finished = _distinct(6000, 24) + [EOS]  # a normal completion
    eos_at_limit = _distinct(7000, 47) + [EOS]  # 48 tokens, but it finished
    loop_then_eos = _distinct(8000, 19) + _distinct(1000, 5) * 4 + [EOS]  # looped, then stopped
    return [loop_cut, finished, eos_at_limit, [], loop_then_eos]


def test_summary_with_max_length():
    s = degeneration_summary(_batch(), max_length=48, end_ids={EOS})
    assert s == {
        "n": 4,
        "empty": 1,
        "length_limit_frac": 0.25,
        "repetition_loop_frac": 0.5,
        "length_limit_loop_frac": 0.25,
        "response_len_mean": (48 + 25 + 48 + 40) / 4,
    }
    # without end ids the eos at the limit is not recognised (it is a truncation) and eos hides the second loop
    s = degeneration_summary(_batch(), max_length=48)
    assert s["length_limit_frac"] == 0.5 and s["repetition_loop_frac"] == 0.25


def test_summary_with_truncated_flags_and_text():
    s = degeneration_summary(_batch(), [False, False, True, True, True], end_ids={EOS})
    assert s["length_limit_frac"] == 0.5 and s["length_limit_loop_frac"] == 0.25 and s["empty"] == 1
    texts = ["Ok. \\boxed{3}", "Wait, let me check. " * 5, ""]
    s = degeneration_summary(texts, [False, True, True])
    assert (s["n"], s["empty"], s["repetition_loop_frac"], s["length_limit_loop_frac"]) == (2, 1, 0.5, 0.5)
    assert s["response_len_mean"] == (13 + 100) / 2


def test_summary_of_nothing_and_bad_arguments():
    for batch in ([], [[], ""]):
        s = degeneration_summary(batch, max_length=8)
        assert s["n"] == 0 and s["empty"] == len(batch)
        assert all(math.isnan(s[key]) for key in s if key not in ("n", "empty"))
    with pytest.raises(ValueError):
        degeneration_summary([[1]])  # neither truncated nor max_length
    with pytest.raises(ValueError):
        degeneration_summary([[1]], [True], max_length=4)  # both
    with pytest.raises(ValueError):
        degeneration_summary([[1], [2]], [True])  # one flag for two completions


def test_per_completion_flags_average_to_the_summary():
    """What the reward manager reports per sample (verl averages it at validation) and what the trainer logs per
    step are the same definitions: the mean of the flags is the summary's shares."""
    loop = _distinct(10, 3) + [7, 8, 9] * 8  # a loop, cut at the limit (24 tokens)
    batch = [loop[:24], _distinct(100, 10) + [EOS], _distinct(200, 24), [EOS], _distinct(300, 5) + [7] * 19]
    flags = [completion_flags(seq, max_length=24, end_ids={EOS, PAD}) for seq in batch]
    summary = degeneration_summary(batch, max_length=24, end_ids={EOS, PAD})
    assert [f["length_limit"] for f in flags] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert [f["repetition_loop"] for f in flags] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert summary["length_limit_frac"] == pytest.approx(np.mean([f["length_limit"] for f in flags]))
    assert summary["repetition_loop_frac"] == pytest.approx(np.mean([f["repetition_loop"] for f in flags]))
    assert summary["response_len_mean"] == pytest.approx(np.mean([f["response_tokens"] for f in flags]))
    metrics = degeneration_metrics(summary)
    assert metrics["degeneration/repetition_loop_frac"] == pytest.approx(0.4) and metrics["degeneration/empty"] == 0
    assert set(metrics) == {"degeneration/length_limit_frac", "degeneration/repetition_loop_frac",
                            "degeneration/length_limit_loop_frac", "degeneration/response_len_mean",
                            "degeneration/empty"}  # fmt: skip
