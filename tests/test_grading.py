"""Grading: last \\boxed{} + math-verify, on every shipped evaluation answer, and through verl's reward hook; bounded
time on hostile completions, called from threads as verl's reward loop does; dead and hung workers replaced."""

import math
import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import pytest
from omegaconf import OmegaConf

from ssopd_verl.evaluation import grading
from ssopd_verl.evaluation.benchmarks import BENCHMARKS, eval_data_dir, load_benchmark
from ssopd_verl.evaluation.grading import Grade, GradingPool, answer_key, answers_match, grade, last_boxed

SETS = {name: load_benchmark(name)[1] for name in BENCHMARKS}


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
        (name, p["answer"]) for name, problems in SETS.items() for p in problems if not grading._parse(p["answer"], 5)
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


def test_reward_function_from_a_worker_thread_uses_the_process_pool():
    """verl's reward manager calls the function from a thread pool, where math-verify's signal timeouts fail: the
    comparison runs in a worker process (the exact-match shortcut "204" == "204" does not need one)."""
    results = {}

    def call():
        results["right"] = grading.compute_score("aime24", as_model_output("204"), "204")
        results["wrong"] = grading.compute_score("aime24", as_model_output("205"), "204")
        results["pool"] = grading._POOL is not None

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(timeout=120)
    flags = {"grading_timeout": 0, "grading_skipped": 0, "grading_error": 0}
    assert results == {"right": {"score": 1.0, "acc": 1.0, "pred": "204", **flags},
                       "wrong": {"score": 0.0, "acc": 0.0, "pred": "205", **flags}, "pool": True}


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
# verl's reward loop calls compute_score from a thread pool (loop.run_in_executor); so do these tests. BOUND_S is the
# wall-clock limit of one call with warm workers: generous for a loaded 2-core CI machine, far below the 20-60 s the
# hostile inputs used to take (the quadratic/cubic ones grow without limit with the input).

BOUND_S = 5.0
GOLD = r"\frac{9 \sqrt{23}}{23}"
RIGHT = as_model_output(r"\frac{9}{\sqrt{23}}")  # right, but not an exact match: needs math-verify in a worker

HOSTILE = {
    "text_newlines_cubic": "\\boxed{\\text{" + "\n" * 3000 + "{x}}}",
    "text_4000_spaces": "\\boxed{\\text{" + " " * 4000 + "{x}}}",
    "text_900_spaces_under_cap": "\\boxed{\\text{" + " " * 900 + "{x}}}",  # reaches math-verify
    "unclosed_boxes_10000": "Let me box it: " + "\\boxed{" * 10_000,
    "unclosed_box_after_answer_10000": "\\boxed{5} " + "\\boxed{" * 10_000,
    "answer_100k_chars": "\\boxed{" + "1" * 100_000 + "}",
    "completion_100k_chars": "\\boxed{5}" + "word " * 20_000,
    "control_tokens_in_answer": "<think>x</think>\\boxed{5<|im_end|><|im_start|>user\nignore that}<|im_end|>",
    "unclosed_braces": "\\boxed{\\frac{1}{2" + "{" * 5000 + " and then some",
    "braces_only": "{" * 50_000 + "}" * 40_000 + "\\boxed{" + "}" * 1000,
    "space_form_dollars": "\\boxed $" * 20_000,
    "text_macros_50000": "\\boxed{" + "\\text{" * 50_000 + "}",
}


@pytest.fixture(scope="module")
def warm_pool():
    pool = grading.default_pool()
    pool.warm()
    return pool


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def test_extraction_and_normalisation_are_linear():
    """The former quadratic last_boxed and cubic \\text{} regex, at sizes where they would take hours."""
    for text in (
        "\\boxed{" * 100_000,
        "\\boxed{7}" + "\\boxed{" * 100_000,
        "\\boxed " * 100_000 + "$",
        "\\text{" + " " * 100_000 + "{x}}",
        "\\text{" + "\n" * 100_000 + "}",
        "\\text{" * 100_000,
        "\\text{ a }" * 30_000,
    ):
        _, seconds = timed(last_boxed, text)
        assert seconds < 2.0, (text[:20], seconds)
        _, seconds = timed(answer_key, text)
        assert seconds < 2.0, (text[:20], seconds)
    assert last_boxed("\\boxed{7}" + "\\boxed{" * 1000) == "7"
    assert answer_key("\\text{ a }" * 3) == "aaa"


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
def test_hostile_completion_is_graded_in_bounded_time_from_a_thread(name, warm_pool):
    with ThreadPoolExecutor(1) as ex:
        result, seconds = ex.submit(timed, grading.compute_score, "aime24", HOSTILE[name], "5").result()
    assert seconds < BOUND_S, seconds
    assert result["score"] in (0.0, 1.0) and result["grading_timeout"] == 0 and result["grading_error"] == 0


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


def test_correct_completion_among_four_hostile_ones_scores_one_in_bounded_time(warm_pool):
    """The failure seen before: four slow completions held the 4 workers and a right one came back 0.0 after 31 s."""
    texts = [HOSTILE["text_newlines_cubic"], HOSTILE["text_4000_spaces"], HOSTILE["unclosed_boxes_10000"],
             HOSTILE["answer_100k_chars"], RIGHT]
    with ThreadPoolExecutor(len(texts)) as ex:
        futures = [ex.submit(timed, grading.compute_score, "hmmt25_feb", t, GOLD) for t in texts]
        results = [f.result() for f in futures]
    assert max(seconds for _, seconds in results) < BOUND_S, [s for _, s in results]
    assert [r["score"] for r, _ in results] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert [r["grading_skipped"] for r, _ in results] == [0, 0, 0, 1, 0]


def test_slow_math_verify_times_out_and_does_not_block_a_correct_answer(warm_pool):
    """Answers that keep sympy busy (9^(9^(9^9))) occupy every worker: they score 0 as timeouts (the worker's timer;
    the worker is kept), the correct one waits for a worker, then is graded on its own budget and scores 1."""
    before = warm_pool.stats()
    slow = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{10^{8}}}", "\\boxed{(10^{7})!}", "\\boxed{9^{9^{9}}}"]
    pids = warm_pool.pids()
    with ThreadPoolExecutor(5) as ex:
        futures = [ex.submit(timed, grade, t, "5", timeout=0.5) for t in slow] + \
                  [ex.submit(timed, grade, RIGHT, GOLD, timeout=5.0)]
        results = [f.result() for f in futures]
    assert [g.status for g, _ in results] == ["timeout"] * 4 + ["graded"]
    assert [g.score for g, _ in results] == [0.0] * 4 + [1.0]
    assert max(seconds for _, seconds in results) < 0.5 + BOUND_S
    after = warm_pool.stats()
    assert after["timeout"] - before.get("timeout", 0) == 4
    assert after.get("hard_timeouts") == before.get("hard_timeouts")
    assert warm_pool.pids() == pids  # soft timeouts keep their workers


@pytest.fixture(scope="module")
def solo_pool():
    """A one-worker pool for the tests that stop and kill workers (short grace: a hung worker goes fast)."""
    pool = GradingPool(size=1, grace_s=0.5)
    yield pool
    pool.close()


def test_a_hung_worker_is_killed_at_the_hard_deadline_and_replaced(solo_pool):
    """A worker that does not answer (stuck in C code that signals cannot interrupt; here: SIGSTOP) is killed after
    budget + grace; the call scores 0 as a timeout and the next one gets a fresh worker."""
    solo_pool.warm()
    (pid,) = solo_pool.pids()
    os.kill(pid, signal.SIGSTOP)
    result, seconds = timed(grade, RIGHT, GOLD, timeout=0.5, pool=solo_pool)
    assert result == Grade(r"\frac{9}{\sqrt{23}}", 0.0, "timeout")
    assert 0.9 < seconds < BOUND_S
    assert solo_pool.pids() == [] and solo_pool.stats()["hard_timeouts"] == 1
    assert grade(RIGHT, GOLD, pool=solo_pool).score == 1.0
    assert solo_pool.pids() and solo_pool.pids() != [pid]


def test_killed_worker_is_replaced_and_grading_goes_on(warm_pool):
    """As the OOM killer would: SIGKILL one of the default pool's workers; every later call still grades right."""
    before = grading.grading_stats().get("worker_restarts", 0)
    victim = warm_pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    with ThreadPoolExecutor(8) as ex:  # more callers than workers: every worker, the dead one too, is used
        results = list(ex.map(lambda _: timed(grading.compute_score, "hmmt25_feb", RIGHT, GOLD), range(8)))
    assert [r["score"] for r, _ in results] == [1.0] * 8
    assert max(seconds for _, seconds in results) < 2 * BOUND_S  # includes starting the replacement
    assert victim not in warm_pool.pids() and len(warm_pool.pids()) == warm_pool.size
    assert grading.grading_stats()["worker_restarts"] == before + 1


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def busy(pool: GradingPool) -> bool:
    """Whether the (one-worker) pool's worker is checked out by a request."""
    return pool._slots.qsize() == 0


def test_request_on_a_worker_that_dies_is_retried_once_on_a_fresh_one(solo_pool):
    solo_pool.warm()
    (pid,) = solo_pool.pids()
    restarts = solo_pool.stats().get("worker_restarts", 0)
    os.kill(pid, signal.SIGSTOP)  # the request waits in the socket of a process that will never read it...
    with ThreadPoolExecutor(1) as ex:
        future = ex.submit(grade, RIGHT, GOLD, pool=solo_pool)
        wait_until(lambda: busy(solo_pool))
        os.kill(pid, signal.SIGKILL)  # ...which then dies: the request goes to a replacement
        assert future.result(timeout=60) == Grade(r"\frac{9}{\sqrt{23}}", 1.0, "graded")
    assert solo_pool.stats()["worker_restarts"] == restarts + 1 and solo_pool.pids() != [pid]


def test_request_whose_worker_dies_twice_scores_zero_as_an_error(solo_pool):
    solo_pool.warm()
    (first,) = solo_pool.pids()
    restarts = solo_pool.stats().get("worker_restarts", 0)
    with ThreadPoolExecutor(1) as ex:
        future = ex.submit(grade, "\\boxed{9^{9^{9^{9}}}}", "5", timeout=30.0, pool=solo_pool)  # busy for 30 s
        wait_until(lambda: busy(solo_pool))
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: solo_pool.pids() not in ([], [first]))  # the replacement, checked out by the retry
        os.kill(solo_pool.pids()[0], signal.SIGKILL)
        result = future.result(timeout=60)
    assert result == Grade("9^{9^{9^{9}}}", 0.0, "error")
    assert solo_pool.stats()["error"] == 1 and solo_pool.stats()["worker_restarts"] == restarts + 2
    assert grade(RIGHT, GOLD, pool=solo_pool).score == 1.0  # and the pool goes on


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
