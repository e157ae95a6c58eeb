"""verl's real FSDP2 actor engine in one CPU process, and the batches it consumes.

:func:`build_cpu_fsdp2_engine` builds ``FSDPEngineWithLMHead`` through ``EngineRegistry.new`` from verl's own config
dataclasses, exactly as ``TrainingWorker`` does, minus Ray: world size 1, a gloo process group, fp32 parameters and
compute (no mixed precision), sdpa attention, no torch.compile. :func:`make_train_tensordict` builds the
NO_PADDING ``TensorDict`` that ``engine.train_batch`` / ``engine.infer_batch`` expect (what verl's v1 trainer
stores per row and what ``TrainingWorker.train_batch`` / ``infer_batch`` inject as non-tensor keys).
:func:`build_actor_config` composes verl's default PPO trainer config with Hydra and converts the actor node with
``omega_conf_to_dataclass``, as ``ActorRolloutRefWorker.init_model`` does, for ``partial(ppo_loss, config=...)``.

The CPU platform must be verl's platform in this process: :func:`ensure_cpu_platform` (called by the builder)
selects it, provided nothing resolved verl's platform earlier in the process (it raises otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

__all__ = [
    "build_cpu_fsdp2_engine",
    "make_train_tensordict",
    "build_actor_config",
    "to_nested",
    "ensure_cpu_platform",
]

_FP32_MIXED_PRECISION = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
_BF16_MIXED_PRECISION = {"param_dtype": "bf16", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}


def ensure_cpu_platform() -> None:
    """Make verl's platform in this process the CPU platform; register it and verl's FSDP engines for "cpu".

    verl resolves its platform once per process, from ``VERL_PLATFORM``, the first time anything asks (importing
    verl's engine or trainer modules does). This sets ``VERL_PLATFORM=cpu`` only while verl is imported and the
    platform resolved, then restores the environment, so child processes do not inherit it (a Ray worker needs
    ``VERL_PLATFORM=cpu`` in its runtime env). Raises if ``VERL_PLATFORM`` names another platform, or if verl had
    already resolved another platform in this process.
    """
    previous = os.environ.get("VERL_PLATFORM")
    if previous and previous.strip().lower() != "cpu":
        raise RuntimeError(f"VERL_PLATFORM={previous!r}; the CPU engine needs VERL_PLATFORM=cpu (or unset)")
    os.environ["VERL_PLATFORM"] = "cpu"
    try:
        from ssopd_verl.cpu.platform import is_cpu_platform_active, register_cpu_engines, register_cpu_platform

        register_cpu_platform(engines=False)  # imports verl: its plugins may resolve the platform (env is set)
        active = is_cpu_platform_active()
    finally:
        if previous is None:
            os.environ.pop("VERL_PLATFORM", None)
        else:
            os.environ["VERL_PLATFORM"] = previous
    if not active:
        from verl.plugin.platform import get_platform

        raise RuntimeError(
            f"verl's platform was already resolved as {get_platform().device_name!r} in this process (it is cached "
            "on first use); call ensure_cpu_platform() or set VERL_PLATFORM=cpu before verl's engines are imported"
        )
    register_cpu_engines()


def build_cpu_fsdp2_engine(
    model_path: Union[str, os.PathLike],
    *,
    use_remove_padding: bool = True,
    use_dynamic_bsz: bool = False,
    micro_batch_size_per_gpu: int = 2,
    max_token_len_per_gpu: int = 4096,
    gradient_checkpointing: bool = False,
    lr: float = 1e-3,
    dtype: str = "fp32",
    seed: int = 0,
    lora_rank: int = 0,
    lora_alpha: int = 16,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    ulysses_sequence_parallel_size: int = 1,
):
    """Build and ``initialize()`` verl's FSDP2 ``FSDPEngineWithLMHead`` for ``model_path`` on CPU (world size 1).

    ``dtype`` is the FSDP2 mixed-precision parameter/compute dtype: "fp32" (default; mixed precision off, results
    exact) or "bf16" (verl's GPU default; reductions stay fp32). Master weights are fp32 either way.
    ``lora_rank > 0`` gives a LoRA actor (verl's PEFT path: only adapter weights train). Optimizer:
    verl's AdamW (weight decay 0.01, clip_grad 1.0, constant LR ``lr``). The returned engine carries the same
    ``engine_config`` values ``TrainingWorker`` would inject into each batch (see :func:`make_train_tensordict`).
    ``ulysses_sequence_parallel_size > 1`` runs verl's Ulysses sequence parallelism over the process group's ranks,
    with the CPU stand-in for verl's Ulysses flash-attention (:mod:`ssopd_verl.cpu.attention`).
    """
    ensure_cpu_platform()
    from ssopd_verl.cpu.attention import register_ulysses_sdpa
    from ssopd_verl.cpu.platform import init_gloo_process_group

    init_gloo_process_group()

    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    if dtype in ("fp32", "float32"):
        mixed_precision = dict(_FP32_MIXED_PRECISION)
    elif dtype in ("bf16", "bfloat16"):
        mixed_precision = dict(_BF16_MIXED_PRECISION)
    else:
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")

    model_config = HFModelConfig(
        path=str(model_path),
        override_config={"attn_implementation": register_ulysses_sdpa() if ulysses_sequence_parallel_size > 1 else "sdpa"},
        use_remove_padding=use_remove_padding,
        enable_gradient_checkpointing=gradient_checkpointing,
        use_fused_kernels=False,
        trust_remote_code=False,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )
    model_config.model_type = "language_model"  # TrainingWorker copies config.model_type here

    engine_config = FSDPEngineConfig(
        strategy="fsdp2",
        model_dtype="fp32",
        mixed_precision=mixed_precision,
        use_torch_compile=False,
        use_dynamic_bsz=use_dynamic_bsz,
        ulysses_sequence_parallel_size=ulysses_sequence_parallel_size,
        micro_batch_size_per_gpu=micro_batch_size_per_gpu,
        max_token_len_per_gpu=max_token_len_per_gpu,
        infer_micro_batch_size_per_gpu=micro_batch_size_per_gpu,
        infer_max_token_len_per_gpu=max_token_len_per_gpu,
        use_remove_padding=use_remove_padding,
        use_fused_kernels=False,
        seed=seed,
        forward_only=False,
        param_offload=False,
        optimizer_offload=False,
    )
    optimizer_config = FSDPOptimizerConfig(lr=lr, clip_grad=1.0, lr_scheduler_type="constant")
    checkpoint_config = CheckpointConfig()

    torch.manual_seed(seed)
    engine = EngineRegistry.new(
        model_type="language_model",
        backend="fsdp2",
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=checkpoint_config,
    )
    engine.initialize()
    return engine


def to_nested(rows: Sequence[Any], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rows of different lengths (lists or 1-D tensors) -> a jagged nested tensor (``layout=torch.jagged``)."""
    tensors = [r.detach().clone() if isinstance(r, torch.Tensor) else torch.tensor(r) for r in rows]
    if dtype is not None:
        tensors = [t.to(dtype) for t in tensors]
    for t in tensors:
        if t.dim() < 1:
            raise ValueError("each row must be at least 1-D")
    return torch.nested.as_nested_tensor(tensors, layout=torch.jagged)


def _engine_defaults(engine) -> dict[str, Any]:
    """The non-tensor keys ``TrainingWorker.train_batch`` injects from the engine's configs."""
    ec = engine.engine_config
    return dict(
        use_remove_padding=bool(engine.model_config.get("use_remove_padding", False)),
        use_dynamic_bsz=ec.use_dynamic_bsz,
        max_token_len_per_gpu=ec.max_token_len_per_gpu,
        micro_batch_size_per_gpu=ec.micro_batch_size_per_gpu,
        use_fused_kernels=ec.use_fused_kernels,
    )


def make_train_tensordict(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    temperature: Union[float, Sequence[float], torch.Tensor] = 1.0,
    fields: Optional[Mapping[str, Any]] = None,
    engine=None,
    **non_tensor: Any,
):
    """The NO_PADDING ``TensorDict`` verl's engine consumes for ``train_batch(data, loss_fn)`` / ``infer_batch``.

    Per row (all jagged nested tensors, as verl's v1 trainer stores them; int64 like the agent loop's output):
    ``prompts`` (prompt ids), ``responses`` (response ids), ``input_ids`` (prompt + response),
    ``position_ids`` (0..len-1), ``response_mask`` (ones over the response), ``loss_mask`` (= ``response_mask``,
    as the v1 agent loop sets it; the engine only sums it for ``batch_num_tokens``). No ``attention_mask``: the v1
    rows carry none and the engine builds its own. Every prompt must be non-empty (verl's ``no_padding_2_padding``
    reads the log-prob at the last prompt position).

    ``fields``: extra per-row data, each a list of 1-D rows (nested, e.g. ``old_log_probs`` / ``advantages`` of
    response length; floating rows become float32) or a dense tensor with leading dim = batch size. Every row must
    carry every field. A ``response_mask`` given here replaces the default (and ``loss_mask`` follows it unless
    also given).

    Non-tensor keys (``NonTensorData``): ``temperature`` (a float; or per-row values -> a (bsz,) float32 tensor),
    ``pad_mode`` = NO_PADDING, ``global_batch_size`` (= batch size), ``global_token_num`` (sequence lengths),
    ``calculate_entropy`` False, ``compute_loss`` True, and the keys ``TrainingWorker`` injects:
    ``use_remove_padding``, ``use_dynamic_bsz``, ``micro_batch_size_per_gpu``, ``max_token_len_per_gpu``,
    ``use_fused_kernels`` -- taken from ``engine`` when given (as ``TrainingWorker.train_batch`` does), else
    :func:`build_cpu_fsdp2_engine`'s defaults. ``**non_tensor`` overrides or adds any of them (e.g.
    ``use_remove_padding=False``, ``calculate_entropy=True``, ``distillation_use_topk=True``).
    """
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    bsz = len(prompts)
    if bsz == 0:
        raise ValueError("empty batch")
    prompt_rows = [torch.as_tensor(list(p), dtype=torch.int64) for p in prompts]
    response_rows = [torch.as_tensor(list(r), dtype=torch.int64) for r in responses]
    if any(p.numel() == 0 for p in prompt_rows):
        raise ValueError("every prompt must be non-empty")
    if any(r.numel() == 0 for r in response_rows):
        raise ValueError("every response must be non-empty")
    seq_rows = [torch.cat([p, r]) for p, r in zip(prompt_rows, response_rows)]

    tensors: dict[str, torch.Tensor] = {
        "prompts": to_nested(prompt_rows),
        "responses": to_nested(response_rows),
        "input_ids": to_nested(seq_rows),
        "position_ids": to_nested([torch.arange(s.numel(), dtype=torch.int64) for s in seq_rows]),
        "response_mask": to_nested([torch.ones(r.numel(), dtype=torch.int64) for r in response_rows]),
    }
    tensors["loss_mask"] = tensors["response_mask"].clone()

    for key, val in (fields or {}).items():
        if isinstance(val, torch.Tensor) and not val.is_nested:
            if val.shape[0] != bsz:
                raise ValueError(f"field {key!r}: leading dim {val.shape[0]} != batch size {bsz}")
            tensors[key] = val
        elif isinstance(val, torch.Tensor):
            tensors[key] = val
        else:
            if len(val) != bsz:
                raise ValueError(f"field {key!r}: {len(val)} rows != batch size {bsz}")
            rows = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in val]
            rows = [r.to(torch.float32) if r.is_floating_point() else r for r in rows]
            tensors[key] = to_nested(rows)

    if "response_mask" in (fields or {}) and "loss_mask" not in (fields or {}):
        tensors["loss_mask"] = tensors["response_mask"].clone()

    td = TensorDict(tensors, batch_size=[bsz])

    if isinstance(temperature, (int, float)):
        temperature_value: Any = float(temperature)
    else:
        temperature_value = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1)
        if temperature_value.numel() != bsz:
            raise ValueError(f"{temperature_value.numel()} temperatures for batch size {bsz}")

    meta: dict[str, Any] = dict(
        pad_mode=DatasetPadMode.NO_PADDING,
        global_batch_size=bsz,
        global_token_num=[int(s.numel()) for s in seq_rows],
        calculate_entropy=False,
        compute_loss=True,
    )
    if engine is not None:
        meta.update(_engine_defaults(engine))
    else:
        meta.update(
            use_remove_padding=True,
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=2,
            max_token_len_per_gpu=4096,
            use_fused_kernels=False,
        )
    meta.update(non_tensor)

    if isinstance(temperature_value, torch.Tensor):
        td["temperature"] = temperature_value
    else:
        meta["temperature"] = temperature_value
    for key, val in meta.items():
        # wrap lists whole (TrainingWorker does the same for global_token_num); tu.assign_non_tensor would make a
        # per-row NonTensorStack of them
        tu.assign_non_tensor_data(td, key, val)
    return td


def build_actor_config(overrides: Sequence[str] = (), *, strategy: str = "fsdp2", micro_batch_size_per_gpu: int = 2):
    """verl's default actor config as ``ActorRolloutRefWorker.init_model`` builds it.

    Composes ``verl/trainer/config/ppo_trainer.yaml`` with Hydra (plus ``overrides``, full dotted keys such as
    ``"actor_rollout_ref.actor.clip_ratio=0.3"``) and converts ``actor_rollout_ref.actor`` with verl's
    ``omega_conf_to_dataclass`` -> ``FSDPActorConfig``. Use as ``functools.partial(ppo_loss, config=cfg)``.
    """
    from hydra import compose, initialize_config_module

    from verl.utils.config import omega_conf_to_dataclass

    base = [
        f"actor_rollout_ref.actor.strategy={strategy}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro_batch_size_per_gpu}",
        "actor_rollout_ref.actor.use_torch_compile=False",
    ]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[*base, *overrides])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
