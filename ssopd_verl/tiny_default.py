"""The embedded tiny default: a small Qwen3 that already sits in the RL frontier, with its task, built offline.

Why: SSOPD only acts on *mixed* groups (some completions of a prompt correct, some wrong, ``0 < p < 1``). A randomly
initialised model never answers correctly, so every group is all-wrong and GRPO and SSOPD both do nothing; a CPU
test or demo needs a model that is neither hopeless nor perfect. No checkpoint can be downloaded here, so this
module *builds* one, deterministically, from nothing but the installed libraries:

1. **Task.** Two-digit addition with a verifiable ``\\boxed{}`` answer, e.g. the user turn
   ``"What is 37 + 48? Please reason step by step, and put your final answer within \\boxed{}."`` and the worked
   completion ``"<think>\\n7+8=15\\n3+4+1=8\\n</think>\\n\\n\\boxed{85}"`` (column sums from the units up).
   The 8,100 ordered pairs 10..99 x 10..99 are shuffled with the seed and split into disjoint sets: the RL
   validation and train parquet files (never seen in the warm start), the held-out accuracy-check problems,
   and the supervised warm-start set (the rest).
2. **Tokenizer.** A byte-level BPE in Qwen's layout (Qwen's pre-tokenizer regex, digits one by one, byte-level
   alphabet so *any* text encodes and decodes losslessly) trained with the ``tokenizers`` library on the
   synthetic corpus, at most ``vocab_size`` tokens, then Qwen3's 26 special tokens as added tokens at the end
   (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ..., ``<think>``, ``</think>``; eos ``<|im_end|>``,
   pad ``<|endoftext|>``) and the Qwen3 chat template packaged as ``data/qwen3_chat_template.jinja``. A compact
   vocabulary keeps a training step ~17x cheaper than Qwen3's 151,669 tokens would.
3. **Model.** A ``Qwen3ForCausalLM`` (hidden 128, 4 layers, 4 query / 2 key-value heads of 32, MLP 256, tied
   embeddings, sdpa, float32; 0.65M parameters with the 484-token vocabulary) from a seeded init.
4. **Warm start.** Supervised training (AdamW, loss on the completion tokens and the closing ``<|im_end|>``
   only) on a mixture; every step has

   a. ``batch_size`` = 32 **student rows**: the RL prompt, and as target the worked solution with probability
      ``student_correct_frac`` = 0.45, otherwise the same solution with one plausible *slip* carried through to
      a wrong boxed answer (:meth:`Problem.slipped_solution`: the carry dropped on problems whose units carry,
      else one column sum off by one). The student learns the arithmetic *and* a per-problem chance of slipping
      at a known token, so its sampled accuracy settles near ``student_correct_frac``, inside the frontier, with
      mixed groups on nearly every prompt (and greedy decoding, which drops a carry, also stays below 1);
   b. ``teacher_batch_size`` = 8 **teacher rows**: the SSOPD teacher prompt exactly as the trainer builds it
      (:func:`teacher_prompt_ids`: ``teacher_context.build_teacher_context`` with ``ssopd.template``'s default,
      the student's chat-template kwargs and no target; the witness is a correct completion as the model emits
      it, response ids through ``witness_from_response(..., "keep")``) and as target the correct solution, the
      one the reference solution holds; its loss weighs ``teacher_loss_weight`` = 2. So the policy learns to
      read the reference: with it, it answers correctly; without it, it slips as often as the student rows
      taught it to.

   Schedule: linear warmup over ``warmup_steps``, constant ``lr``, linear decay to ``final_lr_frac`` over the last
   ``decay_frac`` of ``train_steps``. Then a check on the held-out check problems (128 x 2 samples each way,
   temperature 1.0, no top-k / top-p, a truncated completion counts as wrong): the student's sampled accuracy in
   ``band`` (0.3-0.7) and the teacher prompt's at least ``teacher_min`` (0.85); if not, training goes on at the
   final rate, checked every ``check_every`` steps, up to ``max_steps`` (missing them is an error). Finally an
   independent measurement on the validation problems (all 128, ``heldout_samples`` = 4 samples each, temperature
   1.0, seed ``heldout_seed``), recorded in the manifest as ``heldout``: student and teacher-prompt sampled
   accuracy, greedy student accuracy (what the overlay's validation reads) and the count of mixed problems.
   Measured: the targets are met at step 500 (check: student 0.40, teacher prompt 0.91); held out: student 0.38,
   teacher prompt 0.90, greedy student 0.55, 128 val problems x 4 samples. Cost: 500 steps of 32 student rows
   (~58 tokens) and 8 teacher rows (~147 tokens, the template is long); ~410 s of CPU on a heavily shared 2-core
   machine (load 4-9), an estimated ~2-2.5 min on an idle one (the former student-only warm start: 300 steps in
   ~45 s). Fewer steps (400-450) or a heavier teacher weight (3) missed the targets at the end of the schedule.
5. **Data.** ``train.parquet`` / ``val.parquet`` in verl's RL format: ``data_source``, ``prompt`` (chat messages),
   ``ability`` = "math", ``reward_model`` = {style: rule, ground_truth}, ``extra_info`` = {split, index,
   solution} (the solution is the worked completion, used by the OPSD ``reference_solution`` witness).

Chat template / thinking: the completions carry a ``<think>...</think>`` block and the prompts are rendered with
Qwen3's default (thinking on: the prompt ends with ``<|im_start|>assistant\\n`` and the model writes ``<think>``
itself), i.e. **no** chat-template kwargs: verl's default ``data.apply_chat_template_kwargs={}`` is the right
setting (:data:`CHAT_TEMPLATE_KWARGS`). ``enable_thinking=False`` would put an empty think block in the prompt
that the model never saw in training.

Reward: ``data_source`` is :data:`DATA_SOURCE` = ``"lighteval/MATH"``. verl 0.9.1's ``default_compute_score``
has no branch that calls math-verify (its math-verify call is commented out); ``"lighteval/MATH"`` routes to
``math_reward.compute_score`` (last ``\\boxed{}``, normalised string equivalence; 1.0 / 0.0), which is exact for
these integer answers. To grade with math-verify through verl's reward path, point verl's custom reward hook at
``ssopd_verl.evaluation.grading.compute_score`` (the grader of the evaluation too):
``reward.custom_reward_function.path=pkg://ssopd_verl.evaluation.grading
reward.custom_reward_function.name=compute_score`` (it grades in a spawned process pool: scripts need an
``if __name__ == "__main__":`` guard).

Cache: :func:`build_tiny_default` builds once into a versioned directory (default
``$SSOPD_CACHE/tiny-default-v2``, ``$SSOPD_CACHE`` defaulting to ``~/.cache/ssopd_verl``), under a file lock,
in a sibling temporary directory that is renamed into place after ``manifest.json`` (versions, spec, seed,
accuracies, held-out measurement, steps, history, sha256 of every file) is written, so an interrupted build is
never mistaken for a finished one.
A later call checks the manifest and the file hashes and returns the cached build without training. CLI:
``python -m ssopd_verl.tiny_default [--cache-dir D] [--force]``.

Determinism: the same spec (seed included) gives byte-identical files on the same software versions, thread
count (``num_threads``, default 1, set for the warm start and restored after: one thread is also the fastest
on a shared 2-core machine) and CPU; the manifest records them. The global torch RNG is left untouched.

Imports: the standard library at module level (a cached build is returned without importing torch); torch,
transformers, tokenizers and pandas inside the build; verl never.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ssopd_verl.evaluation.grading import last_boxed

__all__ = [
    "CACHE_NAME",
    "CACHE_VERSION",
    "CHAT_TEMPLATE_KWARGS",
    "DATA_SOURCE",
    "INSTRUCTION",
    "Problem",
    "TinyDefault",
    "TinyDefaultSpec",
    "build_tiny_default",
    "build_tokenizer",
    "completion_ids",
    "default_cache_dir",
    "greedy_accuracy",
    "is_correct",
    "make_splits",
    "measure",
    "sample_completions",
    "sampled_accuracy",
    "teacher_prompt_ids",
]

CACHE_VERSION = 2  # 2: the warm start also teaches the teacher prompt (held-out accuracies in the manifest)
CACHE_NAME = f"tiny-default-v{CACHE_VERSION}"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"

# verl's default_compute_score sends this data source to math_reward (last \boxed{}, string equivalence).
DATA_SOURCE = "lighteval/MATH"
ABILITY = "math"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The chat-template kwargs the warm start used (none: Qwen3's default, thinking on). verl must render prompts the
# same way: data.apply_chat_template_kwargs={} (verl's default); the SSOPD teacher uses the student's kwargs.
CHAT_TEMPLATE_KWARGS: dict = {}

CHAT_TEMPLATE_FILE = Path(__file__).with_name("data") / "qwen3_chat_template.jinja"
_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>|</?think>|</?tool_call>|</?tool_response>")


# ----------------------------------------------------------------------------------------------------------------
# Spec and result


@dataclass(frozen=True)
class TinyDefaultSpec:
    """Everything that determines the build (part of the manifest; a different spec means a different build)."""

    seed: int = 0
    # task: a + b with min_operand <= a, b <= max_operand; disjoint splits (the warm start gets the rest)
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
        d = dataclasses.asdict(self)
        d["band"] = [float(x) for x in self.band]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyDefaultSpec":
        d = dict(d)
        if "band" in d:
            d["band"] = tuple(d["band"])
        return cls(**d)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TinyDefault:
    """A finished build. Paths are absolute; ``accuracy`` / ``teacher_accuracy`` are the sampled student /
    teacher-prompt accuracies when the warm start stopped (temperature 1.0, ``spec.n_check`` problems x
    ``spec.check_samples`` samples); ``heldout`` is the manifest's independent measurement on the validation
    problems (see :func:`measure`)."""

    model_path: str  # model + tokenizer (save_pretrained layout; AutoTokenizer / AutoModelForCausalLM load it)
    train_file: str
    val_file: str
    accuracy: float
    steps: int
    cache_dir: str = ""
    teacher_accuracy: float = float("nan")
    heldout: dict = field(default_factory=dict, compare=False)
    data_source: str = DATA_SOURCE
    chat_template_kwargs: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict, repr=False, compare=False)


# ----------------------------------------------------------------------------------------------------------------
# The task


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    @property
    def prompt(self) -> str:
        """The user turn (question + the boxed-answer instruction)."""
        return f"{self.question} {INSTRUCTION}"

    @property
    def messages(self) -> list:
        return [{"role": "user", "content": self.prompt}]

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def solution(self) -> str:
        """The worked completion: column sums from the units up in a think block, then the boxed answer."""
        return _worked(self.a, self.b)

    @property
    def has_carry(self) -> bool:
        """The units column carries into the tens."""
        return self.a % 10 + self.b % 10 >= 10

    def slipped_solution(self, rng: random.Random) -> str:
        """A worked completion with one plausible slip, carried through consistently to a wrong boxed answer.

        A problem whose units carry: the carry is dropped (``3+4=7`` for ``3+4+1=8``). Otherwise one column sum
        (chosen with ``rng``) is off by one (sign chosen with ``rng``). So a student trained on a mix of these and
        correct completions has a per-problem chance of a slip at a known token: on carry problems the
        ``+1``-vs-``=`` choice, elsewhere the column-sum digit."""
        if self.has_carry:
            text = _worked(self.a, self.b, drop_carry=True)
        else:
            column = rng.randrange(2)
            delta = rng.choice((-1, 1))
            digits = ((self.a // 10**column) % 10, (self.b // 10**column) % 10)
            if sum(digits) + delta < 0:  # 0+0 (never for 2-digit operands) can only go up
                delta = 1
            text = _worked(self.a, self.b, off=(column, delta))
        assert not is_correct(text, self.answer), (self, text)
        return text


def _worked(a: int, b: int, *, drop_carry: bool = False, off: Optional[tuple] = None) -> str:
    """Column sums from the units up, the carry passed on, the boxed answer read off the sums. ``drop_carry``: the
    tens column ignores the units' carry; ``off=(column, delta)``: that column's sum is written ``delta`` off.
    Either way the rest follows consistently from the slipped sum."""
    steps, digits, carry, column = [], [], 0, 0
    x, y = a, b
    while x or y:
        dx, dy = x % 10, y % 10
        c = 0 if (drop_carry and column == 1) else carry
        s = dx + dy + c + (off[1] if off is not None and off[0] == column else 0)
        steps.append(f"{dx}+{dy}" + (f"+{c}" if c else "") + f"={s}")
        carry, column = s // 10, column + 1
        digits.append(s % 10)
        x, y = x // 10, y // 10
    answer = int("".join(str(d) for d in ([carry] if carry else []) + digits[::-1]))
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\n\\boxed{" + str(answer) + "}"


def make_splits(spec: TinyDefaultSpec) -> dict:
    """Disjoint problem sets {"val", "train", "check", "sft"} from a seeded shuffle of every ordered pair."""
    lo, hi = spec.min_operand, spec.max_operand
    pairs = [Problem(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
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


_BOXED = "\\boxed{"


def is_correct(completion: str, answer: str) -> bool:
    """The warm start's fast check: the last ``\\boxed{}`` equals the integer answer (agrees with verl's scorers
    on this task; the tests check that)."""
    got = last_boxed(completion)
    return got is not None and got.strip() == str(answer).strip()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _corpus(problems: Sequence[Problem]) -> list:
    """Training text for the BPE: the rendered conversations with special tokens cut out, plus the SSOPD teacher's
    reference-solution wording (so teacher contexts stay short). Deterministic."""
    teacher = (
        "{problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n{witness}\n"
        "=== Reference Solution End ===\n\nAfter reading the reference solution above, make sure you truly "
        "understand the reasoning behind each step — do not copy or paraphrase it. Now, using your own words and "
        "independent reasoning, derive the same final answer to the problem above."
    )
    texts = []
    for i, p in enumerate(problems):
        full = f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n{p.solution}<|im_end|>\n"
        if i % 8 == 0:
            full = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + full
            full += "<|im_start|>user\n" + teacher.format(problem=p.prompt, witness=p.solution) + "<|im_end|>\n"
        texts.extend(piece for piece in _SPECIAL_RE.split(full) if piece)
    return texts


_TRAINED_BPE: dict = {}  # (vocab size, corpus digest) -> trained BPE (JSON), per process


def build_tokenizer(spec: Optional[TinyDefaultSpec] = None, problems: Optional[Sequence[Problem]] = None):
    """The compact Qwen3-style ``PreTrainedTokenizerFast`` (byte-level BPE + Qwen3 special tokens + chat template),
    trained on the warm-start problems of ``spec`` (default spec if None) unless ``problems`` is given."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from ssopd_verl.tiny_tokenizer import QWEN3_SPECIAL_TOKENS, QWEN_PATTERN

    spec = spec or TinyDefaultSpec()
    if problems is None:
        problems = make_splits(spec)["sft"]
    n_special = len(QWEN3_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - n_special,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = _corpus(problems)
    key = (spec.vocab_size, hashlib.sha256("\u0000".join(corpus).encode()).hexdigest())
    trained = _TRAINED_BPE.get(key)
    if trained is None:  # the BPE training is the slow part (seconds); the result is a pure function of key
        tok.train_from_iterator(corpus, trainer=trainer)
        _TRAINED_BPE[key] = tok.to_str()
    else:
        tok = Tokenizer.from_str(trained)
    base = tok.get_vocab_size()
    if base < 256:
        raise RuntimeError(f"BPE vocabulary lost bytes ({base} < 256)")
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_SPECIAL_TOKENS])
    for i, (t, _) in enumerate(QWEN3_SPECIAL_TOKENS):
        if tok.token_to_id(t) != base + i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {base + i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE_FILE.read_text(encoding="utf-8"),
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def _prompt_ids(tokenizer, problem: Problem) -> list:
    """Prompt token ids exactly as verl renders them (chat template, generation prompt, CHAT_TEMPLATE_KWARGS)."""
    text = tokenizer.apply_chat_template(
        problem.messages, add_generation_prompt=True, tokenize=False, **CHAT_TEMPLATE_KWARGS
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer, text: str) -> list:
    """Response ids of a completion as the model emits it: the text's tokens and the closing ``<|im_end|>``."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def teacher_prompt_ids(tokenizer, problem: Problem, witness_response_ids: Optional[Sequence[int]] = None) -> list:
    """The SSOPD teacher's prompt ids for ``problem``: exactly what the trainer builds, i.e.
    :func:`ssopd_verl.teacher_context.build_teacher_context` with ``ssopd.template``'s default, the student's
    chat-template kwargs (:data:`CHAT_TEMPLATE_KWARGS`) and no target, the witness taken from a correct
    completion's response ids by ``witness_from_response(..., "keep")`` (``ssopd.witness_thinking``'s default).
    ``witness_response_ids`` defaults to the problem's worked solution as the model emits it (``<think>`` block,
    boxed answer, ``<|im_end|>``): what a correct sampled completion of this model looks like."""
    from ssopd_verl.teacher_context import DEFAULT_TEMPLATE, build_teacher_context, witness_from_response

    if witness_response_ids is None:
        witness_response_ids = completion_ids(tokenizer, problem.solution)
    witness = witness_from_response(tokenizer, witness_response_ids, "keep")
    context = build_teacher_context(
        tokenizer,
        problem.messages,
        witness,
        [],
        template=DEFAULT_TEMPLATE,
        chat_template_kwargs=CHAT_TEMPLATE_KWARGS,
    )
    return list(context.input_ids)


# ----------------------------------------------------------------------------------------------------------------
# Model, sampling, warm start


def _model_config(spec: TinyDefaultSpec, tokenizer):
    from transformers import Qwen3Config

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False,
        max_window_layers=spec.num_layers,
        attention_dropout=0.0,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        architectures=["Qwen3ForCausalLM"],
        attn_implementation="sdpa",
    )


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> list:
    """Plain ancestral sampling (softmax(logits / temperature), no top-k / top-p) with transformers' ``generate``;
    prompts are left-padded; the global RNG is seeded inside a fork, so the caller's RNG state is untouched.
    Returns ``[(response_ids, finished)]``: ids up to and including ``<|im_end|>``; ``finished`` is False when
    ``max_new_tokens`` ran out first (a truncated completion)."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        )[:, width:].tolist()
    model.train(was_training)
    results = []
    for row in out:
        finished = eos in row
        results.append((row[: row.index(eos) + 1] if finished else row, finished))
    return results


def sampled_accuracy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    samples: int = 1,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    prompt: str = "student",
) -> tuple:
    """Fraction of sampled completions whose last ``\\boxed{}`` is the answer (truncated ones count as wrong).
    Returns ``(accuracy, per_problem_correct_counts)``. Deterministic for a seed. ``prompt`` picks the prompt:
    ``"student"`` (the RL prompt) or ``"teacher"`` (:func:`teacher_prompt_ids`, the problem's worked solution as
    the witness)."""
    if prompt not in ("student", "teacher"):
        raise ValueError(f"prompt must be 'student' or 'teacher', got {prompt!r}")
    make = _prompt_ids if prompt == "student" else teacher_prompt_ids
    prompts = [make(tokenizer, p) for p in problems for _ in range(samples)]
    results = sample_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    counts = [0] * len(problems)
    for k, (resp, finished) in enumerate(results):
        p = problems[k // samples]
        if finished and is_correct(tokenizer.decode(resp, skip_special_tokens=True), p.answer):
            counts[k // samples] += 1
    return sum(counts) / max(1, len(results)), counts


def _pad_rows(rows: Sequence[tuple], pad: int):
    """``[(prompt_ids, target_ids)]`` -> right-padded (input_ids, labels, attention_mask); labels = -100 on the
    prompt and the padding (the loss is on the target tokens only)."""
    import torch

    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        seq = torch.tensor(list(a) + list(b), dtype=torch.long)
        ids[i, : len(seq)] = seq
        labels[i, len(a) : len(seq)] = seq[len(a) :]
        mask[i, : len(seq)] = 1
    return ids, labels, mask


_PERMUTATIONS: dict = {}


def _batch_indices(seed: int, step: int, n: int, batch: int, stream: str = "sft") -> list:
    """The rows of warm-start step ``step`` (0-based) in ``stream``: epochs of seeded permutations of ``range(n)``,
    a pure function of (seed, stream, step)."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    key = (seed, stream, epoch, n)
    perm = _PERMUTATIONS.get(key)
    if perm is None:
        perm = list(range(n))
        random.Random(f"{seed}/{stream}/{epoch}").shuffle(perm)
        _PERMUTATIONS.clear()  # one epoch at a time per stream is all a build needs
        _PERMUTATIONS[key] = perm
    return perm[k * batch : (k + 1) * batch]


def _lr_factor(spec: TinyDefaultSpec, step: int) -> float:
    """Linear warmup, constant, then linear decay to ``final_lr_frac`` over the last ``decay_frac`` of
    ``train_steps``; ``final_lr_frac`` after that."""
    factor = min(1.0, (step + 1) / max(1, spec.warmup_steps))
    start = spec.train_steps * (1.0 - spec.decay_frac)
    if spec.decay_frac > 0 and step >= start:
        done = min(1.0, (step - start) / max(1e-9, spec.train_steps - start))
        factor *= 1.0 - (1.0 - spec.final_lr_frac) * done
    return factor


def _warm_start(model, tokenizer, spec: TinyDefaultSpec, splits: dict, progress: Optional[Callable[[str], None]]):
    """Supervised warm start on a mixture of student and teacher-prompt rows (module docstring, item 4).

    Runs the ``train_steps`` schedule, then checks; if the student is below the band or the teacher below
    ``teacher_min``, goes on at the final learning rate, checking every ``check_every`` steps, up to ``max_steps``.
    Returns (student accuracy, teacher accuracy, steps, history)."""
    import torch

    lo, hi = spec.band
    sft, check = splits["sft"], splits["check"]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    student_prompts: dict = {}  # problem index -> prompt ids, built on first use
    teacher_prompts: dict = {}
    completions: dict = {}  # completion text -> response ids

    def completion(text: str) -> list:
        if text not in completions:
            completions[text] = completion_ids(tokenizer, text)
        return completions[text]

    def student_row(i: int, rng: random.Random) -> tuple:
        if i not in student_prompts:
            student_prompts[i] = _prompt_ids(tokenizer, sft[i])
        p = sft[i]
        text = p.solution if rng.random() < spec.student_correct_frac else p.slipped_solution(rng)
        return student_prompts[i], completion(text)

    def teacher_row(i: int) -> tuple:
        if i not in teacher_prompts:
            teacher_prompts[i] = teacher_prompt_ids(tokenizer, sft[i], completion(sft[i].solution))
        return teacher_prompts[i], completion(sft[i].solution)

    def loss_of(rows: list):
        ids, labels, mask = _pad_rows(rows, pad)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(spec, s))
    history: list = []
    t0 = time.perf_counter()
    acc = teacher_acc = float("nan")
    step, sums = 0, [0.0, 0.0, 0]
    model.train()
    while step < spec.max_steps:
        rng = random.Random(f"{spec.seed}/student-targets/{step}")
        rows = [student_row(i, rng) for i in _batch_indices(spec.seed, step, len(sft), spec.batch_size, "sft")]
        loss_student = loss_of(rows)
        loss = loss_student
        loss_teacher = None
        if spec.teacher_batch_size > 0:
            picks = _batch_indices(spec.seed, step, len(sft), spec.teacher_batch_size, "teacher")
            loss_teacher = loss_of([teacher_row(i) for i in picks])
            loss = loss + spec.teacher_loss_weight * loss_teacher
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        sums = [sums[0] + loss_student.item(), sums[1] + (loss_teacher.item() if loss_teacher is not None else 0.0),
                sums[2] + 1]
        at_check = step >= spec.train_steps and (step - spec.train_steps) % spec.check_every == 0
        if not at_check and step % spec.check_every and step < spec.max_steps:
            continue
        entry = {
            "step": step,
            "loss": round(sums[0] / sums[2], 6),
            "teacher_loss": round(sums[1] / sums[2], 6),
            "accuracy": None,
            "teacher_accuracy": None,
        }
        sums = [0.0, 0.0, 0]
        history.append(entry)
        line = (
            f"warm start: step {step}/{spec.train_steps} (max {spec.max_steps})  loss {entry['loss']:.4f}  "
            f"teacher loss {entry['teacher_loss']:.4f}"
        )
        if not at_check and step < spec.max_steps:
            if progress:
                progress(f"{line}  {time.perf_counter() - t0:.1f}s")
            continue
        seed = spec.seed * 1_000_003 + step
        kwargs = dict(samples=spec.check_samples, seed=seed, max_new_tokens=spec.max_new_tokens)
        acc, _ = sampled_accuracy(model, tokenizer, check, **kwargs)
        teacher_acc, _ = sampled_accuracy(model, tokenizer, check, prompt="teacher", **kwargs)
        model.train()
        entry.update(accuracy=acc, teacher_accuracy=teacher_acc)
        if progress:
            progress(
                f"{line}  sampled accuracy: student {acc:.3f} (target {lo}-{hi}), teacher prompt {teacher_acc:.3f} "
                f"(target >= {spec.teacher_min})  {time.perf_counter() - t0:.1f}s"
            )
        if lo <= acc <= hi and teacher_acc >= spec.teacher_min:
            model.eval()
            return acc, teacher_acc, step, history
        if acc > hi:
            break  # more training only raises it: the spec (student_correct_frac, train_steps) needs changing
    raise RuntimeError(
        f"warm start did not reach its targets (student sampled accuracy in [{lo}, {hi}], teacher-prompt accuracy "
        f">= {spec.teacher_min}; max_steps {spec.max_steps}): last student {acc:.3f}, teacher {teacher_acc:.3f} at "
        f"step {step}; history: {history[-5:]}"
    )


def greedy_accuracy(model, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int = 64) -> float:
    """Share of ``problems`` answered correctly by greedy decoding from the student prompt (what verl's validation
    reports with ``val_kwargs.temperature=0``), all prompts in one left-padded batch."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    prompts = [_prompt_ids(tokenizer, p) for p in problems]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
            pad_token_id=pad, top_k=None, top_p=None, temperature=None,
        )[:, width:].tolist()
    model.train(was_training)
    correct = 0
    for row, p in zip(out, problems):
        if eos in row and is_correct(tokenizer.decode(row[: row.index(eos)], skip_special_tokens=True), p.answer):
            correct += 1
    return correct / max(1, len(problems))


def measure(
    model, tokenizer, problems: Sequence[Problem], *, samples: int, seed: int, max_new_tokens: int = 48
) -> dict:
    """The held-out measurement recorded in the manifest: sampled accuracy (temperature 1, no top-k / top-p) from
    the student prompt and from the teacher prompt (:func:`teacher_prompt_ids`, the worked solution as witness),
    ``samples`` per problem with ``seed``; plus the greedy student accuracy and the mixed-group count.
    ``samples=0``: nothing is measured ({})."""
    if samples <= 0:
        return {}
    kwargs = dict(samples=samples, seed=seed, max_new_tokens=max_new_tokens)
    student, counts = sampled_accuracy(model, tokenizer, problems, **kwargs)
    teacher, _ = sampled_accuracy(model, tokenizer, problems, prompt="teacher", **kwargs)
    return {
        "problems": len(problems),
        "samples": samples,
        "seed": seed,
        "temperature": 1.0,
        "student_accuracy": student,
        "teacher_accuracy": teacher,
        "student_greedy_accuracy": greedy_accuracy(model, tokenizer, problems, max_new_tokens=max_new_tokens),
        "mixed_problems": sum(0 < c < samples for c in counts),
    }


# ----------------------------------------------------------------------------------------------------------------
# Data files


def _rows(problems: Sequence[Problem], split: str) -> list:
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": p.messages,
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "solution": p.solution},
        }
        for i, p in enumerate(problems)
    ]


def _write_parquet(rows: list, path: Path) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path, index=False)


# ----------------------------------------------------------------------------------------------------------------
# Build and cache


def default_cache_dir(spec: Optional[TinyDefaultSpec] = None) -> Path:
    """``$SSOPD_CACHE/tiny-default-v2`` (``$SSOPD_CACHE`` defaults to ``~/.cache/ssopd_verl``); a non-default spec
    gets a suffix with its digest."""
    root = Path(os.environ.get("SSOPD_CACHE") or Path.home() / ".cache" / "ssopd_verl").expanduser()
    name = CACHE_NAME
    if spec is not None and spec != TinyDefaultSpec():
        name += "-" + spec.digest()[:10]
    return root / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("ssopd-verl", "torch", "transformers", "tokenizers", "pandas", "pyarrow", "verl"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cached_tiny_default(cache_dir: Optional[os.PathLike | str] = None) -> Optional[TinyDefault]:
    """The default build if it is in the cache (``cache_dir`` or :func:`default_cache_dir`) and intact; None if it
    still has to be built. Never trains."""
    spec = TinyDefaultSpec()
    return _load_cached(Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir(spec), spec)


def _load_cached(cache_dir: Path, spec: TinyDefaultSpec) -> Optional[TinyDefault]:
    """The cached build if its manifest is complete, for this spec, and every file hash matches; else None."""
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != "ssopd-tiny-default" or manifest.get("version") != CACHE_VERSION:
        return None
    if manifest.get("spec") != spec.to_dict():
        return None
    files = manifest.get("files") or {}
    if not files:
        return None
    for rel, digest in files.items():
        p = cache_dir / rel
        if not p.is_file() or _sha256(p) != digest:
            return None
    return _result(cache_dir, manifest)


def _result(cache_dir: Path, manifest: dict) -> TinyDefault:
    return TinyDefault(
        model_path=str(cache_dir / MODEL_DIR),
        train_file=str(cache_dir / TRAIN_FILE),
        val_file=str(cache_dir / VAL_FILE),
        accuracy=float(manifest["accuracy"]),
        steps=int(manifest["steps"]),
        teacher_accuracy=float(manifest["teacher_accuracy"]),
        heldout=dict(manifest["heldout"]),
        cache_dir=str(cache_dir),
        data_source=manifest["data_source"],
        chat_template_kwargs=dict(manifest["chat_template_kwargs"]),
        manifest=manifest,
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build_into(out: Path, spec: TinyDefaultSpec, progress: Optional[Callable[[str], None]]) -> dict:
    import torch
    from transformers import Qwen3ForCausalLM

    t0 = time.perf_counter()
    splits = make_splits(spec)
    tokenizer = build_tokenizer(spec, splits["sft"])
    config = _model_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    if progress:
        progress(
            f"tiny default: vocabulary {len(tokenizer)} tokens, model {n_params / 1e6:.2f}M parameters, "
            f"{len(splits['sft'])} warm-start problems"
        )
    with _torch_threads(spec.num_threads):
        accuracy, teacher_accuracy, steps, history = _warm_start(model, tokenizer, spec, splits, progress)
        heldout = measure(
            model,
            tokenizer,
            splits["val"],
            samples=spec.heldout_samples,
            seed=spec.heldout_seed,
            max_new_tokens=spec.max_new_tokens,
        )
    heldout = {"split": "val", **heldout} if heldout else {}
    if progress and heldout:
        progress(
            f"held out ({heldout['problems']} val problems x {heldout['samples']}, temperature 1): student "
            f"{heldout['student_accuracy']:.3f}, teacher prompt {heldout['teacher_accuracy']:.3f}; greedy student "
            f"{heldout['student_greedy_accuracy']:.3f}"
        )

    model_dir = out / MODEL_DIR
    model_dir.mkdir(parents=True)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_p = 1.0
    model.generation_config.top_k = 0
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    from ssopd_verl.tiny_model import save_with_sdpa

    save_with_sdpa(model, tokenizer, model_dir)

    _write_parquet(_rows(splits["train"], "train"), out / TRAIN_FILE)
    _write_parquet(_rows(splits["val"], "val"), out / VAL_FILE)

    for p in out.rglob("*"):  # safetensors writes 0600; a shared cache should be readable
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    files = {str(p.relative_to(out)): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format": "ssopd-tiny-default",
        "version": CACHE_VERSION,
        "spec": spec.to_dict(),
        "seed": spec.seed,
        "versions": _versions(),
        "torch_threads": spec.num_threads,
        "accuracy": accuracy,
        "teacher_accuracy": teacher_accuracy,
        "steps": steps,
        "history": history,
        "heldout": heldout,
        "teacher_prompt": {
            "builder": "ssopd_verl.teacher_context.build_teacher_context",
            "template": "ssopd.template default (teacher_context.DEFAULT_TEMPLATE)",
            "witness": "the problem's worked solution as response ids, witness_from_response(..., 'keep')",
            "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
        },
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "data_source": DATA_SOURCE,
        "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
        "rows": {"train": len(splits["train"]), "val": len(splits["val"]), "sft": len(splits["sft"])},
        "build_seconds": round(time.perf_counter() - t0, 2),
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last: marks completion
    return manifest


def build_tiny_default(
    cache_dir: Optional[os.PathLike | str] = None,
    *,
    force: bool = False,
    spec: Optional[TinyDefaultSpec] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> TinyDefault:
    """Build the tiny default into ``cache_dir`` (default :func:`default_cache_dir`) once, and return it.

    A finished build (manifest present, same spec, file hashes intact) is returned as is, without training or
    touching any file, unless ``force``. Otherwise it is built in a temporary sibling directory that replaces
    ``cache_dir`` once complete; concurrent callers wait on a sibling lock file ``.<name>.lock``. ``progress``
    receives one line per accuracy check. Raises RuntimeError if the warm start misses the band."""
    spec = spec or TinyDefaultSpec()
    cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir(spec)
    if not force:
        cached = _load_cached(cache_dir, spec)
        if cached is not None:
            return cached
    with _file_lock(cache_dir.with_name(f".{cache_dir.name}.lock")):
        if not force:  # another process may have finished it while we waited
            cached = _load_cached(cache_dir, spec)
            if cached is not None:
                return cached
        for stale in cache_dir.parent.glob(cache_dir.name + ".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir.with_name(f"{cache_dir.name}.partial-{os.getpid()}")
        tmp.mkdir(parents=True)
        try:
            manifest = _build_into(tmp, spec, progress)
            if cache_dir.exists():
                shutil.rmtree(cache_dir)
            os.replace(tmp, cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _result(cache_dir, manifest)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssopd_verl.tiny_default",
        description="Build (once, cached) the embedded tiny default: a compact-vocabulary Qwen3 warm-started into "
        "the frontier of 2-digit addition, plus verl train/val parquet files.",
    )
    parser.add_argument("--cache-dir", default=None, help=f"build directory (default: {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build is cached")
    parser.add_argument("--seed", type=int, default=None, help="seed (non-default seeds get their own directory)")
    args = parser.parse_args(argv)
    spec = TinyDefaultSpec() if args.seed is None else TinyDefaultSpec(seed=args.seed)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = build_tiny_default(args.cache_dir, force=args.force, spec=spec, progress=progress)
    m = result.manifest
    print(f"model_path: {result.model_path}")
    print(f"train_file: {result.train_file}")
    print(f"val_file:   {result.val_file}")
    h = result.heldout
    if h:
        print(
            f"held out ({h['problems']} val problems x {h['samples']} samples, temperature 1, seed {h['seed']}): "
            f"student {h['student_accuracy']:.3f}, teacher prompt {h['teacher_accuracy']:.3f}; greedy student "
            f"{h['student_greedy_accuracy']:.3f}"
        )
    print(
        f"sampled accuracy {result.accuracy:.3f} (teacher prompt {result.teacher_accuracy:.3f}) after {result.steps} "
        "warm-start steps; "
        f"{m.get('parameters')} parameters, vocabulary {m.get('vocab_size')}; "
        f"built in {m.get('build_seconds')}s ({time.perf_counter() - t0:.1f}s this call)"
    )
    print(f"data_source: {result.data_source}   data.apply_chat_template_kwargs: {result.chat_template_kwargs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------------------------
# Hydra resolver: `${ssopd_tiny:model_path}` in the `+tiny=default` overlay (registered by the verl plugin).

RESOLVER = "ssopd_tiny"


def resolve_path(field_name: str) -> str:
    """A path of the tiny default for a config interpolation; builds it (once, cached) on first use."""
    allowed = ("model_path", "train_file", "val_file")
    if field_name not in allowed:
        raise ValueError(f"${{{RESOLVER}:{field_name}}}: expected one of {allowed}")
    # "ssopd: " so that scripts/run_tiny_cpu.sh, which shows only our lines, shows the first-use build's progress
    built = build_tiny_default(progress=lambda line: print(f"ssopd: {line}", file=sys.stderr, flush=True))
    return getattr(built, field_name)
