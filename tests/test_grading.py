"""Grading: last \\boxed{} + math-verify, on every shipped evaluation answer, and through verl's reward hook; bounded
time on hostile completions, called from threads as verl's reward loop does; dead and hung workers replaced.

No assertion here depends on how fast the machine is. Tests that expect a grade give math-verify a budget no load
reaches (PATIENT_S); what happens past a budget is shown with short budgets on inputs that never finish, through
statuses, the pool's counters and what each worker was handed (the WorkerCalls spy), never by timing a call.
Bounded time is shown by its mechanisms: linear extraction (a deterministic work count), the cap and whitespace
collapse on what reaches math-verify, and the budget and hard deadline each request carries."""

import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from omegaconf import OmegaConf

from ssopd_verl.evaluation import grading
from ssopd_verl.evaluation.benchmarks import BENCHMARKS, eval_data_dir, load_benchmark
from ssopd_verl.evaluation.grading import Grade, GradingPool, answer_key, answers_match, grade, last_boxed

SETS = {name: load_benchmark(name)[1] for name in BENCHMARKS}

PATIENT_S = 600.0  # math-verify budget (and hard-deadline grace) where a test expects a grade: no load reaches it
STUCK_S = 600.0  # how long a test waits for a state it polls before it calls itself stuck


@pytest.fixture(scope="module", autouse=True)
def patient_default_pool():
    """The process's default pool (what grade() and compute_score use) with a PATIENT_S budget while this module
    runs: the production default (10 s) is a bound on hostile answers, which a loaded machine may approach on a
    legitimate one; tests that expect a timeout pass their own short budget."""
    pool = grading.default_pool()
    assert (pool.timeout_s, pool.grace_s) == (grading.DEFAULT_TIMEOUT_S, grading.HARD_GRACE_S)
    pool.timeout_s = PATIENT_S
    yield pool
    pool.timeout_s = grading.DEFAULT_TIMEOUT_S


@dataclass(eq=False)
class WorkerCall:
    """One request handed to a grading worker (one ``_Worker.call``): what math-verify was asked, with what budget
    and hard deadline, and the outcome (``(score, status)``, ``"died"`` or ``"hung"``)."""

    pid: int
    pred: str
    gold: str
    budget_s: float
    deadline_s: float
    result: object = None
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class WorkerCalls:
    """Spy on ``_Worker.call``: every request sent to a grading worker, in order. The first ``hold`` requests wait
    in the call, before they are sent, until the test releases them (a worker killed then dies with the request on
    it, never between checkout and call, where the pool replaces a dead worker without using up the retry); the
    first ``together`` requests wait there until that many are in flight at once (every worker checked out)."""

    def __init__(self):
        self.entries: list[WorkerCall] = []
        self.hold = 0
        self.together = 0
        self._cond = threading.Condition()
        self._barrier: Optional[threading.Barrier] = None

    def enter(self, worker, pred, gold, budget_s, deadline_s) -> WorkerCall:
        entry = WorkerCall(worker.pid, pred, gold, budget_s, deadline_s)
        with self._cond:
            self.entries.append(entry)
            index = len(self.entries)
            if self.together and self._barrier is None:
                self._barrier = threading.Barrier(self.together, timeout=STUCK_S)
            self._cond.notify_all()
        if index <= self.together:
            self._barrier.wait()
        if index <= self.hold:
            assert entry.released.wait(STUCK_S), f"stuck: request {index} never released by the test"
        return entry

    def wait_for(self, n: int) -> WorkerCall:
        """The n-th request (1-based), once a worker has been handed it."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.entries) >= n, STUCK_S), f"stuck: no request {n}"
            return self.entries[n - 1]


@pytest.fixture
def worker_calls(monkeypatch):
    calls = WorkerCalls()
    original = grading._Worker.call

    def call(worker, pred, gold, budget_s, deadline_s):
        entry = calls.enter(worker, pred, gold, budget_s, deadline_s)
        entry.result = original(worker, pred, gold, budget_s, deadline_s)
        return entry.result

    monkeypatch.setattr(grading._Worker, "call", call)
    return calls


def wait_until(condition, what: str) -> None:
    """Poll a state (not a clock): fails only a test stuck for STUCK_S."""
    deadline = time.monotonic() + STUCK_S
    while not condition():
        assert time.monotonic() < deadline, f"stuck: {what} not reached within {STUCK_S:.0f}s"
        time.sleep(0.01)


def as_model_output(answer: str) -> str:
    """How a thinking model writes it: a wrong boxed guess inside the reasoning, the final answer boxed last."""
    return (
        "<think>\nLet me try small cases first. Maybe the answer is \\boxed{123456789}? No, that fails.\n</think>\n\n"
        f"Putting everything together, the answer is $\\boxed{{{answer}}}$."
    )


def perturb(answer: str) -> str:
    stripped = answer.strip()
    if stripped.lstrip("-").isdigit():
        return str(int(stripped) + 1)
    return f"{stripped}+1"


def test_shipped_sets_are_complete():
    sizes = {name: len(problems) for name, problems in SETS.items()}
    assert sizes == {"aime24": 30, "aime25": 30, "hmmt25_feb": 30, "amc23": 40, "math500": 500}
    assert sorted(p.name for p in eval_data_dir().glob("*.jsonl")) == sorted(f"{s}.jsonl" for s in BENCHMARKS.values())
    # the HMMT set really has LaTeX answers (the cases the grader must handle)
    assert sum("\\" in p["answer"] for p in SETS["hmmt25_feb"]) >= 10


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_answer_scores_one_and_a_perturbed_one_scores_zero(name):
    problems = SETS[name]
    with ThreadPoolExecutor(grading.DEFAULT_WORKERS) as ex:  # as verl's reward loop: threads, the pool's workers
        right = list(ex.map(lambda p: grade(as_model_output(p["answer"]), p["answer"]).score, problems))
        wrong = list(ex.map(lambda p: grade(as_model_output(perturb(p["answer"])), p["answer"]).score, problems))
    wrong_right = [(i, p["answer"]) for i, (p, s) in enumerate(zip(problems, right)) if s != 1.0]
    wrong_wrong = [(i, p["answer"]) for i, (p, s) in enumerate(zip(problems, wrong)) if s != 0.0]
    assert not wrong_right, f"correct answers graded wrong: {wrong_right}"
    assert not wrong_wrong, f"perturbed answers graded right: {wrong_wrong}"


def test_math_verify_parses_every_reference_answer():
    """The exact-match shortcut must not be what makes the answers above pass."""
    unparsed = [
        (name, p["answer"])
        for name, problems in SETS.items()
        for p in problems
        if not grading._parse(p["answer"], int(PATIENT_S))  # math-verify's own timer: a budget no load reaches
    ]
    assert not unparsed


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{9}{\sqrt{23}}", r"\frac{9 \sqrt{23}}{23}"),
        (r"\frac{\pi-2}{\pi}", r"1-\frac{2}{\pi}"),
        (r"26! \cdot 2^{25}", r"2^{25} \cdot 26!"),
        (r"\dfrac{4}{9}", r"\frac{4}{9}"),
        (r"\sqrt{95/24}", r"\sqrt{\frac{95}{24}}"),
        (r"4\sqrt{37}+14", r"14+4\sqrt{37}"),
        (r"\frac{-1-\sqrt{17}}{2}, \frac{-1+\sqrt{17}}{2}", r"\frac{-1+\sqrt{17}}{2}, \frac{-1-\sqrt{17}}{2}"),
        ("0.25", r"\frac{1}{4}"),
    ],
)
def test_equivalent_forms_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred, gold", [("-984", "984"), (r"\frac{7}{18}", r"\frac{18}{7}"), (r"8\sqrt{10}", "8")])
def test_different_values_do_not_match(pred, gold):
    assert not answers_match(pred, gold)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}} and then \boxed{3}", "3"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\fbox{7}", "7"),
        (r"the answer is \boxed 5.", "5"),
        (r"first \boxed{12} then a truncated \boxed{\frac{1}{", "12"),  # an unclosed box does not count
        ("no box at all: 42", None),
        (r"\boxed{17} ... remember to put the final answer within \boxed{}.", "17"),  # an empty box is no answer
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_no_box_scores_zero():
    assert grade("The answer is 204.", "204").score == 0.0


def test_verl_loads_and_calls_the_reward_function_from_the_launch_config():
    """The reward path the launch scripts configure: verl's loader, then the call its reward manager makes."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": "pkg://ssopd_verl.evaluation.grading", "name": "compute_score"}}}
    )
    fn = get_custom_reward_fn(config)
    hmmt = next(p for p in SETS["hmmt25_feb"] if p["answer"] == r"\frac{9 \sqrt{23}}{23}")
    right = fn(data_source="hmmt25_feb", solution_str=as_model_output(r"\frac{9}{\sqrt{23}}"),
               ground_truth=hmmt["answer"], extra_info={"index": 6})
    wrong = fn(data_source="hmmt25_feb", solution_str=as_model_output("9"), ground_truth=hmmt["answer"])
    flags = {"grading_timeout": 0, "grading_skipped": 0, "grading_error": 0}
    assert right == {"score": 1.0, "acc": 1.0, "pred": r"\frac{9}{\sqrt{23}}", **flags}
    assert wrong["score"] == 0.0 and wrong["pred"] == "9"


def test_reward_function_from_a_worker_thread_uses_the_process_pool(worker_calls):
    """verl's reward manager calls the function from a thread pool, where math-verify's signal timeouts fail: the
    comparison runs in a worker process (the exact-match shortcut "204" == "204" does not need one)."""
    results = {}

    def call():
        results["right"] = grading.compute_score("aime24", as_model_output("204"), "204")
        results["wrong"] = grading.compute_score("aime24", as_model_output("205"), "204")

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(timeout=STUCK_S)
    assert not thread.is_alive(), f"stuck: compute_score did not return within {STUCK_S:.0f}s"
    flags = {"grading_timeout": 0, "grading_skipped": 0, "grading_error": 0}
    assert results == {"right": {"score": 1.0, "acc": 1.0, "pred": "204", **flags},
                       "wrong": {"score": 0.0, "acc": 0.0, "pred": "205", **flags}}
    assert [(c.pred, c.gold, c.result) for c in worker_calls.entries] == [("205", "204", (0.0, "graded"))]
    assert worker_calls.entries[0].pid in grading.default_pool().pids()


# sha256 of the five sets as the project received them (../shared/data/eval, 2026-11): the shipped copies must be
# byte-identical, so that evaluation numbers refer to exactly these problems and answers.
SHARED_SHA256 = {
    "aime24": "a3c49569f3d7125aaf4eea5764bd1b868af534ae3aff6aad0843a7da58fe46b8",
    "aime25": "6012af2a112f5e26d91f1b0cc644b5dde6399173b8b648aec2e6b9899877a2db",
    "amc2023": "b443425b035d98fec3da4de7e347ac43cebcf7b721e96ba8bf9e0120d24dd61d",
    "hmmt25_feb": "58d889b807a87fd189562d9aeaf2bddf342b2e956843ebbbd8259fc93195cc3f",
    "math500": "5b126695a919f8fb40edffaf2e748ae08f7fb6ce0721211671c760b4f0b7c5de",
}


def test_shipped_files_are_copies_of_the_shared_sets():
    import hashlib

    assert sorted(SHARED_SHA256) == sorted(BENCHMARKS.values())
    for stem, digest in SHARED_SHA256.items():
        assert hashlib.sha256((eval_data_dir() / f"{stem}.jsonl").read_bytes()).hexdigest() == digest, stem


# ------------------------------------------------------------------------------------ bounded time, hostile text
#
# verl's reward loop calls compute_score from a thread pool (loop.run_in_executor); so do these tests. The hostile
# inputs used to take 20-60 s at these sizes (the quadratic/cubic ones grow without limit with the input). What keeps
# them bounded, tested below without a clock: in the caller only linear string work runs (a work count that doubles
# at most when the input doubles); math-verify only ever sees an answer of at most MAX_ANSWER_CHARS with its
# whitespace runs collapsed (what each worker was handed); and every request carries a budget and a hard deadline
# (the timeout tests).

GOLD = r"\frac{9 \sqrt{23}}{23}"
RIGHT = as_model_output(r"\frac{9}{\sqrt{23}}")  # right, but not an exact match: needs math-verify in a worker

# hostile shapes at any size n, and the size each is graded at below
SHAPES = {
    "text_newlines_cubic": (lambda n: "\\boxed{\\text{" + "\n" * n + "{x}}}", 3000),
    "text_4000_spaces": (lambda n: "\\boxed{\\text{" + " " * n + "{x}}}", 4000),
    "text_900_spaces_under_cap": (lambda n: "\\boxed{\\text{" + " " * n + "{x}}}", 900),  # reaches math-verify
    "unclosed_boxes_10000": (lambda n: "Let me box it: " + "\\boxed{" * n, 10_000),
    "unclosed_box_after_answer_10000": (lambda n: "\\boxed{5} " + "\\boxed{" * n, 10_000),
    "answer_100k_chars": (lambda n: "\\boxed{" + "1" * n + "}", 100_000),
    "completion_100k_chars": (lambda n: "\\boxed{5}" + "word " * n, 20_000),
    "unclosed_braces": (lambda n: "\\boxed{\\frac{1}{2" + "{" * n + " and then some", 5000),
    "braces_only": (lambda n: "{" * (5 * n) + "}" * (4 * n) + "\\boxed{" + "}" * (n // 10), 10_000),
    "space_form_dollars": (lambda n: "\\boxed $" * n, 20_000),
    "text_macros_50000": (lambda n: "\\boxed{" + "\\text{" * n + "}", 50_000),
}
HOSTILE = {
    **{name: shape(n) for name, (shape, n) in SHAPES.items()},
    "control_tokens_in_answer": "<think>x</think>\\boxed{5<|im_end|><|im_start|>user\nignore that}<|im_end|>",
}
# what each hostile completion hands math-verify (the answer is "5"); the others hand it nothing: no complete box,
# an exact match, or an answer over MAX_ANSWER_CHARS (skipped)
HOSTILE_REACHES = {
    "text_newlines_cubic": [r"\text{ {x}}"],  # 3,000 newlines collapsed to one space
    "text_4000_spaces": [r"\text{ {x}}"],
    "text_900_spaces_under_cap": [r"\text{ {x}}"],
    "control_tokens_in_answer": ["5<|im_end|><|im_start|>user ignore that"],
}


@pytest.fixture(scope="module")
def warm_pool(patient_default_pool):
    patient_default_pool.warm()
    return patient_default_pool


class _CountingPattern:
    """Stands in for one of grading.py's compiled regexes and adds what its calls scan to ``work``: the whole string
    (from ``pos``) for a pass (finditer, sub), up to the match (or the end) for search, and for an anchored match the
    match, or on failure the whitespace run it backtracked through (match serves only ``\\s+([^\\s$]+)``, whose two
    repeats never compete for a character). A pattern without nested or competing repeats runs in time linear in
    what it scans; REVIEWED_PATTERNS pins the ones that were checked for that."""

    _WS = re.compile(r"\s*")

    def __init__(self, pattern: re.Pattern, work: Counter):
        self.pattern, self.work = pattern, work

    def _add(self, method: str, chars: int) -> None:
        self.work["scanned"] += chars
        self.work[(self.pattern.pattern, method)] += 1

    def finditer(self, string, pos=0):
        self._add("finditer", len(string) - pos)
        return self.pattern.finditer(string, pos)

    def search(self, string, pos=0):
        m = self.pattern.search(string, pos)
        self._add("search", (m.end() if m else len(string)) - pos)
        return m

    def match(self, string, pos=0):
        m = self.pattern.match(string, pos)
        self._add("match", (m.end() if m else self._WS.match(string, pos).end() + 1) - pos)
        return m

    def sub(self, repl, string, count=0):
        self._add("sub", len(string))
        return self.pattern.sub(repl, string, count)

    def __getattr__(self, name):
        raise AssertionError(f"grading.py calls {self.pattern.pattern!r}.{name}: count its work here, review it")


# grading.py's regexes, each reviewed to run in time linear in what it scans: literal alternations, single character
# classes, a single repeat; \s+([^\s$]+) is only used anchored (match) and its two repeats share no character.
REVIEWED_PATTERNS = {
    "_BOX_RE": r"\\boxed|\\fbox",
    "_BRACE_RE": r"[{}]",
    "_SPACE_ARG_RE": r"\s+([^\s$]+)",
    "_TEXT_MACRO_RE": r"\\text\{",
    "_SPACING_RE": r"\\(?:left|right|!|,|;|:)",
    "_WHITESPACE_RE": r"\s+",
}


class _NoMathVerify:
    """A pool that answers at once: what grade() does in the caller's thread, without the worker."""

    def verify(self, pred, gold, timeout_s=None):
        return 0.0, "graded"


def work(fn, *args) -> Counter:
    """Deterministic work of ``fn(*args)`` in grading.py: lines of Python it runs there (``lines``) and characters
    its regexes scan (``scanned``), with a count per (pattern, method)."""
    counts: Counter = Counter()
    patterns = {name: value for name, value in vars(grading).items() if isinstance(value, re.Pattern)}
    source = grading.__file__

    def local(frame, event, arg):
        if event == "line":
            counts["lines"] += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == source else None

    previous = sys.gettrace()
    try:
        for name, pattern in patterns.items():
            setattr(grading, name, _CountingPattern(pattern, counts))
        sys.settrace(tracer)
        fn(*args)
    finally:
        sys.settrace(previous)
        for name, pattern in patterns.items():
            setattr(grading, name, pattern)
    return counts


# shapes that once took hours (the quadratic last_boxed, the cubic \text{} regex), plus every hostile one
LINEAR_SHAPES = {
    "boxes_open": lambda n: "\\boxed{" * n,
    "box_then_open": lambda n: "\\boxed{7}" + "\\boxed{" * n,
    "space_boxes": lambda n: "\\boxed " * n + "$",
    "text_spaces": lambda n: "\\text{" + " " * n + "{x}}",
    "text_newlines": lambda n: "\\text{" + "\n" * n + "}",
    "text_open": lambda n: "\\text{" * n,
    "text_words": lambda n: "\\text{ a }" * n,
    **{name: shape for name, (shape, _) in SHAPES.items()},
}


@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
def test_extraction_and_normalisation_are_linear(shape):
    """Doubling the input at most doubles the work (a quadratic pass quadruples it) of everything grade() runs in
    the caller's thread: last_boxed, answer_key and the rest of grade() up to handing math-verify its answer."""
    make = LINEAR_SHAPES[shape]
    for fn, extra in ((last_boxed, ()), (answer_key, ()), (grade, ("5", None, _NoMathVerify()))):
        small, large = work(fn, make(1000), *extra), work(fn, make(2000), *extra)
        for measure in ("lines", "scanned"):
            assert large[measure] <= 2 * small[measure] + 20, (fn.__name__, measure, small[measure], large[measure])
        assert small["scanned"] <= 8 * len(make(1000)) + 20, (fn.__name__, small["scanned"])  # a few passes
    assert last_boxed("\\boxed{7}" + "\\boxed{" * 1000) == "7"
    assert answer_key("\\text{ a }" * 3) == "aaa"


def test_the_grader_uses_only_reviewed_regexes():
    """The work count above trusts each regex to be linear in what it scans: only the reviewed ones exist, only
    through the methods counted, and nothing calls the re module directly."""
    found = {name: value.pattern for name, value in vars(grading).items() if isinstance(value, re.Pattern)}
    assert found == REVIEWED_PATTERNS
    assert set(re.findall(r"\bre\.(\w+)\(", Path(grading.__file__).read_text())) == {"compile", "escape"}
    used = Counter()
    for shape in LINEAR_SHAPES.values():
        for fn, args in ((last_boxed, ()), (answer_key, ()), (grade, ("5", None, _NoMathVerify()))):
            used.update(k for k in work(fn, shape(50), *args) if isinstance(k, tuple))
    assert {method for (pattern, method) in used if pattern == r"\s+([^\s$]+)"} == {"match"}
    assert {pattern for pattern, _ in used} == set(REVIEWED_PATTERNS.values())  # the count saw every one at work


# The implementations this module replaced (quadratic last_boxed, cubic \text{} regex): the oracle on small inputs.
def _old_last_boxed(text: str) -> Optional[str]:
    end = len(text)
    while True:
        start, command = -1, ""
        for cmd in ("\\boxed", "\\fbox"):
            i = text.rfind(cmd, 0, end)
            if i > start:
                start, command = i, cmd
        if start < 0:
            return None
        i, content = start + len(command), None
        if text.startswith("{", i):
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if text[j] == "}" and depth == 0:
                    content = text[i + 1 : j].strip()
                    break
        elif text.startswith(" ", i):
            match = re.match(r"\s+([^\s$]+)", text[i:])
            content = match.group(1).rstrip(".") if match else None
        if content:
            return content
        end = start


def _old_normalize(answer: str) -> str:
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\(left|right|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def test_linear_rewrites_agree_with_the_old_implementations():
    pieces = ["\\boxed", "\\fbox", "{", "}", " ", "  ", "\n", "$", ".", "1", "x", "\\text{", "\\text", "\\left(",
              "\\right)", "\\,", "\\dfrac", "{1}{2}", "a b", "\t"]
    rng = random.Random(0)
    for _ in range(10_000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert last_boxed(s) == _old_last_boxed(s), s
        assert grading._normalize(s) == _old_normalize(s), s


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completion_hands_math_verify_at_most_a_short_collapsed_answer(name, warm_pool, worker_calls):
    with ThreadPoolExecutor(1) as ex:
        result = ex.submit(grading.compute_score, "aime24", HOSTILE[name], "5").result()
    assert [(c.pred, c.gold) for c in worker_calls.entries] == [(p, "5") for p in HOSTILE_REACHES.get(name, [])]
    for c in worker_calls.entries:  # the mechanism, whatever the input: capped, no whitespace run, a budget
        assert len(c.pred) <= grading.MAX_ANSWER_CHARS and not re.search(r"\s\s", c.pred)
        assert (c.budget_s, c.deadline_s) == (warm_pool.timeout_s, warm_pool.timeout_s + warm_pool.grace_s)
    assert result["score"] in (0.0, 1.0) and result["grading_timeout"] == 0 and result["grading_error"] == 0
    assert result["grading_skipped"] == int(name == "answer_100k_chars")


def test_hostile_outcomes():
    """What each hostile completion is graded as (the answer is "5")."""
    by = {name: grade(text, "5") for name, text in HOSTILE.items()}
    assert by["unclosed_boxes_10000"] == Grade(None, 0.0, "no_answer")
    assert by["unclosed_box_after_answer_10000"] == Grade("5", 1.0, "graded")
    assert by["completion_100k_chars"] == Grade("5", 1.0, "graded")
    assert by["space_form_dollars"] == Grade(None, 0.0, "no_answer")
    assert by["answer_100k_chars"] == Grade("1" * 100_000, 0.0, "skipped")  # over MAX_ANSWER_CHARS: no math-verify
    for name in ("text_newlines_cubic", "text_4000_spaces", "text_900_spaces_under_cap"):  # whitespace collapsed
        assert by[name].status == "graded" and by[name].score == 0.0, name
    assert grade("\\boxed{\\text{" + " " * 4000 + "5}}", "5") == Grade("\\text{" + " " * 4000 + "5}", 1.0, "graded")
    # control tokens spelled as text are just characters of the answer: not the number 5
    assert by["control_tokens_in_answer"].extracted.startswith("5<|im_end|>")
    assert by["control_tokens_in_answer"].score == 0.0
    assert grade("<|im_end|>\\boxed{5}<|im_end|><|endoftext|>", "5") == Grade("5", 1.0, "graded")
    # an unclosed box does not count, the complete one before it does
    assert by["unclosed_braces"] == Grade(None, 0.0, "no_answer")
    assert grade("\\boxed{5} then \\boxed{\\frac{1}{2", "5").score == 1.0
    # a long answer that is an exact match after normalisation needs no math-verify
    assert grade("\\boxed{" + "5" + " " * 5000 + "}", "5").score == 1.0
    assert grade("\\boxed{" + "1+" * 600 + "1}", "5").status == "skipped"
    assert grade("\\boxed{5" + " " * 5000 + "+1}", "5") == Grade("5" + " " * 5000 + "+1", 0.0, "graded")


def test_correct_completion_among_four_hostile_ones_scores_one(warm_pool, worker_calls):
    """The failure seen before: four slow completions held the 4 workers and a right one came back 0.0 after 31 s.
    Now the hostile ones hand math-verify short collapsed answers or nothing, and the right one is graded."""
    texts = [HOSTILE["text_newlines_cubic"], HOSTILE["text_4000_spaces"], HOSTILE["unclosed_boxes_10000"],
             HOSTILE["answer_100k_chars"], RIGHT]
    with ThreadPoolExecutor(len(texts)) as ex:
        results = list(ex.map(lambda t: grading.compute_score("hmmt25_feb", t, GOLD), texts))
    assert [r["score"] for r in results] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert [r["grading_skipped"] for r in results] == [0, 0, 0, 1, 0]
    assert [r["grading_timeout"] + r["grading_error"] for r in results] == [0] * 5
    assert sorted((c.pred, c.gold, c.result) for c in worker_calls.entries) == sorted(
        [(r"\text{ {x}}", GOLD, (0.0, "graded"))] * 2 + [(r"\frac{9}{\sqrt{23}}", GOLD, (1.0, "graded"))]
    )


# Answers that keep sympy busy far beyond any budget used here: 9^(9^9) alone is a 1.2-billion-bit integer (minutes
# of big-integer multiplication, interruptible by the worker's timer); the others are as hopeless.
NEVER_FINISH = ["9^{9^{9^{9}}}", "10^{10^{8}}", "(10^{7})!", "9^{9^{9}}"]


def test_slow_math_verify_times_out_and_does_not_block_a_correct_answer(warm_pool, worker_calls, monkeypatch):
    """Answers that never finish occupy every worker: each scores 0 as a timeout of its own 0.5 s budget (the
    worker's timer; the worker is kept). The correct one, sent once all four are on their workers, waits for a
    worker, then is graded on its full budget (the wait is not taken from it) and scores 1."""
    monkeypatch.setattr(warm_pool, "grace_s", PATIENT_S)  # only the workers' timers can end the slow requests
    before, pids = warm_pool.stats(), warm_pool.pids()
    slow = (NEVER_FINISH * warm_pool.size)[: warm_pool.size]  # one per worker
    with ThreadPoolExecutor(len(slow) + 1) as ex:
        futures = [ex.submit(grade, f"\\boxed{{{t}}}", "5", timeout=0.5) for t in slow]
        worker_calls.wait_for(len(slow))  # every worker busy
        futures.append(ex.submit(grade, RIGHT, GOLD, timeout=PATIENT_S))
        results = [f.result() for f in futures]
    assert [g.status for g in results] == ["timeout"] * len(slow) + ["graded"]
    assert [g.score for g in results] == [0.0] * len(slow) + [1.0]
    calls = sorted((c.pred, c.budget_s, c.deadline_s, c.result) for c in worker_calls.entries)
    assert calls == sorted([(t, 0.5, 0.5 + PATIENT_S, (0.0, "timeout")) for t in slow] +
                           [(r"\frac{9}{\sqrt{23}}", PATIENT_S, 2 * PATIENT_S, (1.0, "graded"))])
    assert worker_calls.entries[-1].pred == r"\frac{9}{\sqrt{23}}"  # handed a worker after every slow one
    after = warm_pool.stats()
    assert after["timeout"] - before.get("timeout", 0) == len(slow)
    assert after.get("hard_timeouts") == before.get("hard_timeouts")  # the workers' timers, not the hard deadline
    assert warm_pool.pids() == pids  # soft timeouts keep their workers


@pytest.fixture(scope="module")
def solo_pool():
    """A one-worker pool for the tests that stop and kill workers (short grace: a hung worker goes fast)."""
    pool = GradingPool(size=1, timeout_s=PATIENT_S, grace_s=0.5)
    yield pool
    pool.close()


def test_a_hung_worker_is_killed_at_the_hard_deadline_and_replaced(solo_pool, worker_calls):
    """A worker that does not answer (stuck in C code that signals cannot interrupt; here: SIGSTOP, so it can never
    answer) is killed at budget + grace; the call scores 0 as a timeout and the next one gets a fresh worker."""
    solo_pool.warm()
    (pid,) = solo_pool.pids()
    hard = solo_pool.stats().get("hard_timeouts", 0)
    os.kill(pid, signal.SIGSTOP)
    result = grade(RIGHT, GOLD, timeout=0.5, pool=solo_pool)
    assert result == Grade(r"\frac{9}{\sqrt{23}}", 0.0, "timeout")
    assert [(c.pid, c.budget_s, c.deadline_s, c.result) for c in worker_calls.entries] == [(pid, 0.5, 1.0, "hung")]
    assert solo_pool.pids() == [] and solo_pool.stats()["hard_timeouts"] == hard + 1
    assert grade(RIGHT, GOLD, pool=solo_pool).score == 1.0
    assert solo_pool.pids() and solo_pool.pids() != [pid]


def test_killed_worker_is_replaced_and_grading_goes_on(warm_pool, worker_calls):
    """As the OOM killer would: SIGKILL one of the default pool's workers; every later call still grades right."""
    before = grading.grading_stats().get("worker_restarts", 0)
    victim = warm_pool.pids()[0]
    (process,) = [w.proc for w in warm_pool._live if w.pid == victim]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: process.poll() is not None, "the killed worker's exit")
    worker_calls.together = warm_pool.size  # the first requests hold every worker at once: the dead one is used
    with ThreadPoolExecutor(8) as ex:  # more callers than workers
        results = list(ex.map(lambda _: grading.compute_score("hmmt25_feb", RIGHT, GOLD), range(8)))
    assert [r["score"] for r in results] == [1.0] * 8
    assert len(worker_calls.entries) == 8 and all(c.result == (1.0, "graded") for c in worker_calls.entries)
    assert victim not in {c.pid for c in worker_calls.entries}
    assert victim not in warm_pool.pids() and len(warm_pool.pids()) == warm_pool.size
    assert grading.grading_stats()["worker_restarts"] == before + 1


def test_request_on_a_worker_that_dies_is_retried_once_on_a_fresh_one(solo_pool, worker_calls):
    solo_pool.warm()
    (pid,) = solo_pool.pids()
    restarts = solo_pool.stats().get("worker_restarts", 0)
    worker_calls.hold = 1  # the request waits on its worker...
    with ThreadPoolExecutor(1) as ex:
        future = ex.submit(grade, RIGHT, GOLD, pool=solo_pool)
        first = worker_calls.wait_for(1)
        os.kill(first.pid, signal.SIGKILL)  # ...which dies: the request goes to a replacement
        first.release()
        assert future.result(timeout=STUCK_S) == Grade(r"\frac{9}{\sqrt{23}}", 1.0, "graded")
    first, second = worker_calls.entries
    assert (first.pid, first.result) == (pid, "died") and second.result == (1.0, "graded") and second.pid != pid
    assert solo_pool.stats()["worker_restarts"] == restarts + 1 and solo_pool.pids() == [second.pid]


def test_request_whose_worker_dies_twice_scores_zero_as_an_error(solo_pool, worker_calls):
    """Each death happens with the request on its worker (held in the call until the worker is killed): a worker
    killed between checkout and call would be replaced at checkout, without using up the retry."""
    solo_pool.warm()
    (pid,) = solo_pool.pids()
    before = solo_pool.stats()
    worker_calls.hold = 2
    with ThreadPoolExecutor(1) as ex:
        future = ex.submit(grade, RIGHT, GOLD, pool=solo_pool)
        for n in (1, 2):
            call = worker_calls.wait_for(n)
            os.kill(call.pid, signal.SIGKILL)
            call.release()
        result = future.result(timeout=STUCK_S)
    assert result == Grade(r"\frac{9}{\sqrt{23}}", 0.0, "error")
    first, second = worker_calls.entries
    assert first.pid == pid and second.pid != pid and first.result == second.result == "died"
    after = solo_pool.stats()
    assert after["error"] == before.get("error", 0) + 1
    assert after["worker_restarts"] == before.get("worker_restarts", 0) + 2
    assert grade(RIGHT, GOLD, pool=solo_pool).score == 1.0  # and the pool goes on, on a third worker
    assert worker_calls.entries[2].pid not in (first.pid, second.pid)


@pytest.mark.parametrize("bad", [None, float("nan"), np.float64("nan"), math.inf, "", "   ", ["5"], {"a": 1}, True])
def test_bad_ground_truth_is_a_clear_error(bad):
    """A missing or corrupt reference is a data bug, not the policy's: it raises instead of scoring 0 silently."""
    with pytest.raises(ValueError, match="reference answer"):
        grading.compute_score("aime24", "\\boxed{5}", bad)
    with pytest.raises(ValueError, match="reference answer"):
        grade("no box", bad)  # checked even when there is no answer to compare


def test_numeric_ground_truth_is_read_as_its_value():
    assert grading.compute_score("aime24", "\\boxed{204}", 204)["score"] == 1.0
    assert grading.compute_score("aime24", "\\boxed{204}", np.int64(204))["score"] == 1.0
    assert grading.compute_score("aime24", "\\boxed{204}", 204.0)["score"] == 1.0
    assert grading.compute_score("aime24", "\\boxed{0.5}", 0.5)["score"] == 1.0
    with pytest.raises(TypeError, match="completion"):
        grading.compute_score("aime24", None, "5")


def test_reward_flags_have_the_same_keys_for_every_outcome():
    """verl's reward loop builds reward_extra_info from the first sample's keys: every outcome must have them all."""
    outcomes = [grading.compute_score("s", t, "5") for t in
                ("\\boxed{5}", "no box", "\\boxed{" + "7" * 5000 + "}", "\\boxed{6}")]
    assert len({tuple(sorted(o)) for o in outcomes}) == 1
    assert [(o["grading_skipped"], o["grading_timeout"], o["grading_error"]) for o in outcomes] == \
        [(0, 0, 0), (0, 0, 0), (1, 0, 0), (0, 0, 0)]
    for key in ("grading_timeout", "grading_skipped", "grading_error"):  # what verl does with them
        assert np.array([o[key] for o in outcomes]).dtype.kind == "i"
    stats = grading.grading_stats()
    assert stats["no_answer"] >= 1 and stats["skipped"] >= 1 and stats["graded"] >= 2
