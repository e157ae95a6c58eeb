"""Tests for ssopd_verl.losses against an independently written float64 reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ssopd_verl.losses as losses
from ssopd_verl.losses import CLIP_MODES, ForwardKLTerms, chunked_clipped_forward_kl, clipped_forward_kl

TAU = 0.05
TEMPERATURES = (0.7, 1.0, 1.5)
FP64 = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- independent float64 reference


def _per_row(temperature):
    return temperature.double().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature


def ref_terms(student, teacher, temperature):
    """(p_T, d) in float64, written out by hand: log-softmax via max-shift, 0 log 0 = 0.
    `temperature`: a float or one value per row."""
    z = student.double() / _per_row(temperature)
    u = teacher.detach().double() / _per_row(temperature)
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


def test_reference_per_row_temperature():
    s, t = make_logits(5, 6, 40)
    temps = torch.tensor([0.5, 0.7, 1.0, 1.3, 2.0, 0.9], dtype=torch.float64)
    for clip in CLIP_MODES:
        s1 = s.clone().requires_grad_(True)
        out = clipped_forward_kl(s1, t, clip=clip, temperature=temps)
        # Row by row with a float temperature gives the same.
        rows = torch.stack([clipped_forward_kl(s[i], t[i], clip=clip, temperature=float(temps[i])) for i in range(6)])
        torch.testing.assert_close(out, rows, **FP64)
        torch.testing.assert_close(out, ref_loss(s, t, TAU, clip, temps), **FP64)


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


def row_temperatures(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64))


def ref_clipped_mass(d, p_t, clip):
    """Share of teacher probability in clipped entries (pointwise), 1.0 if the row is clipped (token), else 0."""
    return {
        "pointwise": (p_t * (d > TAU)).sum(-1),
        "token": (d.sum(-1) > TAU).double(),
        "none": torch.zeros(d.shape[0], dtype=torch.float64),
    }[clip]


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("temperature", TEMPERATURES + ("per_row",))
def test_chunked_matches_reference(clip, temperature):
    n, v, h = 7, 60, 8
    if temperature == "per_row":
        temperature = row_temperatures(n)
    for chunk_size, prescaled, bias in itertools.product((1, 3, n, n + 5), (False, True), (False, True)):
        student, hidden, weight, b = make_chunked_inputs(chunk_size + 10 * bias, n, v, h, bias=bias)
        raw = student.clone().requires_grad_(True)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
        fed = raw / _per_row(temperature) if prescaled else raw
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
        torch.testing.assert_close(terms.loss, expected.detach(), **FP64)
        torch.testing.assert_close(raw.grad, ref_s.grad, **FP64)
        torch.testing.assert_close(terms.loss, clipped_forward_kl(student, teacher, TAU, clip, temperature), **FP64)

        # Stop-gradient teacher: nothing reaches hidden states, lm_head weight or bias.
        assert hidden.grad is None and weight.grad is None and (b is None or b.grad is None)

        # Diagnostics against independent computations.
        p_t, d = ref_terms(student, teacher, temperature)
        torch.testing.assert_close(terms.kl, d.sum(-1), **FP64)
        torch.testing.assert_close(terms.clipped_mass, ref_clipped_mass(d, p_t, clip), **FP64)
        assert terms.teacher_nonfinite.dtype == torch.bool and not terms.teacher_nonfinite.any()
        assert terms.teacher_logp_sampled is terms.student_logp_sampled is terms.teacher_argmax_differs is None
        assert terms.teacher_argmax is None
        assert not any(x.requires_grad for x in (terms.kl, terms.clipped_mass, terms.teacher_nonfinite))
        if clip != "none":  # the data clip some rows and leave others untouched
            assert (terms.clipped_mass > 0).any() and (terms.clipped_mass == 0).any()


def test_clipped_mass_is_teacher_mass_not_entry_share():
    # One dominant teacher entry that the student misses: a single clipped entry out of V holds ~all the mass.
    v = 1000
    teacher = torch.full((1, v), -5.0, dtype=torch.float64)
    teacher[0, 3] = 10.0
    student = torch.zeros(1, v, dtype=torch.float64)
    eye = torch.eye(1, dtype=torch.float64)
    terms = chunked_clipped_forward_kl(student, eye, teacher.T.contiguous())
    p_t, d = ref_terms(student, teacher, 1.0)
    assert int((d > TAU).sum()) == 1  # the old "share of entries" metric would read 0.001
    torch.testing.assert_close(terms.clipped_mass, p_t[:, 3], **FP64)
    assert terms.clipped_mass.item() > 0.99


@pytest.mark.parametrize("clip", CLIP_MODES)
def test_chunked_student_rows_equal_gathered_rows(clip):
    """student_rows=idx is student_logits[idx] without the copy: same values, same gradient (zero elsewhere)."""
    n, v, h, m = 5, 40, 6, 12
    student, hidden, weight, _ = make_chunked_inputs(3, m, v, h)
    hidden = hidden[:n]
    idx = torch.tensor([9, 0, 4, 11, 6])
    upstream = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for chunk_size, temperature in itertools.product((1, 2, n), (0.7, row_temperatures(n, 1))):
        fed = student.clone().requires_grad_(True)
        terms = chunked_clipped_forward_kl(fed, hidden, weight, tau=TAU, clip=clip, temperature=temperature,
                                           chunk_size=chunk_size, student_rows=idx)
        (terms.loss * upstream).sum().backward()
        gathered = student.clone().requires_grad_(True)
        expected = ref_loss(gathered[idx], (hidden @ weight.T).detach(), TAU, clip, temperature)
        (expected * upstream).sum().backward()
        torch.testing.assert_close(terms.loss, expected.detach(), **FP64)
        torch.testing.assert_close(fed.grad, gathered.grad, **FP64)
        untouched = torch.ones(m, dtype=torch.bool)
        untouched[idx] = False
        assert not fed.grad[untouched].any()
    with pytest.raises(ValueError, match="distinct"):
        chunked_clipped_forward_kl(student, hidden, weight, student_rows=torch.tensor([1, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="index"):
        chunked_clipped_forward_kl(student, hidden, weight, student_rows=torch.tensor([1, 2, 3, 4, 12]))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, v, h, chunk_size", [(37, 1000, 64, 5), (6, 151936, 32, 4)])
def test_teacher_projected_like_the_student(dtype, n, v, h, chunk_size):
    """Same hidden states on both sides: the teacher logits are the student's (projected in the inputs' dtype,
    upcast afterwards), so the KL is ~0 -- also in bf16, where a float32 teacher would read ~2e-3."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 4 / h**0.5).to(dtype)
    student = (hidden @ weight.T).float().requires_grad_(True)
    for temperature in (1.0, 0.6, torch.linspace(0.5, 1.5, n)):
        terms = chunked_clipped_forward_kl(student, hidden, weight, temperature=temperature, chunk_size=chunk_size)
        assert terms.kl.abs().max() <= 1e-5, terms.kl
        assert terms.loss.abs().max() <= 1e-5
    # The old path (float32 teacher from bf16 inputs) is far off: the test above measures something.
    if dtype == torch.bfloat16:
        upcast = chunked_clipped_forward_kl(student, hidden.float(), weight.float(), clip="none")
        assert upcast.kl.max() > 1e-4


def test_chunked_mixed_dtypes():
    # bf16 lm_head with fp32 hidden states; bf16 student. Results are float32, grad is bf16.
    student, hidden, weight, b = make_chunked_inputs(5, 9, 70, 8, dtype=torch.float32, bias=True)
    s = student.bfloat16().requires_grad_(True)
    w16 = weight.bfloat16()
    terms = chunked_clipped_forward_kl(s, hidden, w16, lm_head_bias=b, chunk_size=4, temperature=0.7)
    assert terms.loss.dtype == terms.kl.dtype == terms.clipped_mass.dtype == torch.float32
    terms.loss.sum().backward()
    assert s.grad.dtype == torch.bfloat16
    s_ref = s.detach().clone().requires_grad_(True)
    # Projection in promote_types(float32, bfloat16) = float32.
    expected = clipped_forward_kl(s_ref, hidden @ w16.float().T + b, temperature=0.7)
    expected.sum().backward()
    # float32 rounding (different log-softmax routes) on losses of ~1e-5..1e-1.
    torch.testing.assert_close(terms.loss, expected, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(s.grad, s_ref.grad)


def test_weight_cast_in_vocabulary_blocks(monkeypatch):
    """A weight of another dtype is cast a few vocabulary rows at a time (never a whole (V, H) copy); same result.

    Bitwise only where the arithmetic is exact, so that no kernel choice can show: with hidden states, weight and
    bias on the grid k / 2 (|k| <= 2), every product and partial sum of the projection is a multiple of 1/4 below 9,
    exact in float32 in any reduction order. On random data the blocked matmul (7 output columns) and the whole one
    (50) may pick different BLAS kernels, i.e. another order of the H = 8 float32 products per logit (on an AVX-512
    EPYC the loss differs by 1.2e-7): a few float32 ulp of the logits, within assert_close's float32 tolerance."""
    student, hidden, weight, b = make_chunked_inputs(11, 6, 50, 8, dtype=torch.float32, bias=True)
    g = torch.Generator().manual_seed(12)
    grid = [torch.randint(-2, 3, shape, generator=g).float() / 2 for shape in ((6, 8), (50, 8), (50,))]
    cases = {"random": (hidden, weight.bfloat16(), b), "exact": (grid[0], grid[1].bfloat16(), grid[2])}
    whole = {name: chunked_clipped_forward_kl(student, h, w, lm_head_bias=bias) for name, (h, w, bias) in cases.items()}
    monkeypatch.setattr(losses, "_WEIGHT_CAST_ELEMENTS", 8 * 7)  # blocks of 7 rows: 50 = 7 * 7 + 1
    for name, (h, w, bias) in cases.items():
        with _OpSizes() as ops:
            blocked = chunked_clipped_forward_kl(student, h, w, lm_head_bias=bias)
        assert 50 * 8 not in ops.sizes  # no full-size cast of the weight
        for got, want in zip(blocked, whole[name]):
            if want is not None:
                tol = dict(rtol=0, atol=0) if name == "exact" or not want.is_floating_point() else {}
                torch.testing.assert_close(got, want, **tol)


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


# ---------------------------------------------------------------- non-finite inputs


def test_chunked_zero_teacher_probability_is_finite():
    student, hidden, weight, b = make_chunked_inputs(7, 5, 20, 4, bias=True)
    b[:6] = float("-inf")
    s = student.clone().requires_grad_(True)
    for clip in CLIP_MODES:
        terms = chunked_clipped_forward_kl(s, hidden, weight, lm_head_bias=b, clip=clip, chunk_size=2)
        (grad,) = torch.autograd.grad(terms.loss.sum(), s)
        assert torch.isfinite(terms.loss).all() and torch.isfinite(terms.kl).all() and torch.isfinite(grad).all()
        assert not terms.teacher_nonfinite.any()  # -inf entries in a finite row are legitimate (p_T = 0)
        s_ref = student.clone().requires_grad_(True)
        expected = ref_loss(s_ref, hidden @ weight.T + b, TAU, clip, 1.0)
        (expected_grad,) = torch.autograd.grad(expected.sum(), s_ref)
        torch.testing.assert_close(terms.loss, expected.detach())
        torch.testing.assert_close(grad, expected_grad)


def test_zero_probability_on_both_sides_is_finite():
    # Entries that both sides rule out (-inf logits) contribute nothing, as in the reference.
    student, hidden, weight, b = make_chunked_inputs(8, 4, 20, 4, bias=True)
    b[:5] = float("-inf")
    student[:, :5] = float("-inf")
    s = student.clone().requires_grad_(True)
    terms = chunked_clipped_forward_kl(s, hidden, weight, lm_head_bias=b, chunk_size=3)
    (grad,) = torch.autograd.grad(terms.loss.sum(), s)
    # Same as leaving those entries out of the vocabulary.
    expected = ref_loss(student[:, 5:], (hidden @ weight.T + b)[:, 5:], TAU, "pointwise", 1.0)
    torch.testing.assert_close(terms.loss, expected, **FP64)
    assert torch.isfinite(grad).all() and not grad[:, :5].any()


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("topk", [None, 7])
def test_nonfinite_teacher_rows_are_skipped(clip, topk):
    """NaN / inf teacher hidden states: loss 0, gradient row 0, flagged; the other rows are unaffected."""
    n, v, h = 6, 30, 5
    student, hidden, weight, _ = make_chunked_inputs(9, n, v, h)
    hidden[1, 2] = float("nan")
    hidden[4] = float("inf")  # logits of both signs of infinity
    ids = torch.arange(n) * 5
    s = student.clone().requires_grad_(True)
    terms = chunked_clipped_forward_kl(s, hidden, weight, clip=clip, chunk_size=4, sampled_ids=ids, topk=topk,
                                       temperature=row_temperatures(n))
    (terms.loss * torch.arange(1.0, n + 1, dtype=torch.float64)).sum().backward()
    bad = torch.tensor([False, True, False, False, True, False])
    assert terms.teacher_nonfinite.tolist() == bad.tolist()
    assert terms.teacher_argmax[bad].eq(-1).all() and terms.teacher_argmax[~bad].ge(0).all()
    for name, field in zip(terms._fields, terms):
        if field is not None and field.dtype != torch.bool and name != "teacher_argmax":
            assert torch.isfinite(field).all()
            assert not field[bad].any()
    assert torch.isfinite(s.grad).all() and not s.grad[bad].any()

    good = ~bad
    s_ref = student[good].clone().requires_grad_(True)
    expected = chunked_clipped_forward_kl(s_ref, hidden[good], weight, clip=clip, sampled_ids=ids[good], topk=topk,
                                          temperature=row_temperatures(n)[good])
    (expected.loss * torch.arange(1.0, n + 1, dtype=torch.float64)[good]).sum().backward()
    for got, want in zip(terms, expected):
        if want is not None and want.dtype != torch.bool:
            torch.testing.assert_close(got[good], want, **FP64)
    torch.testing.assert_close(s.grad[good], s_ref.grad, **FP64)
    if topk is None:
        torch.testing.assert_close(terms.loss[good], ref_loss(student[good], hidden[good] @ weight.T, TAU, clip,
                                                              row_temperatures(n)[good]), **FP64)


# ---------------------------------------------------------------- sampled-token diagnostics


@pytest.mark.parametrize("prescaled", [False, True])
def test_sampled_token_diagnostics(prescaled):
    n, v, h, m = 9, 50, 6, 14
    student, hidden, weight, b = make_chunked_inputs(10, m, v, h, bias=True)
    hidden = hidden[:n]
    rows = torch.tensor([13, 2, 5, 0, 7, 9, 1, 11, 4])
    temperature = row_temperatures(n, 2)
    teacher = hidden @ weight.T + b
    ids = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    ids[:3] = teacher[:3].argmax(-1)  # some rows sample the teacher's argmax
    fed = student / torch.ones(m, dtype=torch.float64).index_copy(0, rows, temperature)[:, None] if prescaled \
        else student
    terms = chunked_clipped_forward_kl(fed, hidden, weight, lm_head_bias=b, temperature=temperature, chunk_size=4,
                                       student_rows=rows, sampled_ids=ids, student_prescaled=prescaled)
    logp_t = torch.log_softmax(teacher / temperature[:, None], -1)
    logp_s = torch.log_softmax(student[rows] / temperature[:, None], -1)
    torch.testing.assert_close(terms.teacher_logp_sampled, logp_t.gather(1, ids[:, None]).squeeze(1), **FP64)
    torch.testing.assert_close(terms.student_logp_sampled, logp_s.gather(1, ids[:, None]).squeeze(1), **FP64)
    expected_differs = (teacher.argmax(-1) != ids).double()
    assert expected_differs[:3].eq(0).all() and expected_differs.eq(1).any()
    torch.testing.assert_close(terms.teacher_argmax_differs, expected_differs, rtol=0, atol=0)
    assert torch.equal(terms.teacher_argmax, teacher.argmax(-1))  # the token view shows it
    # The diagnostics change nothing else.
    plain = chunked_clipped_forward_kl(fed, hidden, weight, lm_head_bias=b, temperature=temperature, chunk_size=4,
                                       student_rows=rows, student_prescaled=prescaled)
    for name in ("loss", "kl", "clipped_mass", "teacher_nonfinite"):
        torch.testing.assert_close(getattr(terms, name), getattr(plain, name), rtol=0, atol=0)
    assert not any(x.requires_grad for x in terms[4:])


# ---------------------------------------------------------------- top-k approximation


def ref_topk_loss(student, teacher, k, tau, clip, temperature):
    """Hand-written float64 top-k + tail bucket: forward KL between the two coarsened distributions."""
    p_s = torch.softmax(student.double() / _per_row(temperature), -1)
    p_t = torch.softmax(teacher.double() / _per_row(temperature), -1)
    idx = p_t.topk(k, -1).indices
    coarse = lambda p: torch.cat([p.gather(1, idx), 1 - p.gather(1, idx).sum(-1, keepdim=True)], -1)  # noqa: E731
    pt, ps = coarse(p_t), coarse(p_s)
    d = torch.where(pt > 0, pt * (pt.log() - ps.log()), torch.zeros((), dtype=torch.float64))
    if clip == "pointwise":
        return torch.minimum(d, torch.full_like(d, tau)).sum(-1), d, pt
    kl = d.sum(-1)
    return (torch.minimum(kl, torch.full_like(kl, tau)) if clip == "token" else kl), d, pt


@pytest.mark.parametrize("clip", CLIP_MODES)
def test_topk_matches_coarsened_kl(clip):
    n, v, h, k = 7, 40, 6, 5
    student, hidden, weight, _ = make_chunked_inputs(12, n, v, h)
    temperature = row_temperatures(n, 4)
    s = student.clone().requires_grad_(True)
    terms = chunked_clipped_forward_kl(s, hidden, weight, clip=clip, topk=k, chunk_size=3, temperature=temperature)
    upstream = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (terms.loss * upstream).sum().backward()
    s_ref = student.clone().requires_grad_(True)
    expected, d, pt = ref_topk_loss(s_ref, hidden @ weight.T, k, TAU, clip, temperature)
    (expected * upstream).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-12)  # the reference's 1 - sum(top) tail loses a few digits
    torch.testing.assert_close(terms.loss, expected.detach(), **tol)
    torch.testing.assert_close(s.grad, s_ref.grad, **tol)
    torch.testing.assert_close(terms.kl, d.sum(-1).detach(), **tol)
    torch.testing.assert_close(terms.clipped_mass, ref_clipped_mass(d, pt, clip).detach(), **tol)
    if clip == "none":  # data-processing inequality: the coarse KL never exceeds the full one
        assert (terms.kl <= ref_loss(student, hidden @ weight.T, TAU, "none", temperature) + 1e-12).all()


@pytest.mark.parametrize("clip", CLIP_MODES)
def test_topk_of_whole_vocabulary_is_exact(clip):
    n, v, h = 6, 30, 5
    student, hidden, weight, b = make_chunked_inputs(13, n, v, h, bias=True)
    ids = torch.arange(n)
    out = {}
    for topk in (None, v):
        s = student.clone().requires_grad_(True)
        terms = chunked_clipped_forward_kl(s, hidden, weight, lm_head_bias=b, clip=clip, topk=topk, chunk_size=4,
                                           temperature=0.8, sampled_ids=ids)
        terms.loss.sum().backward()
        out[topk] = (terms, s.grad)
    for got, want in zip(out[v][0], out[None][0]):
        torch.testing.assert_close(got, want, **FP64)
    torch.testing.assert_close(out[v][1], out[None][1], **FP64)


# ---------------------------------------------------------------- autograd behaviour


def test_chunked_empty():
    s = torch.zeros(0, 11, requires_grad=True)
    terms = chunked_clipped_forward_kl(s, torch.zeros(0, 3), torch.randn(11, 3), chunk_size=4)
    assert terms.loss.shape == terms.kl.shape == terms.clipped_mass.shape == terms.teacher_nonfinite.shape == (0,)
    terms.loss.sum().backward()
    assert s.grad.shape == (0, 11)


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("topk", [None, 3])
def test_chunked_gradient_against_finite_differences(clip, topk):
    """Like torch.autograd.gradcheck, which cannot be used as is: it runs backward several times through one
    graph, while the precomputed gradient is consumed by the first backward (one forward per row here)."""
    student, hidden, weight, b = make_chunked_inputs(8, 4, 6, 3, bias=True)
    # token: tau between the rows' KLs, so both branches are checked.
    kl = ref_terms(student, hidden @ weight.T + b, 1.3)[1].sum(-1).sort().values
    tau = 0.05 if clip != "token" else float(kl[1] + kl[2]) / 2
    fn = lambda x: chunked_clipped_forward_kl(  # noqa: E731
        x, hidden, weight, lm_head_bias=b, tau=tau, clip=clip, temperature=1.3, chunk_size=3, topk=topk
    ).loss
    analytic = torch.stack([_row_grad(fn, student, i) for i in range(student.shape[0])])  # (rows, *student)
    eps = 1e-6
    numeric = torch.zeros_like(analytic)
    flat = student.flatten()
    for j in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[j] = eps
        numeric.view(student.shape[0], -1)[:, j] = (
            fn((flat + step).view_as(student)) - fn((flat - step).view_as(student))
        ) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def _row_grad(fn, x, i):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x)[i], x)
    return grad


def test_gradient_only_when_needed():
    student, hidden, weight, _ = make_chunked_inputs(14, 5, 20, 4)
    s = student.clone().requires_grad_(True)
    with torch.no_grad():
        assert not chunked_clipped_forward_kl(s, hidden, weight).loss.requires_grad
    assert not chunked_clipped_forward_kl(student, hidden, weight).loss.requires_grad
    assert chunked_clipped_forward_kl(s, hidden, weight).loss.requires_grad


def test_backward_twice_raises():
    student, hidden, weight, _ = make_chunked_inputs(15, 5, 20, 4)
    s = student.clone().requires_grad_(True)
    loss = chunked_clipped_forward_kl(s, hidden, weight).loss.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_gradient_flows_through_a_non_leaf():
    # verl's logits come out of the lm_head: the gradient must flow on, scaled by the upstream per row.
    student, hidden, weight, _ = make_chunked_inputs(16, 6, 20, 4)
    x = student.clone().requires_grad_(True)
    up = torch.linspace(-1, 2, 6, dtype=torch.float64)
    (chunked_clipped_forward_kl(x * 2.0, hidden, weight, chunk_size=4).loss * up).sum().backward()
    x_ref = student.clone().requires_grad_(True)
    (ref_loss(x_ref * 2.0, hidden @ weight.T, TAU, "pointwise", 1.0) * up).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **FP64)


# ---------------------------------------------------------------- which way the student moves


def logp_change(student, step, temperature, idx=None):
    """First-order change of log_softmax(student / T) along ``step`` (a direction of the unscaled logits), by
    autograd's forward mode (the directional derivative). With ``idx`` (rows, k): of the k + 1 coarse entries
    (those k tokens, then the log-mass of the rest)."""
    t = _per_row(temperature)

    def logp(x):
        out = torch.log_softmax(x / t, -1)
        if idx is None:
            return out
        tail = out.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([out.gather(-1, idx), tail], -1)

    return torch.func.jvp(logp, (student,), (step,))[1]


def reference_reversals(student, teacher, tau, clip, temperature, topk=None):
    """From autograd on the float64 reference: the change of each entry's log-probability under a gradient-descent
    step of the configured loss and of the exact forward KL (with ``topk``: of the unclipped top-k loss, over the
    k + 1 coarse entries); an entry is reversed where the first lowers it and the second raises it. Returns, per
    row, whether the teacher's argmax is reversed, the teacher mass so reversed, and the old logit reading of the
    argmax (its logit pushed down by the loss and up by the exact KL) for comparison."""

    def loss_grad(mode):
        s = student.clone().requires_grad_(True)
        if topk is None:
            loss = ref_loss(s, teacher, tau, mode, temperature)
        else:
            loss = ref_topk_loss(s, teacher, topk, tau, mode, temperature)[0]
        return torch.autograd.grad(loss.sum(), s)[0]

    p_t = torch.softmax(teacher / _per_row(temperature), -1)
    idx = None if topk is None else p_t.topk(topk, -1).indices
    if idx is not None:  # coarse teacher probabilities
        p_t = torch.cat([p_t.gather(1, idx), 1 - p_t.gather(1, idx).sum(-1, keepdim=True)], -1)
    g, g_exact = loss_grad(clip), loss_grad("none")
    lowered = logp_change(student, -g, temperature, idx) < 0
    reversed_ = lowered & (logp_change(student, -g_exact, temperature, idx) > 0)
    argmax = teacher.argmax(-1, keepdim=True)
    at = argmax if idx is None else torch.zeros_like(argmax)  # the argmax is the first of the sorted top-k
    logit_reading = ((g > 0) & (g_exact < 0)).gather(-1, argmax).squeeze(-1)
    return reversed_.gather(-1, at).squeeze(-1).double(), (p_t * reversed_).sum(-1), logit_reading.double()


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, "per_row"])
@pytest.mark.parametrize("topk", [None, 7])
def test_reversed_directions_match_autograd(clip, temperature, topk):
    """teacher_argmax_reversed and reversed_teacher_mass against autograd's first-order change of the
    log-probabilities under each loss's gradient step, per clip mode: the pointwise clip reverses some entries
    (and on this data the logit's direction and the log-probability's disagree at some teacher argmax, so the test
    tells the two readings apart), the other modes never."""
    n, v, h = 24, 60, 8
    student, hidden, weight, _ = make_chunked_inputs(31, n, v, h)
    teacher = hidden @ weight.T
    temperature = row_temperatures(n, 6) if temperature == "per_row" else temperature
    terms = chunked_clipped_forward_kl(student, hidden, weight, tau=TAU, clip=clip, temperature=temperature,
                                       chunk_size=5, topk=topk)  # fmt: skip
    argmax_rev, mass, logit_reading = reference_reversals(student, teacher, TAU, clip, temperature, topk)
    torch.testing.assert_close(terms.teacher_argmax_reversed, argmax_rev, rtol=0, atol=0)
    torch.testing.assert_close(terms.reversed_teacher_mass, mass, **FP64)
    if clip == "pointwise":
        assert terms.teacher_argmax_reversed.sum() >= 1 and (mass > 0).any()  # the test data shows reversals
        if topk is None:
            assert (logit_reading != argmax_rev).any()
    else:
        assert not terms.teacher_argmax_reversed.any() and not terms.reversed_teacher_mass.any()
    if topk is None:  # topk = V is the exact loss: the coarse reversals equal the exact ones
        full = chunked_clipped_forward_kl(student, hidden, weight, tau=TAU, clip=clip, temperature=temperature,
                                          topk=v)  # fmt: skip
        torch.testing.assert_close(full.teacher_argmax_reversed, terms.teacher_argmax_reversed, **FP64)
        torch.testing.assert_close(full.reversed_teacher_mass, terms.reversed_teacher_mass, **FP64)


def one_position(p_t, p_s, clip):
    """The loss's terms at one position with teacher probabilities p_T and student probabilities p_S (T = 1); the
    logit gradients of the loss and of the exact forward KL, and the first-order change of each log p_S[v] under
    their gradient-descent steps (autograd on the float64 reference)."""
    p_t, p_s = (torch.tensor([p], dtype=torch.float64) for p in (p_t, p_s))
    hidden, weight = p_t.log(), torch.eye(p_t.shape[1], dtype=torch.float64)  # teacher logits = log p_T
    terms = chunked_clipped_forward_kl(p_s.log(), hidden, weight, tau=TAU, clip=clip)
    grads = []
    for mode in (clip, "none"):  # gradients by autograd through the float64 reference
        s = p_s.log().clone().requires_grad_(True)
        grads.append(torch.autograd.grad(ref_loss(s, p_t.log(), TAU, mode, 1.0).sum(), s)[0])
    changes = [logp_change(p_s.log(), -g, 1.0)[0] for g in grads]
    return terms, grads[0][0], grads[1][0], *changes


@pytest.mark.parametrize("p_t, p_s, expected", [
    ((0.9, 0.001, 0.05, 0.049), (0.03, 0.9, 0.04, 0.03), 0.0740),  # issue 22's example
    ((0.01, 0.8, 0.19), (0.8, 0.05, 0.15), 0.0865),
])  # fmt: skip
def test_logit_pushed_down_while_its_probability_rises_is_not_reversed(p_t, p_s, expected):
    """The teacher's top token is clipped, so the pointwise loss pushes its *logit* down (and the exact KL pushes it
    up), yet the student pushes the tokens it over-weights down harder: the top token's log-probability rises to
    first order. The metric follows the log-probability: not reversed."""
    terms, grad, grad_exact, change, _ = one_position(p_t, p_s, "pointwise")
    top = max(range(len(p_t)), key=p_t.__getitem__)
    assert grad[top] > 0 and grad_exact[top] < 0  # the logit reading would call it reversed
    assert change[top].item() == pytest.approx(expected, abs=1e-4)  # its log-probability rises
    assert terms.teacher_argmax_reversed.item() == 0.0
    assert terms.clipped_mass.item() == pytest.approx(p_t[top])  # only the top token is clipped, ...
    assert terms.reversed_teacher_mass.item() < p_t[top]  # ... but it is not among the reversed entries


def test_pointwise_clip_reverses_the_teachers_choice_on_a_constructed_position():
    """One position, three tokens: the teacher is sure of token 0 (0.9), the student is not (0.1). Its forward-KL
    term 0.9 * log 9 = 1.98 is far above tau: pointwise clipping zeroes the pull on token 0 and keeps the push
    p_S[0] * W, and here its log-probability falls too; the exact KL (and clip="none") raises it."""
    for clip, expected in (("pointwise", 1.0), ("token", 0.0), ("none", 0.0)):
        terms, grad, _, change, change_exact = one_position((0.9, 0.05, 0.05), (0.1, 0.45, 0.45), clip)
        assert change_exact[0] > 0  # the exact KL raises log p_S[0]
        assert terms.teacher_argmax_reversed.item() == expected, clip
        if clip == "pointwise":
            assert grad[0] > 0 and change[0] < 0  # pushed down, and its log-probability falls
            assert terms.reversed_teacher_mass.item() == pytest.approx(0.9)  # only token 0 is reversed
        elif clip == "none":
            torch.testing.assert_close(change, change_exact, **FP64)


def test_reversed_mass_counts_entries_by_their_probability_not_their_logit():
    """p_T = (0.47, 0.52, 0.01), p_S = (0.8, 0.05, 0.15): only the top token (0.52) is clipped. Token 2 is
    over-weighted by the student, so the exact KL pushes its logit *down* (the logit reading sees no reversal), but
    the exact KL's step still raises its log-probability (it lowers token 0's far more), while the clipped loss's
    step lowers it: reversed, and its teacher mass counts: 0.52 + 0.01, not the clipped mass 0.52."""
    terms, grad, grad_exact, change, change_exact = one_position((0.47, 0.52, 0.01), (0.8, 0.05, 0.15), "pointwise")
    assert grad_exact[2] > 0 and change_exact[2] > 0 and change[2] < 0  # the readings disagree on token 2
    assert change[1] < 0 < change_exact[1] and not change[0] < 0 < change_exact[0]
    assert terms.teacher_argmax_reversed.item() == 1.0
    assert terms.clipped_mass.item() == pytest.approx(0.52)
    assert terms.reversed_teacher_mass.item() == pytest.approx(0.53)


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


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rows", [False, True])
def test_chunked_memory_is_bounded(student_dtype, with_rows):
    """Forward holds one gradient buffer for the *distilled* rows only: (N, V), never (M, V) when N < M."""
    n, v, h, chunk = 64, 50, 16, 8
    m = 3 * n if with_rows else n  # a micro-batch of M positions, N of them distilled
    bound = chunk * v  # only chunk-sized tensors (the float32 lm_head weight needs no cast)
    assert n * v > 3 * bound
    student, hidden, weight, b = (x.float() if x is not None else None for x in make_chunked_inputs(9, m, v, h))
    hidden = hidden[:n]
    rows = torch.randperm(m, generator=torch.Generator().manual_seed(0))[:n] if with_rows else None
    for clip, topk in itertools.product(CLIP_MODES, (None, 5)):
        s = student.to(student_dtype, copy=True).requires_grad_(True)
        saved = []

        def pack(x):
            saved.append(x)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), _OpSizes() as fwd:
            terms = chunked_clipped_forward_kl(s, hidden, weight, clip=clip, chunk_size=chunk, student_rows=rows,
                                               topk=topk)
        # Autograd saves nothing of size N * V.
        assert all(x.numel() < n * v for x in saved)
        # Forward: exactly one (N, V) tensor (the distilled rows' gradient), everything else chunk-sized.
        big = [x for x in fwd.sizes if x > bound]
        assert big == [n * v], big
        buffer = terms.loss.grad_fn.grad_rows
        assert buffer.dtype == student_dtype and buffer.shape == (n, v)
        buffer_ptr = buffer.data_ptr()
        del buffer  # a reference held here would keep autograd from adopting the buffer
        with _OpSizes() as bwd:
            terms.loss.sum().backward()
        if with_rows:
            # Standalone, the logits' gradient is an (M, V) tensor, zero outside the distilled rows (with a
            # gradient_sink nothing of that size is allocated: test_gradient_sink_adds_into_the_policy_gradient).
            assert [x for x in bwd.sizes if x > n] == [m * v], bwd.sizes
        else:
            # Backward allocates nothing big: it scales the buffer in place, and the leaf adopts it as .grad.
            assert max(bwd.sizes, default=0) <= n, bwd.sizes
            assert s.grad.data_ptr() == buffer_ptr

    # No gradient wanted: no (N, V) tensor at all.
    with torch.no_grad(), _OpSizes() as nograd:
        chunked_clipped_forward_kl(s, hidden, weight, chunk_size=chunk, student_rows=rows)
    assert max(nograd.sizes) <= bound

    # The probe is real: the plain reference does allocate (N, V) tensors in forward.
    with _OpSizes() as plain:
        clipped_forward_kl(s[:n], hidden @ weight.T)
    assert max(plain.sizes) >= n * v


def _policy_like_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A stand-in for verl's policy loss on the same logits: log-probabilities of the labels (log_softmax +
    gather, as verl's logprobs_from_logits on CPU), weighted."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    return (logp * torch.linspace(-1.0, 1.0, len(labels), dtype=logp.dtype)).sum()


@pytest.mark.parametrize("squeeze", [False, True])
def test_gradient_sink_adds_into_the_policy_gradient(squeeze):
    """With gradient_sink, the distilled rows' gradient is added in place into the gradient the policy loss gives
    the same logits: the total equals the float64 reference (policy + distillation, through one autograd graph),
    and backward allocates nothing of size (M, V) beyond what the policy loss alone allocates."""
    n, v, h, m = 6, 40, 8, 20
    student, hidden, weight, _ = make_chunked_inputs(21, m, v, h)
    hidden = hidden[:n]
    rows = torch.tensor([3, 17, 0, 9, 12, 5])
    labels = torch.randint(0, v, (m,), generator=torch.Generator().manual_seed(2))
    up = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    x_ref = student.clone().requires_grad_(True)
    reference = _policy_like_loss(x_ref * 1.5, labels) + (ref_loss((x_ref * 1.5)[rows], hidden @ weight.T, TAU,
                                                                   "pointwise", 0.8) * up).sum()  # fmt: skip
    reference.backward()

    def run(with_distill: bool):
        x = student.clone().requires_grad_(True)
        base = x * 1.5  # a non-leaf, like the lm_head's logits
        if squeeze:  # verl hands the hook (1, M, V) views of its logits
            base = base.unsqueeze(0)
        logits = base.view(m, v)
        total = _policy_like_loss(logits, labels)
        if with_distill:
            terms = chunked_clipped_forward_kl(logits, hidden, weight, tau=TAU, temperature=0.8, chunk_size=4,
                                               student_rows=rows, gradient_sink=base)
            total = total + (terms.loss * up).sum()
        with _OpSizes() as bwd:
            total.backward()
        return x.grad, sorted(size for size in bwd.sizes if size >= m * v)

    grad, big = run(True)
    torch.testing.assert_close(grad, x_ref.grad, **FP64)
    _, big_policy_alone = run(False)
    assert big == big_policy_alone  # no extra (M, V) gradient buffer


def test_gradient_sink_without_another_gradient_fails_loudly():
    """If nothing else reads the logits the sink receives no gradient, and autograd lets no hook create one: the
    distillation term would vanish, so the end of the backward pass raises."""
    student, hidden, weight, _ = make_chunked_inputs(22, 8, 20, 4)
    x = student.clone().requires_grad_(True)
    base = x * 1.0
    terms = chunked_clipped_forward_kl(base, hidden[:4], weight, student_rows=torch.tensor([0, 2, 4, 6]),
                                       gradient_sink=base)
    with pytest.raises(RuntimeError, match="gradient_sink received no gradient"):
        terms.loss.sum().backward()
    with pytest.raises(ValueError, match="gradient_sink"):
        chunked_clipped_forward_kl(base, hidden, weight, gradient_sink=base[1:])


@pytest.mark.parametrize("temperature", [0.7, 0.6])
def test_prescaled_bf16_student_against_its_own_states_gives_zero_kl(temperature):
    """verl divides bf16 logits by the temperature rounded to bf16 (bf16(0.7) = 0.69921875), in bf16. A teacher
    with the student's own hidden states must then give KL 0 at T != 1, not a rounding bias on every token."""
    n, v, h = 24, 3000, 32
    g = torch.Generator().manual_seed(5)
    hidden = (torch.randn(n, h, generator=g) * 3).bfloat16()
    weight = torch.randn(v, h, generator=g).bfloat16()
    per_row = torch.full((n,), temperature)  # verl's per-token temperatures are float32
    student = torch.nn.functional.linear(hidden, weight) / per_row[:, None].to(torch.bfloat16)  # the engine's op
    assert torch.tensor(temperature).bfloat16().item() != temperature
    terms = chunked_clipped_forward_kl(student, hidden, weight, clip="none", temperature=per_row,
                                       student_prescaled=True)
    assert terms.kl.abs().max().item() == 0.0
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
    for temperature in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 0.0, 1.0]),
                        torch.tensor([1.0, float("nan"), 1.0])):
        with pytest.raises(ValueError, match="temperature"):
            clipped_forward_kl(s, t, temperature=temperature)
        with pytest.raises(ValueError, match="temperature"):
            chunked_clipped_forward_kl(s, h, w, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        chunked_clipped_forward_kl(s, h, w, temperature=torch.ones(4))  # one per teacher row
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
    for ids in (torch.tensor([0, 1, 5]), torch.tensor([0, -1, 2]), torch.tensor([0.0, 1.0, 2.0]), torch.zeros(2)):
        with pytest.raises(ValueError, match="sampled_ids"):
            chunked_clipped_forward_kl(s, h, w, sampled_ids=ids)
    for topk in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="topk"):
            chunked_clipped_forward_kl(s, h, w, topk=topk)
