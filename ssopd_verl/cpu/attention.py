"""Ulysses sequence-parallel attention on CPU: sdpa over verl's packed sequences, with verl's all-to-alls.

verl runs DeepSpeed-Ulysses (``actor.fsdp_config.ulysses_sequence_parallel_size > 1``) by replacing transformers'
``_flash_attention_forward`` with one that wraps flash-attention in two all-to-alls
(``verl.models.transformers.monkey_patch._ulysses_flash_attention_forward``). CPU has no flash-attention, so a
model on the CPU runtime would skip that replacement and attend only within its own shard. This module registers
one attention function, under :data:`NAME`, with transformers' ``AttentionInterface`` (its public hook for custom
attention; nothing is patched) that does what verl's flash path does:

1. queries, keys and values of this rank's shard ``(b, seq/sp, heads, d)`` -> the whole sequence and
   ``heads/sp`` heads, with verl's ``gather_seq_scatter_heads`` over verl's SP group (keys and values first
   repeated up to ``sp`` heads when there are fewer, as verl does);
2. the position ids of all shards gathered, so the packed sequences' boundaries are known (a sequence starts where
   the position id is 0, the layout verl's remove-padding path and its SP padding produce);
3. sdpa with a block-diagonal causal mask (each packed sequence attends only to itself);
4. back to ``(b, seq/sp, heads, d)`` with ``gather_heads_scatter_seq``.

Without an SP group (``sp = 1``) steps 1, 2 and 4 do nothing, so the function is exact packed-sequence sdpa. It is
the CPU runtime's stand-in for flash-attention, used by the tests of SSOPD under sequence parallelism; the
mask is [seq x seq], fine for test sizes, not for long contexts.
"""

from __future__ import annotations

import torch

NAME = "ulysses_sdpa"


def ulysses_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           position_ids=None, **kwargs):  # fmt: skip
    """transformers attention interface: ``query`` (b, heads, s, d) -> (output (b, s, heads, d), None)."""
    from verl.utils.ulysses import (
        gather_heads_scatter_seq,
        gather_seq_scatter_heads,
        get_ulysses_sequence_parallel_group,
        get_ulysses_sequence_parallel_world_size,
    )

    if position_ids is None:
        raise ValueError(f"{NAME} attention needs position_ids (verl's remove-padding layout)")
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention builds its own mask from position_ids; got an attention_mask")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (b, s_local, heads, d)
    sp = get_ulysses_sequence_parallel_world_size()
    if sp > 1:
        repeats = max(sp // k.size(2), 1)  # fewer kv heads than ranks: repeat them, as verl does
        k, v = (t.repeat_interleave(repeats, dim=2) for t in (k, v))
        q, k, v = (gather_seq_scatter_heads(t, seq_dim=1, head_dim=2) for t in (q, k, v))  # (b, s, heads/sp, d)
        shards = [torch.empty_like(position_ids) for _ in range(sp)]
        torch.distributed.all_gather(shards, position_ids.contiguous(), group=get_ulysses_sequence_parallel_group())
        position_ids = torch.cat(shards, dim=-1)
    group_size = q.size(2) // k.size(2)  # grouped-query attention: consecutive query heads share a kv head
    k, v = (t.repeat_interleave(group_size, dim=2) for t in (k, v))
    if position_ids.dim() == 3:  # mrope layout (channels, b, s): every channel restarts at 0 together
        position_ids = position_ids[0]
    segment = torch.cumsum(position_ids[0] == 0, dim=0)
    length = q.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    mask = causal & (segment[:, None] == segment[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout, scale=scaling
    ).transpose(1, 2)  # (b, s, heads/sp, d)
    if sp > 1:
        out = gather_heads_scatter_seq(out, seq_dim=1, head_dim=2)
    return out.contiguous(), None


def register_ulysses_sdpa() -> str:
    """Register :func:`ulysses_sdpa_attention` with transformers (idempotent); returns its name for
    ``attn_implementation``. No mask function is registered: transformers then passes ``attention_mask=None``."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, ulysses_sdpa_attention)
    return NAME
