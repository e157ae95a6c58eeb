"""A CPU rollout backend for verl 0.9.1 on plain transformers, used by the tiny default and the tests.

``+platform=cpu`` selects it (``actor_rollout_ref.rollout.name=hf``) so that verl's own trainer, agent loop and
weight sync run end to end without an accelerator; vLLM is the backend on GPUs. Text only, one sequence per
request (the agent loop issues ``rollout.n`` calls). verl's contract, with no verl function patched:

* Registration: ``verl.workers.rollout.base._ROLLOUT_REGISTRY[(name, "async")]`` (private: verl 0.9.1 has no
  public way to register a ``BaseRollout``) and ``RolloutReplicaRegistry.register(name, loader)``.
* :class:`HFServerAdapter`, the ``BaseRollout`` in every trainer rank. The v1 trainer syncs weights the ``naive``
  way: ``update_weights`` gets the actor's ``(HF name, full tensor)`` generator on every rank; every rank drains it
  (FSDP's ``full_tensor()`` is a collective) and the replica's first rank ships the state dict to its server.
* :class:`HFRolloutServer`, a Ray actor per replica (no GPU): ``generate(prompt_ids, sampling_params, request_id)
  -> TokenOutput``, ``set_global_steps``, ``abort_all_requests``/``resume_generation`` (partial completions come
  back with ``stop_reason="aborted"``) and the memory calls (``wake_up``, ``sleep``, ...), no-ops here.
* :class:`HFReplica` starts the server next to the replica's first trainer rank under a unique pseudo-address.

Determinism: a completion is a pure function of (``rollout.seed``, the replica, ``global_steps``, the prompt ids,
the sampling parameters, k), k counting the identical requests that came before it since ``global_steps`` last
changed. Each request samples from its own ``torch.Generator`` seeded from a hash of that tuple, so a run resumed
from a checkpoint samples what the uninterrupted run sampled and no RNG state needs saving. The agent loop sends
the n samples of a prompt as n identical requests (with random request ids), so which of them gets k = 0 is up to
arrival order; the set of n completions is fixed, and verl orders a batch by completion time in any case. Timing
decides which requests share a forward, so that must not matter either: a forward always has ``max_batch_size``
rows (filler rows make up the number) of one prompt length (nothing padded). CPU kernels change their arithmetic
with the number of rows (~1e-6 on the logits, enough to flip a sampled token now and then), not with what the other
rows hold or where a row sits: a row gets the same logits, bit for bit, whatever its company (the tests check it).
``max_batch_size`` and ``num_threads`` are thus part of the numerics, as the seed is. With several replicas, which
replica's counter a request meets is up to verl's load balancer.

Sampling as in vLLM: temperature (``<= 1e-5``: greedy), then top-k (``-1``/``0``: off), then top-p; no repetition
penalty (the agent loop always sends 1.0). Log-probs (``logprobs``) are the fp32 ``log_softmax`` of the logits
after temperature, before top-k/top-p (vLLM's ``processed_logprobs``, verl's default and what the actor recomputes
as ``old_log_probs``; greedy: temperature 1). A completion ends with a stop token
(returned; the EOS ids of the tokenizer and of ``generation_config`` plus ``stop_token_ids``, unless ``ignore_eos``)
or after ``max_tokens`` (default, vLLM's in verl: ``min(response_length, prompt_length + response_length -
len(prompt))``), within the context window.

Options in ``actor_rollout_ref.rollout.engine_kwargs.hf`` (add with ``+``): ``num_threads`` (torch threads of the
server; default 1: the server shares the cores with the trainer ranks, and two threads on a busy 2-core machine made
the tiny default's generation 10x slower), ``num_cpus`` (Ray CPUs it reserves; default 0, so it fits beside the
trainer ranks), ``max_batch_size`` (default 16), ``batch_wait_ms`` (how long a batch waits for company; default 5).
``rollout.dtype`` is the model's dtype (``float32`` on CPU, as the actor); ``load_format=dummy`` (verl's default)
starts from random weights, which the trainer replaces before the first generation.
"""

from __future__ import annotations

import os

ROLLOUT_NAME = "hf"
"""The default registration name (``actor_rollout_ref.rollout.name=hf``)."""

_RESERVED_NAMES = ("vllm", "sglang", "trtllm")  # verl branches on these names in several places
_ADAPTER_PATH = f"{__name__}.HFServerAdapter"  # resolved by verl's get_rollout_class() when it is looked up


# Registration comes before this module imports verl: a Ray worker whose first import is this module (unpickling
# HFRolloutServer) imports verl below, verl loads its plugins, and a plugin calling register_hf_rollout() must find
# it in this partially initialised module.


def _load_replica():
    return HFReplica


def register_hf_rollout(name: str = ROLLOUT_NAME) -> str:
    """Register this backend with verl as ``rollout.name=<name>``; idempotent. Returns ``name``.

    Refuses verl's own backend names and a name another backend holds. Safe in a ``verl.plugins`` entry point.
    """
    if name in _RESERVED_NAMES:
        raise ValueError(f"rollout name {name!r} is verl's own backend name (verl branches on it); pick another")
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    key = (name, "async")
    if base._ROLLOUT_REGISTRY.get(key, _ADAPTER_PATH) != _ADAPTER_PATH:
        raise ValueError(f"rollout {key} is already registered as {base._ROLLOUT_REGISTRY[key]!r}")
    if RolloutReplicaRegistry._registry.get(name, _load_replica) is not _load_replica:
        raise ValueError(f"rollout replica {name!r} is already registered")
    base._ROLLOUT_REGISTRY[key] = _ADAPTER_PATH
    RolloutReplicaRegistry.register(name, _load_replica)
    return name


import asyncio  # noqa: E402
import hashlib  # noqa: E402
import threading  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Optional  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import HFModelConfig, RolloutConfig  # noqa: E402
from verl.workers.rollout.base import BaseRollout  # noqa: E402
from verl.workers.rollout.replica import RolloutReplica, TokenOutput  # noqa: E402

__all__ = ["ROLLOUT_NAME", "HFReplica", "HFRolloutServer", "HFServerAdapter", "register_hf_rollout"]

_GREEDY_EPS = 1e-5  # vLLM's threshold: a temperature below it means greedy


def _server_name(rollout_name: str, replica_rank: int, suffix: str = "") -> str:
    """The Ray actor name of a replica's server: how each trainer rank's adapter finds it."""
    return f"{rollout_name}_server_{replica_rank}{suffix}"


def _options(config: RolloutConfig) -> dict[str, Any]:
    """``engine_kwargs.hf`` over the defaults; an unknown key is an error, not a silent no-op."""
    options = {"num_threads": 1, "num_cpus": 0, "max_batch_size": 16, "batch_wait_ms": 5}
    given = dict((config.engine_kwargs or {}).get("hf") or {})
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise ValueError(f"unknown rollout.engine_kwargs.hf keys {unknown}; known: {sorted(options)}")
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def _ids(value: Any) -> list[int]:
    return [] if value is None else [int(value)] if isinstance(value, int) else [int(v) for v in value]


@dataclass(frozen=True)
class _Sampling:
    """A request's sampling parameters, normalised: requests with equal ones can share a batch."""

    temperature: float  # 0: greedy
    top_k: int  # 0: off
    top_p: float
    logprobs: bool
    stop_ids: tuple[int, ...]


@dataclass(eq=False)  # requests are distinct even when identical
class _Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: _Sampling
    generator: Optional[torch.Generator]  # None: greedy
    future: asyncio.Future
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    aborted: bool = False


def _next_token(logits: torch.Tensor, request: _Request) -> tuple[int, float]:
    """One row's next token and its log-prob, from that row's fp32 logits alone (1-D ops, never the batch's)."""
    s = request.sampling
    if s.temperature == 0:
        token = int(logits.argmax())
    else:
        logits = logits / s.temperature
        kept = logits
        if s.top_k > 0:
            kept = kept.masked_fill(kept < kept.topk(min(s.top_k, kept.numel())).values[-1], float("-inf"))
        if s.top_p < 1.0:  # drop the tokens whose better-ranked ones already hold top_p of the mass
            ranked, order = kept.sort(descending=True)
            probs = ranked.softmax(-1)
            kept = kept.index_fill(0, order[probs.cumsum(-1) - probs >= s.top_p], float("-inf"))
        token = int(torch.multinomial(kept.softmax(-1), 1, generator=request.generator))
    return token, float(torch.log_softmax(logits, -1)[token]) if s.logprobs else 0.0


class HFRolloutServer:
    """Token-in/token-out generation on a transformers causal LM (see the module docstring).

    ``config``: the rollout config (``RolloutConfig`` or its DictConfig); ``model_config``: ``HFModelConfig`` or the
    ``actor_rollout_ref.model`` DictConfig; ``replica_rank``: this replica (part of every request's seed).
    """

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0, **kwargs: Any) -> None:
        self.config: RolloutConfig = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        if not isinstance(model_config, HFModelConfig):
            model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.model_config = model_config
        self.replica_rank = int(replica_rank)
        self.options = _options(self.config)
        if self.config.logprobs_mode != "processed_logprobs":  # verl's default, what the actor recomputes
            raise ValueError(f"rollout.logprobs_mode={self.config.logprobs_mode!r}: hf has processed_logprobs only")
        torch.set_num_threads(int(self.options["num_threads"]))
        self.model = self._build_model()
        self.eos_token_ids = self._eos_token_ids()
        context = getattr(self.model.config, "max_position_embeddings", None)  # vLLM's default: the model's
        default_len = context or self.config.prompt_length + self.config.response_length
        self.max_model_len = int(self.config.max_model_len or default_len)
        # every name of every parameter and buffer (tied weights have two): the actor may send either
        self._weights = dict(self.model.named_parameters(remove_duplicate=False))
        self._weights.update(self.model.named_buffers(remove_duplicate=False))

        self.global_steps: Optional[int] = None  # the weights' version, reported with every completion
        self._seen: Counter = Counter()  # identical sampled requests since global_steps last changed
        self._lock = threading.Lock()  # the model: generation (in a worker thread) vs weight loading
        self._queue: list[_Request] = []
        self._running: list[_Request] = []
        self._worker: Optional[asyncio.Task] = None
        self._paused = self._rejecting = self._abort_all = False

    def _build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, GenerationConfig

        from verl.utils.torch_dtypes import PrecisionType

        mc = self.model_config
        kwargs = dict(
            dtype=PrecisionType.to_dtype(self.config.dtype),
            attn_implementation="eager" if (mc.override_config or {}).get("attn_implementation") == "eager" else "sdpa",
            trust_remote_code=mc.trust_remote_code,
        )
        if self.config.load_format == "dummy":  # verl's default: the actor's weights arrive before generation
            model = AutoModelForCausalLM.from_config(mc.hf_config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(mc.local_path, config=mc.hf_config, **kwargs)
        model.generation_config = GenerationConfig()  # the checkpoint's sampling defaults must not leak into ours
        return model.to(kwargs["dtype"]).eval().requires_grad_(False)

    def _eos_token_ids(self) -> tuple[int, ...]:
        """The tokenizer's EOS and the generation config's (Qwen3: ``<|im_end|>`` and ``<|endoftext|>``)."""
        mc = self.model_config
        ids = [i for src in (mc.tokenizer, mc.generation_config) for i in _ids(getattr(src, "eos_token_id", None))]
        return tuple(dict.fromkeys(ids or _ids(mc.hf_config.eos_token_id)))

    # ---- requests ----------------------------------------------------------------------------------------------

    def _sampling(self, params: dict[str, Any]) -> _Sampling:
        def get(key):  # the request's value, else the rollout config's
            return params[key] if params.get(key) is not None else getattr(self.config, key)

        if int(params.get("n") or 1) != 1:
            raise ValueError("sampling_params n > 1: one request yields one sequence (the agent loop issues n calls)")
        if float(params.get("repetition_penalty") or 1.0) != 1.0:  # verl's agent loop always sends 1.0
            raise ValueError("the hf rollout has no repetition penalty")
        temperature, top_k, top_p = float(get("temperature")), int(get("top_k")), float(get("top_p"))
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise ValueError(f"temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")
        greedy = temperature <= _GREEDY_EPS
        stop_ids = ([] if get("ignore_eos") else list(self.eos_token_ids)) + _ids(params.get("stop_token_ids"))
        return _Sampling(
            temperature=0.0 if greedy else temperature,
            top_k=0 if greedy else max(top_k, 0),
            top_p=1.0 if greedy else top_p,
            logprobs=bool(params.get("logprobs", False)),
            stop_ids=tuple(dict.fromkeys(stop_ids)),
        )

    def _max_tokens(self, params: dict[str, Any], prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"a {prompt_len}-token prompt leaves no room within max_model_len {self.max_model_len}")
        wanted = params.get("max_tokens")
        if wanted is None:  # what verl's vLLM server asks for
            length = self.config.response_length
            wanted = min(length, self.config.prompt_length + length - prompt_len)
        return max(1, min(int(wanted), room))

    def _generator(self, prompt: list[int], sampling: _Sampling) -> Optional[torch.Generator]:
        """The request's own RNG (see the module docstring): seeded from the request and how many identical ones
        came before it at this ``global_steps``, never from arrival times or batch company."""
        if sampling.temperature == 0:
            return None
        key = (tuple(prompt), sampling)
        k = self._seen[key]
        self._seen[key] += 1
        text = repr((int(self.config.seed), self.replica_rank, self.global_steps, key, k))
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1  # manual_seed takes < 2**63
        return torch.Generator().manual_seed(seed)

    def _set_global_steps(self, global_steps: Optional[int]) -> None:
        if global_steps != self.global_steps:
            self._seen.clear()  # k restarts: identical requests of the new step are new samples
            self.global_steps = global_steps

    async def generate(self, prompt_ids, sampling_params, request_id=None, **kwargs: Any) -> TokenOutput:
        """One completion of ``prompt_ids``: the contract of verl's ``vLLMHttpServer.generate``."""
        if any(kwargs.get(key) is not None for key in ("image_data", "video_data", "audio_data")):
            raise NotImplementedError("the hf rollout is text-only")
        prompt = [int(t) for t in (prompt_ids.reshape(-1).tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
        params = dict(sampling_params or {})
        sampling, max_tokens = self._sampling(params), self._max_tokens(params, len(prompt))
        generator = self._generator(prompt, sampling)  # now, in call order, before anything awaits
        future = asyncio.get_running_loop().create_future()
        request = _Request(request_id or "", prompt, max_tokens, sampling, generator, future)
        while self._paused:  # abort_all_requests() parks new requests until resume_generation()
            if self._rejecting:
                request.aborted = True
                return self._output(request)
            await asyncio.sleep(0.01)
        self._queue.append(request)
        worker = self._worker
        if worker is None or worker.done() or worker.get_loop() is not asyncio.get_running_loop():
            self._worker = asyncio.create_task(self._serve())
        return await request.future

    def _output(self, request: _Request) -> TokenOutput:
        return TokenOutput(
            token_ids=request.token_ids,
            log_probs=request.log_probs if request.sampling.logprobs else None,
            stop_reason="aborted" if request.aborted else "completed",
            extra_fields={"global_steps": self.global_steps},  # the weights' version, as vLLM reports it
        )

    async def _serve(self) -> None:
        """Run the queue a batch at a time, off the event loop, until it is empty."""
        while self._queue:
            await asyncio.sleep(self.options["batch_wait_ms"] / 1000)  # let concurrent requests join the batch
            while self._paused:
                await asyncio.sleep(0.01)
            if not self._queue:
                continue
            first = self._queue[0]  # and whoever can run with it: same sampling, same prompt length (no padding)
            key = (first.sampling, len(first.prompt_ids))
            same = [r for r in self._queue if (r.sampling, len(r.prompt_ids)) == key]
            batch = same[: int(self.options["max_batch_size"])]
            self._queue = [r for r in self._queue if r not in batch]
            self._running = batch
            try:
                await asyncio.to_thread(self._decode, batch)
            except Exception as error:  # every caller of the batch gets the error
                for request in batch:
                    if not request.future.done():  # a caller may have given up waiting
                        request.future.set_exception(error)
                continue
            finally:
                self._running = []
            for request in batch:
                if not request.future.done():
                    request.future.set_result(self._output(request))

    def _decode(self, batch: list[_Request]) -> None:
        """Generate a batch in lockstep with a KV cache, then each row picks its own tokens (``_next_token``).

        Every forward has ``max_batch_size`` rows (filler rows make up the number) of one prompt length (nothing
        padded or masked): CPU kernels change their arithmetic with the number of rows, but not with what the
        other rows hold or where a row sits, so a row's logits are the same bits whatever its company.
        """
        from transformers import DynamicCache

        stop_ids = set(batch[0].sampling.stop_ids)
        fillers = int(self.options["max_batch_size"]) - len(batch)
        inputs = torch.tensor([r.prompt_ids for r in batch] + [batch[0].prompt_ids] * fillers)
        cache = DynamicCache(config=self.model.config)
        live = list(batch)
        with self._lock, torch.inference_mode():
            while live:
                out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1].float()
                for i, request in enumerate(batch):
                    if request in live:
                        token, log_prob = _next_token(logits[i], request)
                        request.token_ids.append(token)
                        request.log_probs.append(log_prob)
                live = [r for r in live if r.token_ids[-1] not in stop_ids and len(r.token_ids) < r.max_tokens]
                if self._abort_all:  # abort_all_requests(): the rest stop here, with what they have
                    for request in live:
                        request.aborted = True
                    live = []
                # finished and filler rows go on being fed: their outputs are ignored and touch no other row
                inputs = torch.tensor([[r.token_ids[-1]] for r in batch] + [[0]] * fillers)

    # ---- weight sync (driven by HFServerAdapter.update_weights) -----------------------------------------------

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], global_steps=None) -> dict:
        """Load the actor's full state dict (HF names); ``global_steps`` is the new weights' version."""
        await asyncio.to_thread(self._load, named_tensors)
        if global_steps is not None:
            self._set_global_steps(global_steps)
        return {"num_tensors": len(named_tensors)}

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Check that the tensors fit and cover the model, then copy them; never while a batch decodes."""
        unset = {id(p): name for name, p in self.model.named_parameters()}
        for name, tensor in named_tensors:
            target = self._weights.get(name)
            if target is None:
                raise KeyError(
                    f"weight {name!r} from the actor has no counterpart in the rollout model "
                    f"({type(self.model).__name__}); LoRA adapters and fused MoE layouts are not supported"
                )
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != rollout {tuple(target.shape)}")
            unset.pop(id(target), None)
        if unset:
            raise RuntimeError(
                f"the actor's state dict leaves {len(unset)} rollout parameters unset (e.g. {list(unset.values())[:5]})"
            )
        with self._lock, torch.no_grad():
            for name, tensor in named_tensors:
                self._weights[name].copy_(tensor)

    # ---- control plane (what verl calls on every server) -------------------------------------------------------

    async def set_global_steps(self, global_steps: int) -> None:
        self._set_global_steps(global_steps)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Park new requests (or, with ``reject_request``, refuse them) and end queued and running ones now, with
        ``stop_reason="aborted"`` and what they have generated so far."""
        self._paused, self._rejecting = True, bool(reject_request)
        queued, self._queue = self._queue, []
        aborted = [r.request_id for r in queued + self._running]
        for request in queued:
            request.aborted = True
            if not request.future.done():
                request.future.set_result(self._output(request))
        self._abort_all = True
        try:
            while self._running:
                await asyncio.sleep(0.01)
        finally:
            self._abort_all = False
        return {"aborted_count": len(aborted), "request_ids": aborted}

    async def resume_generation(self) -> None:
        self._paused = self._rejecting = False

    async def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    # The model stays in host memory and no KV cache outlives a batch: what vLLM frees and restores in these calls
    # has no counterpart here. ``ready`` lets the replica wait for the actor to be built.
    ready = wake_up = sleep = clear_kv_cache = release_kv_cache = resume_kv_cache = _nothing
    start_profile = stop_profile = _nothing


class HFServerAdapter(BaseRollout):
    """The ``BaseRollout`` verl builds in each trainer rank: hands the actor's weights to the replica's server
    (found by Ray actor name, or set ``server_handle``)."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs) -> None:
        super().__init__(config, model_config, device_mesh)
        c = self.config
        rank, ranks_per_replica = int(os.environ.get("RANK", "0")), (
            c.tensor_model_parallel_size * c.data_parallel_size * c.pipeline_model_parallel_size
        )
        self.replica_rank = rank // ranks_per_replica if replica_rank == -1 else int(replica_rank)
        self._has_server = rank % ranks_per_replica == 0  # the replica's first rank talks to the server
        self.server_handle = None  # a Ray actor handle (or anything whose ``.method.remote(...)`` is awaitable)
        self.sleep_level = 1  # read by verl's LoRA path; weights are never discarded here

    def _server(self):
        if self.server_handle is None and self._has_server:
            self.server_handle = ray.get_actor(_server_name(self.config.name, self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        return None  # the server keeps its model in host memory: nothing to bring back

    async def release(self):
        return None

    async def update_weights(self, weights, wire_format="named_tensors", peft_config=None, global_steps=None, **kw):
        """Load the actor's full weights into the server. Every rank must call this (and drain ``weights``)."""
        from verl.workers.rollout.utils import ensure_async_iterator

        if wire_format != "named_tensors":
            raise NotImplementedError("the hf rollout takes wire_format='named_tensors' only")
        if peft_config is not None:
            raise NotImplementedError("the hf rollout loads full weights only: set model.lora.merge=True")
        server, named = self._server(), []
        async for name, tensor in ensure_async_iterator(weights):  # on every rank: full_tensor() is a collective
            if server is not None:  # the replica's first rank ships them
                named.append((name, tensor.detach().to("cpu")))
        return {} if server is None else await server.update_weights.remote(named, global_steps=global_steps)


class HFReplica(RolloutReplica):
    """One :class:`HFRolloutServer` Ray actor per replica, on the node of its first trainer rank, with no GPU."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self):
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
        else:
            node_id = ray.get_runtime_context().get_node_id()
        role = "_reward" if self.is_reward_model else "_teacher" if self.is_teacher_model else ""
        name = _server_name(self.config.name + role, self.replica_rank, self.name_suffix)
        on_node = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        server = ray.remote(HFRolloutServer).options(
            name=name,
            num_cpus=_options(self.config)["num_cpus"],
            num_gpus=0,
            max_concurrency=self.max_concurrency,
            scheduling_strategy=on_node,
        ).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"hf://{node_id[:16]}/{name}"  # verl's load balancer keys servers by address
