r"""Clipped full-vocabulary forward KL for Self-Supervised On-Policy Distillation.

Pure torch (no verl import), so it can be tested and reused on its own.

Math
----
At a response position ``t`` with student logits ``s`` and teacher logits ``u`` (both divided by the
same temperature ``T``, which may differ from position to position: ``z = s / T``), let ``p_S = softmax(z)``,
``p_T = softmax(u / T)`` and

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

All three are ``p_S[j] * sum_v w[v] - w[j]`` with the teacher weights ``w = p_T * m`` (``m`` = per-entry
mask, per-row flag, or 1). dl/ds = dl/dz / T when the student logits were scaled here. In pointwise mode a
clipped entry (m[j] = 0) loses its "-p_T[j]" pull but keeps the "+p_S[j] * ..." push, i.e. the gradient on a
clipped logit can point the wrong way (Huang et al. 2026); that is why the mode is switchable. At a tie
``d == tau`` the entry counts as not clipped, matching ``torch.clamp``'s subgradient.

How much clipping happens is reported as the *clipped mass*, the share of the teacher's probability that sits
in clipped entries: pointwise ``sum_v p_T[v] * 1[d[v] > tau]``; token ``1[sum_v d[v] > tau]``; none 0. (The
share of vocabulary *entries* clipped, an earlier metric, reads ~0 for any 152k vocabulary and says nothing.)

Which way the student moves. A gradient-descent step on the logits moves ``z`` by ``-eta g`` (``g = dl/dz``; a step
on the unscaled logits ``s = T z`` moves ``z`` by ``-eta g / T**2``, the same direction), which changes the student's
log-probabilities (at the loss temperature) to first order by

    Delta_j = d log p_S[j] = -eta (g_j - c),   c = sum_v p_S[v] g_v     (d log p_S[j] / d z_k = delta_jk - p_S[k])

The logit's own direction (the sign of ``-g_j``) does not decide it: under the softmax a logit pushed down still gains
probability when the p_S-weighted mean logit is pushed down more (``0 < g_j < c``). With ``g = p_S W - w`` (``W =
sum_v w[v]``), ``c = W sum_v p_S[v]**2 - sum_v p_S[v] w[v]``. The exact forward KL's step is the same with ``w = p_T``
(``W = sum_v p_T[v]``, i.e. 1). An entry is *reversed* when the configured loss's step lowers its log-probability
(``Delta_j < 0``, i.e. ``g_j > c``) while the exact forward KL's step would raise it (``Delta_j > 0``); both strict.
Only that direction counts: it moves the student away from what the teacher asks for (the converse -- the loss raising
an entry the exact KL would lower, the student overshooting -- is not counted). Two per-position diagnostics:
``teacher_argmax_reversed`` (1.0 when the teacher's most likely token is reversed) and ``reversed_teacher_mass``
(``sum_v p_T[v]`` over the reversed entries). It is a first-order statement about a step on the logits of this one
position; the optimiser moves shared parameters, so the real change after an update also depends on every other
position (scripts/clip_direction_check.py measures that). Closed forms: with ``clip="none"`` the step is the exact
KL's, with ``"token"`` it is the exact KL's or 0 (a clipped row): nothing is ever reversed. With ``"pointwise"`` a
clipped entry's logit is always pushed down (``g_j = p_S[j] W >= 0``) although the KL wants it up (a clipped entry has
``d[j] > tau > 0``, so ``p_T[j] > p_S[j]``), but whether its log-probability falls depends on ``c``; unclipped entries
can be reversed too, through ``c``. So the reversed entries are computed per entry, from ``p_S``, ``p_T``, ``w`` and
five row sums, in the same pass as the gradient (no extra (rows, V) buffer). With ``topk`` the same is computed for
the k + 1 coarse entries under the step on the full logits: a top-k entry's log-probability, and the tail bucket's
log-mass ``log sum_tail p_S``, whose change is ``-(h - c)`` with ``h = sum_tail p_S[v] g_v / sum_tail p_S`` the tail's
p_S-weighted mean gradient; the comparison step is the unclipped loss of the same approximation (so ``"token"`` and
``"none"`` again never reverse). The tests check all of it against autograd (the directional derivative of log_softmax
along the loss's gradient step), including positions where the logit's direction and the log-probability's disagree.

A position whose teacher logits hold a NaN or +inf (or no finite entry at all) has no teacher distribution:
its loss is 0, its gradient is 0, and it is flagged (``teacher_nonfinite``) rather than poisoning the batch.

Top-k approximation (``topk=k``, off by default)
------------------------------------------------
Keep the teacher's k most likely entries ``K`` and lump the rest into one tail bucket, for both sides:
``P_T = (p_T[K], 1 - sum p_T[K])``, ``P_S = (p_S[K], 1 - sum p_S[K])`` (tail masses summed over the tail
entries, not as 1 - sum), and apply the same per-entry formula and clip to these k + 1 entries. Unclipped, this
is the exact forward KL between the two distributions *coarsened* to the partition {each of K, the rest}: by
the data-processing inequality it never exceeds the full KL, and it equals it when the student is proportional
to the teacher on the tail. It ignores how the mass is spread *within* the tail (the student is only asked to
put the right total mass there), so it approximates well when both sides have little mass outside K, and it
misses any disagreement inside the tail. With pointwise clipping the tail bucket is one entry: lumping ~V small
terms, each far below tau in the exact loss, it is often above tau and then clipped as a whole, so pointwise
top-k can differ from exact pointwise far more than the unclipped KLs do (docs/performance.md measures both).
Gradient, with w = P_T * m over the k + 1 entries, W = sum w and a = w_tail / P_S[tail]:

    dl/dz_j = p_S[j] * W - w_j                      for j in K
    dl/dz_j = p_S[j] * (W - a)                      for j in the tail

(``k = V`` is the exact loss; SDPO distils top-100 entries plus a tail bucket.)

How it is computed (chunked_clipped_forward_kl)
-----------------------------------------------
A plain implementation materialises several (N, V) float32 tensors (teacher logits, both log-probabilities,
d, and everything autograd saves): with V ~ 152k and N = 2048 that is ~1.2 GB per tensor.
:func:`chunked_clipped_forward_kl` takes the teacher's *final hidden states* and the lm_head weight and builds
teacher logits ``chunk_size`` rows at a time. Because the loss is a sum over rows with a closed-form gradient,
the gradient w.r.t. the student logits is computed in the same pass (as Liger's chunked distillation losses
do) and written into one preallocated (N, V) tensor in the student's dtype, one row per *distilled* position
(``student_rows`` picks them out of an (M, V) micro-batch: rows that are not distilled get no buffer); backward
only multiplies each row by its upstream gradient, in place (so it runs once per forward call). No teacher logit
is ever recomputed and autograd saves nothing of size (M, V). Besides that gradient, the pass holds a fixed set
of (chunk_size, V) work buffers (about 2.25 float32 ones; 3.25 when the student is bf16).

Where the gradient goes. Standalone, backward returns it as the gradient of ``student_logits`` (an (M, V)
tensor then exists at backward time, zero outside the distilled rows). Inside a trainer whose own loss also
reads the logits (verl's log-probabilities for the policy loss), that would be a second (M, V) buffer next to the
policy loss's own logit gradient, summed afterwards. With ``gradient_sink`` (the tensor whose storage holds the
student logits, e.g. the engine's logits before the hook's view) the distilled rows are instead added, in
place, into the gradient that the sink receives from the other loss: a hook on the sink
(``Tensor.register_hook``, autograd's public hook) runs after every consumer of the logits has contributed, and
the loss's own backward contributes nothing of size (M, V). The extra memory of the distillation term is then
the (N, V) buffer of the distilled rows only. If the sink receives no gradient from another loss (nothing else
reads the logits), the end of the backward pass raises rather than drop the term silently.

Teacher logits are projected exactly as the student's are (``hidden @ W.T + b`` in the inputs' own dtype, so
bf16 stays bf16 for the matmul), *then* upcast to float32 (float64 if an input is) for the softmax/KL math;
the temperature divides the upcast logits, never the hidden states. With the same hidden states on both sides
the KL is then ~0 instead of the ~2e-3 that a float32 teacher against a bf16 student shows. When the student
logits arrive already divided by the temperature (``student_prescaled``: verl's engine computes
``logits / T.to(logits.dtype)`` in the logits' dtype, so with bf16 logits T = 0.7 becomes 0.69921875 and the
quotient is rounded to bf16), the teacher logits are divided the same way, in the student's dtype by the
temperature rounded to it, before the upcast: a teacher given the student's own context then gives KL 0 at any
temperature, not a rounding bias on every token.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CLIP_MODES = ("pointwise", "token", "none")

# Vocabulary rows of the lm_head weight cast at once when its dtype differs from the projection dtype
# (e.g. a bf16 weight against float32 hidden states): bounds the cast copy to ~2**24 elements instead of
# a full (V, H) copy of the weight.
_WEIGHT_CAST_ELEMENTS = 2**24

Temperature = Union[float, torch.Tensor]


def _validate(tau: float, clip: str, temperature: Temperature) -> None:
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    # `not (x > 0)` also rejects NaN.
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() and not bool(((temperature > 0) & torch.isfinite(temperature)).all()):
            raise ValueError("temperature must be finite and > 0 on every row")
    elif not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")


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
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """Reference per-position clipped forward KL (materialises every (..., V) intermediate).

    ``temperature`` is a float or a tensor of shape ``logits.shape[:-1]`` (one per position); both sides are
    divided by it. Returns a tensor of shape ``logits.shape[:-1]`` in float32 (float64 if an input is
    float64), differentiable w.r.t. ``student_logits`` only: the teacher is detached.
    """
    _validate(tau, clip, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = _compute_dtype(student_logits.dtype, teacher_logits.dtype)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(device=student_logits.device, dtype=dtype).unsqueeze(-1)
    logp_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    logp_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    _, d = _kl_terms(logp_t, logp_s)
    return _clip_loss(d, tau, clip)


class ForwardKLTerms(NamedTuple):
    """Per teacher row (N,) outputs of :func:`chunked_clipped_forward_kl`.

    Float fields are float32 (float64 if an input is float64); all but ``loss`` are detached. Rows flagged
    in ``teacher_nonfinite`` read 0 in every float field (and get a zero gradient): mask them out of means.
    """

    loss: torch.Tensor  # clipped loss l (see module docstring); the only field with a gradient
    kl: torch.Tensor  # unclipped forward KL sum_v d[v] (over the k + 1 entries with topk)
    clipped_mass: torch.Tensor  # teacher probability in clipped entries (pointwise) / 1.0 if clipped (token) / 0
    # "Which way" (module docstring): 1.0 where the loss's gradient step on the logits lowers log p_S of the
    # teacher's most likely token (to first order) while the exact forward KL's step would raise it; the teacher
    # probability in all entries so reversed.
    teacher_argmax_reversed: torch.Tensor
    reversed_teacher_mass: torch.Tensor
    teacher_nonfinite: torch.Tensor  # bool: the teacher logits had a NaN or +inf, or no finite entry
    # Only with sampled_ids (else None), at the loss temperature:
    teacher_logp_sampled: Optional[torch.Tensor] = None  # log p_T[sampled token]
    student_logp_sampled: Optional[torch.Tensor] = None  # log p_S[sampled token]
    teacher_argmax_differs: Optional[torch.Tensor] = None  # 1.0 where argmax_v p_T != sampled token, else 0.0
    teacher_argmax: Optional[torch.Tensor] = None  # int64 argmax_v p_T (-1 on teacher_nonfinite rows)


class _GradientSink:
    """Adds the distilled rows' gradient into the gradient another loss gives ``tensor`` (see the module
    docstring): a hook on ``tensor`` runs once every consumer of it has contributed, and adds ``rows`` of the
    scaled (N, V) buffer in place. ``pending`` between the loss's backward and the hook; the end of the backward
    pass checks it, so a term that never reached the logits fails loudly instead of vanishing."""

    def __init__(self, tensor: torch.Tensor, rows: Optional[torch.Tensor], width: int):
        self.rows, self.width, self.grad = rows, width, None
        self.handle = tensor.register_hook(self._add)

    def deliver(self, grad: torch.Tensor) -> None:
        """Called from the loss's backward with the scaled (N, V) gradient."""
        self.grad = grad
        torch.autograd.Variable._execution_engine.queue_callback(self._check)

    def _add(self, grad: torch.Tensor):
        if self.grad is None:  # the loss was not part of this backward: nothing to add
            return None
        if grad is None:  # no other loss gave the logits a gradient (autograd cannot take one from a hook): _check
            return None
        # The gradient the other loss produced for the logits is a fresh buffer that only this node reads next
        # (log_softmax / gather backward): add into it. An expanded or strided one is made dense first.
        grad = grad.contiguous()
        flat = grad.view(-1, self.width)
        update = self.grad if self.grad.dtype == flat.dtype else self.grad.to(flat.dtype)
        if self.rows is None:
            flat.add_(update)
        else:
            flat.index_add_(0, self.rows, update)
        self.grad = None
        self.handle.remove()
        return grad

    def _check(self) -> None:
        if self.grad is not None:
            self.grad = None
            raise RuntimeError(
                "chunked_clipped_forward_kl: the distillation gradient was computed but gradient_sink received no "
                "gradient in this backward pass, so it could not be added; pass no gradient_sink when nothing "
                "else reads the student logits"
            )


class _PrecomputedGradient(torch.autograd.Function):
    """Attaches a gradient computed in the forward pass to the per-row loss.

    backward scales row ``i`` of the stored (N, V) gradient by ``grad_loss[i]`` *in place* (so it can run only
    once per forward), then either hands it to the gradient sink (and returns no gradient for the logits) or
    returns it as the logits' gradient: the buffer itself when every row is distilled (a leaf's ``.grad`` takes it
    without a copy), else an (M, V) tensor with the distilled rows filled in.
    """

    @staticmethod
    def forward(ctx, student, loss, grad_rows, rows, block_rows, sink):
        ctx.grad_rows, ctx.rows, ctx.shape, ctx.block_rows, ctx.sink = grad_rows, rows, student.shape, block_rows, sink
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad = ctx.grad_rows
        if grad is None:
            raise RuntimeError(
                "chunked_clipped_forward_kl: its gradient was precomputed and is consumed by the first backward; "
                "backward through the same call twice (retain_graph=True) is not supported"
            )
        ctx.grad_rows = None  # drop our reference: autograd may then adopt the buffer as `.grad`
        scale = grad_loss.unsqueeze(-1)
        if scale.dtype == grad.dtype:
            grad.mul_(scale)
        else:
            # E.g. a bf16 gradient times a float32 scale (multiplied in float32, rounded to bf16). By row blocks:
            # on CPU an in-place op of mixed dtypes works on float32 copies of its whole operand (two (N, V)
            # float32 temporaries at once).
            for lo in range(0, grad.shape[0], ctx.block_rows):
                grad[lo : lo + ctx.block_rows].mul_(scale[lo : lo + ctx.block_rows])
        if ctx.sink is not None:
            ctx.sink.deliver(grad)
            return None, None, None, None, None, None
        if ctx.rows is not None:
            grad = grad.new_zeros(ctx.shape).index_copy_(0, ctx.rows, grad)
        return grad, None, None, None, None, None


class _Scratch:
    """(chunk_size, V) work buffers, allocated once per call and reused by every chunk.

    Reuse bounds the peak to a fixed set of buffers, and on CPU it also saves time: glibc maps and unmaps
    blocks this large on every allocation, so a fresh tensor per chunk would page-fault it in every time.
    """

    def __init__(self, rows: int, cols: int, device: torch.device):
        self.rows, self.cols, self.device, self.buffers = rows, cols, device, {}

    def get(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.empty(self.rows * self.cols, dtype=dtype, device=self.device)
        return buf[: rows * self.cols].view(rows, self.cols)

    def get_as(self, name: str, rows: int, dtype: torch.dtype, as_dtype: torch.dtype) -> torch.Tensor:
        """The same storage as ``get(name, rows, dtype)``, reinterpreted as ``as_dtype`` (not larger than dtype)."""
        flat = self.get(name, rows, dtype).view(-1).view(torch.uint8)
        return flat[: rows * self.cols * as_dtype.itemsize].view(as_dtype).view(rows, self.cols)


def _project(hidden, weight, bias, out: torch.Tensor) -> torch.Tensor:
    """Teacher logits ``hidden @ weight.T + bias`` into ``out``, computed in ``out.dtype`` (the promoted dtype of
    the three inputs).

    When all three have that dtype, these are the kernels of the student's lm_head (F.linear = addmm / mm), so
    equal hidden states give equal logits. Otherwise the weight is cast a block of vocabulary rows at a time,
    never as a whole (V, H) copy.
    """
    dtype = out.dtype
    hidden = hidden.to(dtype)
    if weight.dtype == dtype and (bias is None or bias.dtype == dtype):
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    block = max(1, _WEIGHT_CAST_ELEMENTS // max(1, weight.shape[1]))
    for lo in range(0, weight.shape[0], block):
        hi = min(lo + block, weight.shape[0])
        out[:, lo:hi] = F.linear(hidden, weight[lo:hi].to(dtype), None if bias is None else bias[lo:hi].to(dtype))
    return out


def _logsumexp(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """(rows, 1) logsumexp of ``x`` over the last dim, with ``work`` (same shape) as scratch instead of the
    (rows, V) temporary torch.logsumexp allocates. A row holding NaN or +inf (or only -inf) gives a non-finite
    result."""
    shift = x.amax(-1, keepdim=True)
    return torch.sub(x, shift, out=work).exp_().sum(-1, keepdim=True).log_().add_(shift)


def _chunk_loss(logp_t, logp_s, work, mask, tau: float, clip: str, topk: Optional[int], need_grad: bool, argmax):
    """Loss terms and gradient for one chunk, given both sides' log-probabilities (rows, V).

    Works in place: ``logp_t`` and the scratch buffers ``work`` (float, like logp_t) and ``mask`` (bool; only
    needed by the exact pointwise clip) are consumed; ``logp_s`` is turned into the gradient dl/dz (when
    ``need_grad``, and always with the pointwise clip, whose "Which way" reads it). Both log-probabilities must be
    clamped to finite values (so that 0 * (log 0 - log 0) reads 0, not NaN). ``argmax``: (rows,) the teacher's
    most likely entry.
    Returns (loss, kl, clipped_mass, argmax_reversed, reversed_mass, grad_or_None) (module docstring, "Which way").
    """
    if topk is not None:
        return _chunk_loss_topk(logp_t, logp_s, tau, clip, topk, need_grad)
    a = argmax.unsqueeze(-1)
    p_t = torch.exp(logp_t, out=work)
    d = logp_t.sub_(logp_s).mul_(p_t)  # d = p_T (log p_T - log p_S), in logp_t's storage
    kl = d.sum(-1)
    if clip != "pointwise":
        loss = kl.clamp(max=tau) if clip == "token" else kl
        clipped_mass = (kl > tau).to(kl.dtype) if clip == "token" else torch.zeros_like(kl)
        weights = p_t
        if clip == "token":  # m = 1[kl <= tau] per row
            weights.mul_((kl <= tau).unsqueeze(-1))
        # The step is the exact KL's or 0: nothing is reversed (module docstring, "Which way").
        argmax_reversed, reversed_mass = torch.zeros_like(kl), torch.zeros_like(kl)
        grad = logp_s.exp_().mul_(weights.sum(-1, keepdim=True)).sub_(weights) if need_grad else None
        return loss, kl, clipped_mass, argmax_reversed, reversed_mass, grad

    clipped = torch.gt(d, tau, out=mask)
    loss = d.clamp_(max=tau).sum(-1)
    # p_T on the clipped entries, written into d's storage (no longer needed). Not `p_t * clipped`: mixing
    # dtypes would first cast the mask to a float (rows, V) copy.
    clipped_mass = torch.where(clipped, p_t, p_t.new_zeros(()), out=d).sum(-1)
    # Which way (module docstring): first-order change of log p_S[v] under each step, -(g_v - c). Exact KL first
    # (w = p_T), into d's storage: p_T where its step raises log p_S[v] (p_T - P p_S + c_KL > 0), else 0.
    p_s = logp_s.exp_()
    s2 = _rowdot(p_s, p_s)
    total_t = p_t.sum(-1, keepdim=True)
    c_kl = total_t * s2 - _rowdot(p_s, p_t)
    raised = torch.add(p_t, c_kl, out=d).addcmul_(p_s, total_t, value=-1).clamp_(min=0).sign_().mul_(p_t)
    weights = p_t.masked_fill_(clipped, 0)  # w = p_T * m
    total = weights.sum(-1, keepdim=True)
    c = total * s2 - _rowdot(p_s, weights)
    grad = p_s.mul_(total).sub_(weights)  # dl/dz = p_S * sum_v w[v] - w, in logp_s's storage
    lowered = torch.gt(grad, c, out=mask)  # the loss's step lowers log p_S[v]: g_v > c
    argmax_reversed = (lowered.gather(-1, a) & (raised.gather(-1, a) > 0)).squeeze(-1).to(kl.dtype)
    reversed_mass = raised.masked_fill_(lowered.logical_not_(), 0).sum(-1)
    return loss, kl, clipped_mass, argmax_reversed, reversed_mass, grad if need_grad else None


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows, 1) row-wise dot products of two (rows, V) tensors, as a batched matrix product: no (rows, V)
    temporary, unlike ``(x * y).sum(-1)``."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1, 1)


def _chunk_loss_topk(logp_t, logp_s, tau, clip, k, need_grad):
    """The top-k + tail-bucket approximation (module docstring); same contract as :func:`_chunk_loss`."""
    top_logp_t, idx = logp_t.topk(k, dim=-1, sorted=False)
    top_logp_s = logp_s.gather(-1, idx)
    # Tail masses summed directly over the tail entries (1 - sum(top) would cancel catastrophically when the
    # top-k hold nearly all the mass): zero the top-k entries in place, sum, and (student) restore them.
    tail_t = logp_t.exp_().scatter_(-1, idx, 0).sum(-1, keepdim=True)
    p_s = logp_s.exp_()
    top_p_s = top_logp_s.exp()
    tail_s = p_s.scatter_(-1, idx, 0).sum(-1, keepdim=True)
    tail_s2 = _rowdot(p_s, p_s) if clip == "pointwise" else None  # sum_tail p_S**2, for "Which way"
    p_s.scatter_(-1, idx, top_p_s)

    # The k + 1 coarse entries (last = tail), through the reference's own formulas.
    logp_t_k = torch.cat([top_logp_t, tail_t.log()], dim=-1)
    logp_s_k = torch.cat([top_logp_s, tail_s.log()], dim=-1)
    p_t_k, d = _kl_terms(logp_t_k, logp_s_k)
    kl = d.sum(-1)
    loss = _clip_loss(d, tau, clip)
    if clip == "pointwise":
        clipped = d > tau
        clipped_mass = (p_t_k * clipped).sum(-1)
        weights = p_t_k.masked_fill(clipped, 0)
    elif clip == "token":
        clipped_mass = (kl > tau).to(kl.dtype)
        weights = p_t_k * (kl <= tau).unsqueeze(-1)
    else:
        clipped_mass = torch.zeros_like(kl)
        weights = p_t_k
    total = weights.sum(-1, keepdim=True)
    if clip == "pointwise":
        # Which way, for the k + 1 coarse entries under the step on the full logits (module docstring): lowered by
        # the loss's step while the unclipped top-k loss's step (w = P_T) would raise it.
        p_s_k = torch.cat([top_p_s, tail_s], dim=-1)
        change = lambda w, total: _coarse_logp_change(p_s_k, tail_s2, w, total)  # noqa: E731
        against = (change(weights, total) < 0) & (change(p_t_k, p_t_k.sum(-1, keepdim=True)) > 0)
        top1 = top_logp_t.argmax(-1, keepdim=True)  # the teacher's argmax is its top-1 entry
        argmax_reversed = against[:, :-1].gather(-1, top1).squeeze(-1).to(kl.dtype)
        reversed_mass = (p_t_k * against).sum(-1)
    else:  # the step is the unclipped loss's or 0: nothing is reversed
        argmax_reversed, reversed_mass = torch.zeros_like(kl), torch.zeros_like(kl)
    grad = None
    if need_grad:
        # a = w_tail / P_S[tail]; 0 when the tail has no student mass (then w_tail * p_S[j] / P_S[tail] is 0/0
        # on every tail entry, whose p_S[j] are all 0).
        tail_w = weights[:, -1:]
        a = torch.where(tail_s > 0, tail_w / tail_s.clamp(min=torch.finfo(tail_s.dtype).tiny), 0.0)
        grad = p_s.mul_(total - a).scatter_add_(-1, idx, top_p_s * a - weights[:, :-1])
    return loss, kl, clipped_mass, argmax_reversed, reversed_mass, grad


def _coarse_logp_change(p_s_k, tail_s2, w, total):
    """Per unit step, the first-order change of log P_S of each of the k + 1 coarse entries when the full logits
    take a gradient step of the top-k loss with coarse weights ``w`` (sum ``total``): ``c - h``, with ``h`` the
    entry's p_S-weighted mean logit gradient (``g_j = p_S[j] W - w_j`` for a top-k entry; ``p_S[v] (W - a)`` on
    every tail entry, a = w_tail / P_S[tail], so h_tail = (W - a) sum_tail p_S**2 / P_S[tail]) and c = sum P_S h."""
    tail_s = p_s_k[:, -1:]
    tiny = torch.finfo(tail_s.dtype).tiny
    a = torch.where(tail_s > 0, w[:, -1:] / tail_s.clamp(min=tiny), 0.0)
    h_tail = torch.where(tail_s > 0, (total - a) * tail_s2 / tail_s.clamp(min=tiny), 0.0)
    h = torch.cat([p_s_k[:, :-1] * total - w[:, :-1], h_tail], dim=-1)
    return (p_s_k * h).sum(-1, keepdim=True) - h


_ALWAYS = ("loss", "kl", "clipped_mass", "teacher_argmax_reversed", "reversed_teacher_mass")  # _chunk_loss's order
_DIAGNOSTICS = ("teacher_logp_sampled", "student_logp_sampled", "teacher_argmax_differs")


def _forward_pass(student, hidden, weight, bias, rows, temperature, prescaled, sampled_ids, tau, clip, chunk_size,
                  topk, need_grad):
    """The whole loss in one pass over teacher-row chunks, without autograd. Returns (fields dict, grad or None).

    Memory besides the gradient: the (chunk_size, V) buffers of _Scratch -- teacher log-probs (later d), one
    scratch (later p_T, then w), a bool mask, and the student log-probs when they cannot live in the gradient.
    """
    v = student.shape[1]
    n = hidden.shape[0]
    device = student.device
    dtype = _compute_dtype(student.dtype, hidden.dtype, weight.dtype, *(() if bias is None else (bias.dtype,)))
    proj_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        proj_dtype = torch.promote_types(proj_dtype, bias.dtype)
    # Finite stand-in for log 0: keeps d = p_T (log p_T - log p_S) = 0 * finite = 0 where p_T = 0, in place.
    log_zero = torch.finfo(dtype).min
    per_row = isinstance(temperature, torch.Tensor)
    if per_row:
        temperature = temperature.to(device=device, dtype=dtype)

    out = {name: torch.zeros(n, dtype=dtype, device=device) for name in _ALWAYS}
    out["teacher_nonfinite"] = torch.zeros(n, dtype=torch.bool, device=device)
    if sampled_ids is not None:
        out.update({name: torch.zeros(n, dtype=dtype, device=device) for name in _DIAGNOSTICS})
        out["teacher_argmax"] = torch.full((n,), -1, dtype=torch.int64, device=device)

    # The gradient w.r.t. the distilled student rows, (N, V) in the student's dtype: the only allocation that
    # grows with N. Rows of the micro-batch that are not distilled have none.
    grad = torch.empty((n, v), dtype=student.dtype, device=device) if need_grad else None
    # When the gradient is a float32/64 buffer of the compute dtype, each chunk's student log-probs are built
    # directly in its rows (they become the gradient there): one (chunk, V) buffer less.
    in_grad = grad is not None and grad.dtype == dtype
    scratch = _Scratch(min(chunk_size, n), v, device)

    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        c = hi - lo
        t = temperature[lo:hi].unsqueeze(-1) if per_row else temperature
        scaled = per_row or t != 1.0
        work = scratch.get("work", c, dtype)

        # Teacher: project like the student's lm_head (in `work`, reinterpreted, if that dtype is narrower), then
        # upcast, then temperature -- or, for a prescaled student, temperature in the student's dtype first, as the
        # engine scaled the student (module docstring).
        logp_t = scratch.get("teacher", c, dtype)
        if proj_dtype == dtype:
            projected = _project(hidden[lo:hi], weight, bias, out=logp_t)
        else:
            projected = _project(hidden[lo:hi], weight, bias, out=scratch.get_as("work", c, dtype, proj_dtype))
        if scaled and prescaled and student.dtype != dtype:
            if projected.dtype != student.dtype:
                projected = projected.to(student.dtype)
            projected.div_(torch.as_tensor(t, dtype=student.dtype, device=device))
        if projected is not logp_t:
            logp_t.copy_(projected)
        if scaled and not (prescaled and student.dtype != dtype):
            logp_t.div_(t)
        lse_t = _logsumexp(logp_t, work)
        # NaN or +inf logits make lse NaN/+inf; a row of -inf only makes it NaN too. Either way the row has no
        # teacher distribution: run it as uniform (finite arithmetic) and zero its outputs and gradient below.
        bad = ~torch.isfinite(lse_t)
        logp_t.masked_fill_(bad, 0.0).sub_(torch.where(bad, math.log(v), lse_t))

        # Student rows of this chunk, as float log-probabilities at the same temperature.
        if in_grad:
            logp_s = grad[lo:hi]
            if rows is None:
                logp_s.copy_(student[lo:hi])
            else:
                torch.index_select(student, 0, rows[lo:hi], out=logp_s)
        else:
            logp_s = scratch.get("student", c, dtype)
            if rows is None:
                logp_s.copy_(student[lo:hi])
            elif student.dtype == dtype:
                torch.index_select(student, 0, rows[lo:hi], out=logp_s)
            else:
                logp_s.copy_(student.index_select(0, rows[lo:hi]))
        if not prescaled and scaled:
            logp_s.div_(t)
        logp_s.sub_(_logsumexp(logp_s, work))

        argmax = logp_t.argmax(-1)
        if sampled_ids is not None:  # diagnostics, before the clamp below turns log 0 into a finite number
            ids = sampled_ids[lo:hi].unsqueeze(-1)
            out["teacher_logp_sampled"][lo:hi] = logp_t.gather(-1, ids).squeeze(-1)
            out["student_logp_sampled"][lo:hi] = logp_s.gather(-1, ids).squeeze(-1)
            out["teacher_argmax"][lo:hi] = argmax
            out["teacher_argmax_differs"][lo:hi] = (argmax != ids.squeeze(-1)).to(dtype)
        logp_t.clamp_(min=log_zero)
        logp_s.clamp_(min=log_zero)

        mask = scratch.get("mask", c, torch.bool) if clip == "pointwise" and topk is None else None
        *values, g = _chunk_loss(logp_t, logp_s, work, mask, tau, clip, topk, need_grad, argmax)
        bad = bad.squeeze(-1)
        for name, value in zip(_ALWAYS, values, strict=True):
            out[name][lo:hi] = value.masked_fill(bad, 0.0)
        out["teacher_nonfinite"][lo:hi] = bad
        if sampled_ids is not None:
            for name in _DIAGNOSTICS:
                out[name][lo:hi].masked_fill_(bad, 0.0)
            out["teacher_argmax"][lo:hi].masked_fill_(bad, -1)

        if g is not None:
            g.masked_fill_(bad.unsqueeze(-1), 0.0)
            if not prescaled and scaled:
                g.div_(t)  # dl/ds = dl/dz / T
            if not in_grad:
                grad[lo:hi].copy_(g)  # one rounding to the student's dtype
    return out, grad


def chunked_clipped_forward_kl(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    tau: float = 0.05,
    clip: str = "pointwise",
    temperature: Temperature = 1.0,
    student_prescaled: bool = False,
    lm_head_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    student_rows: Optional[torch.Tensor] = None,
    sampled_ids: Optional[torch.Tensor] = None,
    topk: Optional[int] = None,
    gradient_sink: Optional[torch.Tensor] = None,
) -> ForwardKLTerms:
    """Memory-bounded, one-pass clipped forward KL against teacher logits ``teacher_hidden @ W.T (+ b)``.

    Args:
        student_logits: (N, V) student logits (any float dtype, usually with grad); (M, V) with ``student_rows``.
        teacher_hidden: (N, H) final hidden states of the teacher forward (stop-gradient). Pass them as the
            model produced them (e.g. bf16): the teacher logits are projected in the inputs' dtype, exactly like
            the student's lm_head, and upcast afterwards. Do not pre-divide them by the temperature.
        lm_head_weight: (V, H) output embedding (stop-gradient). If its dtype differs from the hidden states',
            the projection runs in ``torch.promote_types`` of the two (the weight is cast in vocabulary blocks).
        tau, clip: as in :func:`clipped_forward_kl`.
        temperature: a float, or an (N,) tensor with one temperature per teacher row. It divides the teacher
            logits (after projection and upcast) and, unless ``student_prescaled``, the student row it is
            compared with.
        student_prescaled: the student logits are already divided by the temperature as verl's engine does it,
            ``logits / T.to(logits.dtype)`` in the logits' dtype; the teacher logits are then divided the same way
            (module docstring), so that equal hidden states give equal scaled logits.
        lm_head_bias: optional (V,) bias.
        chunk_size: teacher rows per chunk. Memory besides the (N, V) gradient of the distilled rows: about
            2.25 float32 (chunk_size, V) tensors (3.25 with a bf16 student), whatever N is; the time hardly
            depends on it from 64 up. Default 128 (docs/performance.md has the measurements).
        student_rows: optional (N,) distinct indices into the rows of ``student_logits`` (then (M, V), any M):
            teacher row i is compared with student row ``student_rows[i]``. Equals passing
            ``student_logits[student_rows]`` without materialising that copy (or its gradient): verl hands the
            logits of a whole micro-batch, of which only the target's response positions are distilled.
        sampled_ids: optional (N,) long, the token actually sampled at each position; turns on the fields
            ``teacher_logp_sampled``, ``student_logp_sampled`` and ``teacher_argmax_differs`` (same pass).
        topk: None (exact, default) or k in [1, V]: the top-k + tail-bucket approximation of the module
            docstring (its unclipped KL is a lower bound of the exact one; see there for when it is accurate).
        gradient_sink: optional tensor whose storage is exactly ``student_logits``' (same first element, same
            number of elements, both contiguous; e.g. the (1, M, V) or (M, V) tensor ``student_logits`` is a view
            of) and whose gradient another loss also produces: the distilled rows' gradient is added into that
            gradient in place instead of being returned as a second (M, V) tensor (module docstring).

    The gradient w.r.t. ``student_logits`` is computed in this forward call (only when it requires grad and
    grad mode is on) into one (N, V) tensor of its dtype, and ``loss.backward`` only scales it row by row, in
    place: backward can run once per call. No gradient ever reaches the teacher inputs.

    A teacher row whose logits hold a NaN or +inf (or only -inf) is skipped: loss, kl and clipped mass 0, zero
    gradient, flagged in ``teacher_nonfinite``. -inf entries in an otherwise finite row are legitimate
    (p_T = 0 there). Non-finite *student* logits are not screened: they propagate as usual.

    Returns:
        :class:`ForwardKLTerms` of (N,) tensors (see its field comments).
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
    device = student_logits.device
    if student_rows is not None:
        student_rows = student_rows.to(device=device, dtype=torch.long).reshape(-1)
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
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() == 0:
            temperature = float(temperature)
        elif temperature.shape != (n,):
            raise ValueError(f"temperature must be a float or an ({n},) tensor, got shape {tuple(temperature.shape)}")
    else:
        temperature = float(temperature)
    if sampled_ids is not None:
        if sampled_ids.shape != (n,) or sampled_ids.is_floating_point() or sampled_ids.is_complex():
            raise ValueError(f"sampled_ids must be an ({n},) integer tensor, got {sampled_ids.dtype} "
                             f"{tuple(sampled_ids.shape)}")
        sampled_ids = sampled_ids.to(device=device, dtype=torch.long)
        if n and (int(sampled_ids.min()) < 0 or int(sampled_ids.max()) >= v):
            raise ValueError(f"sampled_ids must index the vocabulary of {v} entries")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= v):
        raise ValueError(f"topk must be None or an int in [1, {v}], got {topk!r}")

    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if gradient_sink is not None and not (
        gradient_sink.numel() == student_logits.numel()
        and gradient_sink.data_ptr() == student_logits.data_ptr()
        and gradient_sink.is_contiguous()
        and student_logits.is_contiguous()
    ):
        raise ValueError("gradient_sink must hold exactly student_logits' storage (a contiguous tensor it views)")
    with torch.no_grad():
        out, grad = _forward_pass(
            student_logits.detach(), teacher_hidden.detach(), lm_head_weight.detach(),
            None if lm_head_bias is None else lm_head_bias.detach(), student_rows, temperature,
            bool(student_prescaled), sampled_ids, float(tau), clip, chunk_size, topk, need_grad,
        )
    loss = out.pop("loss")
    if need_grad:
        sink = None if gradient_sink is None else _GradientSink(gradient_sink, student_rows, v)
        loss = _PrecomputedGradient.apply(student_logits, loss, grad, student_rows, chunk_size, sink)
    return ForwardKLTerms(loss=loss, **out)
