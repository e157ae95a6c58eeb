"""Grading: the last ``\\boxed{}`` of a completion, compared with the reference answer by math-verify.

This is the evaluation protocol of the paper (as in OPSD): thinking on, the *last* boxed answer counts, math-verify
decides equivalence. The same function grades training rollouts, through verl's custom-reward hook::

    reward.custom_reward_function.path=pkg://ssopd_verl.evaluation.grading
    reward.custom_reward_function.name=compute_score

(verl's ``default_compute_score`` never routes to math-verify: its math data sources use string/Minerva matching.)

Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which only works in a process's main
thread. verl calls reward functions from a thread pool, so off the main thread the work is sent to a small
spawn-process pool whose workers grade in their own main thread (scripts that end up here need a
``if __name__ == "__main__":`` guard, as for verl's own math-verify scorer).
"""

from __future__ import annotations

import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Optional

BOXED_COMMANDS = ("\\boxed", "\\fbox")
DEFAULT_TIMEOUT_S = 5  # per math-verify parse / comparison, as math-verify's own default


@dataclass(frozen=True)
class Grade:
    extracted: Optional[str]  # content of the last complete \boxed{...}; None if there is none
    score: float  # 1.0 correct, 0.0 otherwise


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``.

    Braces are matched, so nested LaTeX (``\\boxed{\\frac{1}{2}}``) is returned whole. A box left open at the
    end (a truncated completion) and an empty one (``"... within \\boxed{}"`` quoted from the instruction) are
    skipped in favour of the previous complete one.
    """
    end = len(text)
    while True:
        start, command = -1, ""
        for cmd in BOXED_COMMANDS:
            i = text.rfind(cmd, 0, end)
            if i > start:
                start, command = i, cmd
        if start < 0:
            return None
        content = _box_content(text, start + len(command))
        if content:
            return content
        end = start  # unclosed, empty or malformed: look further back


def _box_content(text: str, i: int) -> Optional[str]:
    if text.startswith("{", i):
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        return None
    if text.startswith(" ", i):  # "\boxed 5": the token after the space
        match = re.match(r"\s+([^\s$]+)", text[i:])
        return match.group(1).rstrip(".") if match else None
    return None


def _normalize(answer: str) -> str:
    """Cheap canonical form for an exact-match shortcut (and for majority voting)."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\(left|right|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def answer_key(answer: Optional[str]) -> Optional[str]:
    """The key majority voting groups answers by (None: no answer, does not vote)."""
    return None if answer is None else _normalize(answer)


def _parse(expr: str, timeout: Optional[int]):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Wrap in \boxed{} so math-verify reads exactly this expression, as LaTeX first, plain expression second.
    return parse(
        "\\boxed{" + expr + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )


def answers_match(pred: str, gold: str, timeout: Optional[int] = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``pred`` is mathematically equal to ``gold`` (both bare answers, no ``\\boxed``)."""
    if _normalize(pred) == _normalize(gold):
        return True
    from math_verify import verify

    try:
        gold_parsed = _parse(gold, timeout)
        pred_parsed = _parse(pred, timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify's TimeoutException and sympy errors alike: not verified
        return False


def grade(completion: str, answer: str, timeout: Optional[int] = DEFAULT_TIMEOUT_S) -> Grade:
    """Grade one completion against a reference answer (in-process; see the module doc about threads)."""
    extracted = last_boxed(completion)
    if extracted is None:
        return Grade(None, 0.0)
    if threading.current_thread() is not threading.main_thread():
        timeout = None  # signal.alarm is main-thread only; callers in threads should use `grade_isolated`
    return Grade(extracted, 1.0 if answers_match(extracted, str(answer), timeout) else 0.0)


_POOL: Optional[ProcessPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> ProcessPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("spawn"))
        return _POOL


def grade_isolated(completion: str, answer: str, timeout: int = DEFAULT_TIMEOUT_S) -> Grade:
    """`grade`, safe from any thread: in the main thread directly, otherwise in a spawn-pool worker."""
    if threading.current_thread() is threading.main_thread():
        return grade(completion, answer, timeout)
    future = _pool().submit(grade, completion, answer, timeout)
    try:
        # parse + verify each have `timeout` inside the worker; this is only a backstop.
        return future.result(timeout=4 * timeout + 10)
    except FutureTimeout:
        return Grade(last_boxed(completion), 0.0)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl reward function (``reward.custom_reward_function``): 1.0 when the last boxed answer is right, else 0.

    Returns ``score`` (the reward), ``acc`` (verl reports ``val-core/<data_source>/acc/...`` from it) and ``pred``
    (the extracted answer, which verl's validation metrics use for maj@N). ``data_source`` is not used: every
    source is graded the same way.
    """
    result = grade_isolated(solution_str, str(ground_truth))
    return {"score": result.score, "acc": result.score, "pred": result.extracted or ""}
