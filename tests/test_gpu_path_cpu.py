"""The GPU path's costs, checked on CPU (issue 25): what verl does differently on GPU, emulated with its own code.

* flash-attn's cross-entropy (verl's GPU log-prob path) writes its gradient into the logits' storage in backward.
  SSOPD's loss computes its gradient in forward and its gradient sink only adds into the gradient that arrives,
  so the opt-out ``VERL_DISABLE_FLASH_ATTN_CE=1`` is not needed: with a stand-in of that kernel
  (``benchmarks/inplace_cross_entropy.py``) in verl's dispatch, SSOPD's gradients equal a float64 reference, and
  the same stand-in does corrupt a backward that reads the logits (the hazard the opt-out was for).
* the lm_head the loss projects with is the one the teacher forward gathered, in the compute dtype: no gather of
  its own (counted), no fp32 copy.
* a micro-batch without a distilled position gives the logits no gradient at all (no logits-sized zero tensor).
"""

import functools
import os
import sys

import pytest
import torch

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.losses import chunked_clipped_forward_kl, clipped_forward_kl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import inplace_cross_entropy  # noqa: E402

sys.path.pop(0)

from test_ssopd_engine import N, groups, make_batch, model_path, plan_for, tokenizer  # noqa: E402,F401  (fixtures)


@pytest.fixture
def inplace_ce(monkeypatch):
    monkeypatch.delenv("VERL_DISABLE_FLASH_ATTN_CE", raising=False)
    inplace_cross_entropy.install(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))


def _problem(seed=0, m=24, n=10, v=512, h=16):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(m, h, generator=g, dtype=torch.float64), weight=torch.randn(v, h, generator=g,
                dtype=torch.float64) / 2, states=torch.randn(n, h, generator=g, dtype=torch.float64),
                rows=torch.randperm(m, generator=g)[:n], labels=torch.randint(0, v, (m,), generator=g),
                advantages=torch.randn(m, generator=g, dtype=torch.float64),
                upstream=torch.rand(n, generator=g, dtype=torch.float64))  # fmt: skip


def _reference_grad(p, tau, reader=False):
    """d/d hidden of sum(adv * log p(label)) + sum(upstream * l) [+ sum(logits**2) / V], all float64."""
    hidden = p["hidden"].clone().requires_grad_(True)
    logits = hidden @ p["weight"].T
    policy = (torch.log_softmax(logits, -1).gather(-1, p["labels"][:, None]).squeeze(-1) * p["advantages"]).sum()
    distill = clipped_forward_kl(logits[p["rows"]], p["states"] @ p["weight"].T, tau=tau)
    total = policy + (distill * p["upstream"]).sum() + ((logits**2).sum() / logits.shape[1] if reader else 0)
    total.backward()
    return hidden.grad


def _engine_like_grad(p, tau, reader=False):
    """The same, as verl's engine runs it in float32: the hook reads a view of the logits first (SSOPD, with the
    gradient sink), then verl's logprobs_from_logits; ``reader`` adds a term whose backward reads the logits."""
    from verl.utils.torch_functional import logprobs_from_logits

    hidden = p["hidden"].float().requires_grad_(True)
    weight = p["weight"].float()
    logits = hidden @ weight.T  # the lm_head's output (not a leaf), as in verl
    student = logits.unsqueeze(0)  # what the engine hands the logits hook
    extra = (logits**2).sum() / logits.shape[1] if reader else 0  # created before the CE: its backward runs after
    terms = chunked_clipped_forward_kl(student.squeeze(0), p["states"].float(), weight, tau=tau, chunk_size=4,
                                       student_rows=p["rows"], gradient_sink=logits)  # fmt: skip
    policy = (logprobs_from_logits(logits, p["labels"]) * p["advantages"].float()).sum()
    (policy + (terms.loss * p["upstream"].float()).sum() + extra).backward()
    return hidden.grad.double()


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_inplace_cross_entropy_leaves_ssopd_gradients_unchanged(inplace_ce, tau):
    p = _problem()
    got = _engine_like_grad(p, tau)
    want = _reference_grad(p, tau)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert want.abs().sum() > 0


def test_inplace_cross_entropy_stand_in_is_verls_path_and_corrupts_a_logits_reader(inplace_ce):
    """Control: the stand-in is what verl dispatches to, it overwrites the logits, and a backward that reads them
    afterwards goes wrong -- so the test above would catch a loss that read the logits in backward."""
    import verl.utils.torch_functional as verl_functional

    calls = []
    kernel = verl_functional.cross_entropy_loss
    verl_functional.cross_entropy_loss = lambda *a, **k: calls.append(k) or kernel(*a, **k)
    try:
        p = _problem(seed=1)
        got = _engine_like_grad(p, 0.05, reader=True)
    finally:
        verl_functional.cross_entropy_loss = kernel
    assert calls == [{"inplace_backward": True}]
    want = _reference_grad(p, 0.05, reader=True)
    assert (got - want).abs().max() > 1e-2  # the reader saw the gradient where the logits were


def test_opt_out_and_inplace_paths_give_the_same_gradient(monkeypatch):
    """verl's row-wise fallback (the opt-out) and the in-place kernel give SSOPD the same gradient."""
    p = _problem(seed=2)
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
    fallback = _engine_like_grad(p, 0.05)
    inplace_cross_entropy.install(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))
    torch.testing.assert_close(_engine_like_grad(p, 0.05), fallback, atol=1e-6, rtol=1e-5)


def test_recipe_no_longer_sets_the_opt_out():
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "ssopd_verl", "conf", "recipe", "ssopd.yaml")) as f:
        recipe = yaml.safe_load(f)
    env = ((recipe.get("ray_kwargs") or {}).get("ray_init") or {}).get("runtime_env", {}).get("env_vars", {})
    assert "VERL_DISABLE_FLASH_ATTN_CE" not in env


# ---- on verl's FSDP2 engine (bf16 mixed precision, as on GPU) --------------------------------------------------


@pytest.fixture(scope="module")
def bf16_engine(model_path):  # noqa: F811
    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine

    return build_cpu_fsdp2_engine(model_path, lr=1e-2, seed=0, dtype="bf16")


def _actor_loss(cfg, engine):
    from verl.workers.utils.losses import ppo_loss

    from ssopd_verl.cpu.engine import build_actor_config
    from ssopd_verl.glue.actor_loss import SSOPDActorLoss

    return SSOPDActorLoss(functools.partial(ppo_loss, config=build_actor_config()), cfg, rollout_n=N, engine=engine)


class _Counter:
    """Counts FSDP2 all-gathers (param-group unshards) of the output layer and DTensor.full_tensor calls."""

    def __init__(self, monkeypatch, head):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        from torch.distributed.tensor import DTensor

        self.head_unshards, self.full_tensors = 0, 0
        unshard, full_tensor = FSDPParamGroup.unshard, DTensor.full_tensor

        def counted_unshard(group, *a, **k):
            if any(head is m for m in group.modules):
                self.head_unshards += 1
            return unshard(group, *a, **k)

        def counted_full_tensor(tensor, *a, **k):
            self.full_tensors += 1
            return full_tensor(tensor, *a, **k)

        monkeypatch.setattr(FSDPParamGroup, "unshard", counted_unshard)
        monkeypatch.setattr(DTensor, "full_tensor", counted_full_tensor)


def test_lm_head_comes_from_the_teacher_forward_in_the_compute_dtype(bf16_engine, groups, tokenizer,  # noqa: F811
                                                                      monkeypatch):
    from ssopd_verl.glue.actor_loss import OUT_LOSS
    from ssopd_verl.glue.teacher_forward import lm_head_weight, output_layer

    engine = bf16_engine
    cfg = SSOPDConfig()
    plan = plan_for(groups, tokenizer, cfg)
    td = make_batch(groups, plan, engine)
    loss_fn = _actor_loss(cfg, engine)
    heads = []
    take = loss_fn.teacher.take_head
    monkeypatch.setattr(loss_fn.teacher, "take_head", lambda: heads.append(take()) or heads[-1])
    counter = _Counter(monkeypatch, output_layer(engine.module))
    rows = sum(len(p) + len(r) for p, r in ((g["prompt"], g["response"]) for g in groups))
    student = torch.randn(1, rows, engine.module.config.vocab_size, dtype=torch.bfloat16, requires_grad=True)
    with engine.eval_mode():
        out = loss_fn(student_logits=student, data=td)
    forwards = loss_fn.teacher.forwards
    assert forwards == 1 and len(heads) == 1
    # One gather of the output layer per teacher forward (the forward's own), no gather for the loss, no fp32 copy.
    assert counter.head_unshards == forwards
    assert counter.full_tensors == 0
    assert heads[0].dtype == torch.bfloat16 and loss_fn.teacher._head is None  # released before the backward
    with engine.eval_mode():
        reference = lm_head_weight(engine.module, torch.bfloat16)  # gathered from the bf16-cast shards
    assert counter.full_tensors == 1
    assert torch.equal(heads[0], reference)  # exactly the weight FSDP2's mixed precision gives the student
    assert out[OUT_LOSS].abs().sum() > 0


def test_micro_batch_without_targets_gives_the_logits_no_gradient(bf16_engine, groups, tokenizer):  # noqa: F811
    from ssopd_verl.glue.actor_loss import HOOK_OUTPUTS, OUT_LOSS, ROW_WEIGHT

    engine = bf16_engine
    cfg = SSOPDConfig()
    plan = plan_for(groups, tokenizer, cfg)
    td = make_batch(groups, plan, engine)
    td[ROW_WEIGHT] = torch.zeros_like(td[ROW_WEIGHT])  # no target in this micro-batch (nor on any rank)
    loss_fn = _actor_loss(cfg, engine)
    rows = sum(len(g["prompt"]) + len(g["response"]) for g in groups)
    student = torch.randn(1, rows, 64, dtype=torch.bfloat16, requires_grad=True)
    with engine.eval_mode():
        out = loss_fn(student_logits=student, data=td)
    assert list(out) == list(HOOK_OUTPUTS) and loss_fn.teacher.forwards == 0  # no rank has a target: no forward
    assert out[OUT_LOSS].requires_grad and not out[OUT_LOSS].any()  # attached to the graph, zero
    (out[OUT_LOSS] * 3.0).sum().backward()
    assert student.grad is None  # nothing of size [tokens x vocabulary] was produced for it
    # Beside a policy loss, the logits' gradient is exactly the policy's.
    labels = torch.randint(0, 64, (rows,))
    logits = student.detach().clone().requires_grad_(True)
    with engine.eval_mode():
        out = loss_fn(student_logits=logits, data=td)
    policy = lambda x: torch.log_softmax(x.float(), -1)[0].gather(-1, labels[:, None]).sum()  # noqa: E731
    (out[OUT_LOSS].sum() + policy(logits)).backward()
    alone = student.detach().clone().requires_grad_(True)
    policy(alone).backward()
    assert torch.equal(logits.grad, alone.grad)


def test_engine_update_is_the_same_with_the_inplace_cross_entropy(model_path, groups, tokenizer,  # noqa: F811
                                                                  monkeypatch):
    """verl's whole forward/backward (hook, gradient sink, policy loss) on the fp32 engine: parameter gradients
    with the in-place kernel equal those of the opt-out path."""
    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine
    from ssopd_verl.glue.actor_loss import mark_for_distillation

    engine = build_cpu_fsdp2_engine(model_path, lr=1e-2, seed=0)
    cfg = SSOPDConfig()

    def grads():
        td = make_batch(groups, plan_for(groups, tokenizer, cfg), engine, micro_batch_size_per_gpu=4)
        mark_for_distillation(td, cfg)
        with engine.train_mode():
            engine.optimizer_zero_grad()
            engine.forward_backward_batch(td, loss_function=_actor_loss(cfg, engine))
            out = {n: p.grad.full_tensor().clone() for n, p in engine.module.named_parameters() if p.grad is not None}
            engine.optimizer_zero_grad()
        return out

    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
    fallback = grads()
    inplace_cross_entropy.install(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))
    inplace = grads()
    assert fallback and set(fallback) == set(inplace)
    for name in fallback:
        torch.testing.assert_close(inplace[name], fallback[name], atol=1e-6, rtol=1e-4, msg=name)
