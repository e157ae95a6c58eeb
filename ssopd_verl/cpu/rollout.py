"""A verl 0.9.1 rollout backend on transformers ``generate``: for CPU runs and for debugging a config without vLLM.

vLLM is the production backend. This one exists so that ``python -m verl.trainer.main_ppo`` (v1 trainer, hybrid
engine, agent loop) runs end to end on a machine without an accelerator, and so that a config can be exercised
without installing vLLM. It is slow (one HF model per replica, no paged KV cache, no continuous batching) and
supports text-only, single-turn or multi-turn token-in/token-out generation, which is all the agent loop needs.

Select it with ``actor_rollout_ref.rollout.name=hf`` (see :data:`ROLLOUT_NAME`; vLLM-specific keys are ignored).

verl hooks used (no verl function is patched):

* ``verl.workers.rollout.base._ROLLOUT_REGISTRY[(name, "async")]`` -- the dict read by ``get_rollout_class``, which
  ``ActorRolloutRefWorker.init_model`` uses to build the rollout object living in each trainer rank. It is private:
  verl 0.9.1 has no public function to register a ``BaseRollout``; this is its only registration point.
* ``verl.workers.rollout.replica.RolloutReplicaRegistry.register(name, loader)`` -- read by
  ``LLMServerManager`` (``get_rollout_replica_class``) to launch the per-replica server.

The pieces and verl's contract for each:

* :class:`HFServerAdapter` (a ``BaseRollout``) lives in every trainer rank. verl's v1 trainer forces the ``naive``
  checkpoint backend: ``ActorRolloutRefWorker.update_weights`` calls ``await rollout.update_weights(gen, ...)`` on
  every rank with a generator of ``(HF state-dict name, full tensor)`` pairs. Every rank drains it (FSDP's
  ``full_tensor()`` is a collective); the first rank of each replica ships the tensors to its server in buckets of
  ``checkpoint_engine.update_weights_bucket_megabytes``. ``resume`` / ``release`` forward to the server's
  ``wake_up`` / ``sleep`` when ``free_cache_engine`` is set.
* :class:`HFRolloutServer` (a Ray actor, one per replica, ``num_gpus=0``) holds a ``transformers`` causal LM and
  serves what verl calls on a server: ``generate(prompt_ids, sampling_params, request_id, ...) -> TokenOutput``
  (called by ``LLMServerClient`` through the load balancer), ``wake_up``/``sleep``/``clear_kv_cache``/
  ``release_kv_cache``/``resume_kv_cache`` (no-ops: the model stays resident in host memory),
  ``set_global_steps``, ``abort_all_requests``/``resume_generation``/``abort_request`` (real: partial rollouts come
  back with ``stop_reason="aborted"``), ``start_profile``/``stop_profile`` (no-ops).
* :class:`HFReplica` (a ``RolloutReplica``) launches the server actor next to its first worker and reports a unique
  pseudo-address (``hf://...``; there is no HTTP endpoint) and the handle. ``rollout_worker_use_gpu()`` is False.
  Hybrid mode (the v1 trainer's default, trainer and rollout colocated) is the supported mode.

Sampling (what vLLM does, on HF's own logits processors): repetition penalty, then temperature, then top-k (``-1``
or ``0`` = off), then top-p; ``temperature <= 1e-5`` means greedy (argmax). ``n`` is the agent loop's business (it
issues ``rollout.n`` calls); a request asks for one sequence. Generation stops at ``max_tokens`` (or the vLLM default
``min(response_length, prompt_length + response_length - len(prompt))``, clamped to the context window) and at the
EOS ids of the tokenizer and of the model's ``generation_config`` (Qwen3: ``<|im_end|>`` and ``<|endoftext|>``)
plus any ``stop_token_ids``, unless ``ignore_eos``. The stop token is part of the returned ids, as with vLLM.

Log-probs (``sampling_params["logprobs"]``, i.e. ``rollout.calculate_log_probs``) are computed in fp32 from the very
logits the token was sampled from: after repetition penalty and temperature, before top-k/top-p filtering (greedy:
the raw logits). That is the quantity the actor recomputes for ``old_log_probs`` (``log_softmax(logits / T)`` over
the full vocabulary), which verl compares ``rollout_log_probs`` against (rollout correction, ``rollout_corr/*``).
vLLM's ``logprobs_mode="processed_logprobs"`` (verl's default) gives the same numbers when top-k/top-p are off
(verl's training default); with top-k/top-p on, vLLM renormalises over the kept tokens, this backend does not.
``rollout.logprobs_mode="raw_logprobs"`` returns log-probs before temperature instead.

Backend options live in ``actor_rollout_ref.rollout.engine_kwargs.hf`` (add with ``+``): ``num_threads``
(``torch.set_num_threads`` in the server; default ``min(2, cpu_count)``), ``num_cpus`` (Ray logical CPUs the server
actor reserves; default 0, so it fits next to the trainer ranks), ``max_batch_size`` (concurrent requests with
identical sampling parameters are generated together, left-padded; default 16), ``batch_wait_ms`` (how long the
server waits for more requests before starting a batch; default 5).

Model dtype: ``rollout.dtype`` (use ``float32`` on CPU for log-probs that match the actor). ``rollout.load_format``
``dummy`` (verl's default) builds the model randomly initialised (the trainer syncs the actor's weights before the
first generation); anything else loads the checkpoint at ``model.path``.
"""

from __future__ import annotations

import os

ROLLOUT_NAME = "hf"
"""The default registration name (``actor_rollout_ref.rollout.name=hf``)."""

_RESERVED_NAMES = ("vllm", "sglang", "trtllm")  # verl branches on these names in several places
_ADAPTER_PATH = f"{__name__}.HFServerAdapter"  # resolved by verl's get_rollout_class() when it is looked up


# ----------------------------------------------------------------------------------------------------------------
# Registration. Defined before this module imports verl, and importing nothing of verl at module level: a process
# whose first import is this module (a Ray worker unpickling HFRolloutServer) imports verl below, verl then loads
# its plugins, and a plugin calling register_hf_rollout() must find it in this partially initialised module.
# ----------------------------------------------------------------------------------------------------------------


def _load_replica():
    return HFReplica


def register_hf_rollout(name: str = ROLLOUT_NAME) -> str:
    """Register this backend with verl under ``name`` (``actor_rollout_ref.rollout.name``). Idempotent.

    Raises ``ValueError`` for verl's own backend names and if ``name`` is already taken by another backend.
    Returns ``name``. Safe to call from a ``verl.plugins`` entry point (it resolves no verl platform).
    """
    if name in _RESERVED_NAMES:
        raise ValueError(f"rollout name {name!r} is verl's own backend name (verl branches on it); pick another")
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    # verl 0.9.1 has no public way to register a BaseRollout: get_rollout_class() reads this private dict, the
    # only registration point there is.
    registry = rollout_base._ROLLOUT_REGISTRY
    key = (name, "async")
    if registry.get(key, _ADAPTER_PATH) != _ADAPTER_PATH:
        raise ValueError(f"rollout {key} is already registered as {registry[key]!r}")
    existing = RolloutReplicaRegistry._registry.get(name)
    if existing is not None and existing is not _load_replica:
        raise ValueError(f"rollout replica {name!r} is already registered ({existing!r})")
    registry[key] = _ADAPTER_PATH
    RolloutReplicaRegistry.register(name, _load_replica)
    return name


import asyncio  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Optional  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import HFModelConfig, RolloutConfig  # noqa: E402
from verl.workers.rollout.base import BaseRollout  # noqa: E402
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput  # noqa: E402

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

_GREEDY_EPS = 1e-5  # vLLM's threshold: a temperature below it means greedy sampling
_SUPPORTED_LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
_KNOWN_SAMPLING_KEYS = {
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "logprobs",
    "max_tokens",
    "max_new_tokens",
    "ignore_eos",
    "stop_token_ids",
    "n",
    "seed",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "detokenize",
    "prompt_logprobs",
}

__all__ = [
    "ROLLOUT_NAME",
    "HFServerAdapter",
    "HFRolloutServer",
    "HFReplica",
    "register_hf_rollout",
    "server_actor_name",
]


def server_actor_name(rollout_name: str, replica_rank: int, suffix: str = "") -> str:
    """The Ray actor name of a replica's server (how each trainer rank's adapter finds it)."""
    return f"{rollout_name}_server_{replica_rank}{suffix}"


# ----------------------------------------------------------------------------------------------------------------
# Options and sampling parameters
# ----------------------------------------------------------------------------------------------------------------


def _engine_options(config: RolloutConfig) -> dict[str, Any]:
    """``engine_kwargs.hf`` with defaults filled in."""
    raw = dict((config.engine_kwargs or {}).get("hf", None) or {})
    cpus = os.cpu_count() or 1
    options = {
        "num_threads": min(2, cpus),
        "num_cpus": 0,
        "max_batch_size": 16,
        "batch_wait_ms": 5.0,
    }
    unknown = set(raw) - set(options)
    if unknown:
        raise ValueError(f"unknown rollout.engine_kwargs.hf keys {sorted(unknown)}; known: {sorted(options)}")
    options.update({k: v for k, v in raw.items() if v is not None})
    options["num_threads"] = max(1, int(options["num_threads"]))
    options["max_batch_size"] = max(1, int(options["max_batch_size"]))
    options["batch_wait_ms"] = max(0.0, float(options["batch_wait_ms"]))
    options["num_cpus"] = float(options["num_cpus"])
    return options


@dataclass(frozen=True)
class _Sampling:
    """Per-request sampling parameters, normalised. Requests with equal values can share a batch."""

    greedy: bool
    temperature: float
    top_k: int  # 0 = off
    top_p: float
    repetition_penalty: float
    logprobs: bool
    stop_ids: tuple[int, ...]


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: _Sampling
    future: asyncio.Future


def _as_int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [int(value)]
    return [int(v) for v in value]


def _normalize_prompt(prompt_ids: Any) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("empty prompt")
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Logits processors / stopping criteria plugged into transformers' generate
# ----------------------------------------------------------------------------------------------------------------


def _make_logprob_capture():
    from transformers import LogitsProcessor

    class _LogprobCapture(LogitsProcessor):
        """Records, per step, ``log_softmax`` (fp32) of the scores it sees and gathers the sampled token's entry.

        Placed in the processor list where the log-probs are defined (after temperature, before top-k/top-p). It
        keeps one step's full distribution: the token sampled at step t is read from ``input_ids[:, -1]`` at step
        t + 1, and from the final sequences for the last step (:meth:`finish`).
        """

        def __init__(self) -> None:
            self._pending: Optional[torch.Tensor] = None
            self._gathered: list[torch.Tensor] = []

        def _gather(self, tokens: torch.Tensor) -> None:
            assert self._pending is not None
            self._gathered.append(self._pending.gather(-1, tokens.view(-1, 1).to(self._pending.device)).squeeze(-1))
            self._pending = None

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self._pending is not None:
                self._gather(input_ids[:, -1])
            self._pending = torch.log_softmax(scores.to(torch.float32), dim=-1)
            return scores

        def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
            """``[batch, steps]`` log-probs of ``new_tokens`` (the generated part of the sequences)."""
            if self._pending is not None:
                self._gather(new_tokens[:, len(self._gathered)])
            if len(self._gathered) != new_tokens.shape[1]:
                raise RuntimeError(f"captured {len(self._gathered)} steps for {new_tokens.shape[1]} tokens")
            if not self._gathered:
                return torch.zeros(new_tokens.shape[0], 0)
            return torch.stack(self._gathered, dim=1).cpu()

    return _LogprobCapture()


def _make_row_stopper(prompt_width: int, budgets: list[int], should_stop_row):
    from transformers import StoppingCriteria

    class _RowStopper(StoppingCriteria):
        """Per-row token budget (requests in a batch may ask for different ``max_tokens``) and aborts."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
            generated = input_ids.shape[1] - prompt_width
            done = torch.tensor([generated >= b for b in budgets], dtype=torch.bool, device=input_ids.device)
            for i in range(len(budgets)):
                if not done[i] and should_stop_row(i):
                    done[i] = True
            return done

    return _RowStopper()


# ----------------------------------------------------------------------------------------------------------------
# The server (one per replica; a Ray actor in a real run)
# ----------------------------------------------------------------------------------------------------------------


class HFRolloutServer:
    """Token-in/token-out generation server on a transformers causal LM (see the module docstring).

    Args:
        config: the rollout config (``RolloutConfig`` or its DictConfig).
        model_config: the model config (``HFModelConfig`` or the ``actor_rollout_ref.model`` DictConfig).
        replica_rank: this replica's rank (seeds sampling with ``config.seed + replica_rank``).
        rollout_mode: verl's ``RolloutMode`` (informational).
    """

    def __init__(
        self,
        config: Any,
        model_config: Any,
        replica_rank: int = 0,
        rollout_mode: Optional[RolloutMode] = None,
        node_rank: int = 0,
    ) -> None:
        self.config: RolloutConfig = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        if isinstance(model_config, HFModelConfig):
            self.model_config = model_config
        else:
            self.model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.replica_rank = int(replica_rank)
        self.node_rank = int(node_rank)
        self.rollout_mode = rollout_mode
        self.options = _engine_options(self.config)
        if self.config.logprobs_mode not in (None, *_SUPPORTED_LOGPROBS_MODES):
            raise ValueError(
                f"rollout.logprobs_mode={self.config.logprobs_mode!r} is not supported by the {ROLLOUT_NAME!r} "
                f"rollout; use one of {_SUPPORTED_LOGPROBS_MODES}"
            )
        self._logprobs_raw = self.config.logprobs_mode == "raw_logprobs"

        torch.set_num_threads(self.options["num_threads"])
        torch.manual_seed(int(self.config.seed) + self.replica_rank)

        self.model = self._build_model()
        self.tokenizer = self.model_config.tokenizer
        self.eos_token_ids: tuple[int, ...] = self._eos_token_ids()
        self.pad_token_id: int = self._pad_token_id()
        max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        default_len = max_positions or self.config.prompt_length + self.config.response_length
        self.max_model_len = int(self.config.max_model_len or default_len)  # vLLM's default: the model's context
        if max_positions and self.max_model_len > max_positions:
            raise ValueError(f"max_model_len {self.max_model_len} > max_position_embeddings {max_positions}")

        # parameters (and persistent buffers) by every name they have, for weight sync
        self._targets: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        self._targets.update(dict(self.model.named_buffers(remove_duplicate=False)))
        self._unique_params = {id(p): name for name, p in self.model.named_parameters()}

        self.global_steps: Optional[int] = None
        self.weight_version = 0  # bumped by every completed weight update
        self.awake = True  # bookkeeping only: sleep/wake_up keep the model resident

        self._model_lock = threading.Lock()  # generate (in a worker thread) vs weight loading
        self._queue: list[_Request] = []
        self._running: list[_Request] = []
        self._batch_task: Optional[asyncio.Task] = None
        self._updating = False
        self._update_seen: set[int] = set()
        self._update_count = 0
        self._paused = False
        self._rejecting = False
        self._abort_all = False
        self._aborted_ids: set[str] = set()
        self.num_generated_requests = 0
        self.num_batches = 0

    # ---- model -------------------------------------------------------------------------------------------------

    def _build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, GenerationConfig

        from verl.utils.torch_dtypes import PrecisionType

        dtype = PrecisionType.to_dtype(self.config.dtype)
        attn = (self.model_config.override_config or {}).get("attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager"):
            attn = "sdpa"  # flash-attention does not exist on CPU
        hf_config = self.model_config.hf_config
        trust = self.model_config.trust_remote_code
        if self.config.load_format == "dummy":
            # verl's default: weights arrive from the actor (update_weights) before the first generation
            model = AutoModelForCausalLM.from_config(
                hf_config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_config.local_path,
                config=hf_config,
                dtype=dtype,
                attn_implementation=attn,
                trust_remote_code=trust,
            )
        model = model.to(dtype=dtype).eval()
        model.requires_grad_(False)
        # Sampling is fully specified per request: no generation default of the checkpoint (Qwen3 ships top_k=20,
        # temperature=0.6, ...) may leak into generate().
        model.generation_config = GenerationConfig()
        return model

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        if self.tokenizer is not None:
            ids += _as_int_list(getattr(self.tokenizer, "eos_token_id", None))
        generation_config = self.model_config.generation_config
        if generation_config is not None:
            ids += _as_int_list(getattr(generation_config, "eos_token_id", None))
        if not ids:
            ids += _as_int_list(getattr(self.model_config.hf_config, "eos_token_id", None))
        return tuple(dict.fromkeys(ids))

    def _pad_token_id(self) -> int:
        for source in (self.tokenizer, self.model_config.generation_config, self.model_config.hf_config):
            pad = getattr(source, "pad_token_id", None) if source is not None else None
            if pad is not None:
                return int(pad)
        if self.eos_token_ids:
            return self.eos_token_ids[0]
        return 0

    # ---- requests ----------------------------------------------------------------------------------------------

    def _sampling(self, sampling_params: dict[str, Any]) -> _Sampling:
        sp = dict(sampling_params or {})
        unknown = set(sp) - _KNOWN_SAMPLING_KEYS
        if unknown:
            logger.warning("hf rollout ignores sampling params %s", sorted(unknown))
        n = int(sp.get("n", 1) or 1)
        if n != 1:
            raise ValueError(f"sampling_params n={n}: one request yields one sequence (the agent loop issues n calls)")
        temperature = float(sp.get("temperature", self.config.temperature))
        if temperature < 0 or math.isnan(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_k = int(sp["top_k"] if sp.get("top_k") is not None else self.config.top_k)
        if top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or positive, got {top_k}")
        top_p = float(sp["top_p"] if sp.get("top_p") is not None else self.config.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        repetition_penalty = float(sp.get("repetition_penalty", self.config.repetition_penalty) or 1.0)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        ignore_eos = bool(sp.get("ignore_eos", self.config.ignore_eos))
        stop_ids = list(_as_int_list(sp.get("stop_token_ids")))
        if not ignore_eos:
            stop_ids = list(self.eos_token_ids) + stop_ids
        greedy = temperature <= _GREEDY_EPS
        return _Sampling(
            greedy=greedy,
            temperature=1.0 if greedy else temperature,
            top_k=0 if greedy or top_k <= 0 else top_k,
            top_p=1.0 if greedy else top_p,
            repetition_penalty=repetition_penalty,
            logprobs=bool(sp.get("logprobs", False)),
            stop_ids=tuple(dict.fromkeys(stop_ids)),
        )

    def _max_tokens(self, sampling_params: dict[str, Any], prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(
                f"prompt length {prompt_len} leaves no room to generate within max_model_len {self.max_model_len}"
            )
        if sampling_params.get("max_tokens") is not None:
            max_tokens = int(sampling_params["max_tokens"])
        elif sampling_params.get("max_new_tokens") is not None:
            max_tokens = int(sampling_params["max_new_tokens"])
        else:  # vLLM server's default in verl
            max_tokens = min(
                self.config.response_length, self.config.prompt_length + self.config.response_length - prompt_len
            )
        return max(1, min(max_tokens, room))

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: Optional[str] = None,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> TokenOutput:
        """Generate one sequence for ``prompt_ids``; the contract of verl's ``vLLMHttpServer.generate``."""
        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError(f"the {ROLLOUT_NAME!r} rollout is text-only (got multi-modal data)")
        request_id = request_id or uuid.uuid4().hex
        prompt = _normalize_prompt(prompt_ids)
        sampling_params = dict(sampling_params or {})
        request = _Request(
            request_id=request_id,
            prompt_ids=prompt,
            max_tokens=self._max_tokens(sampling_params, len(prompt)),
            sampling=self._sampling(sampling_params),
            future=asyncio.get_running_loop().create_future(),
        )
        while self._paused:  # abort_all_requests() parks new requests until resume_generation()
            if self._rejecting:
                return self._aborted_output([])
            await asyncio.sleep(0.01)
        self._queue.append(request)
        self._ensure_batch_task()
        return await request.future

    def _aborted_output(self, token_ids: list[int], log_probs: Optional[list[float]] = None) -> TokenOutput:
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs,
            stop_reason="aborted",
            extra_fields={"global_steps": self.global_steps},
        )

    def _ensure_batch_task(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._batch_task
        if task is None or task.done() or task.get_loop() is not loop:
            self._batch_task = loop.create_task(self._batch_loop())

    def _take_batch(self) -> list[_Request]:
        first = self._queue[0]
        batch = [r for r in self._queue if r.sampling == first.sampling][: self.options["max_batch_size"]]
        taken = {id(r) for r in batch}
        self._queue = [r for r in self._queue if id(r) not in taken]
        return [r for r in batch if not r.future.done()]

    async def _batch_loop(self) -> None:
        while self._queue:
            if self.options["batch_wait_ms"] > 0:
                await asyncio.sleep(self.options["batch_wait_ms"] / 1000.0)
            while self._updating or self._paused:  # a weight update in progress, or generation paused
                await asyncio.sleep(0.01)
            if not self._queue:
                break
            batch = self._take_batch()
            if not batch:
                continue
            self._running = batch
            try:
                outputs = await asyncio.to_thread(self._generate_batch, batch)
            except BaseException as error:  # surface the error to every caller of this batch
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                if not isinstance(error, Exception):
                    raise
                continue
            finally:
                self._running = []
                for request in batch:
                    self._aborted_ids.discard(request.request_id)
            for request, output in zip(batch, outputs):
                if not request.future.done():
                    request.future.set_result(output)

    # ---- generation (runs in a worker thread) ------------------------------------------------------------------

    def _logits_processors(self, sampling: _Sampling):
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        processors = LogitsProcessorList()
        capture = _make_logprob_capture() if sampling.logprobs else None
        if sampling.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if capture is not None and (self._logprobs_raw or sampling.greedy):
            processors.append(capture)
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if capture is not None and not self._logprobs_raw:
                processors.append(capture)
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(top_k=sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=sampling.top_p))
        return processors, capture

    def _row_should_stop(self, batch: list[_Request]):
        def should_stop(i: int) -> bool:
            return self._abort_all or batch[i].request_id in self._aborted_ids

        return should_stop

    def _generate_batch(self, batch: list[_Request]) -> list[TokenOutput]:
        from transformers import GenerationConfig, StoppingCriteriaList

        sampling = batch[0].sampling
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, request in enumerate(batch):  # left padding
            n = len(request.prompt_ids)
            input_ids[i, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[i, width - n :] = 1
        budgets = [r.max_tokens for r in batch]
        processors, capture = self._logits_processors(sampling)
        should_stop = self._row_should_stop(batch)
        stopping = StoppingCriteriaList([_make_row_stopper(width, budgets, should_stop)])
        generation_config = GenerationConfig(
            do_sample=not sampling.greedy,
            num_beams=1,
            max_new_tokens=max(budgets),
            min_new_tokens=0,
            # every sampling transform is one of our processors, in vLLM's order; generate adds none of its own
            temperature=1.0,
            top_k=None if sampling.greedy else 0,  # greedy: unused (None keeps transformers from warning)
            top_p=1.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            eos_token_id=list(sampling.stop_ids) or None,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        with self._model_lock, torch.inference_mode():
            started = time.perf_counter()
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=generation_config,
                logits_processor=processors,
                stopping_criteria=stopping,
            )
            new_tokens = sequences[:, width:].cpu()
            log_probs = capture.finish(new_tokens) if capture is not None else None
            elapsed = time.perf_counter() - started
        self.num_batches += 1
        self.num_generated_requests += len(batch)

        stop_set = set(sampling.stop_ids)
        outputs = []
        for i, request in enumerate(batch):
            row = new_tokens[i, : request.max_tokens].tolist()
            stopped = False
            for j, token in enumerate(row):
                if token in stop_set:
                    row = row[: j + 1]
                    stopped = True
                    break
            row_log_probs = log_probs[i, : len(row)].tolist() if log_probs is not None else None
            finished = stopped or len(row) >= request.max_tokens
            extra = {"global_steps": self.global_steps}  # the model weights' version, as vLLM reports it
            if finished:
                outputs.append(
                    TokenOutput(token_ids=row, log_probs=row_log_probs, stop_reason="completed", extra_fields=extra)
                )
            else:  # cut short by abort_all_requests / abort_request
                outputs.append(self._aborted_output(row, row_log_probs))
        logger.info("hf rollout: %d requests in %.2fs", len(batch), elapsed)
        return outputs

    # ---- weight sync -------------------------------------------------------------------------------------------

    async def begin_weight_update(self) -> None:
        """Start a weight update: generation waits until :meth:`finish_weight_update`."""
        self._updating = True
        self._update_seen = set()
        self._update_count = 0

    def _load_locked(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        with self._model_lock, torch.no_grad():
            for name, tensor in named_tensors:
                target = self._targets.get(name)
                if target is None:
                    raise KeyError(
                        f"weight {name!r} from the actor has no counterpart in the rollout model "
                        f"({type(self.model).__name__}); LoRA adapters and fused MoE layouts are not supported"
                    )
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != rollout {tuple(target.shape)}")
                target.copy_(tensor)
                self._update_seen.add(id(target))
                self._update_count += 1

    async def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Copy a bucket of ``(HF name, tensor)`` pairs into the model (names as in the HF state dict)."""
        if not self._updating:
            raise RuntimeError("load_weights() outside begin_weight_update() / finish_weight_update()")
        await asyncio.to_thread(self._load_locked, list(named_tensors))
        return len(named_tensors)

    async def finish_weight_update(self, global_steps: Optional[int] = None, complete: bool = True) -> dict:
        """End a weight update; with ``complete``, check that every parameter of the model was written."""
        self._updating = False
        if not complete:
            return {"num_tensors": self._update_count}
        missing = [name for pid, name in self._unique_params.items() if pid not in self._update_seen]
        if missing:
            raise RuntimeError(
                f"weight update left {len(missing)} rollout parameters unset (e.g. {missing[:5]}): the actor's "
                "state dict does not match the rollout model"
            )
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return {"num_tensors": self._update_count, "weight_version": self.weight_version}

    # ---- control plane (what verl calls on every server) -------------------------------------------------------

    async def ready(self) -> dict:
        """Called by the replica once the actor is built."""
        return {"pid": os.getpid(), "num_threads": torch.get_num_threads(), "dtype": str(self.model.dtype)}

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self.awake = True

    async def sleep(self) -> None:
        self.awake = False

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        while self._queue or self._running:
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Stop admitting requests, end queued and running ones with ``stop_reason="aborted"`` (partial output)."""
        self._paused = True
        self._rejecting = bool(reject_request)
        queued, self._queue = self._queue, []
        running = list(self._running)
        request_ids = [r.request_id for r in queued] + [r.request_id for r in running]
        for request in queued:
            if not request.future.done():
                request.future.set_result(self._aborted_output([]))
        self._abort_all = True
        try:
            while self._running:
                await asyncio.sleep(0.01)
        finally:
            self._abort_all = False
        return {"aborted_count": len(request_ids), "request_ids": request_ids}

    async def resume_generation(self) -> None:
        self._paused = False
        self._rejecting = False

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        for request in self._queue:
            if request.request_id == request_id:
                self._queue.remove(request)
                if not request.future.done():
                    request.future.set_result(self._aborted_output([]))
                return {"aborted": True, "request_id": request_id}
        if any(r.request_id == request_id for r in self._running):
            self._aborted_ids.add(request_id)
            return {"aborted": True, "request_id": request_id}
        return {"aborted": False, "request_id": request_id, "error": "Request not found"}

    async def start_profile(self, **kwargs) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


# ----------------------------------------------------------------------------------------------------------------
# The adapter in each trainer rank
# ----------------------------------------------------------------------------------------------------------------


class HFServerAdapter(BaseRollout):
    """The ``BaseRollout`` verl builds in each trainer rank (``get_rollout_class(name, "async")``).

    ``update_weights`` drains the actor's ``(name, tensor)`` generator on every rank; the replica's first rank
    sends the tensors to its :class:`HFRolloutServer` (found by Ray actor name, or set ``server_handle``).
    """

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // world if replica_rank == -1 else int(replica_rank)
        self.rollout_rank = rank % world
        self._has_server = self.rollout_rank == 0
        self.server_handle = None  # a Ray actor handle (anything with ``.method.remote(...)`` awaitables)
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self.sleep_level = 1  # read by verl's LoRA path; weights are never discarded here

    def _server(self):
        if not self._has_server:
            return None
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_actor_name(self.config.name, self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        server = self._server()
        if self.config.free_cache_engine and server is not None:
            await server.wake_up.remote(tags=tags)

    async def release(self):
        server = self._server()
        if self.config.free_cache_engine and server is not None:
            await server.sleep.remote()

    async def update_weights(
        self,
        weights: Iterable,
        global_steps: Optional[int] = None,
        wire_format: str = "named_tensors",
        peft_config: Any = None,
        base_sync_done: bool = True,
        **kwargs,
    ) -> dict:
        """Load the actor's full weights into the rollout server. Every rank must call this (and drains ``weights``)."""
        from verl.workers.rollout.utils import ensure_async_iterator

        if wire_format != "named_tensors":
            raise NotImplementedError(f"the {ROLLOUT_NAME!r} rollout takes wire_format='named_tensors' only")
        if peft_config is not None:
            raise NotImplementedError(
                f"the {ROLLOUT_NAME!r} rollout loads full weights only: set actor_rollout_ref.model.lora.merge=True"
            )
        server = self._server()
        if server is None:  # not the replica's first rank: take part in the collectives, send nothing
            async for _ in ensure_async_iterator(weights):
                pass
            return {}

        started = time.perf_counter()
        await server.begin_weight_update.remote()
        complete = False
        try:
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            async for name, tensor in ensure_async_iterator(weights):
                tensor = tensor.detach().to("cpu")
                bucket.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= self.bucket_bytes:
                    await server.load_weights.remote(bucket)
                    bucket, size = [], 0
            if bucket:
                await server.load_weights.remote(bucket)
            complete = True
        finally:
            result = await server.finish_weight_update.remote(global_steps=global_steps, complete=complete)
        logger.info("hf rollout: weights synced in %.2fs", time.perf_counter() - started)
        return result

    def generate_sequences(self, prompts):
        raise NotImplementedError("server mode only: generation goes through the agent loop and HFRolloutServer")


# ----------------------------------------------------------------------------------------------------------------
# The replica (launches the server actor)
# ----------------------------------------------------------------------------------------------------------------


class HFReplica(RolloutReplica):
    """One :class:`HFRolloutServer` Ray actor per replica, CPU only (``num_gpus=0``)."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    def _server_name(self) -> str:
        if self.is_reward_model:
            return server_actor_name(f"{self.config.name}_reward", self.replica_rank, self.name_suffix)
        if self.is_teacher_model:
            return server_actor_name(f"{self.config.name}_teacher", self.replica_rank, self.name_suffix)
        return server_actor_name(self.config.name, self.replica_rank, self.name_suffix)

    async def launch_servers(self):
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(
                lambda worker: ray.get_runtime_context().get_node_id()
            )
        else:
            node_id = ray.get_runtime_context().get_node_id()
        options = _engine_options(self.config)
        name = self._server_name()
        server = (
            ray.remote(HFRolloutServer)
            .options(
                name=name,
                num_cpus=options["num_cpus"],
                num_gpus=0,
                max_concurrency=self.max_concurrency,
                scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    node_id=node_id, soft=False
                ),
            )
            .remote(
                config=self.config,
                model_config=self.model_config,
                replica_rank=self.replica_rank,
                rollout_mode=self.rollout_mode,
            )
        )
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        # verl's load balancer keys servers by address: unique per replica; there is no HTTP endpoint behind it
        self._server_address = f"hf://{node_id[:16]}/{name}"
