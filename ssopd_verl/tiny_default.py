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
4. **Warm start.** Plain supervised training (AdamW, loss on the completion tokens and the closing
   ``<|im_end|>`` only, batches of 32) that stops as soon as the *sampled* accuracy (temperature 1.0, no top-k /
   top-p, a truncated completion counts as wrong; 128 held-out problems x 2 samples) lies inside ``band``
   (default 0.3-0.7), checked every ``check_every`` = 25 steps once the training loss is below
   ``check_below_loss``; if one interval jumps over the band the run goes back to the last check and re-checks
   every step. Hard cap ``max_steps``; missing the band is an error. Measured on 2 busy CPU cores: 300 steps,
   accuracy 0.36, ~45 s for the whole build (batch 32 and MLP 256 reach the band in about the same number of
   steps as batch 64 / MLP 512, at ~40% of the cost).
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
``$SSOPD_CACHE/tiny-default-v1``, ``$SSOPD_CACHE`` defaulting to ``~/.cache/ssopd_verl``), under a file lock,
in a sibling temporary directory that is renamed into place after ``manifest.json`` (versions, spec, seed,
accuracy, steps, sha256 of every file) is written, so an interrupted build is never mistaken for a finished one.
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
import copy
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
    "default_cache_dir",
    "is_correct",
    "make_splits",
    "sample_completions",
    "sampled_accuracy",
]

CACHE_VERSION = 1
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
    n_val: int = 64
    n_check: int = 128  # held-out problems for the sampled-accuracy check during the warm start
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
    # warm start
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_steps: int = 3000
    check_every: int = 25  # the first check is at this step (an untrained model scores 0)
    band: tuple = (0.3, 0.7)  # target sampled accuracy, inclusive
    check_samples: int = 2  # samples per check problem (temperature 1.0): 256 samples, std <= 0.03
    check_below_loss: float = 0.5  # skip the (costly) check while the interval's mean loss is above this
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
    """A finished build. Paths are absolute; ``accuracy`` is the sampled accuracy at the step the warm start
    stopped (temperature 1.0, ``spec.n_check`` problems x ``spec.check_samples`` samples)."""

    model_path: str  # model + tokenizer (save_pretrained layout; AutoTokenizer / AutoModelForCausalLM load it)
    train_file: str
    val_file: str
    accuracy: float
    steps: int
    cache_dir: str = ""
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
        steps, carry = [], 0
        x, y = self.a, self.b
        while x or y:
            dx, dy = x % 10, y % 10
            s = dx + dy + carry
            steps.append(f"{dx}+{dy}" + (f"+{carry}" if carry else "") + f"={s}")
            carry = s // 10
            x, y = x // 10, y // 10
        return "<think>\n" + "\n".join(steps) + "\n</think>\n\n\\boxed{" + self.answer + "}"


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
    tok.train_from_iterator(_corpus(problems), trainer=trainer)
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
) -> tuple:
    """Fraction of sampled completions whose last ``\\boxed{}`` is the answer (truncated ones count as wrong).
    Returns ``(accuracy, per_problem_correct_counts)``. Deterministic for a seed."""
    prompts = [_prompt_ids(tokenizer, p) for p in problems for _ in range(samples)]
    results = sample_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    counts = [0] * len(problems)
    for k, (resp, finished) in enumerate(results):
        p = problems[k // samples]
        if finished and is_correct(tokenizer.decode(resp, skip_special_tokens=True), p.answer):
            counts[k // samples] += 1
    return sum(counts) / max(1, len(results)), counts


def _encode_sft(tokenizer, problems: Sequence[Problem]):
    """(input_ids, labels, lengths) right-padded; labels = -100 on the prompt and padding."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = []
    for p in problems:
        prompt = _prompt_ids(tokenizer, p)
        completion = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt, completion))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        seq = torch.tensor(a + b, dtype=torch.long)
        ids[i, : len(seq)] = seq
        labels[i, len(a) : len(seq)] = seq[len(a) :]
        lengths[i] = len(seq)
    return ids, labels, lengths


def _batch_indices(seed: int, step: int, n: int, batch: int) -> list:
    """The rows of warm-start step ``step`` (0-based): epochs of seeded permutations, a pure function of step."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    perm = list(range(n))
    random.Random(f"{seed}/sft/{epoch}").shuffle(perm)
    return perm[k * batch : (k + 1) * batch]


def _warm_start(model, tokenizer, spec: TinyDefaultSpec, splits: dict, progress: Optional[Callable[[str], None]]):
    """Train until the sampled accuracy on the check problems is inside ``spec.band``. Returns (acc, steps, history)."""
    import torch

    lo, hi = spec.band
    ids, labels, lengths = _encode_sft(tokenizer, splits["sft"])
    check = splits["check"]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, spec.warmup_steps)))
    history: list = []
    t0 = time.perf_counter()

    def evaluate(step: int) -> float:
        acc, _ = sampled_accuracy(
            model,
            tokenizer,
            check,
            samples=spec.check_samples,
            seed=spec.seed * 1_000_003 + step,
            max_new_tokens=spec.max_new_tokens,
        )
        return acc

    def snapshot(step: int) -> dict:
        return {
            "step": step,
            "model": copy.deepcopy(model.state_dict()),
            "opt": copy.deepcopy(opt.state_dict()),
            "sched": copy.deepcopy(sched.state_dict()),
        }

    def restore(s: dict) -> int:
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"])
        return s["step"]

    acc = float("nan")
    last = snapshot(0)
    interval, step, loss_sum, loss_n = spec.check_every, 0, 0.0, 0
    model.train()
    while step < spec.max_steps:
        rows = _batch_indices(spec.seed, step, len(ids), spec.batch_size)
        width = int(lengths[rows].max())
        batch_ids, batch_labels = ids[rows, :width], labels[rows, :width]
        attn = (torch.arange(width)[None, :] < lengths[rows][:, None]).long()
        loss = model(input_ids=batch_ids, attention_mask=attn, labels=batch_labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % interval and step < spec.max_steps:
            continue
        mean_loss = loss_sum / loss_n
        loss_sum, loss_n = 0.0, 0
        if mean_loss > spec.check_below_loss and step < spec.max_steps:
            history.append({"step": step, "loss": round(mean_loss, 6), "accuracy": None})
            if progress:
                progress(
                    f"warm start: step {step}/{spec.max_steps}  loss {mean_loss:.4f}  (no check above loss "
                    f"{spec.check_below_loss})  {time.perf_counter() - t0:.1f}s"
                )
            last = snapshot(step)
            continue
        acc = evaluate(step)
        history.append({"step": step, "loss": round(mean_loss, 6), "accuracy": acc})
        if progress:
            progress(
                f"warm start: step {step}/{spec.max_steps}  loss {mean_loss:.4f}  sampled accuracy {acc:.3f} "
                f"(target {lo}-{hi})  {time.perf_counter() - t0:.1f}s"
            )
        if lo <= acc <= hi:
            model.eval()
            return acc, step, history
        if acc > hi and interval > 1:
            # Jumped over the band within one interval: go back to the last check and check every step.
            step = restore(last)
            interval = 1
            if progress:
                progress(f"warm start: overshot the band, back to step {step}, checking every step")
            continue
        if acc > hi:
            break
        last = snapshot(step)
    raise RuntimeError(
        f"warm start did not land in the sampled-accuracy band [{lo}, {hi}] (max_steps {spec.max_steps}; "
        f"last {acc:.3f} at step {step}); history: {history[-5:]}"
    )


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
    """``$SSOPD_CACHE/tiny-default-v1`` (``$SSOPD_CACHE`` defaults to ``~/.cache/ssopd_verl``); a non-default spec
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
        accuracy, steps, history = _warm_start(model, tokenizer, spec, splits, progress)

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
        "steps": steps,
        "history": history,
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
    print(
        f"sampled accuracy {result.accuracy:.3f} after {result.steps} warm-start steps; "
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
    built = build_tiny_default(progress=lambda line: print(line, file=sys.stderr, flush=True))
    return getattr(built, field_name)
