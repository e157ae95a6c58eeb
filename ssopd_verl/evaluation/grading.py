"""Grading: the last ``\\boxed{}`` of a completion, compared with the reference answer by math-verify.

This is the evaluation protocol of the paper (as in OPSD): thinking on, the *last* boxed answer counts, math-verify
decides equivalence. The same function grades training rollouts, through verl's custom-reward hook::

    reward.custom_reward_function.path=pkg://ssopd_verl.evaluation.grading
    reward.custom_reward_function.name=compute_score

(verl's ``default_compute_score`` never routes to math-verify: its math data sources use string/Minerva matching.)
The evaluation (``runner.py``) calls :func:`grade`, which is what :func:`compute_score` calls: one code path.

What is bounded, and how (a policy can emit anything; grading must neither stall nor mis-score because of it):

* In the calling process, only linear-time string work runs: :func:`last_boxed` (one regex pass over the box
  commands, one pass over the braces) and :func:`answer_key` / the exact-match shortcut (regex substitutions without
  backtracking blow-ups, and a single scan for ``\\text{...}``).
* What math-verify gets has every whitespace run collapsed to one space (as TeX reads it; math-verify's regexes are
  quadratic in such runs). An answer (or reference) still longer than :data:`MAX_ANSWER_CHARS` that is not an exact
  match is never handed to math-verify: it scores 0 with status ``"skipped"``.
* Everything else, i.e. math-verify and sympy parsing of the untrusted answer, runs only in a worker process of a
  :class:`GradingPool` (plain ``python -c`` subprocesses talking over a socket pair; no ``__main__`` guard needed, the
  parent's main module is not re-imported). Each request has a *budget* (``timeout``, default
  :data:`DEFAULT_TIMEOUT_S`) enforced twice:
  - in the worker, by ``setitimer`` around parse + verify (the interrupt is a ``BaseException``, so math-verify's
    and sympy's ``except Exception`` cannot swallow it); the worker survives and is reused;
  - in the caller, by a hard deadline of budget + :data:`HARD_GRACE_S` from the moment the worker received the
    request; past it (stuck in C code, where signals wait) the worker is SIGKILLed and replaced.
  Either way the result is score 0, status ``"timeout"``.
  The hard deadline is needed: math-verify's regexes run in C, where the timer's signal waits (on 100 characters
  of nested braces the 10 s budget overran by 1.5 s). A worker also has a 4 GiB address-space limit
  (:data:`WORKER_MEMORY_BYTES`), so a runaway sympy computation fails with MemoryError (scored 0) in the worker
  rather than waking the machine's OOM killer. The time a caller waits for a free worker is not counted against the
  budget (so a correct answer queued behind slow ones is still graded); it is itself bounded, every busy worker
  being bounded. Worst case of one call with a free worker: budget + grace (+ ~1.5 s to start a replacement).
* A worker that dies (OOM killer, segfault, SIGKILL) is replaced and the request retried once on a fresh worker; a
  second death scores 0 with status ``"error"``. A worker that cannot start at all (e.g. the package is not
  importable by ``sys.executable``) raises ``RuntimeError``: silently scoring everything 0 would be worse.
  Nothing is ever graded without a bound in the caller's thread.
* Nothing from the data is executed by this module (no ``eval``). math-verify's plain-expression parsing goes
  through sympy's ``parse_expr`` (which evaluates the tokenised text); that happens only in the workers.

Bad inputs that are not the policy's doing raise: a reference answer that is None, NaN, empty or not a string or a
number raises ``ValueError``; a completion that is not a string raises ``TypeError``.

:func:`compute_score` returns, per completion, ``score`` (the reward), ``acc``, ``pred`` and the numeric flags
``grading_timeout``, ``grading_skipped`` and ``grading_error`` (0/1), which verl's reward loop passes on as
``reward_extra_info`` (validation reports their means as ``val-aux/<source>/grading_timeout/mean@N`` etc.);
:func:`grading_stats` gives the running totals of this process.
"""

from __future__ import annotations

import atexit
import logging
import math
import numbers
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Optional

BOXED_COMMANDS = ("\\boxed", "\\fbox")
# budget of one math-verify comparison (parse both + verify), enforced in the worker; SSOPD_GRADING_TIMEOUT_S sets
# it for every process (e.g. the test suite's end-to-end runs, whose loaded machine must not turn grades into
# timeouts)
DEFAULT_TIMEOUT_S = float(os.environ.get("SSOPD_GRADING_TIMEOUT_S", "10"))
HARD_GRACE_S = 5.0  # past budget + grace without an answer, the caller kills the worker
MAX_ANSWER_CHARS = 1_000  # longer boxed answers / references are not handed to math-verify (longest shipped: 53)
DEFAULT_WORKERS = int(os.environ.get("SSOPD_GRADING_WORKERS", "4"))
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of a grading worker (RLIMIT_AS)
STARTUP_TIMEOUT_S = 120.0  # a worker imports math-verify + sympy (~1.5 s of CPU) before it says it is ready

STATUSES = ("graded", "no_answer", "skipped", "timeout", "error")


@dataclass(frozen=True)
class Grade:
    extracted: Optional[str]  # content of the last complete \boxed{...}; None if there is none
    score: float  # 1.0 correct, 0.0 otherwise
    # graded: decided by the exact-match shortcut or math-verify; no_answer: no complete box; skipped: answer or
    # reference over MAX_ANSWER_CHARS (not handed to math-verify); timeout: budget spent; error: worker died twice
    status: str = "graded"


# ------------------------------------------------------------------------------------------- extraction (linear)

_BOX_RE = re.compile("|".join(re.escape(command) for command in BOXED_COMMANDS))
_BRACE_RE = re.compile(r"[{}]")
_SPACE_ARG_RE = re.compile(r"\s+([^\s$]+)")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``.

    Braces are matched, so nested LaTeX (``\\boxed{\\frac{1}{2}}``) is returned whole. A box left open at the
    end (a truncated completion) and an empty one (``"... within \\boxed{}"`` quoted from the instruction) are
    skipped in favour of the previous complete one. Linear time: one pass finds the box commands, one pass over
    the braces after the first of them matches every brace that opens a box.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]  # just after each command
    if not starts:
        return None
    opens = {i for i in starts if text.startswith("{", i)}
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text, starts[0]):  # a brace's partner only depends on the text after it
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            i = stack.pop()
            if i in opens:
                close[i] = m.start()
    for i in reversed(starts):
        if i in opens:
            if i in close:
                content = text[i + 1 : close[i]].strip()
                if content:
                    return content
        elif text.startswith(" ", i):  # "\boxed 5": the token after the space
            # whitespace runs after different commands are disjoint and a match returns: linear overall
            match = _SPACE_ARG_RE.match(text, i)
            if match:
                content = match.group(1).rstrip(".")
                if content:
                    return content
    return None


_TEXT_MACRO_RE = re.compile(r"\\text\{")
_SPACING_RE = re.compile(r"\\(?:left|right|!|,|;|:)")
_WHITESPACE_RE = re.compile(r"\s+")


def _strip_text_macros(s: str) -> str:
    """``\\text{ abc }`` -> ``abc`` where the argument has no braces (left to right, not recursive).

    Linear: from each ``\\text{`` one search for the next brace, which stops at the latest at the next
    ``\\text{``'s own brace, so the searched stretches do not overlap.
    """
    out, last = [], 0
    for m in _TEXT_MACRO_RE.finditer(s):
        brace = _BRACE_RE.search(s, m.end())
        if brace is not None and brace.group() == "}":
            out.append(s[last : m.start()])
            out.append(s[m.end() : brace.start()].strip())
            last = brace.end()
    out.append(s[last:])
    return "".join(out)


def _normalize(answer: str) -> str:
    """Cheap canonical form for an exact-match shortcut (and for majority voting). Linear time."""
    s = answer.strip().strip("$").strip()
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _strip_text_macros(s)
    s = _WHITESPACE_RE.sub("", s)
    return s.rstrip(".")


def answer_key(answer: Optional[str]) -> Optional[str]:
    """The key majority voting groups answers by (None: no answer, does not vote)."""
    return None if answer is None else _normalize(answer)


def _reference_text(answer) -> str:
    """The reference answer as a string; data errors (None, NaN, empty, other types) raise ``ValueError``."""
    if isinstance(answer, str):
        if not answer.strip():
            raise ValueError("reference answer is empty")
        return answer
    if answer is None:
        raise ValueError("reference answer is None (missing ground truth in the data)")
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise ValueError(f"reference answer must be a string or a number, got {type(answer).__name__}: {answer!r}")
    if isinstance(answer, numbers.Integral):
        return str(int(answer))
    value = float(answer)
    if not math.isfinite(value):
        raise ValueError(f"reference answer is {value} (missing or corrupt ground truth in the data)")
    return str(int(value)) if value.is_integer() else repr(value)


# ----------------------------------------------------------------------------------- math-verify (workers only)


def _parse(expr: str, timeout: Optional[int]):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Wrap in \boxed{} so math-verify reads exactly this expression, as LaTeX first, plain expression second.
    return parse(
        "\\boxed{" + expr + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )


class _OutOfTime(BaseException):
    """Raised by the worker's timer; a BaseException so that ``except Exception`` in sympy cannot swallow it."""


def _on_alarm(signum, frame):
    raise _OutOfTime()


def _verify_within(pred: str, gold: str, budget_s: float) -> tuple[float, str]:
    """math-verify equality under a wall-clock timer. Worker processes only (main thread, untrusted text)."""
    from math_verify import verify

    try:
        try:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(budget_s, 0.001))
            gold_parsed = _parse(gold, None)  # our timer, not math-verify's signal.alarm, bounds the work
            pred_parsed = _parse(pred, None)
            ok = bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _OutOfTime:
        return 0.0, "timeout"
    except Exception:  # sympy errors that math-verify let through: not verified
        return 0.0, "graded"
    return (1.0 if ok else 0.0), "graded"


def _worker_main(fd: int) -> None:
    """Entry point of a grading worker: answer ``(seq, pred, gold, budget_s)`` requests until the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; we exit when it goes away
    try:  # a runaway sympy computation gets MemoryError (scored 0) here instead of waking the machine's OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: we time it ourselves
    conn = Connection(fd)
    _verify_within("1", "1", 60.0)  # import math-verify, sympy and the LaTeX parser before saying ready
    conn.send(("ready", os.getpid()))
    while True:
        try:
            seq, pred, gold, budget_s = conn.recv()
            conn.send((seq, _verify_within(pred, gold, budget_s)))
        except (EOFError, OSError):  # the parent closed the socket or is gone
            return


_WORKER_BOOT = "import sys; from ssopd_verl.evaluation.grading import _worker_main; _worker_main(int(sys.argv[1]))"


class _Worker:
    def __init__(self, startup_timeout_s: float):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.seq = 0
        try:
            if not self.conn.poll(startup_timeout_s):
                raise RuntimeError(f"grading worker did not start within {startup_timeout_s:.0f}s")
            message = self.conn.recv()
            if not (isinstance(message, tuple) and message[0] == "ready"):
                raise RuntimeError(f"grading worker sent {message!r} instead of 'ready'")
        except (EOFError, OSError) as e:
            self.kill()
            raise RuntimeError(f"grading worker exited during startup (exit code {self.proc.poll()})") from e
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, pred: str, gold: str, budget_s: float, deadline_s: float):
        """``(score, status)``, ``"died"`` or ``"hung"`` (no answer within ``deadline_s``)."""
        self.seq += 1
        try:
            self.conn.send((self.seq, pred, gold, budget_s))
            if not self.conn.poll(deadline_s):
                return "hung"
            seq, result = self.conn.recv()
        except (EOFError, OSError, ValueError, TypeError):  # closed socket, or a garbled reply from a dying worker
            return "died"
        return result if seq == self.seq else "died"

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


class GradingPool:
    """``size`` grading workers, started on demand; each request gets a worker to itself (see the module doc)."""

    def __init__(self, size: int = DEFAULT_WORKERS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 grace_s: float = HARD_GRACE_S, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        if size < 1:
            raise ValueError(f"a grading pool needs at least one worker, got {size}")
        self.size, self.timeout_s, self.grace_s, self.startup_timeout_s = size, timeout_s, grace_s, startup_timeout_s
        # idle workers, last used on top (a sequential caller reuses one warm worker); None: a worker to start
        self._slots: queue.LifoQueue = queue.LifoQueue()
        for _ in range(size):
            self._slots.put(None)
        self._live: set[_Worker] = set()
        self._lock = threading.Lock()
        self._stats: Counter = Counter()
        self._closed = False

    def verify(self, pred: str, gold: str, timeout_s: Optional[float] = None) -> tuple[float, str]:
        """math-verify ``pred == gold`` in a worker: ``(score, status)``, status "graded", "timeout" or "error"."""
        budget = self.timeout_s if timeout_s is None else float(timeout_s)
        for _ in range(2):  # a dead worker is replaced and the request retried once
            worker = self._checkout()
            try:
                result = worker.call(pred, gold, budget, budget + self.grace_s)
            except BaseException:  # e.g. KeyboardInterrupt while waiting: the worker's state is unknown
                self._discard(worker)
                raise
            if result == "hung":
                self._discard(worker)
                self._count("timeout", hard_timeouts=1)
                return 0.0, "timeout"
            if result == "died":
                self._discard(worker)
                self._count(worker_restarts=1)
                continue
            self._checkin(worker)
            self._count(result[1])
            return result
        self._count("error")
        return 0.0, "error"

    def warm(self) -> None:
        """Start every worker now (in parallel) instead of on demand."""
        with ThreadPoolExecutor(self.size) as starters:
            futures = [starters.submit(self._checkout) for _ in range(self.size)]
        errors = []
        for future in futures:
            try:
                self._checkin(future.result())
            except Exception as e:  # that slot went back to the pool as "to start"
                errors.append(e)
        if errors:
            raise errors[0]

    def pids(self) -> list[int]:
        """Process ids of the started workers (for tests and monitoring)."""
        with self._lock:
            return sorted(w.pid for w in self._live)

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live, self._live = list(self._live), set()
        for worker in live:
            worker.kill()

    def _checkout(self) -> _Worker:
        worker = self._slots.get()  # waits for a free slot; every busy worker is bounded, so this wait is too
        if worker is not None and worker.proc.poll() is None:
            return worker
        if worker is not None:  # died while idle: replaced here, no request lost
            self._discard(worker, refill=False)
            self._count(worker_restarts=1)
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("grading pool is closed")
            worker = _Worker(self.startup_timeout_s)
        except BaseException:
            self._slots.put(None)
            raise
        with self._lock:
            self._live.add(worker)
        return worker

    def _checkin(self, worker: _Worker) -> None:
        self._slots.put(worker)

    def _discard(self, worker: _Worker, refill: bool = True) -> None:
        worker.kill()
        with self._lock:
            self._live.discard(worker)
        if refill:
            self._slots.put(None)

    def _count(self, status: Optional[str] = None, **counts: int) -> None:
        with self._lock:
            if status:
                self._stats[status] += 1
            self._stats.update(counts)


_POOL: Optional[GradingPool] = None
_POOL_PID: Optional[int] = None
_POOL_LOCK = threading.Lock()
_LOCAL_STATS: Counter = Counter()  # grades decided without a worker (no answer, exact match, skipped)


def default_pool() -> GradingPool:
    """The process-wide pool :func:`grade` uses (a forked child gets its own, never its parent's)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL, _POOL_PID = GradingPool(), os.getpid()
        return _POOL


def _shutdown() -> None:
    if _POOL is not None and _POOL_PID == os.getpid():
        _POOL.close()


atexit.register(_shutdown)


def grading_stats() -> dict:
    """Running totals of this process: grades per status, plus ``worker_restarts`` and ``hard_timeouts``."""
    with _POOL_LOCK:
        totals = Counter(_LOCAL_STATS)
        pool = _POOL if _POOL_PID == os.getpid() else None
    if pool is not None:
        totals.update(pool.stats())
    return dict(totals)


# ------------------------------------------------------------------------------------------------ public API


def _compare(pred: str, gold: str, timeout: Optional[float], pool: Optional[GradingPool]) -> tuple[float, str]:
    if _normalize(pred) == _normalize(gold):
        status, score = "graded", 1.0
    else:
        # TeX reads a run of whitespace as one space; math-verify's own regexes are quadratic in such runs
        pred, gold = _WHITESPACE_RE.sub(" ", pred), _WHITESPACE_RE.sub(" ", gold)
        if len(pred) <= MAX_ANSWER_CHARS and len(gold) <= MAX_ANSWER_CHARS:
            return (pool or default_pool()).verify(pred, gold, timeout)
        status, score = "skipped", 0.0
    with _POOL_LOCK:
        _LOCAL_STATS[status] += 1
    return score, status


def answers_match(pred: str, gold, timeout: Optional[float] = None, pool: Optional[GradingPool] = None) -> bool:
    """Whether ``pred`` is mathematically equal to ``gold`` (both bare answers, no ``\\boxed``); bounded as `grade`."""
    return _compare(str(pred), _reference_text(gold), timeout, pool)[0] == 1.0


def grade(completion: str, answer, timeout: Optional[float] = None, pool: Optional[GradingPool] = None) -> Grade:
    """Grade one completion against a reference answer, in bounded time, from any thread.

    ``timeout``: the math-verify budget in seconds (default: the pool's, :data:`DEFAULT_TIMEOUT_S`).
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a string, got {type(completion).__name__}")
    gold = _reference_text(answer)
    extracted = last_boxed(completion)
    if extracted is None:
        with _POOL_LOCK:
            _LOCAL_STATS["no_answer"] += 1
        return Grade(None, 0.0, "no_answer")
    score, status = _compare(extracted, gold, timeout, pool)
    return Grade(extracted, score, status)


# compute_score's 0/1 flags (reward_extra_info) and the grading status each one reports
GRADING_FLAGS = {"grading_timeout": "timeout", "grading_skipped": "skipped", "grading_error": "error"}


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl reward function (``reward.custom_reward_function``): 1.0 when the last boxed answer is right, else 0.

    Returns ``score`` (the reward), ``acc`` (verl reports ``val-core/<data_source>/acc/...`` from it), ``pred``
    (the extracted answer, which verl's validation metrics use for maj@N) and the 0/1 flags ``grading_timeout``
    (budget spent: scored 0), ``grading_skipped`` (answer or reference over ``MAX_ANSWER_CHARS``: scored 0 without
    math-verify) and ``grading_error`` (the grading worker died twice on it: scored 0). Every call returns the same
    keys, as verl's reward loop requires. ``data_source`` is not used: every source is graded the same way.
    """
    result = grade(solution_str, ground_truth)
    return {
        "score": result.score,
        "acc": result.score,
        "pred": result.extracted or "",
        **{flag: int(result.status == status) for flag, status in GRADING_FLAGS.items()},
    }
