"""verl's real FSDP2 engine on CPU: log-probs match plain transformers, and one PPO step trains.

Run: ``cd /work/main && PYTHONPATH=. .venv/bin/pytest -q --import-mode=importlib tests/test_cpu_engine.py``.
"""

import functools
import math
import os

import pytest
import torch

from ssopd_verl.cpu.engine import ensure_cpu_platform

# verl resolves (and caches) its platform once per process: select the CPU platform at collection, before another
# test module imports verl's engine or trainer modules. VERL_PLATFORM is set only while that happens (subprocesses
# started by other tests do not inherit it).
ensure_cpu_platform()

TOL = 1e-5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ssopd_verl.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)


@pytest.fixture(scope="module")
def engine(model_path):
    import torch.distributed as dist

    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine

    had_group = dist.is_initialized()
    eng = build_cpu_fsdp2_engine(model_path, micro_batch_size_per_gpu=2, lr=1e-3, seed=0)
    # the engine starts from the checkpoint on disk (tests below compare against its exported weights)
    from safetensors.torch import load_file

    on_disk = load_file(os.path.join(model_path, "model.safetensors"))
    exported = dict(eng.get_per_tensor_param()[0])
    assert set(on_disk) <= set(exported)
    for name, tensor in on_disk.items():
        assert torch.equal(exported[name], tensor), name
    yield eng
    del eng
    if not had_group and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def batch(model_path):
    """Four rows of real Qwen3 token ids with different prompt and response lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompts = [
        list(tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]),
        tok.encode("Hello world,"),
        tok.encode("<|im_start|>user\nSolve x^2 = 4.<|im_end|>\n<|im_start|>assistant\n"),
        tok.encode("A"),
    ]
    responses = [
        tok.encode("<think>\n\n</think>\n\n5<|im_end|>"),
        tok.encode(" the answer is \\boxed{4}."),
        tok.encode("x = 2 or x = -2"),
        tok.encode("BC") + [151668],
    ]
    assert [prompts[1], len(tok)] == [[9707, 1879, 11], 151669]
    return prompts, responses


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()


def _reference_logprobs(model, engine, prompts, responses, temperature):
    """Plain transformers fp32 forward, one sequence at a time, with the engine's current weights."""
    params, _ = engine.get_per_tensor_param()  # verl's own full-weight export (HF names)
    missing, unexpected = model.load_state_dict(dict(params), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    out = []
    temperatures = temperature if isinstance(temperature, list) else [temperature] * len(prompts)
    with torch.no_grad():
        for p, r, t in zip(prompts, responses, temperatures):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0].float() / t
            logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(logp[len(p) - 1 :])
    return out


def _response_logprobs(engine, td):
    from verl.workers.utils.padding import response_from_nested

    with engine.eval_mode():
        output = engine.infer_batch(td, loss_function=None)
    log_probs = output["model_output"]["log_probs"]
    return [t for t in response_from_nested(log_probs, td["response_mask"]).unbind()]


@pytest.mark.parametrize(
    "use_remove_padding,use_dynamic_bsz,temperature",
    [
        (True, False, 1.0),
        (False, False, 1.0),
        (True, True, 0.7),
        (False, True, 1.0),
        (True, False, [0.7, 1.0, 1.3, 0.9]),  # per-row temperatures: a (bsz,) tensor
        (False, True, [0.7, 1.0, 1.3, 0.9]),
    ],
)
def test_infer_logprobs_match_transformers(hf_model, engine, batch, use_remove_padding, use_dynamic_bsz, temperature):
    from ssopd_verl.cpu.engine import make_train_tensordict

    prompts, responses = batch
    td = make_train_tensordict(
        prompts,
        responses,
        temperature=temperature,
        engine=engine,
        use_remove_padding=use_remove_padding,
        use_dynamic_bsz=use_dynamic_bsz,
        max_token_len_per_gpu=48,  # dynamic batching then splits the 61 tokens (rows of 3-26) in 2
        compute_loss=False,
    )
    got = _response_logprobs(engine, td)
    want = _reference_logprobs(hf_model, engine, prompts, responses, temperature)
    assert [g.shape for g in got] == [w.shape for w in want] == [torch.Size([len(r)]) for r in responses]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_engine_setup(engine):
    from torch.distributed.fsdp import FSDPModule

    from ssopd_verl.cpu.platform import CPUPlatform, register_cpu_platform
    from verl.plugin.platform import PlatformRegistry, get_platform
    from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device
    from verl.workers.engine import EngineRegistry

    register_cpu_platform()  # idempotent: a second call changes nothing and does not raise
    assert PlatformRegistry.get("cpu") is CPUPlatform and isinstance(get_platform(), CPUPlatform)
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is type(engine)
    assert EngineRegistry.get_engine_cls("value_model", "fsdp2").__name__ == "FSDPEngineWithValueHead"
    assert (get_device_name(), get_device_id(), get_nccl_backend()) == ("cpu", "cpu", "gloo")
    device = get_torch_device()  # what TrainingWorker / memory utils call on it
    assert device.max_memory_allocated() > 0 and device.memory_reserved() > 0 and device.is_available()
    device.empty_cache(), device.synchronize(), device.set_device(0), device.current_stream()
    assert isinstance(engine.module, FSDPModule)
    assert engine.module.config._attn_implementation == "sdpa"
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    assert engine._autocast_dtype == torch.float32


def test_train_batch_ppo_loss_updates_params(engine, batch):
    from torch.distributed.tensor import DTensor

    from ssopd_verl.cpu.engine import build_actor_config, make_train_tensordict
    from verl.workers.utils.losses import ppo_loss

    prompts, responses = batch
    actor_config = build_actor_config()
    assert actor_config.strategy == "fsdp2" and actor_config.loss_agg_mode == "token-mean"
    loss_fn = functools.partial(ppo_loss, config=actor_config)

    old = _response_logprobs(engine, make_train_tensordict(prompts, responses, engine=engine, compute_loss=False))
    advantages = [torch.full((len(r),), 1.0 if i % 2 == 0 else -1.0) for i, r in enumerate(responses)]
    td = make_train_tensordict(
        prompts, responses, engine=engine, fields={"old_log_probs": old, "advantages": advantages}
    )

    def snapshot():
        return {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in engine.module.named_parameters()
        }

    before = snapshot()
    with engine.train_mode():
        out = engine.train_batch(td, loss_function=loss_fn)
    after = snapshot()

    losses = out["loss"]
    assert len(losses) == 2  # 4 rows / micro_batch_size_per_gpu 2
    assert all(math.isfinite(x) for x in losses)
    grad_norm = out["metrics"]["grad_norm"]
    assert math.isfinite(grad_norm) and grad_norm > 0
    assert "actor/pg_loss" in out["metrics"]
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(torch.isfinite(after[n]).all() for n in after)
    assert any("layers.0.self_attn.q_proj" in n for n in changed)
    # on-policy: ratio 1, so the PPO loss is -mean(advantage) over response tokens (token-mean)
    n_tok = sum(len(r) for r in responses)
    expected = -sum(float(a.sum()) for a in advantages) / n_tok
    assert sum(losses) == pytest.approx(expected, abs=1e-5)
