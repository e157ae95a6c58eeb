r"""Clipped full-vocabulary forward KL for Self-Supervised On-Policy Distillation.

Pure torch (no verl import), so it can be tested and reused on its own.

Math
----
At a response position ``t`` with student logits ``s`` and teacher logits ``u`` (both divided by the
same temperature ``T``: ``z = s / T``), let ``p_S = softmax(z)``, ``p_T = softmax(u / T)`` and

    d[v] = p_T[v] * (log p_T[v] - log p_S[v])          (forward-KL terms over the whole vocabulary)

with ``d[v] = 0`` where ``p_T[v] == 0`` (the 0 * log 0 = 0 convention; no NaN). Per-position loss:

    clip="pointwise":  l = sum_v min(d[v], tau)         (the paper's default, tau = 0.05)
    clip="token":      l = min(sum_v d[v], tau)
    clip="none":       l = sum_v d[v]                   (plain forward KL)

The teacher is stop-gradient (the same policy with the witness in its context), so only the student
gets a gradient. Since d log p_S[v] / d z_j = delta_vj - p_S[j], we get d d[v] / d z_j =
p_T[v] * (p_S[j] - delta_vj), hence, with the "not clipped" mask m[v] = 1[d[v] <= tau]:

    pointwise:  dl/dz_j = -p_T[j] m[j] + p_S[j] * sum_v p_T[v] m[v]
    token:      dl/dz_j = 1[sum_v d[v] <= tau] * (p_S[j] - p_T[j])
    none:       dl/dz_j = p_S[j] - p_T[j]

and dl/ds = dl/dz / T when the student logits were scaled here. In pointwise mode a clipped entry
(m[j] = 0) loses its "-p_T[j]" pull but keeps the "+p_S[j] * ..." push, i.e. the gradient on a clipped
logit can point the wrong way (Huang et al. 2026); that is why the mode is switchable. At a tie
``d == tau`` the entry counts as not clipped, matching ``torch.clamp``'s subgradient.

Why chunking
------------
A plain implementation materialises several (N, V) float32 tensors (teacher logits, both
log-probabilities, d, and everything autograd saves): with V ~ 152k and N = 2048 that is ~1.2 GB per
tensor. :func:`chunked_clipped_forward_kl` instead takes the teacher's *final hidden states* and the
lm_head weight and builds teacher logits ``chunk_size`` rows at a time, in forward and again in backward
(recomputation instead of storage). Autograd keeps only the inputs; the only (N, V) tensor it creates
is the student-logit gradient, which the caller's backward needs anyway.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CLIP_MODES = ("pointwise", "token", "none")


def _validate(tau: float, clip: str, temperature: float) -> None:
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    # `not (x > 0)` also rejects NaN.
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _kl_terms(logp_t: torch.Tensor, logp_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (p_T, d) with d = p_T (log p_T - log p_S) and d = 0 wherever p_T == 0.

    `where` (not a product) keeps -inf teacher logits from producing 0 * (-inf) = NaN; the masked branch
    also gets a zero gradient, so autograd through this stays finite.
    """
    p_t = logp_t.exp()
    d = torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros((), dtype=p_t.dtype, device=p_t.device))
    return p_t, d


def _clip_loss(d: torch.Tensor, tau: float, clip: str) -> torch.Tensor:
    if clip == "pointwise":
        return d.clamp(max=tau).sum(-1)
    kl = d.sum(-1)
    return kl.clamp(max=tau) if clip == "token" else kl


def clipped_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 0.05,
    clip: str = "pointwise",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reference per-position clipped forward KL (materialises every (..., V) intermediate).

    Returns a tensor of shape ``logits.shape[:-1]`` in float32 (float64 if an input is float64),
    differentiable w.r.t. ``student_logits`` only: the teacher is detached.
    """
    _validate(tau, clip, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = _compute_dtype(student_logits.dtype, teacher_logits.dtype)
    logp_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    logp_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    _, d = _kl_terms(logp_t, logp_s)
    return _clip_loss(d, tau, clip)


class ForwardKLTerms(NamedTuple):
    loss: torch.Tensor  # (N,) per-position clipped loss, differentiable w.r.t. student_logits
    kl: torch.Tensor  # (N,) unclipped sum_v d (detached)
    clip_fraction: torch.Tensor  # (N,) see chunked_clipped_forward_kl (detached)


def _chunk_logprobs(student, hidden, weight, bias, lo, hi, temperature, prescaled, dtype, rows=None):
    """(log p_S, log p_T) for rows lo:hi, both (hi - lo, V) in `dtype`; teacher logits built here.

    `rows` (optional) maps teacher row i to student row rows[i]: only the chunk's student rows are gathered."""
    z = (student[lo:hi] if rows is None else student[rows[lo:hi]]).to(dtype)
    if not prescaled:
        z = z / temperature
    u = hidden[lo:hi].to(dtype) @ weight.T
    if bias is not None:
        u = u + bias
    u = u / temperature
    return F.log_softmax(z, dim=-1), F.log_softmax(u, dim=-1)


class _ChunkedClippedFKL(torch.autograd.Function):
    """Streams over row chunks; saves only its inputs and recomputes teacher probabilities in backward."""

    @staticmethod
    def forward(ctx, student, hidden, weight, bias, rows, tau, clip, temperature, prescaled, chunk_size):
        dtype = _compute_dtype(student.dtype, hidden.dtype, weight.dtype, *(() if bias is None else (bias.dtype,)))
        # One cast of the (V, H) weight per call (a no-op when it already has `dtype`): casting per
        # chunk would repeat it N / chunk_size times. (V, H) is independent of N.
        w, b = weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=dtype, device=student.device)
        kl = torch.empty_like(loss)
        clip_fraction = torch.empty_like(loss)
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            logp_s, logp_t = _chunk_logprobs(student, hidden, w, b, lo, hi, temperature, prescaled, dtype, rows)
            _, d = _kl_terms(logp_t, logp_s)
            kl[lo:hi] = d.sum(-1)
            loss[lo:hi] = _clip_loss(d, tau, clip)
            if clip == "pointwise":
                clip_fraction[lo:hi] = (d > tau).to(dtype).mean(-1)
            elif clip == "token":
                clip_fraction[lo:hi] = (kl[lo:hi] > tau).to(dtype)
            else:
                clip_fraction[lo:hi] = 0
        ctx.save_for_backward(student, hidden, weight, bias, rows)
        ctx.opts = (tau, clip, temperature, prescaled, chunk_size, dtype)
        ctx.mark_non_differentiable(kl, clip_fraction)
        return loss, kl, clip_fraction

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kl, _grad_clip_fraction):
        student, hidden, weight, bias, rows = ctx.saved_tensors
        tau, clip, temperature, prescaled, chunk_size, dtype = ctx.opts
        grad_student = None
        if ctx.needs_input_grad[0]:
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            # The only (M, V) allocation: the result itself, in the student's dtype (rows that are not
            # distilled get zero).
            grad_student = torch.empty_like(student) if rows is None else torch.zeros_like(student)
            scale = grad_loss.to(dtype) if prescaled else grad_loss.to(dtype) / temperature
            for lo in range(0, hidden.shape[0], chunk_size):
                hi = min(lo + chunk_size, hidden.shape[0])
                logp_s, logp_t = _chunk_logprobs(student, hidden, w, b, lo, hi, temperature, prescaled, dtype, rows)
                p_s = logp_s.exp()
                p_t, d = _kl_terms(logp_t, logp_s)
                if clip == "pointwise":
                    kept = p_t * (d <= tau)  # p_T[v] m[v]
                    g = p_s * kept.sum(-1, keepdim=True) - kept
                else:
                    g = p_s - p_t
                    if clip == "token":
                        g = g * (d.sum(-1, keepdim=True) <= tau)
                target = slice(lo, hi) if rows is None else rows[lo:hi]
                grad_student[target] = (g * scale[lo:hi, None]).to(grad_student.dtype)
        # Stop-gradient teacher: never a gradient to hidden states, lm_head weight or bias.
        return grad_student, None, None, None, None, None, None, None, None, None


def chunked_clipped_forward_kl(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    tau: float = 0.05,
    clip: str = "pointwise",
    temperature: float = 1.0,
    student_prescaled: bool = False,
    lm_head_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    student_rows: Optional[torch.Tensor] = None,
) -> ForwardKLTerms:
    """Memory-bounded clipped forward KL against teacher logits ``teacher_hidden @ W.T (+ b)``.

    Args:
        student_logits: (N, V) student logits (any float dtype, usually with grad).
        teacher_hidden: (N, H) final hidden states of the teacher forward (stop-gradient).
        lm_head_weight: (V, H) output embedding (stop-gradient); may differ in dtype from the hidden states.
        tau, clip, temperature: as in :func:`clipped_forward_kl`.
        student_prescaled: the student logits are already divided by ``temperature`` (verl's engine
            hands them so); the teacher logits are always divided here.
        lm_head_bias: optional (V,) bias.
        chunk_size: rows per chunk; peak extra memory is a few (chunk_size, V) tensors.
        student_rows: optional (N,) distinct indices into the rows of ``student_logits`` (then (M, V), any M):
            teacher row i is compared with student row ``student_rows[i]``. Equals passing
            ``student_logits[student_rows]`` without materialising that copy (or its gradient): verl hands the
            logits of a whole micro-batch, of which only the target's response positions are distilled.

    Returns:
        ForwardKLTerms of (N,) tensors in float32 (float64 if an input is float64): ``loss``
        (differentiable w.r.t. ``student_logits``), ``kl`` = unclipped sum_v d, and ``clip_fraction``
        (pointwise: fraction of vocabulary entries with d > tau; token: 1.0 where sum_v d > tau;
        none: 0). ``kl`` and ``clip_fraction`` are detached.
    """
    _validate(tau, clip, temperature)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if student_logits.dim() != 2 or teacher_hidden.dim() != 2 or lm_head_weight.dim() != 2:
        raise ValueError(
            "expected student_logits (N, V), teacher_hidden (N, H), lm_head_weight (V, H); got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_hidden.shape)}, {tuple(lm_head_weight.shape)}"
        )
    m, v = student_logits.shape
    n = teacher_hidden.shape[0]
    if student_rows is not None:
        student_rows = student_rows.to(device=student_logits.device, dtype=torch.long).reshape(-1)
        if student_rows.numel() != n:
            raise ValueError(f"student_rows has {student_rows.numel()} entries for {n} teacher rows")
        if n and (int(student_rows.min()) < 0 or int(student_rows.max()) >= m):
            raise ValueError(f"student_rows must index the {m} student rows")
        if student_rows.unique().numel() != n:
            raise ValueError("student_rows must be distinct")
    elif n != m:
        raise ValueError(
            "shape mismatch: student_logits (N, V), teacher_hidden (N, H), lm_head_weight (V, H) required; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_hidden.shape)}, {tuple(lm_head_weight.shape)}"
        )
    if lm_head_weight.shape != (v, teacher_hidden.shape[1]):
        raise ValueError(
            "shape mismatch: student_logits (N, V), teacher_hidden (N, H), lm_head_weight (V, H) required; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_hidden.shape)}, {tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and lm_head_bias.shape != (v,):
        raise ValueError(f"lm_head_bias must have shape ({v},), got {tuple(lm_head_bias.shape)}")
    loss, kl, clip_fraction = _ChunkedClippedFKL.apply(
        student_logits, teacher_hidden, lm_head_weight, lm_head_bias, student_rows,
        float(tau), clip, float(temperature), bool(student_prescaled), chunk_size,
    )
    return ForwardKLTerms(loss, kl, clip_fraction)
