"""The transformers rollout backend (``ssopd_verl.cpu.rollout``) against plain transformers and verl's actor.

Run: ``cd /work/main && .venv/bin/python -m pytest -q tests/test_hf_rollout.py``.

The server and the adapter run in this process (the adapter reaches the server through a stand-in for a Ray actor
handle). The Ray path (the replica, the server actor's options, the adapter's actor-name lookup, weight updates
every step) is what the end-to-end ``main_ppo`` runs of ``tests/test_e2e_cpu.py`` go through.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from ssopd_verl.cpu.engine import ensure_cpu_platform

# verl caches its platform on first use: select the CPU platform before anything imports verl's engine modules.
ensure_cpu_platform()

from ssopd_verl.cpu.rollout import (  # noqa: E402
    ROLLOUT_NAME,
    HFReplica,
    HFRolloutServer,
    HFServerAdapter,
    register_hf_rollout,
)

QWEN3_IM_END = 151645  # <|im_end|>
QWEN3_ENDOFTEXT = 151643  # <|endoftext|>
RESPONSE_LENGTH = 16
LOGPROB_TOL = 1e-4
GREEDY = {"temperature": 0.0, "top_k": -1, "top_p": 1.0}  # what verl's agent loop sends for greedy decoding
STUCK_S = 600.0  # how long a test waits for a state before it calls itself stuck


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------


def _write_generation_config(path, eos_token_ids):
    """Released Qwen3 checkpoints list both <|im_end|> and <|endoftext|> as EOS in generation_config.json."""
    file = path / "generation_config.json"
    data = json.loads(file.read_text()) if file.exists() else {}
    data["eos_token_id"] = list(eos_token_ids)
    file.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ssopd_verl.tiny_model import build_tiny_qwen3

    path = tmp_path_factory.mktemp("tiny_qwen3")
    build_tiny_qwen3(path, seed=0)
    _write_generation_config(path, [QWEN3_IM_END, QWEN3_ENDOFTEXT])
    return str(path)


def _rollout_config(**overrides):
    from verl.workers.config import RolloutConfig

    kwargs = dict(
        name=ROLLOUT_NAME,
        tensor_model_parallel_size=1,
        prompt_length=64,
        response_length=RESPONSE_LENGTH,
        dtype="float32",
        load_format="auto",
        calculate_log_probs=True,
        engine_kwargs={"hf": {"batch_wait_ms": 20}},
    )
    kwargs.update(overrides)
    return RolloutConfig(**kwargs)


def _model_config(path):
    from verl.workers.config import HFModelConfig

    return HFModelConfig(path=str(path), override_config={"attn_implementation": "sdpa"})


@pytest.fixture(scope="module")
def model_config(model_path):
    return _model_config(model_path)


@pytest.fixture(scope="module")
def server(model_config):
    return HFRolloutServer(_rollout_config(), model_config)


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def prompts(model_config):
    tok = model_config.tokenizer
    chat = [{"role": "user", "content": "What is 2+3?"}]
    return [
        list(tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]),
        tok.encode("Hello world,"),
        tok.encode("<|im_start|>user\nSolve x^2 = 4.<|im_end|>\n<|im_start|>assistant\n"),
        tok.encode("A"),
        tok.encode("What is 2+3? Answer:"),  # this tiny model's greedy continuation changes token halfway
    ]


@pytest.fixture(scope="module")
def engine(model_path):
    import torch.distributed as dist

    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine

    had_group = dist.is_initialized()
    eng = build_cpu_fsdp2_engine(model_path, micro_batch_size_per_gpu=1, lr=1e-2, seed=0)
    yield eng
    del eng
    if not had_group and dist.is_initialized():
        dist.destroy_process_group()


def _run(coro):
    return asyncio.run(coro)


def _run_all(*coros):
    """Run coroutines concurrently (the way a server sees simultaneous requests); results in order."""

    async def gather():
        return await asyncio.gather(*coros)

    return asyncio.run(gather())


async def _generate_all(server, prompts, sampling_params, n=1, **kwargs):
    """Concurrent requests, as the agent loop sends them (n calls per prompt); outputs in prompt-major order."""
    calls = [
        server.generate(prompt_ids=p, sampling_params=dict(sampling_params), request_id=f"{i}-{j}", **kwargs)
        for i, p in enumerate(prompts)
        for j in range(n)
    ]
    return await asyncio.gather(*calls)


def _reference_greedy(model, prompt, max_new_tokens, eos_token_ids):
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_token_ids),
        pad_token_id=QWEN3_ENDOFTEXT,
    )
    return out[0, len(prompt) :].tolist()


def _reference_logits(model, prompt, response):
    """fp32 logits predicting each response token (plain transformers, one full forward)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : -1]


def _reference_logprobs(model, prompt, response, temperature=1.0):
    logits = _reference_logits(model, prompt, response) / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _actor_logprobs(engine, prompts, responses, temperature):
    """verl's FSDP2 actor recomputation (what the trainer stores as old_log_probs)."""
    from ssopd_verl.cpu.engine import make_train_tensordict
    from verl.workers.utils.padding import response_from_nested

    td = make_train_tensordict(prompts, responses, temperature=temperature, engine=engine, compute_loss=False)
    with engine.eval_mode():
        output = engine.infer_batch(td, loss_function=None)
    log_probs = output["model_output"]["log_probs"]
    return list(response_from_nested(log_probs, td["response_mask"]).unbind())


class _LocalHandle:
    """Stands in for a Ray actor handle: ``handle.method.remote(...)`` returns an awaitable."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)
        return types.SimpleNamespace(remote=lambda *args, **kwargs: method(*args, **kwargs))


def _adapter_for(server, **config_overrides):
    adapter = HFServerAdapter(_rollout_config(**config_overrides), server.model_config, device_mesh=None)
    adapter.server_handle = _LocalHandle(server)
    return adapter


def _perturbed_state_dict(model, scale=0.05, seed=1):
    """Every weight moved by a few percent of its spread; tied weights (embedding = lm_head) stay tied."""
    gen = torch.Generator().manual_seed(seed)
    state, by_storage = {}, {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key not in by_storage:
            new = tensor.clone()
            if tensor.is_floating_point():
                new = new + scale * torch.randn(tensor.shape, generator=gen) * (tensor.std() + 1e-3)
            by_storage[key] = new
        state[name] = by_storage[key]
    return state


# ---------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------


def test_registration_through_verl_lookups():
    from verl.workers.config import RolloutConfig
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class
    from verl.workers.rollout.replica import RolloutReplicaRegistry, get_rollout_replica_class

    # start from verl's own registries (ssopd_verl's verl.plugins entry point may already have registered "hf")
    _ROLLOUT_REGISTRY.pop((ROLLOUT_NAME, "async"), None)
    RolloutReplicaRegistry._registry.pop(ROLLOUT_NAME, None)
    with pytest.raises(AssertionError, match="not found"):
        get_rollout_class(ROLLOUT_NAME, "async")
    assert register_hf_rollout() == ROLLOUT_NAME == "hf"
    register_hf_rollout()  # idempotent
    assert get_rollout_class(ROLLOUT_NAME, "async") is HFServerAdapter  # what ActorRolloutRefWorker calls
    assert get_rollout_replica_class(ROLLOUT_NAME) is HFReplica  # what LLMServerManager calls
    assert RolloutReplicaRegistry.get(ROLLOUT_NAME) is HFReplica
    # verl's own names are refused; a name taken by another backend is not overwritten
    for reserved in ("vllm", "sglang", "trtllm"):
        with pytest.raises(ValueError):
            register_hf_rollout(reserved)
    _ROLLOUT_REGISTRY[("someone_else", "async")] = "elsewhere.Adapter"
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_hf_rollout("someone_else")
    finally:
        del _ROLLOUT_REGISTRY[("someone_else", "async")]
    # verl's config validation accepts the name; the replica never asks for a GPU
    config = RolloutConfig(name=ROLLOUT_NAME, tensor_model_parallel_size=1)
    replica = HFReplica(replica_rank=0, config=config, model_config={}, gpus_per_node=1)
    assert replica.rollout_worker_use_gpu() is False and replica.world_size == 1


def test_registration_from_a_plugin_while_this_module_imports_verl(tmp_path):
    """A Ray worker's first import is this module (unpickling HFRolloutServer); it imports verl, verl loads its
    plugins, and a plugin calling register_hf_rollout() must find it in the partially initialised module."""
    (tmp_path / "hf_plugin_shim.py").write_text(
        "from ssopd_verl.cpu.rollout import register_hf_rollout\nregister_hf_rollout()\n"
    )
    code = (
        "import ssopd_verl.cpu.rollout as m\n"
        "from verl.workers.rollout.base import get_rollout_class\n"
        "from verl.workers.rollout.replica import get_rollout_replica_class\n"
        "assert get_rollout_class('hf', 'async') is m.HFServerAdapter\n"
        "assert get_rollout_replica_class('hf') is m.HFReplica\n"
        "print('registered')\n"
    )
    # verl imports VERL_USE_EXTERNAL_MODULES on `import verl` just before its entry-point plugins, and lets errors
    # propagate (a failing entry-point plugin would only be logged at DEBUG level)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "VERL_USE_EXTERNAL_MODULES": "hf_plugin_shim"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "registered" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling_params",
    [GREEDY, {"temperature": 1.0, "top_k": 1, "top_p": 1.0}, {"temperature": 0.7, "top_k": -1, "top_p": 1e-6}],
    ids=["temperature0", "top_k1", "top_p_tiny"],
)
def test_greedy_matches_transformers_generate(server, hf_model, prompts, sampling_params):
    outputs = _run(_generate_all(server, prompts, {**sampling_params, "logprobs": True}))
    for prompt, out in zip(prompts, outputs):
        want = _reference_greedy(hf_model, prompt, RESPONSE_LENGTH, server.eos_token_ids)
        assert out.token_ids == want
        assert out.stop_reason == "completed"
        assert len(out.log_probs) == len(out.token_ids)
        if sampling_params == GREEDY:  # greedy reports the raw log-probs (temperature 1), as vLLM does
            torch.testing.assert_close(
                torch.tensor(out.log_probs), _reference_logprobs(hf_model, prompt, out.token_ids), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize(
    "sampling_params",
    [{"temperature": 0.8, "top_k": -1, "top_p": 1.0}, {"temperature": 0.8, "top_k": 50, "top_p": 0.9}],
    ids=["plain", "top_k_top_p"],
)
def test_sampled_logprobs_match_actor_recomputation(server, engine, prompts, sampling_params):
    n = 3
    outputs = _run(_generate_all(server, prompts, {**sampling_params, "logprobs": True}, n=n))
    responses = [o.token_ids for o in outputs]
    prompt_rows = [p for p in prompts for _ in range(n)]
    actor = _actor_logprobs(engine, prompt_rows, responses, temperature=sampling_params["temperature"])
    for out, want in zip(outputs, actor):
        assert out.stop_reason == "completed" and len(out.log_probs) == len(out.token_ids) == want.numel()
        # same logits, same temperature, no top-k/top-p renormalisation: the actor's old_log_probs convention
        torch.testing.assert_close(torch.tensor(out.log_probs), want.float(), atol=LOGPROB_TOL, rtol=0)
    # n calls per prompt really sample (a random model over 151,936 tokens does not repeat itself by chance)
    for i in range(len(prompts)):
        group = [tuple(r) for r in responses[i * n : (i + 1) * n]]
        assert len(set(group)) > 1


def test_what_the_agent_loop_never_asks_for_is_refused(server, model_config, prompts):
    for mode in ("raw_logprobs", "processed_logits"):
        with pytest.raises(ValueError, match="logprobs_mode"):
            HFRolloutServer(_rollout_config(logprobs_mode=mode), model_config)
    with pytest.raises(ValueError, match="repetition penalty"):
        _run(server.generate(prompts[0], {**GREEDY, "repetition_penalty": 1.2}, "r"))
    with pytest.raises(ValueError, match="one request yields one sequence"):
        _run(server.generate(prompts[0], {**GREEDY, "n": 2}, "n"))
    with pytest.raises(NotImplementedError, match="text-only"):
        _run(server.generate(prompts[0], GREEDY, "i", image_data=["an image"]))
    with pytest.raises(ValueError, match="unknown rollout.engine_kwargs.hf"):
        HFRolloutServer(_rollout_config(engine_kwargs={"hf": {"max_num_seqs": 4}}), model_config)


def test_top_k_and_top_p_restrict_the_sampled_tokens(server, hf_model, prompts):
    temperature = 1.0
    outputs = _run(_generate_all(server, prompts, {"temperature": temperature, "top_k": 3, "logprobs": True}, n=2))
    for out, prompt in zip(outputs, [p for p in prompts for _ in range(2)]):
        logits = _reference_logits(hf_model, prompt, out.token_ids)
        ranks = (logits > logits.gather(-1, torch.tensor(out.token_ids)[:, None])).sum(-1)
        assert ranks.max().item() < 3, ranks.tolist()
    top_p = 0.3
    outputs = _run(_generate_all(server, prompts, {"temperature": temperature, "top_p": top_p}, n=2))
    for out, prompt in zip(outputs, [p for p in prompts for _ in range(2)]):
        probs = torch.softmax(_reference_logits(hf_model, prompt, out.token_ids) / temperature, -1)
        chosen = probs.gather(-1, torch.tensor(out.token_ids)[:, None])
        mass_above = (probs * (probs > chosen)).sum(-1)  # probability of the tokens ranked above the sampled one
        assert (mass_above < top_p + 1e-4).all(), mass_above.tolist()
        assert out.log_probs is None  # not requested


def test_max_tokens_and_defaults(server, prompts):
    outputs = _run_all(
        server.generate(prompts[0], {**GREEDY, "max_tokens": 5}, "a"),
        server.generate(prompts[1], {**GREEDY, "max_tokens": 3}, "b"),
        server.generate(prompts[2], {**GREEDY, "ignore_eos": True}, "c"),
        server.generate(list(range(100, 160)), {**GREEDY}, "d"),  # 60-token prompt: 64 + 16 - 60 = 20 > 16
        server.generate(list(range(100, 170)), {**GREEDY}, "e"),  # 70-token prompt: 64 + 16 - 70 = 10
    )
    assert [len(o.token_ids) for o in outputs] == [5, 3, RESPONSE_LENGTH, RESPONSE_LENGTH, 10]
    assert all(o.stop_reason == "completed" for o in outputs)
    with pytest.raises(ValueError, match="no room"):
        _run(server.generate(list(range(server.max_model_len)), GREEDY, "g"))


def test_stops_at_every_eos_of_tokenizer_and_generation_config(model_path, server, hf_model, prompts, tmp_path):
    assert set(server.eos_token_ids) == {QWEN3_IM_END, QWEN3_ENDOFTEXT}
    # Make a token the greedy continuation produces an EOS of the checkpoint's generation_config.
    prompt = prompts[4]
    free = _reference_greedy(hf_model, prompt, RESPONSE_LENGTH, ())
    stop_at = next(j for j in range(2, len(free)) if free[j] not in free[:j])  # a token that first appears late
    stop_token = free[stop_at]
    path = tmp_path / "model"
    shutil.copytree(model_path, path)
    _write_generation_config(path, [QWEN3_IM_END, QWEN3_ENDOFTEXT, stop_token])
    eos_server = HFRolloutServer(_rollout_config(), _model_config(path))
    assert set(eos_server.eos_token_ids) == {QWEN3_IM_END, QWEN3_ENDOFTEXT, stop_token}
    stopped, ignored = _run_all(
        eos_server.generate(prompt, {**GREEDY, "logprobs": True}, "x"),
        eos_server.generate(prompt, {**GREEDY, "ignore_eos": True}, "y"),
    )
    via_request = _run(server.generate(prompt, {**GREEDY, "stop_token_ids": [stop_token]}, "z"))
    assert stopped.token_ids == free[: stop_at + 1]  # the stop token is returned, as vLLM does
    assert stopped.stop_reason == "completed" and len(stopped.log_probs) == stop_at + 1
    assert ignored.token_ids == free
    assert via_request.token_ids == free[: stop_at + 1]


def test_abort_and_resume(server, prompts):
    """abort_all_requests ends a running request with what it has: the decode is held after its second forward
    (the prompt's, then one decode step) until the abort is under way, so the partial completion has exactly two
    tokens however fast or loaded the machine is; a request sent meanwhile is parked until resume_generation."""
    forwards, held = [0], threading.Event()

    def hold_until_abort(module, args, output):
        forwards[0] += 1
        if forwards[0] == 2:
            held.set()
            deadline = time.monotonic() + STUCK_S
            while not server._abort_all:  # set by abort_all_requests, which then waits for this batch to stop
                assert time.monotonic() < deadline, f"stuck: no abort within {STUCK_S:.0f}s"
                time.sleep(0.001)

    async def scenario():
        long = {**GREEDY, "ignore_eos": True, "max_tokens": 3000, "logprobs": True}
        running = asyncio.ensure_future(server.generate(prompts[0], long, "long"))
        assert await asyncio.to_thread(held.wait, STUCK_S), f"stuck: the request did not start within {STUCK_S:.0f}s"
        result = await server.abort_all_requests()
        partial = await running
        parked = asyncio.ensure_future(server.generate(prompts[1], {**GREEDY, "max_tokens": 2}, "parked"))
        await asyncio.sleep(0.1)  # a chance to run, which it must not take: held until resume_generation
        assert not parked.done()
        await server.resume_generation()
        return result, partial, await parked

    hook = server.model.register_forward_hook(hold_until_abort)
    try:
        result, partial, parked = _run(scenario())
    finally:
        hook.remove()
    assert server.max_model_len - len(prompts[0]) > 2  # room for more: the abort, not the length, stopped it
    assert result["request_ids"] == ["long"]
    assert partial.stop_reason == "aborted" and len(partial.token_ids) == 2
    assert len(partial.log_probs) == len(partial.token_ids)
    assert parked.stop_reason == "completed" and len(parked.token_ids) == 2


# ---------------------------------------------------------------------------------------------------------------
# determinism: a completion is a function of (seed, global_steps, request, k), not of timing or batch company
# ---------------------------------------------------------------------------------------------------------------

SAMPLED = {"temperature": 1.0, "top_k": -1, "top_p": 1.0, "logprobs": True}  # what verl's agent loop sends


def _completions(server, prompts, n, order):
    """n identical concurrent requests per prompt, issued in ``order`` (a permutation of the prompt indices);
    returns {prompt index: [(token ids, log-probs) of its k-th request]}."""
    calls = [(i, j) for i in order for j in range(n)]
    outputs = _run(_generate_all(server, [prompts[i] for i, _ in calls], SAMPLED))
    by_prompt = {}
    for (i, _), out in zip(calls, outputs):
        assert out.stop_reason == "completed"
        by_prompt.setdefault(i, []).append((tuple(out.token_ids), tuple(out.log_probs)))
    return by_prompt


def test_samples_do_not_depend_on_batch_company_or_order(server, prompts, monkeypatch):
    n = 3
    prompts = prompts + [p[:-1] + [100] for p in prompts]  # two prompts of each length
    batch_sizes = []
    decode = server._decode
    monkeypatch.setattr(server, "_decode", lambda batch: batch_sizes.append(len(batch)) or decode(batch))
    _run(server.set_global_steps(7))
    # all prompts at once (several lengths arrive mixed; a batch holds one length and other prompts' requests)
    together = _completions(server, prompts, n, order=range(len(prompts)))
    assert max(batch_sizes) > n  # requests of several prompts really shared forwards
    _run(server.set_global_steps(8))
    _run(server.set_global_steps(7))  # back at step 7: k restarts, the same samples come again...
    reordered = _completions(server, prompts, n, order=reversed(range(len(prompts))))  # ...in another order
    assert all(together[i] == reordered[i] for i in range(len(prompts)))
    for i in (0, len(prompts) - 1):  # the first and the last prompt (two lengths)
        _run(server.set_global_steps(8))
        _run(server.set_global_steps(7))
        alone = _completions(server, prompts, n, order=[i])  # ...and with no other prompt around
        # the k-th identical request gets the same completion, down to the last bit of its log-probs
        assert together[i] == alone[i]
        assert len(set(alone[i])) == n  # and the n requests of a prompt are n different samples


def test_a_fresh_server_samples_the_same_and_step_or_seed_change_it(server, model_config, prompts):
    """What a resumed run relies on: a new server process at the same step samples what the old one did."""
    _run(server.set_global_steps(7))
    at_7 = _completions(server, prompts, 2, order=range(len(prompts)))
    _run(server.set_global_steps(9))
    at_9 = _completions(server, prompts, 2, order=range(len(prompts)))
    torch.manual_seed(12345)  # the global RNG plays no part
    fresh, other_seed = (HFRolloutServer(_rollout_config(**kw), model_config) for kw in ({}, {"seed": 1234}))
    for s in (fresh, other_seed):
        _run(s.set_global_steps(7))
    again = _completions(fresh, prompts, 2, order=range(len(prompts)))
    seeded = _completions(other_seed, prompts, 2, order=range(len(prompts)))
    for i in range(len(prompts)):
        assert again[i] == at_7[i] != at_9[i] and at_7[i] != seeded[i]


def test_greedy_does_not_depend_on_batch_company(server, prompts):
    """Validation decodes greedily: the same answer whether a prompt comes alone or with others of its length."""
    same_length = [prompts[0][:-1] + [t] for t in (100, 200, 300, 400)] + [prompts[0]]
    together = _run(_generate_all(server, same_length, {**GREEDY, "logprobs": True}))
    for prompt, out in zip(same_length, together):
        single = _run(server.generate(prompt, {**GREEDY, "logprobs": True}, "alone"))
        assert (out.token_ids, out.log_probs) == (single.token_ids, single.log_probs)


# ---------------------------------------------------------------------------------------------------------------
# weight sync
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dummy_server(model_config):
    """load_format=dummy (verl's default): random weights until the actor's arrive."""
    return HFRolloutServer(_rollout_config(load_format="dummy"), model_config)


def test_update_weights_loads_new_weights(dummy_server, hf_model, model_path, prompts):
    from transformers import AutoModelForCausalLM

    server = dummy_server
    perturbed = _perturbed_state_dict(hf_model)
    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ref.load_state_dict(perturbed)
    before = _run(_generate_all(server, prompts, {**GREEDY, "logprobs": True}))
    # the actor's export has no lm_head.weight when embeddings are tied (as verl's FSDP engine sends it)
    weights = ((k, v) for k, v in perturbed.items() if k != "lm_head.weight")
    adapter = _adapter_for(server)
    result = _run(adapter.update_weights(weights, global_steps=3, peft_config=None, base_sync_done=True))
    assert result == {"num_tensors": len(perturbed) - 1}
    after = _run(_generate_all(server, prompts, {**GREEDY, "logprobs": True}))
    for prompt, old, new in zip(prompts, before, after):
        assert new.token_ids == _reference_greedy(ref, prompt, RESPONSE_LENGTH, server.eos_token_ids)
        torch.testing.assert_close(
            torch.tensor(new.log_probs), _reference_logprobs(ref, prompt, new.token_ids), atol=1e-5, rtol=0
        )
        assert new.extra_fields["global_steps"] == 3
        assert old.extra_fields["global_steps"] is None
    # negative control: the dummy weights generated something else
    assert [o.token_ids for o in before] != [o.token_ids for o in after]

    # a state dict that does not fit or cover the model is refused before anything is copied
    with pytest.raises(RuntimeError, match="unset"):
        _run(adapter.update_weights(iter([("model.norm.weight", torch.zeros_like(perturbed["model.norm.weight"]))])))
    with pytest.raises(KeyError, match="no counterpart"):
        _run(adapter.update_weights(iter([("model.not_a_weight", torch.zeros(3))])))
    with pytest.raises(ValueError, match="shape"):
        _run(adapter.update_weights(iter([("model.norm.weight", torch.zeros(3))])))
    unchanged = _run(server.generate(prompts[0], {**GREEDY, "logprobs": True}, "after-errors"))
    assert (unchanged.token_ids, unchanged.log_probs) == (after[0].token_ids, after[0].log_probs)
    # ranks other than the replica's first drain the generator (FSDP collectives) and send nothing
    other = HFServerAdapter(_rollout_config(tensor_model_parallel_size=1), server.model_config, None, replica_rank=0)
    other._has_server = False
    drained = []
    _run(other.update_weights(((k, drained.append(k) or v) for k, v in perturbed.items())))
    assert len(drained) == len(perturbed)


def test_rollout_follows_the_actor_after_a_ppo_step(dummy_server, engine, prompts):
    """Train verl's FSDP2 actor one PPO step, sync with verl's own export, compare log-probs with the actor."""
    import functools

    from ssopd_verl.cpu.engine import build_actor_config, make_train_tensordict
    from verl.workers.utils.losses import ppo_loss

    server = dummy_server
    adapter = _adapter_for(server)
    sampling = {"temperature": 0.8, "logprobs": True}

    def sync(step):
        weights, _ = engine.get_per_tensor_param()  # what ActorRolloutRefWorker.update_weights hands the rollout
        _run(adapter.update_weights(weights, global_steps=step))

    sync(0)
    outputs = _run(_generate_all(server, prompts, sampling, n=2))
    rows = [p for p in prompts for _ in range(2)]
    responses = [o.token_ids for o in outputs]
    old = _actor_logprobs(engine, rows, responses, temperature=0.8)
    for out, want in zip(outputs, old):
        torch.testing.assert_close(torch.tensor(out.log_probs), want.float(), atol=LOGPROB_TOL, rtol=0)

    advantages = [torch.full((len(r),), 1.0 if i % 2 == 0 else -1.0) for i, r in enumerate(responses)]
    td = make_train_tensordict(
        rows, responses, temperature=0.8, engine=engine, fields={"old_log_probs": old, "advantages": advantages}
    )
    with engine.train_mode():
        engine.train_batch(td, loss_function=functools.partial(ppo_loss, config=build_actor_config()))
    new_actor = _actor_logprobs(engine, rows, responses, temperature=0.8)
    assert max((a - b).abs().max().item() for a, b in zip(old, new_actor)) > 1e-2  # the step changed the policy

    stale = _run(_generate_all(server, prompts, {**sampling, "max_tokens": 1}, n=2))
    sync(1)
    fresh = _run(_generate_all(server, prompts, sampling, n=2))
    actor = _actor_logprobs(engine, rows, [o.token_ids for o in fresh], temperature=0.8)
    for out, want in zip(fresh, actor):
        torch.testing.assert_close(torch.tensor(out.log_probs), want.float(), atol=LOGPROB_TOL, rtol=0)
        assert out.extra_fields["global_steps"] == 1
    assert all(o.extra_fields["global_steps"] == 0 for o in stale)
