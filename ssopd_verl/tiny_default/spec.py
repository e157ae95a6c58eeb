"""What determines a build of the tiny default: :class:`TinyDefaultSpec`, recorded in the manifest and compared
on every cache lookup (a different spec means a different build; a non-default spec gets its own cache directory,
named with :meth:`TinyDefaultSpec.digest`).

Pure: the standard library only (and, inside :meth:`TinyDefaultSpec.for_task`, the task registry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

__all__ = ["DEFAULT_TASK", "TinyDefaultSpec"]

DEFAULT_TASK = "addition"


@dataclass(frozen=True)
class TinyDefaultSpec:
    """Everything that determines the build (part of the manifest; a different spec means a different build)."""

    seed: int = 0
    # task: a name in tasks.TASKS; the addition task's problems are a + b with min_operand <= a, b <= max_operand
    # (another task reads the knobs it needs); disjoint splits (the warm start gets the rest)
    task: str = DEFAULT_TASK
    min_operand: int = 10
    max_operand: int = 99
    n_train: int = 512
    n_val: int = 128  # the RL validation set (the +tiny=default overlay validates on all of it, greedy)
    n_check: int = 128  # held-out problems for the accuracy checks during the warm start
    # tokenizer: at most this many tokens in total (BPE merges + 256 bytes + Qwen3's 26 special tokens)
    vocab_size: int = 1024
    # model
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    # warm start: every step has batch_size student rows and teacher_batch_size teacher-prompt rows
    batch_size: int = 32
    teacher_batch_size: int = 8
    teacher_loss_weight: float = 2.0  # loss = student loss + this x teacher loss (each a mean over target tokens)
    student_correct_frac: float = 0.45  # share of student targets that are correct; the rest carry one slip
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    train_steps: int = 500  # the schedule: warmup, constant, linear decay over the last decay_frac of it
    decay_frac: float = 0.5
    final_lr_frac: float = 0.05  # lr at train_steps (and after it) relative to lr
    max_steps: int = 1500  # not in the targets at train_steps: go on at the final lr, checking every check_every
    check_every: int = 50
    band: tuple = (0.3, 0.7)  # target sampled student accuracy (check problems), inclusive
    teacher_min: float = 0.85  # minimum sampled teacher-prompt accuracy (check problems)
    check_samples: int = 2  # samples per check problem (temperature 1.0): 256 samples, std <= 0.03
    heldout_samples: int = 4  # the manifest's held-out measurement: every val problem x this many samples
    heldout_seed: int = 1234
    max_new_tokens: int = 48  # completions are 20-26 tokens + <|im_end|>; longer ones are truncated = wrong
    num_threads: int = 1

    def to_dict(self) -> dict:
        """The spec as recorded in the manifest (and hashed by :meth:`digest`). The default task is left out:
        builds made before there were tasks recorded none, and they keep their manifest and cache directory."""
        d = dataclasses.asdict(self)
        d["band"] = [float(x) for x in self.band]
        if d["task"] == DEFAULT_TASK:
            del d["task"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyDefaultSpec":
        d = dict(d)
        if "band" in d:
            d["band"] = tuple(d["band"])
        return cls(**d)

    @classmethod
    def for_task(cls, task: str = DEFAULT_TASK, **overrides) -> "TinyDefaultSpec":
        """The task's preset: the default spec with ``task`` and the task's ``spec_defaults`` (its operand range,
        warm-start mix and targets), then ``overrides``. ``for_task()`` / ``for_task("addition")`` is
        ``TinyDefaultSpec()``; ``for_task("addition3")`` is the harder task's tuned spec."""
        from ssopd_verl.tiny_default.tasks import get_task

        fields = {"task": task, **dict(getattr(get_task(task), "spec_defaults", {}) or {}), **overrides}
        return dataclasses.replace(cls(), **fields)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
