"""A CPU stand-in for flash-attn's Triton cross-entropy with ``inplace_backward=True``, the kernel verl's
``logprobs_from_logits`` uses on GPU unless ``VERL_DISABLE_FLASH_ATTN_CE=1``.

What it shares with the kernel (flash_attn.ops.triton.cross_entropy, as verl calls it): forward returns
``(losses, z_losses)`` with ``losses = logsumexp(logits) - logits[label]`` in float32 per row; it keeps the
logits tensor itself for backward, not a copy; backward writes ``(softmax(logits) - onehot(label)) * grad`` into
that very storage, in the logits' dtype, and returns it as the logits' gradient. So after its backward the
logits' values are gone: any other backward that reads the logits afterwards reads the gradient instead. Rows are
processed in blocks, so it holds no float32 logits-sized temporary (as the kernel holds none).

`install(module)` makes verl's dispatch pick it (``verl.utils.torch_functional``'s flash-attn branch), so tests and
benchmarks run verl's own ``logprobs_from_logits`` -> ``logprobs_from_logits_flash_attn`` code path on CPU.
"""

from __future__ import annotations

import os

import torch

BLOCK_ROWS = 256  # rows converted to float32 at a time


class _InplaceCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):
        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for lo in range(0, logits.shape[0], BLOCK_ROWS):
            block = logits[lo : lo + BLOCK_ROWS].float()
            losses[lo : lo + BLOCK_ROWS] = torch.logsumexp(block, -1) - block.gather(
                -1, labels[lo : lo + BLOCK_ROWS, None]).squeeze(-1)  # fmt: skip
        ctx.save_for_backward(logits, labels)  # the tensor itself (a version check would catch others' writes)
        z_losses = torch.zeros_like(losses)  # flash-attn's z-loss term: verl does not use it
        ctx.mark_non_differentiable(z_losses)
        return losses, z_losses

    @staticmethod
    def backward(ctx, grad_losses, _grad_z):
        logits, labels = ctx.saved_tensors
        # Written into the saved logits' storage, as the kernel does (through .data: the kernel writes behind
        # autograd's back too, so a later reader of the logits sees the gradient, not an error).
        out = logits.data
        for lo in range(0, out.shape[0], BLOCK_ROWS):
            block = out[lo : lo + BLOCK_ROWS]
            probs = torch.softmax(block.float(), -1)
            probs.scatter_add_(-1, labels[lo : lo + BLOCK_ROWS, None], -torch.ones_like(probs[:, :1]))
            block.copy_(probs * grad_losses[lo : lo + BLOCK_ROWS, None])
        return out, None


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = False):
    """The kernel's signature and return value (losses, z_losses); only the in-place backward is emulated."""
    if not inplace_backward:
        raise NotImplementedError("the stand-in emulates flash-attn's inplace_backward=True only")
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError("expected contiguous (N, V) logits")
    return _InplaceCrossEntropy.apply(logits, labels)


def install(set_attr=setattr) -> None:
    """Route verl's ``logprobs_from_logits`` to the stand-in. ``set_attr(obj, name, value)``: ``setattr`` in a
    throw-away process, pytest's ``monkeypatch.setattr`` (with ``raising=False``) in a test."""
    import verl.utils.torch_functional as verl_functional

    set_attr(verl_functional, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)  # (sic: verl's spelling)
    set_attr(verl_functional, "cross_entropy_loss", cross_entropy_loss)
    os.environ.pop("VERL_DISABLE_FLASH_ATTN_CE", None)  # the opt-out, read by verl at every call
