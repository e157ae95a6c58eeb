"""What a task of the tiny default is: the two protocols the tokenizer, the warm start and the build rely on.

A task is a family of problems with a verifiable ``\\boxed{}`` answer and, for each problem, a worked completion
(the warm start's correct target) and a *slipped* one: the same working with one plausible mistake carried through
to a wrong boxed answer. The warm start mixes the two (``TinyDefaultSpec.student_correct_frac``), so the student
learns the task *and* a per-problem chance of slipping at a known token: its sampled accuracy settles inside the RL
frontier, where SSOPD has mixed groups to act on. The build reads nothing else of a task, so a second task is a new
module implementing :class:`Task` plus one entry in :data:`ssopd_verl.tiny_default.tasks.TASKS`, picked by name
with ``TinyDefaultSpec(task=...)``; the tokenizer, warm start and build stay as they are.

Pure: the standard library (and the evaluation's ``last_boxed``); no torch, no verl.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence

from ssopd_verl.evaluation.grading import last_boxed

__all__ = ["INSTRUCTION", "Task", "TaskProblem", "is_correct"]

# The instruction of the paper's evaluation prompt, after the question in the user turn.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class TaskProblem(Protocol):
    """One problem of a task."""

    @property
    def prompt(self) -> str:
        """The user turn: the question, a space, :data:`INSTRUCTION`."""

    @property
    def messages(self) -> list:
        """The RL prompt's chat messages, ``[{"role": "user", "content": prompt}]`` (the parquet ``prompt``)."""

    @property
    def answer(self) -> str:
        """The ground truth, as the boxed answer is written."""

    @property
    def solution(self) -> str:
        """The worked completion as the model writes it: ``<think>\\n...\\n</think>\\n\\n\\boxed{answer}``."""

    def slipped_solution(self, rng: random.Random) -> str:
        """A worked completion with one plausible slip carried through to a wrong boxed answer (never
        :func:`is_correct`); any choice it makes is drawn from ``rng`` (the build is deterministic)."""


class Task(Protocol):
    """A task: a name, verl's data-source labels, and its problems."""

    name: str  # the key in TASKS and the value of TinyDefaultSpec.task
    data_source: str  # the parquet files' data_source column: it picks verl's default scorer
    ability: str  # the parquet files' ability column
    # the task's preset: TinyDefaultSpec fields that TinyDefaultSpec.for_task(name) sets (optional; none: {})
    spec_defaults: dict

    def problems(self, spec) -> Sequence[TaskProblem]:
        """Every problem for ``spec`` (a :class:`~ssopd_verl.tiny_default.spec.TinyDefaultSpec`; the task reads
        its knobs, e.g. the operand range), in a fixed order: :func:`~ssopd_verl.tiny_default.tasks.make_splits`
        shuffles them with the seed into the disjoint splits."""


def is_correct(completion: str, answer: str) -> bool:
    """The warm start's fast check: the last ``\\boxed{}`` equals the answer, whitespace aside (on the addition
    task's integer answers it agrees with verl's scorers; the tests check that)."""
    got = last_boxed(completion)
    return got is not None and got.strip() == str(answer).strip()
