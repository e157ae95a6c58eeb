"""Grading: last \\boxed{} + math-verify, on every shipped evaluation answer, and through verl's reward hook."""

import json
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssopd_verl.evaluation import grading
from ssopd_verl.evaluation.benchmarks import BENCHMARKS, eval_data_dir, load_benchmark
from ssopd_verl.evaluation.grading import answers_match, grade, last_boxed

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
    wrong_right, wrong_wrong = [], []
    for i, p in enumerate(SETS[name]):
        if grade(as_model_output(p["answer"]), p["answer"]).score != 1.0:
            wrong_right.append((i, p["answer"]))
        if grade(as_model_output(perturb(p["answer"])), p["answer"]).score != 0.0:
            wrong_wrong.append((i, p["answer"]))
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
    assert right == {"score": 1.0, "acc": 1.0, "pred": r"\frac{9}{\sqrt{23}}"}
    assert wrong["score"] == 0.0 and wrong["pred"] == "9"


def test_reward_function_from_a_worker_thread_uses_the_process_pool():
    """verl's reward manager calls the function from a thread pool, where math-verify's signal timeouts fail."""
    results = {}

    def call():
        results["right"] = grading.compute_score("aime24", as_model_output("204"), "204")
        results["wrong"] = grading.compute_score("aime24", as_model_output("205"), "204")
        results["pool"] = grading._POOL is not None

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(timeout=120)
    assert results == {"right": {"score": 1.0, "acc": 1.0, "pred": "204"},
                       "wrong": {"score": 0.0, "acc": 0.0, "pred": "205"}, "pool": True}


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
