"""The tiny default's tokenizer, and the prompts as verl and the SSOPD trainer render them with it.

A byte-level BPE in Qwen's layout (Qwen's pre-tokenizer regex, digits one by one, byte-level alphabet so *any* text
encodes and decodes losslessly) trained with the ``tokenizers`` library on the task's warm-start problems (their
rendered conversations and the SSOPD teacher's reference-solution wording), at most ``spec.vocab_size`` tokens,
then Qwen3's 26 special tokens as added tokens at the end (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
..., ``<think>``, ``</think>``; eos ``<|im_end|>``, pad ``<|endoftext|>``) and the Qwen3 chat template packaged as
``data/qwen3_chat_template.jinja``. A compact vocabulary keeps a training step ~17x cheaper than Qwen3's 151,669
tokens would.

Chat template / thinking: the completions carry a ``<think>...</think>`` block and the prompts are rendered with
Qwen3's default (thinking on: the prompt ends with ``<|im_start|>assistant\\n`` and the model writes ``<think>``
itself), i.e. **no** chat-template kwargs: verl's default ``data.apply_chat_template_kwargs={}`` is the right
setting (:data:`CHAT_TEMPLATE_KWARGS`). ``enable_thinking=False`` would put an empty think block in the prompt
that the model never saw in training.

Imports: the standard library at module level; tokenizers and transformers inside the functions; verl never.
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional, Sequence

from ssopd_verl.tiny_default.spec import TinyDefaultSpec
from ssopd_verl.tiny_default.tasks import TaskProblem, make_splits
from ssopd_verl.tiny_tokenizer import DEFAULT_CHAT_TEMPLATE, QWEN3_SPECIAL_TOKENS, QWEN_PATTERN

__all__ = ["CHAT_TEMPLATE_KWARGS", "build_tokenizer", "completion_ids", "prompt_ids", "teacher_prompt_ids"]

# The chat-template kwargs the warm start used (none: Qwen3's default, thinking on). verl must render prompts the
# same way: data.apply_chat_template_kwargs={} (verl's default); the SSOPD teacher uses the student's kwargs.
CHAT_TEMPLATE_KWARGS: dict = {}

_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>|</?think>|</?tool_call>|</?tool_response>")


def _corpus(problems: Sequence[TaskProblem]) -> list:
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


def build_tokenizer(spec: Optional[TinyDefaultSpec] = None, problems: Optional[Sequence[TaskProblem]] = None):
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
        chat_template=DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8"),
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def prompt_ids(tokenizer, problem: TaskProblem) -> list:
    """Prompt token ids exactly as verl renders them (chat template, generation prompt, CHAT_TEMPLATE_KWARGS)."""
    text = tokenizer.apply_chat_template(
        problem.messages, add_generation_prompt=True, tokenize=False, **CHAT_TEMPLATE_KWARGS
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer, text: str) -> list:
    """Response ids of a completion as the model emits it: the text's tokens and the closing ``<|im_end|>``."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def teacher_prompt_ids(
    tokenizer, problem: TaskProblem, witness_response_ids: Optional[Sequence[int]] = None
) -> list:
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
