"""The `ssopd:` config block, typed and validated.

Every knob of the method lives here, with the default the spec gives (paper where known, our choice
where not; see `SSOPD_SPEC.md` section 1). The Hydra overlay `recipe/ssopd.yaml` carries the same
keys with the same defaults, and a test keeps the two in step.

Validation is strict, because a wrong value otherwise surfaces only after a validation pass and a full rollout
(or never: a threshold no score can pass turns SSOPD off silently). Each key is checked for its type first (a
bool is not an int, a string is not a number, a float is not an int), then for its range; the message names
`ssopd.<key>`, the value and what is expected.

Pure module: no verl import.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ssopd_verl.losses import CLIP_MODES
from ssopd_verl.pairing import FRONTIER_KINDS, TARGET_RULES, WITNESS_SOURCES
from ssopd_verl.teacher_context import DEFAULT_TEMPLATE, THINKING_MODES

# live: the current policy (adapters on, with LoRA). initial: the policy at step 0, frozen (with LoRA: the base
# model, adapters disabled inside the actor's own forward; the paper's reported setup, SSOPD_SPEC.md 1b).
TEACHER_KINDS = ("live", "initial")

# Rewards of verl's rule-based scorers and of our math-verify grader are at most 1 (1 correct, 0 or -1 wrong), and
# correct = score > correct_threshold: a threshold at or above this makes every completion wrong.
MAX_REWARD = 1.0


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
    chunk_size: int = 64
    # With verl's dynamic batching: count the teacher tokens in ppo_max_token_len_per_gpu (fewer student tokens per
    # micro-batch so that student + teacher fit it; glue/teacher_forward.student_token_budget). False: verl's
    # student-only budget, faster, and the teacher's states ride on top of it.
    teacher_in_token_budget: bool = True
    # Seed of the random_correct / random_wrong ablations (mixed with the step number).
    seed: int = 0
    # Token view (ssopd_verl.token_view): every N steps an HTML page of up to token_view_targets distilled targets,
    # each token coloured by its loss, written to token_view_dir/step_<N>.html (None: the run's checkpoint
    # directory, trainer.default_local_dir, /token_view). 0 = off (the production scripts).
    token_view_every: int = 0
    token_view_targets: int = 4
    token_view_dir: Optional[str] = None

    def __post_init__(self):
        _number("lambda", self.lam, ">= 0", lambda v: v >= 0)
        _choice("teacher", self.teacher, TEACHER_KINDS)
        _number("tau", self.tau, "> 0", lambda v: v > 0)
        _choice("clip", self.clip, CLIP_MODES)
        _choice("frontier_weight", self.frontier_weight, FRONTIER_KINDS)
        _choice("witness_source", self.witness_source, WITNESS_SOURCES)
        _choice("target_rule", self.target_rule, TARGET_RULES)
        _number("correct_threshold", self.correct_threshold, None, None)
        _check(
            self.correct_threshold < MAX_REWARD,
            f"ssopd.correct_threshold must be < {MAX_REWARD}, got {self.correct_threshold!r}: a completion is correct "
            f"when its score > correct_threshold, and the rewards of verl's scorers and of the math-verify grader are "
            f"at most {MAX_REWARD} (1 correct, 0 or -1 wrong), so no completion would ever be correct, no group mixed, "
            f"and SSOPD would never distil. Use 0.0 for {{0,1}} and {{-1,1}} rewards.",
        )
        _type("template", self.template, str, "a string")
        _check(
            "{problem}" in self.template and "{witness}" in self.template,
            f"ssopd.template must contain both '{{problem}}' and '{{witness}}', got {_show(self.template)}",
        )
        _choice("witness_thinking", self.witness_thinking, THINKING_MODES)
        _integer("max_witness_tokens", self.max_witness_tokens, minimum=1)
        _integer("max_distill_tokens", self.max_distill_tokens, minimum=1, nullable=True)
        _integer("max_teacher_length", self.max_teacher_length, minimum=1, nullable=True)
        _check(
            self.chat_template_kwargs is None
            or (isinstance(self.chat_template_kwargs, Mapping) and all(isinstance(k, str) for k in self.chat_template_kwargs)),
            f"ssopd.chat_template_kwargs must be a mapping of keyword arguments for the chat template (e.g. "
            f"{{enable_thinking: true}}) or null (the student's data.apply_chat_template_kwargs), got "
            f"{_show(self.chat_template_kwargs)}",
        )
        _type("reference_solution_key", self.reference_solution_key, str, "a dotted field name (a string)")
        _check(
            all(part.strip() for part in self.reference_solution_key.split(".")),
            f"ssopd.reference_solution_key must be a dotted field name such as 'extra_info.solution', got "
            f"{_show(self.reference_solution_key)}",
        )
        _integer("chunk_size", self.chunk_size, minimum=1)
        _type("teacher_in_token_budget", self.teacher_in_token_budget, bool, "true or false")
        _integer("seed", self.seed, minimum=0)
        _integer("token_view_every", self.token_view_every, minimum=0)
        _integer("token_view_targets", self.token_view_targets, minimum=1)
        _check(
            self.token_view_dir is None or (isinstance(self.token_view_dir, str) and self.token_view_dir.strip() != ""),
            f"ssopd.token_view_dir must be a directory path or null, got {_show(self.token_view_dir)}",
        )

    @property
    def enabled(self) -> bool:
        """lambda = 0 runs plain GRPO through the same code path, without the teacher forward."""
        return self.lam > 0

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> "SSOPDConfig":
        """Build from the `ssopd:` block (a dict or DictConfig). Unknown keys are an error, not ignored."""
        if block is None:
            raise ValueError("the config has no `ssopd:` block: run with +recipe=ssopd")
        if not isinstance(block, Mapping):
            raise ValueError(f"the `ssopd:` block must be a mapping of ssopd.* keys, got {_show(block)}")
        # `lambda` is a Python keyword: the YAML key keeps the paper's name, the field is `lam`.
        keys = sorted({f.name for f in dataclasses.fields(cls)} - {"lam"} | {"lambda"})
        unknown = sorted(str(k) for k in block if k not in keys)
        if unknown:
            raise ValueError(f"unknown ssopd.* keys {unknown}; known: {keys}")
        values = dict(block)
        if "lambda" in values:
            values["lam"] = values.pop("lambda")
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


def _show(value: Any) -> str:
    """The value as the message shows it: repr (so "0.5" and 0.5 differ), its type, at most ~80 characters."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _type(name: str, value: Any, kind: type, expected: str) -> None:
    _check(isinstance(value, kind), f"ssopd.{name} must be {expected}, got {_show(value)}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _check(
        isinstance(value, str) and value in allowed,
        f"ssopd.{name} must be one of {', '.join(allowed)}, got {_show(value)}",
    )


def _number(name: str, value: Any, range_text: Optional[str], in_range) -> None:
    """A finite real number (int or float; not a bool, not a string), then its range."""
    expected = "a finite number" + (f" {range_text}" if range_text else "")
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    _check(is_number, f"ssopd.{name} must be {expected}, got {_show(value)}")
    _check(math.isfinite(value), f"ssopd.{name} must be {expected}, got {value!r}")
    if in_range is not None:
        _check(in_range(value), f"ssopd.{name} must be {expected}, got {value!r}")


def _integer(name: str, value: Any, *, minimum: int, nullable: bool = False) -> None:
    """An int (not a bool, not a float such as 2.0 or 2.5), then >= minimum; or None where nullable."""
    if nullable and value is None:
        return
    positive = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    expected = positive + (" or null" if nullable else "")
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    _check(is_int, f"ssopd.{name} must be {expected}, got {_show(value)}")
    _check(value >= minimum, f"ssopd.{name} must be {expected}, got {value!r}")
