"""A tiny, randomly initialised Qwen3 checkpoint with the real Qwen3 tokenizer, built offline.

Real vocabulary and token ids, tiny everything else: a few MB of transformer plus the (tied) embedding, so CPU tests
can run verl's real FSDP2 engine and the full-vocabulary losses on real shapes.

Vocabulary sizes: the tokenizer has 151,669 tokens (151,643 BPE ranks + 26 special tokens); the model's
``vocab_size`` defaults to :data:`QWEN3_MODEL_VOCAB_SIZE` = 151,936, the value every released Qwen3 checkpoint
uses (the embedding is padded past the tokenizer). So, as with real Qwen3, logits have 151,936 columns and ids
151,669..151,935 are never produced by the tokenizer; code that assumes ``logits.shape[-1] == len(tokenizer)`` is
caught by these tests. Pass ``vocab_size=151669`` for an unpadded model.

This module imports transformers (lazily), never verl.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

QWEN3_MODEL_VOCAB_SIZE = 151936  # config.vocab_size of released Qwen3 checkpoints
QWEN3_TOKENIZER_SIZE = 151669  # len(tokenizer): 151643 BPE ranks + 26 special tokens
QWEN3_BOS_TOKEN_ID = 151643  # <|endoftext|> (Qwen3 config.bos_token_id)
QWEN3_EOS_TOKEN_ID = 151645  # <|im_end|> (Qwen3 chat models' config.eos_token_id)
QWEN3_PAD_TOKEN_ID = 151643  # <|endoftext|>

__all__ = [
    "QWEN3_MODEL_VOCAB_SIZE",
    "QWEN3_TOKENIZER_SIZE",
    "build_tiny_qwen3",
    "tiny_qwen3_config",
]


def tiny_qwen3_config(
    *,
    vocab_size: int = QWEN3_MODEL_VOCAB_SIZE,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    dtype: torch.dtype = torch.float32,
):
    """The ``Qwen3Config`` used by :func:`build_tiny_qwen3` (sdpa attention, head_dim = hidden/heads)."""
    from transformers import Qwen3Config

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be divisible by num_kv_heads {num_kv_heads}")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},  # Qwen3's rope_theta
        use_sliding_window=False,
        max_window_layers=num_layers,
        bos_token_id=QWEN3_BOS_TOKEN_ID,
        eos_token_id=QWEN3_EOS_TOKEN_ID,
        pad_token_id=QWEN3_PAD_TOKEN_ID,
        dtype=dtype,
        architectures=["Qwen3ForCausalLM"],
        attn_implementation="sdpa",
    )
    return config


def build_tiny_qwen3(
    path: Union[str, os.PathLike],
    *,
    vocab: str = "qwen",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: Optional[int] = None,
    max_position_embeddings: int = 4096,
) -> str:
    """Write a randomly initialised ``Qwen3ForCausalLM`` and the real Qwen3 tokenizer to ``path``; return ``path``.

    Deterministic for a given ``seed`` (the global torch RNG is left untouched). Offline: nothing is downloaded.
    ``config.json`` carries ``"attn_implementation": "sdpa"`` (read by ``from_pretrained``; verl's
    ``HFModelConfig`` ignores it and needs ``override_config={"attn_implementation": "sdpa"}``).
    """
    if vocab != "qwen":
        raise ValueError(f"only vocab='qwen' (the real Qwen3 tokenizer) is supported, got {vocab!r}")
    from transformers import Qwen3ForCausalLM

    from ssopd_verl.tiny_tokenizer import build_qwen3_tokenizer

    tokenizer = build_qwen3_tokenizer()
    if len(tokenizer) != QWEN3_TOKENIZER_SIZE:
        raise RuntimeError(f"expected the Qwen3 tokenizer ({QWEN3_TOKENIZER_SIZE} tokens), got {len(tokenizer)}")
    vocab_size = QWEN3_MODEL_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {len(tokenizer)}")

    config = tiny_qwen3_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model = model.to(dtype).eval()

    save_with_sdpa(model, tokenizer, path)
    return str(path)


def save_with_sdpa(model, tokenizer, path: Union[str, os.PathLike]) -> Path:
    """save_pretrained model and tokenizer, with ``"attn_implementation": "sdpa"`` in ``config.json``.

    transformers 5 does not serialise the attention implementation; ``from_pretrained`` reads this key back, so
    the saved model loads with sdpa (no flash-attention on CPU) wherever it is opened.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    config_file = path / "config.json"
    data = json.loads(config_file.read_text())
    data["attn_implementation"] = "sdpa"
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
