"""Tests for ssopd_verl.losses against an independently written float64 reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ssopd_verl.losses import CLIP_MODES, ForwardKLTerms, chunked_clipped_forward_kl, clipped_forward_kl

TAU = 0.05
TEMPERATURES = (0.7, 1.0, 1.5)


# ---------------------------------------------------------------- independent float64 reference


def ref_terms(student, teacher, temperature):
    """(p_T, d) in float64, written out by hand: log-softmax via max-shift, 0 log 0 = 0."""
    z = student.double() / temperature
    u = teacher.detach().double() / temperature
    logp_s = z - z.max(-1, keepdim=True).values
    logp_s = logp_s - logp_s.exp().sum(-1, keepdim=True).log()
    logp_t = u - u.max(-1, keepdim=True).values
    logp_t = logp_t - logp_t.exp().sum(-1, keepdim=True).log()
    p_t = logp_t.exp()
    safe_logp_t = torch.where(p_t > 0, logp_t, torch.zeros_like(logp_t))
    d = p_t * safe_logp_t - p_t * logp_s
    return p_t, d


def ref_loss(student, teacher, tau, clip, temperature):
    _, d = ref_terms(student, teacher, temperature)
    if clip == "pointwise":
        return torch.minimum(d, torch.full_like(d, tau)).sum(-1)
    kl = d.sum(-1)
    return torch.minimum(kl, torch.full_like(kl, tau)) if clip == "token" else kl


def make_logits(seed, n, v, dtype=torch.float64):
    """Rows alternate between flat and peaked teachers; the student is a perturbed teacher, so
    some rows/entries exceed tau (clipping happens) and some do not."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.where(torch.arange(n) % 2 == 0, 0.3, 6.0)[:, None]
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    noise = torch.where(torch.arange(n) % 3 == 0, 0.05, 2.0)[:, None]
    student = teacher + noise * torch.randn(n, v, generator=g, dtype=torch.float64) * scale.sqrt()
    return student.to(dtype), teacher.to(dtype)


def test_reference_matches_kl_div():
    # Sanity check of the hand-written reference itself.
    s, t = make_logits(0, 8, 50)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ref_loss(s, t, TAU, "none", 1.0), expected, rtol=1e-12, atol=1e-14)


def test_data_exercises_both_sides_of_the_clip():
    s, t = make_logits(0, 16, 200)
    _, d = ref_terms(s, t, 1.0)
    assert (d > TAU).any() and (d <= TAU).all(-1).any()  # pointwise: some rows clip, some don't
    kl = d.sum(-1)
    assert (kl > TAU).any() and (kl <= TAU).any()  # token: same


# ---------------------------------------------------------------- clipped_forward_kl


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_values_and_grads(clip, temperature, dtype):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for seed, v in [(0, 50), (1, 128), (2, 300)]:
        s, t = make_logits(seed, 12, v, dtype)
        s.requires_grad_(True)
        out = clipped_forward_kl(s, t, tau=TAU, clip=clip, temperature=temperature)
        assert out.shape == (12,) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        s64 = s.detach().double().requires_grad_(True)
        expected = ref_loss(s64, t.double(), TAU, clip, temperature)
        torch.testing.assert_close(out.double(), expected, **tol)
        w = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        (grad,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), s)
        (expected_grad,) = torch.autograd.grad((expected * w).sum(), s64)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), expected_grad, **tol)


def test_reference_leading_dims_and_half_inputs():
    s, t = make_logits(3, 6, 40)
    out = clipped_forward_kl(s.view(2, 3, 40).bfloat16(), t.view(2, 3, 40).bfloat16())
    assert out.shape == (2, 3) and out.dtype == torch.float32


def test_reference_teacher_gets_no_gradient():
    s, t = make_logits(0, 4, 30)
    s.requires_grad_(True)
    t.requires_grad_(True)
    for clip in CLIP_MODES:
        clipped_forward_kl(s, t, clip=clip, temperature=0.7).sum().backward()
    assert t.grad is None or not t.grad.any()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("clip", CLIP_MODES)
def test_reference_zero_teacher_probability_is_finite(clip):
    s, t = make_logits(4, 5, 20)
    t[:, :7] = float("-inf")  # p_T == 0 on those entries
    s.requires_grad_(True)
    out = clipped_forward_kl(s, t, clip=clip)
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # Same values as the reference's 0 * log 0 = 0 convention.
    torch.testing.assert_close(out, ref_loss(s, t, TAU, clip, 1.0), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- chunked_clipped_forward_kl


def make_chunked_inputs(seed, n, v, h, dtype=torch.float64, bias=False):
    g = torch.Generator().manual_seed(seed)
    # Flat teachers on even rows, peaked on odd rows (hidden-state scale sets the logit scale).
    scale = torch.where(torch.arange(n) % 2 == 0, 0.1, 2.0)[:, None]
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    teacher = hidden @ weight.T + (b if bias else 0)
    student = teacher + torch.randn(n, v, generator=g, dtype=torch.float64) * torch.where(
        torch.arange(n) % 3 == 0, 0.05, 2.0
    )[:, None]
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(student), cast(hidden), cast(weight), cast(b)


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_chunked_matches_reference(clip, temperature):
    n, v, h = 7, 60, 8
    for chunk_size, prescaled, bias in itertools.product((1, 3, n, n + 5), (False, True), (False, True)):
        student, hidden, weight, b = make_chunked_inputs(chunk_size + 10 * bias, n, v, h, bias=bias)
        raw = student.clone().requires_grad_(True)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
        fed = raw / temperature if prescaled else raw
        terms = chunked_clipped_forward_kl(
            fed, hidden, weight, tau=TAU, clip=clip, temperature=temperature,
            student_prescaled=prescaled, lm_head_bias=b, chunk_size=chunk_size,
        )
        assert isinstance(terms, ForwardKLTerms)
        rows = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(chunk_size))
        (terms.loss * rows).sum().backward()

        teacher = (hidden @ weight.T + (b if b is not None else 0)).detach()
        ref_s = student.clone().requires_grad_(True)
        expected = ref_loss(ref_s, teacher, TAU, clip, temperature)
        (expected * rows).sum().backward()
        tol = dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(terms.loss, expected.detach(), **tol)
        torch.testing.assert_close(raw.grad, ref_s.grad, **tol)
        torch.testing.assert_close(terms.loss, clipped_forward_kl(student, teacher, TAU, clip, temperature), **tol)

        # Stop-gradient teacher: nothing reaches hidden states, lm_head weight or bias.
        assert hidden.grad is None and weight.grad is None and (b is None or b.grad is None)

        # Diagnostics against independent computations.
        _, d = ref_terms(student, teacher, temperature)
        torch.testing.assert_close(terms.kl, d.sum(-1), **tol)
        expected_cf = {
            "pointwise": (d > TAU).double().mean(-1),
            "token": (d.sum(-1) > TAU).double(),
            "none": torch.zeros(n, dtype=torch.float64),
        }[clip]
        torch.testing.assert_close(terms.clip_fraction, expected_cf, rtol=0, atol=0)
        assert not terms.kl.requires_grad and not terms.clip_fraction.requires_grad
        if clip != "none":  # the data clip some rows and leave others untouched
            assert (terms.clip_fraction > 0).any() and (terms.clip_fraction == 0).any()


@pytest.mark.parametrize("clip", CLIP_MODES)
def test_chunked_student_rows_equal_gathered_rows(clip):
    """student_rows=idx is student_logits[idx] without the copy: same values, same gradient (zero elsewhere)."""
    n, v, h, m = 5, 40, 6, 12
    student, hidden, weight, _ = make_chunked_inputs(3, m, v, h)
    hidden = hidden[:n]
    idx = torch.tensor([9, 0, 4, 11, 6])
    upstream = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for chunk_size in (1, 2, n):
        fed = student.clone().requires_grad_(True)
        terms = chunked_clipped_forward_kl(fed, hidden, weight, tau=TAU, clip=clip, temperature=0.7,
                                           chunk_size=chunk_size, student_rows=idx)
        (terms.loss * upstream).sum().backward()
        gathered = student.clone().requires_grad_(True)
        expected = ref_loss(gathered[idx], (hidden @ weight.T).detach(), TAU, clip, 0.7)
        (expected * upstream).sum().backward()
        torch.testing.assert_close(terms.loss, expected.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fed.grad, gathered.grad, rtol=1e-10, atol=1e-12)
        untouched = torch.ones(m, dtype=torch.bool)
        untouched[idx] = False
        assert not fed.grad[untouched].any()
    with pytest.raises(ValueError, match="distinct"):
        chunked_clipped_forward_kl(student, hidden, weight, student_rows=torch.tensor([1, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="index"):
        chunked_clipped_forward_kl(student, hidden, weight, student_rows=torch.tensor([1, 2, 3, 4, 12]))


def test_chunked_mixed_dtypes():
    # bf16 lm_head with fp32 hidden states; bf16 student. Results are float32, grad is bf16.
    student, hidden, weight, b = make_chunked_inputs(5, 9, 70, 8, dtype=torch.float32, bias=True)
    s = student.bfloat16().requires_grad_(True)
    w16 = weight.bfloat16()
    terms = chunked_clipped_forward_kl(s, hidden, w16, lm_head_bias=b, chunk_size=4, temperature=0.7)
    assert terms.loss.dtype == terms.kl.dtype == torch.float32
    terms.loss.sum().backward()
    assert s.grad.dtype == torch.bfloat16
    s_ref = s.detach().clone().requires_grad_(True)
    expected = clipped_forward_kl(s_ref, hidden @ w16.float().T + b, temperature=0.7)
    expected.sum().backward()
    torch.testing.assert_close(terms.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_ref.grad)


def test_chunked_float32_matches_float64():
    student, hidden, weight, _ = make_chunked_inputs(6, 10, 300, 16)
    s32 = student.float().requires_grad_(True)
    terms = chunked_clipped_forward_kl(s32, hidden.float(), weight.float(), clip="pointwise", chunk_size=4)
    terms.loss.sum().backward()
    s64 = student.clone().requires_grad_(True)
    expected = ref_loss(s64, hidden @ weight.T, TAU, "pointwise", 1.0)
    expected.sum().backward()
    torch.testing.assert_close(terms.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_chunked_zero_teacher_probability_is_finite():
    student, hidden, weight, b = make_chunked_inputs(7, 5, 20, 4, bias=True)
    b[:6] = float("-inf")
    s = student.clone().requires_grad_(True)
    for clip in CLIP_MODES:
        terms = chunked_clipped_forward_kl(s, hidden, weight, lm_head_bias=b, clip=clip, chunk_size=2)
        (grad,) = torch.autograd.grad(terms.loss.sum(), s)
        assert torch.isfinite(terms.loss).all() and torch.isfinite(terms.kl).all() and torch.isfinite(grad).all()
        s_ref = student.clone().requires_grad_(True)
        expected = ref_loss(s_ref, hidden @ weight.T + b, TAU, clip, 1.0)
        (expected_grad,) = torch.autograd.grad(expected.sum(), s_ref)
        torch.testing.assert_close(terms.loss, expected.detach())
        torch.testing.assert_close(grad, expected_grad)


def test_chunked_empty():
    s = torch.zeros(0, 11, requires_grad=True)
    terms = chunked_clipped_forward_kl(s, torch.zeros(0, 3), torch.randn(11, 3), chunk_size=4)
    assert terms.loss.shape == terms.kl.shape == terms.clip_fraction.shape == (0,)
    terms.loss.sum().backward()
    assert s.grad.shape == (0, 11)


@pytest.mark.parametrize("clip", CLIP_MODES)
def test_chunked_gradcheck(clip):
    student, hidden, weight, b = make_chunked_inputs(8, 4, 6, 3, bias=True)
    s = student.clone().requires_grad_(True)
    # token: tau between the rows' KLs, so both branches are checked.
    kl = ref_terms(student, hidden @ weight.T + b, 1.3)[1].sum(-1).sort().values
    tau = 0.05 if clip != "token" else float(kl[1] + kl[2]) / 2
    fn = lambda x: chunked_clipped_forward_kl(  # noqa: E731
        x, hidden, weight, lm_head_bias=b, tau=tau, clip=clip, temperature=1.3, chunk_size=3
    ).loss
    assert torch.autograd.gradcheck(fn, (s,))


# ---------------------------------------------------------------- memory boundedness


class _OpSizes(TorchDispatchMode):
    """Records the numel of every tensor that an aten op newly allocates (views and in-place ops,
    whose outputs alias an input, are skipped: they take no memory)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.sizes.append(x.numel())
        return out


def test_chunked_memory_is_bounded():
    n, v, h, chunk = 64, 50, 16, 8
    bound = chunk * v  # only chunk-sized tensors (the float32 lm_head weight needs no cast)
    assert n * v > 3 * bound
    student, hidden, weight, b = (x.float() if x is not None else None for x in make_chunked_inputs(9, n, v, h))
    for clip in CLIP_MODES:
        s = student.clone().requires_grad_(True)
        saved = []

        def pack(x):
            saved.append(x)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), _OpSizes() as fwd:
            loss = chunked_clipped_forward_kl(s, hidden, weight, clip=clip, chunk_size=chunk).loss
        # Autograd keeps nothing of size N * V except the student logits themselves.
        assert all(x.numel() < n * v or x is s for x in saved)
        assert max(fwd.sizes) <= bound, max(fwd.sizes)
        with _OpSizes() as bwd:
            (grad,) = torch.autograd.grad(loss.sum(), s)
        # Backward: exactly one (N, V) tensor (the preallocated gradient), everything else chunk-sized.
        big = [x for x in bwd.sizes if x > bound]
        assert big == [n * v], big

    # The probe is real: the plain reference does allocate (N, V) tensors in forward.
    with _OpSizes() as plain:
        clipped_forward_kl(s, hidden @ weight.T)
    assert max(plain.sizes) >= n * v


# ---------------------------------------------------------------- validation


def test_bad_inputs_raise():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    h, w = torch.randn(3, 2), torch.randn(5, 2)
    with pytest.raises(ValueError, match="clip"):
        clipped_forward_kl(s, t, clip="sequence")
    with pytest.raises(ValueError, match="clip"):
        chunked_clipped_forward_kl(s, h, w, clip="Pointwise")
    for tau in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            clipped_forward_kl(s, t, tau=tau)
        with pytest.raises(ValueError, match="tau"):
            chunked_clipped_forward_kl(s, h, w, tau=tau)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            clipped_forward_kl(s, t, temperature=temperature)
        with pytest.raises(ValueError, match="temperature"):
            chunked_clipped_forward_kl(s, h, w, temperature=temperature)
    with pytest.raises(ValueError, match="shape"):
        clipped_forward_kl(s, torch.randn(3, 6))
    with pytest.raises(ValueError, match="shape"):
        chunked_clipped_forward_kl(s, torch.randn(4, 2), w)  # N mismatch
    with pytest.raises(ValueError, match="shape"):
        chunked_clipped_forward_kl(s, h, torch.randn(6, 2))  # V mismatch
    with pytest.raises(ValueError, match="shape"):
        chunked_clipped_forward_kl(s, h, torch.randn(5, 3))  # H mismatch
    with pytest.raises(ValueError, match="bias"):
        chunked_clipped_forward_kl(s, h, w, lm_head_bias=torch.randn(4))
    with pytest.raises(ValueError):
        chunked_clipped_forward_kl(s.unsqueeze(0), h, w)  # (1, N, V) must be flattened by the caller
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_clipped_forward_kl(s, h, w, chunk_size=0)
