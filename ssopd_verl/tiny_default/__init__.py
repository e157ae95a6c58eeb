"""The embedded tiny default: a small Qwen3 that already sits in the RL frontier, with its task, built offline and
shipped with the package.

Why: SSOPD only acts on *mixed* groups (some completions of a prompt correct, some wrong, ``0 < p < 1``). A randomly
initialised model never answers correctly, so every group is all-wrong and GRPO and SSOPD both do nothing; a CPU
test or demo needs a model that is neither hopeless nor perfect. No checkpoint can be downloaded here, so this
package *builds* one, deterministically on a given machine, from nothing but the installed libraries, and ships
the default build (``shipped/``, ~2.7 MB: a build on another CPU, whose kernels round differently, is another
model, so every machine uses this one). Its parts, in build order:

1. **Task** (:mod:`.tasks`): two-digit addition with a verifiable ``\\boxed{}`` answer and a worked completion
   (:mod:`.tasks.addition`), behind a small :class:`~.tasks.base.Task` protocol and registry: a second task is a
   new module and one registry entry, picked with ``TinyDefaultSpec(task=...)`` or, with the task's preset,
   ``TinyDefaultSpec.for_task(...)``. The second task is :mod:`.tasks.addition3`, three-digit addition, harder
   (``+tiny=addition3``). Its problems are shuffled with
   the seed and split into disjoint sets: the RL validation and train parquet files (never seen in the warm
   start), the held-out accuracy-check problems, and the supervised warm-start set (the rest).
2. **Tokenizer** (:mod:`.tokenizer`): a compact byte-level BPE in Qwen's layout trained on the warm-start
   problems, Qwen3's 26 special tokens and chat template (484 tokens in all); the prompts exactly as verl and the
   SSOPD trainer render them.
3. **Model** (:mod:`.model`): a 0.65M-parameter ``Qwen3ForCausalLM`` from a seeded init; sampling and the
   accuracy measurements.
4. **Warm start** (:mod:`.warm_start`): supervised training on student rows (correct or slipped solutions) and
   SSOPD teacher-prompt rows, until the student's sampled accuracy is in the frontier band (0.3-0.7) and the
   teacher prompt's is at least 0.85. Measured on the validation problems: student 0.38, teacher prompt 0.90,
   greedy student 0.55.
5. **Build** (:mod:`.build`): the above, the held-out measurement, ``model/``, ``train.parquet`` and
   ``val.parquet`` in verl's RL format, ``manifest.json``; cached in ``$SSOPD_CACHE/tiny-default-v2``
   (``~/.cache/ssopd_verl``) under a file lock, found again by spec and file hashes. :mod:`.spec` holds
   :class:`TinyDefaultSpec`, everything that determines a build.
6. **Shipped** (``shipped/``, :func:`~.build.shipped_tiny_default`): the default spec's build, package data, checked
   against its manifest's sha256 on every use (a changed file is an error, never a rebuild). Held out: student
   0.383, teacher prompt 0.896, greedy student 0.547 (stopped at step 500).

CLI: ``python -m ssopd_verl.tiny_default [--cache-dir D] [--force] [--seed S] [--task T] [--ship]`` (``--task``:
that task's preset): builds into the cache and says whether the build equals the shipped copy; ``--ship`` replaces
the shipped copy with it (how to refresh it). In verl: ``+tiny=default``, whose ``${ssopd_tiny:...}`` paths are the
shipped copy's (:func:`~.build.resolve_path`, :func:`~.build.get_tiny_default`; no build, no torch import);
``+tiny=addition3``, the same settings on the harder task's build, built on first use
(``${ssopd_tiny:model_path,addition3}``, i.e. ``TinyDefaultSpec.for_task("addition3")``). Chat
template: Qwen3's default (thinking on), i.e. verl's default ``data.apply_chat_template_kwargs={}``
(:data:`CHAT_TEMPLATE_KWARGS`). Reward: ``data_source`` ``"lighteval/MATH"`` (:data:`DATA_SOURCE`;
:mod:`.tasks.addition` says what verl does with it).

Not part of it: :mod:`ssopd_verl.tiny_model` / :mod:`ssopd_verl.tiny_tokenizer`, the randomly initialised tiny
Qwen3 with the *real* 151,669-token tokenizer that the engine tests use; the tiny default takes only Qwen3's
special tokens, pre-tokenizer regex, chat template file and sdpa save from them.

Imports: the standard library at module level (the shipped copy or a cached build is returned without importing
torch); torch, transformers, tokenizers and pandas inside the build; verl never.
"""

from __future__ import annotations

from ssopd_verl.tiny_default.build import (
    CACHE_NAME,
    CACHE_VERSION,
    RESOLVER,
    SHIPPED_DIR,
    TinyDefault,
    build_tiny_default,
    cached_tiny_default,
    default_cache_dir,
    get_tiny_default,
    resolve_path,
    ship_tiny_default,
    shipped_tiny_default,
)
from ssopd_verl.tiny_default.model import greedy_accuracy, measure, sample_completions, sampled_accuracy
from ssopd_verl.tiny_default.spec import DEFAULT_TASK, TinyDefaultSpec
from ssopd_verl.tiny_default.tasks import INSTRUCTION, TASKS, Task, TaskProblem, get_task, is_correct, make_splits
from ssopd_verl.tiny_default.tasks.addition import DATA_SOURCE, Problem
from ssopd_verl.tiny_default.tokenizer import (
    CHAT_TEMPLATE_KWARGS,
    build_tokenizer,
    completion_ids,
    prompt_ids,
    teacher_prompt_ids,
)

__all__ = [
    "CACHE_NAME",
    "CACHE_VERSION",
    "CHAT_TEMPLATE_KWARGS",
    "DATA_SOURCE",
    "DEFAULT_TASK",
    "INSTRUCTION",
    "Problem",
    "RESOLVER",
    "SHIPPED_DIR",
    "TASKS",
    "Task",
    "TaskProblem",
    "TinyDefault",
    "TinyDefaultSpec",
    "build_tiny_default",
    "build_tokenizer",
    "cached_tiny_default",
    "completion_ids",
    "default_cache_dir",
    "get_task",
    "get_tiny_default",
    "greedy_accuracy",
    "is_correct",
    "make_splits",
    "measure",
    "prompt_ids",
    "resolve_path",
    "sample_completions",
    "sampled_accuracy",
    "ship_tiny_default",
    "shipped_tiny_default",
    "teacher_prompt_ids",
]
