"""The tiny default's model, and how it is sampled and measured.

A ``Qwen3ForCausalLM`` (hidden 128, 4 layers, 4 query / 2 key-value heads of 32, MLP 256, tied embeddings, sdpa,
float32; 0.65M parameters with the 484-token vocabulary) from a seeded init. Sampling is plain ancestral sampling
with transformers' ``generate`` (temperature 1, no top-k / top-p), seeded inside a fork of the global RNG; a
completion truncated by ``max_new_tokens`` counts as wrong. :func:`measure` is the manifest's held-out measurement.

Imports: the standard library at module level; torch and transformers inside the functions; verl never.
"""

from __future__ import annotations

from typing import Sequence

from ssopd_verl.tiny_default.spec import TinyDefaultSpec
from ssopd_verl.tiny_default.tasks import TaskProblem, is_correct
from ssopd_verl.tiny_default.tokenizer import prompt_ids, teacher_prompt_ids

__all__ = [
    "greedy_accuracy",
    "measure",
    "model_config",
    "new_model",
    "sample_completions",
    "sampled_accuracy",
    "save_model",
]


def model_config(spec: TinyDefaultSpec, tokenizer):
    """The ``Qwen3Config`` of the spec, with the tokenizer's vocabulary size and eos / pad ids."""
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


def new_model(spec: TinyDefaultSpec, tokenizer):
    """A freshly initialised float32 ``Qwen3ForCausalLM`` from ``spec.seed`` (the global torch RNG is untouched)."""
    import torch
    from transformers import Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return Qwen3ForCausalLM(model_config(spec, tokenizer)).float()


def save_model(model, tokenizer, path) -> None:
    """The model (sampling defaults in its generation config: temperature 1, no top-k / top-p) and the tokenizer
    in ``save_pretrained`` layout, ``"attn_implementation": "sdpa"`` in ``config.json``."""
    from ssopd_verl.tiny_model import save_with_sdpa

    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_p = 1.0
    model.generation_config.top_k = 0
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    save_with_sdpa(model, tokenizer, path)


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
    problems: Sequence[TaskProblem],
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
    make = prompt_ids if prompt == "student" else teacher_prompt_ids
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


def greedy_accuracy(model, tokenizer, problems: Sequence[TaskProblem], *, max_new_tokens: int = 64) -> float:
    """Share of ``problems`` answered correctly by greedy decoding from the student prompt (what verl's validation
    reports with ``val_kwargs.temperature=0``), all prompts in one left-padded batch."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    prompts = [prompt_ids(tokenizer, p) for p in problems]
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
    model, tokenizer, problems: Sequence[TaskProblem], *, samples: int, seed: int, max_new_tokens: int = 48
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
