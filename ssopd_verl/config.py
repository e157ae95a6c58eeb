"""The `ssopd:` config block, typed and validated.

Every knob of the method lives here, with the default the spec gives (paper where known, our choice
where not; see `SSOPD_SPEC.md` section 1). The Hydra overlay `recipe/ssopd.yaml` carries the same
keys with the same defaults, and a test keeps the two in step.

Pure module: no verl import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ssopd_verl.losses import CLIP_MODES
from ssopd_verl.pairing import FRONTIER_KINDS, TARGET_RULES, WITNESS_SOURCES
from ssopd_verl.teacher_context import DEFAULT_TEMPLATE, THINKING_MODES

# live: the current policy (adapters on, with LoRA). initial: the policy at step 0, frozen (with LoRA: the base
# model, adapters disabled inside the actor's own forward; the paper's reported setup, SSOPD_SPEC.md 1b).
TEACHER_KINDS = ("live", "initial")


@dataclass(frozen=True)
class SSOPDConfig:
    # Weight of the distillation term: loss = GRPO + lambda * sum_g w(p_g) L_g / G. 0 = plain GRPO.
    lam: float = 1.0
    # Which weights the self-teacher runs with: live (current) | initial (step 0, frozen; needs a LoRA actor).
    teacher: str = "live"
    # Clip threshold: per vocabulary entry (pointwise) or per token (token). Paper: 0.05 pointwise.
    tau: float = 0.05
    clip: str = "pointwise"
    # Frontier weight w(p): variance 4p(1-p) | sqrt_variance | binary | none.
    frontier_weight: str = "variance"
    witness_source: str = "shortest_correct"
    target_rule: str = "longest_wrong"
    # A completion is correct when its score > correct_threshold ({0,1} and {-1,1} rewards alike).
    correct_threshold: float = 0.0
    template: str = DEFAULT_TEMPLATE
    witness_thinking: str = "keep"
    max_witness_tokens: int = 4096
    # Distil only the first K response tokens of each target (the paper's "first K steps"); None = all of them.
    # L_g is then the token mean over those K tokens.
    max_distill_tokens: Optional[int] = None
    # Longest teacher sequence (prompt + witness + target). None: the model's max_position_embeddings.
    max_teacher_length: Optional[int] = None
    # Chat-template kwargs for the teacher prompt. None: the same as the student's
    # (data.apply_chat_template_kwargs), so thinking mode matches.
    chat_template_kwargs: Optional[dict] = None
    # Dataset field holding the reference solution, for witness_source=reference_solution (OPSD).
    reference_solution_key: str = "extra_info.solution"
    # Tokens of the teacher logits materialised at once in the chunked loss.
    chunk_size: int = 1024
    # Seed of the random_correct / random_wrong ablations (mixed with the step number).
    seed: int = 0

    def __post_init__(self):
        _check(self.lam >= 0, f"ssopd.lambda must be >= 0, got {self.lam}")
        _check(self.tau > 0, f"ssopd.tau must be > 0, got {self.tau}")
        _choice("teacher", self.teacher, TEACHER_KINDS)
        _choice("clip", self.clip, CLIP_MODES)
        _choice("frontier_weight", self.frontier_weight, FRONTIER_KINDS)
        _choice("witness_source", self.witness_source, WITNESS_SOURCES)
        _choice("target_rule", self.target_rule, TARGET_RULES)
        _choice("witness_thinking", self.witness_thinking, THINKING_MODES)
        _check(
            "{problem}" in self.template and "{witness}" in self.template,
            "ssopd.template must contain both '{problem}' and '{witness}'",
        )
        _check(self.max_witness_tokens > 0, f"ssopd.max_witness_tokens must be > 0, got {self.max_witness_tokens}")
        _check(
            self.max_teacher_length is None or self.max_teacher_length > 0,
            f"ssopd.max_teacher_length must be > 0 or null, got {self.max_teacher_length}",
        )
        _check(
            self.max_distill_tokens is None or self.max_distill_tokens > 0,
            f"ssopd.max_distill_tokens must be > 0 or null, got {self.max_distill_tokens}",
        )
        _check(self.chunk_size > 0, f"ssopd.chunk_size must be > 0, got {self.chunk_size}")

    @property
    def enabled(self) -> bool:
        """lambda = 0 runs plain GRPO through the same code path, without the teacher forward."""
        return self.lam > 0

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> "SSOPDConfig":
        """Build from the `ssopd:` block (a dict or DictConfig). Unknown keys are an error, not ignored."""
        if block is None:
            raise ValueError("the config has no `ssopd:` block: run with +recipe=ssopd")
        values = dict(block)
        if "lambda" in values:  # `lambda` is a Python keyword; the YAML key keeps the paper's name
            values["lam"] = values.pop("lambda")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ssopd.* keys {unknown}; known: {sorted(known - {'lam'}) + ['lambda']}")
        if isinstance(values.get("chat_template_kwargs"), Mapping):
            values["chat_template_kwargs"] = dict(values["chat_template_kwargs"])
        return cls(**values)

    def to_yaml_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lambda"] = out.pop("lam")
        return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _choice(name: str, value: str, allowed: tuple) -> None:
    _check(value in allowed, f"ssopd.{name} must be one of {allowed}, got {value!r}")
