"""Degeneration metrics of a batch of completions: length-limit hits, terminal repetition loops, mean length.

Pure module (standard library only; no verl, no numpy). Works on token ids (tokenizer-independent; what the trainer
has) and on decoded text (what the evaluation has): a completion is any sequence ``s[0..n-1]`` of comparable
elements, a list / tuple / numpy array of ints or a ``str`` (then the elements are characters).

Definitions
-----------

*Empty.* A completion with no element at all (``n = 0``; e.g. a failed request). Empty completions are counted
(``empty``) and left out of every share and mean below. A completion that is only an eos token is not empty.

*Length limit.* Either the caller says which completions stopped at the limit (``truncated``: e.g. vLLM's
``finish_reason == "length"``), or it gives ``max_length`` and a completion hit the limit when ``n >= max_length``
and its last element is not an end id (a completion whose eos is its ``max_length``-th token finished).

*Terminal repetition loop.* Drop the trailing end ids (``end_ids``, e.g. eos and pad; none by default), so that a
loop followed by eos still *ends* the completion; let ``T`` be the last ``W`` (``window``) elements of what remains,
``N = |T|``. For a period ``k >= 1`` the *periodic suffix length* is

    P_k = the largest L <= N such that T[j] == T[j + k] for every N - L <= j < N - k,

i.e. the last ``P_k`` elements are a unit ``u`` of ``k`` elements repeated, ``u u ... u u'``, the last copy
``u'`` possibly cut short (a prefix of ``u``: the loop was cut by the length limit mid-unit). ``P_k >= min(k, N)``
always. The completion **ends in a repetition loop** when some period ``1 <= k <= K`` (``max_period``) has

    P_k >= max(m * k, S)        (m = min_repeats, S = min_span)

i.e. at least ``m`` full copies of the unit and at least ``S`` elements covered, ending at the last element. The loop
reported (:class:`Loop`) is the smallest such ``k``, with ``span = P_k`` (at most ``W``: a longer loop reads as
``W``) and ``repeats = P_k / k``. Only exact repetition counts: a "loop" whose copies differ (a counter that goes
up, a paraphrase) is not one, so the share is a lower bound on looping.

Defaults (:data:`TOKEN_RULE` for ids, :data:`TEXT_RULE` for characters, chosen by the input's type) and why:

=============  ======  ======  =====================================================================================
               tokens  chars   why
=============  ======  ======  =====================================================================================
max_period K   256     1024    reasoning models loop on a phrase, a sentence or a short paragraph ("Wait, let me
                               check again. ...": ~10-200 tokens); 256 tokens ~ 1 kB of text. A larger K does not
                               add false positives (a long period needs a long *exact* repeat, m * k elements)
min_repeats m  3       3       two copies of a sentence can be deliberate (restating a step); three exact copies
                               running into the end are not. A loop cut after 2.x copies of a long unit is missed
min_span S     16      64      short natural runs are not loops: digits "1111" or "0.3333" (Qwen splits digits
                               one by one), "...", "}}}". 16 tokens (~64 characters) still catches the tiny
                               default's loops: its completions are 20-26 tokens and cut at 48, so a loop there
                               covers at most ~40 tokens (a 6-token line "3+4=7\\n" x 3 = 18 tokens)
window W       1024    4096    only the tail is read; W >= m * K so every period up to K can be seen
=============  ======  ======  =====================================================================================

Cost: bounded by the window, never the completion's length. Stripping the trailing end ids reads them (a padded
row's padding; nothing else); then, for each ``k`` in ascending order, ``T`` is compared with itself shifted by
``k`` from the end backwards, stopping at the first mismatch or once ``max(m k, S)`` elements are periodic; the
first qualifying ``k`` is then measured up to ``W``. At most ``sum_k max(m k, S) + W <= K W + W`` comparisons
(O(K W): 0.26M for tokens), usually ~K (a non-looping tail mismatches at the first comparison for almost every
``k``: ~80 us per completion, 0.3 s for 4,096 completions of 2,000 random tokens on a shared 2-core machine);
memory O(W). Plain comparisons, no regular expressions (no backtracking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Optional, Sequence, Union

__all__ = [
    "FLAG_KEYS",
    "TEXT_RULE",
    "TOKEN_RULE",
    "Loop",
    "LoopRule",
    "completion_flags",
    "degeneration_metrics",
    "degeneration_summary",
    "find_terminal_loop",
]

Completion = Union[Sequence[int], str]


@dataclass(frozen=True)
class LoopRule:
    """The parameters of the terminal-loop test (module docstring): ``max_period`` K, ``min_repeats`` m,
    ``min_span`` S, ``window`` W, in elements (tokens or characters)."""

    max_period: int
    min_repeats: int
    min_span: int
    window: int

    def __post_init__(self):
        if self.max_period < 1 or self.min_span < 1:
            raise ValueError(f"max_period and min_span must be >= 1: {self}")
        if self.min_repeats < 2:
            raise ValueError(f"min_repeats must be >= 2 (one copy is not a repetition): {self}")
        if self.window < self.min_repeats * self.max_period or self.window < self.min_span:
            # else a loop of the longest periods could never be seen in the window
            raise ValueError(f"window must be >= min_repeats * max_period and >= min_span: {self}")


TOKEN_RULE = LoopRule(max_period=256, min_repeats=3, min_span=16, window=1024)
TEXT_RULE = LoopRule(max_period=1024, min_repeats=3, min_span=64, window=4096)


@dataclass(frozen=True)
class Loop:
    """A terminal repetition loop: the last ``span`` elements (before trailing end ids) repeat a unit of ``period``
    elements; ``span`` is at most the rule's window."""

    period: int
    span: int

    @property
    def repeats(self) -> float:
        """Copies of the unit, the last one possibly partial (``span / period``)."""
        return self.span / self.period


def _tail(seq: Completion, end_ids: Collection, window: int) -> Completion:
    """The last ``window`` elements of ``seq`` once its trailing end ids are dropped (a str stays a str)."""
    end = len(seq)
    while end and seq[end - 1] in end_ids:
        end -= 1
    tail = seq[max(0, end - window) : end]
    return tail if isinstance(tail, str) else list(tail)


def _periodic_suffix(t: Completion, k: int, limit: int) -> int:
    """``min(P_k, limit)``: the length of the longest suffix of ``t`` with period ``k`` (``t[j] == t[j + k]``
    throughout), reading back from the end no further than ``limit`` elements. Needs ``k < len(t)``."""
    n = len(t)
    stop = max(-1, n - limit - 1)  # the suffix t[j+1:] reaches `limit` elements when j == stop
    j = n - k - 1
    while j > stop and t[j] == t[j + k]:
        j -= 1
    return n - 1 - j


def find_terminal_loop(
    seq: Completion, rule: Optional[LoopRule] = None, *, end_ids: Collection = ()
) -> Optional[Loop]:
    """The terminal repetition loop of ``seq`` (module docstring), or None.

    ``rule`` defaults to :data:`TEXT_RULE` for a ``str`` and :data:`TOKEN_RULE` otherwise; ``end_ids`` (e.g.
    ``{eos_id, pad_id}``) are dropped from the end first. An empty ``seq`` has no loop."""
    if rule is None:
        rule = TEXT_RULE if isinstance(seq, str) else TOKEN_RULE
    t = _tail(seq, frozenset(end_ids), rule.window)
    n = len(t)
    if n < rule.min_span:
        return None
    last = t[n - 1]
    for k in range(1, min(rule.max_period, n // rule.min_repeats) + 1):
        if t[n - 1 - k] != last:  # P_k = k < need: the usual case, decided by one comparison
            continue
        need = max(rule.min_repeats * k, rule.min_span)  # <= n: k <= n // m and S <= n
        if _periodic_suffix(t, k, need) >= need:
            return Loop(period=k, span=_periodic_suffix(t, k, n))
    return None


def degeneration_summary(
    responses: Sequence[Completion],
    truncated: Optional[Sequence[bool]] = None,
    *,
    max_length: Optional[int] = None,
    end_ids: Collection = (),
    rule: Optional[LoopRule] = None,
) -> dict:
    """Degeneration of a batch of completions (token-id sequences or strings), over its non-empty completions.

    Give either ``truncated`` (one flag per completion: it stopped at the length limit) or ``max_length`` (module
    docstring: ``n >= max_length`` and not ending in an end id). Returns

    * ``n``: non-empty completions (the denominator of everything below); ``empty``: completions left out;
    * ``length_limit_frac``: share that hit the length limit;
    * ``repetition_loop_frac``: share that end in a repetition loop (:func:`find_terminal_loop`, cut or not);
    * ``length_limit_loop_frac``: share that hit the length limit inside a loop (of the length-limit hits, the
      ones that looped until cut);
    * ``response_len_mean``: mean length in elements (tokens or characters), end ids included as given.

    Shares are in [0, 1]; with no non-empty completion they and the mean are NaN."""
    if (truncated is None) == (max_length is None):
        raise ValueError("give exactly one of truncated (a flag per completion) and max_length")
    if truncated is not None and len(truncated) != len(responses):
        raise ValueError(f"{len(truncated)} truncated flags for {len(responses)} completions")
    end_ids = frozenset(end_ids)
    n = empty = limit = loops = limit_loops = total = 0
    for i, seq in enumerate(responses):
        length = len(seq)
        if length == 0:
            empty += 1
            continue
        if truncated is not None:
            hit = bool(truncated[i])
        else:
            hit = length >= max_length and seq[length - 1] not in end_ids
        looped = find_terminal_loop(seq, rule, end_ids=end_ids) is not None
        n += 1
        total += length
        limit += hit
        loops += looped
        limit_loops += hit and looped

    def share(count: int) -> float:
        return count / n if n else math.nan

    return {
        "n": n,
        "empty": empty,
        "length_limit_frac": share(limit),
        "repetition_loop_frac": share(loops),
        "length_limit_loop_frac": share(limit_loops),
        "response_len_mean": share(total),
    }


def completion_flags(seq: Completion, *, max_length: int, end_ids: Collection = (),
                     rule: Optional[LoopRule] = None) -> dict:
    """One completion's degeneration, as numbers a reward function can report per sample (verl averages them per
    data source at validation): ``length_limit`` (1.0 if it hit ``max_length``, module docstring),
    ``repetition_loop`` (1.0 if it ends in a loop) and ``response_tokens`` (its length). Same definitions as
    :func:`degeneration_summary`, so that the mean of the flags over a batch is the summary's shares."""
    end_ids = frozenset(end_ids)
    length = len(seq)
    hit = length >= max_length and length > 0 and seq[length - 1] not in end_ids
    looped = find_terminal_loop(seq, rule, end_ids=end_ids) is not None
    return dict(zip(FLAG_KEYS, (float(hit), float(looped), float(length))))


METRIC_PREFIX = "degeneration/"
# the per-sample keys of completion_flags (verl logs their per-data-source means at validation:
# val-aux/<data source>/<flag>/mean@<n>)
FLAG_KEYS = ("length_limit", "repetition_loop", "response_tokens")


def degeneration_metrics(summary: dict, prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """A :func:`degeneration_summary` as tracker metrics: ``<prefix>length_limit_frac``, ``repetition_loop_frac``,
    ``length_limit_loop_frac``, ``response_len_mean`` and ``empty`` (completions left out, so that what was skipped
    is visible)."""
    keys = ("length_limit_frac", "repetition_loop_frac", "length_limit_loop_frac", "response_len_mean", "empty")
    return {prefix + key: float(summary[key]) for key in keys}
