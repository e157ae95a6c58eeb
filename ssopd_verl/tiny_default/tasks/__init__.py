"""The tiny default's tasks: the registry, the seeded splits and verl's parquet rows.

A task (:class:`Task`, in :mod:`.base`) gives its problems in a fixed order; :func:`make_splits` shuffles them
with the spec's seed and cuts disjoint sets: the RL validation and train parquet files (never seen in the warm
start), the held-out accuracy-check problems, and the supervised warm-start set (the rest). :func:`parquet_rows`
writes a split in verl's RL format: ``data_source``, ``prompt`` (chat messages), ``ability``,
``reward_model`` = {style: rule, ground_truth}, ``extra_info`` = {split, index, solution} (the solution is the
worked completion, used by the OPSD ``reference_solution`` witness).

Adding a task: a module next to :mod:`.addition` with a class implementing :class:`Task` (its problems implement
:class:`TaskProblem`), and its instance in :data:`TASKS`; build it with ``TinyDefaultSpec(task=<its name>)``, or
with its preset (the task's ``spec_defaults``) ``TinyDefaultSpec.for_task(<its name>)``. :mod:`.addition3`
(three-digit addition, ``"addition3"``) is the second task.

Pure: no torch, no verl.
"""

from __future__ import annotations

import random
from typing import Sequence

from ssopd_verl.tiny_default.tasks.addition import Addition
from ssopd_verl.tiny_default.tasks.addition3 import Addition3
from ssopd_verl.tiny_default.tasks.base import INSTRUCTION, Task, TaskProblem, is_correct

__all__ = ["INSTRUCTION", "TASKS", "Task", "TaskProblem", "get_task", "is_correct", "make_splits", "parquet_rows"]

# name -> task. The default spec's task ("addition") must stay here: the cache of every existing build uses it.
# "addition3": three-digit addition, harder (TinyDefaultSpec.for_task("addition3"), +tiny=addition3).
TASKS: dict = {task.name: task for task in (Addition(), Addition3())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown tiny-default task {name!r}; known: {sorted(TASKS)}") from None


def make_splits(spec) -> dict:
    """Disjoint problem sets {"val", "train", "check", "sft"} of ``spec.task`` from a seeded shuffle of all its
    problems."""
    pairs = list(get_task(spec.task).problems(spec))
    random.Random(spec.seed).shuffle(pairs)
    n_val, n_train, n_check = spec.n_val, spec.n_train, spec.n_check
    if n_val + n_train + n_check >= len(pairs):
        raise ValueError(f"only {len(pairs)} problems for {n_val} val + {n_train} train + {n_check} check + SFT")
    return {
        "val": pairs[:n_val],
        "train": pairs[n_val : n_val + n_train],
        "check": pairs[n_val + n_train : n_val + n_train + n_check],
        "sft": pairs[n_val + n_train + n_check :],
    }


def parquet_rows(task: Task, problems: Sequence[TaskProblem], split: str) -> list:
    """The rows of a verl RL parquet file for ``problems`` of ``task``."""
    return [
        {
            "data_source": task.data_source,
            "prompt": p.messages,
            "ability": task.ability,
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "solution": p.solution},
        }
        for i, p in enumerate(problems)
    ]
