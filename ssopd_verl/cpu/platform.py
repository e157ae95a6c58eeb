"""A CPU platform for verl 0.9.1, registered through verl's own hooks (no monkeypatching).

verl resolves its accelerator once per process (``verl.plugin.platform.get_platform()``, cached on first call) and
asks that platform for the device name, the ``torch.<device>`` module, the collective backend and the Ray
resource. verl ships no CPU platform: without one the device falls back to "cuda". This module adds one.

Hooks used (all public extension points of verl 0.9.1):

* ``verl.plugin.platform.PlatformRegistry.register("cpu")`` -- registers :class:`CPUPlatform`. It is selected
  **only** with ``VERL_PLATFORM=cpu`` (set before the first ``get_platform()`` call in the process; on Ray set it
  in the runtime env). ``is_platform_available()`` returns False, so auto-detection on a GPU host (including
  CPU-only Ray actors there, where the CUDA probe may fail) never picks it by accident.
* ``verl.workers.engine.EngineRegistry.register(model_type, backend, device="cpu")`` -- registers verl's own
  ``FSDPEngineWithLMHead`` ("language_model") and ``FSDPEngineWithValueHead`` ("value_model") for backends
  ``fsdp``/``fsdp2`` on device "cpu" (verl registers them for "cuda"/"npu" only). Only ``fsdp2`` works on CPU:
  FSDP1 refuses CPU parameters.

What else blocks verl's FSDP2 engine on CPU, and how it is handled:

* Process group: ``verl.utils.distributed.initialize_global_process_group_ray`` (called by
  ``TrainingWorker.__init__``) builds the backend string ``f"cpu:gloo,{device}:{backend}"``, i.e.
  ``"cpu:gloo,cpu:gloo"``, which torch rejects ("Duplicate device type cpu"). No verl hook changes that string,
  but verl skips initialisation when a process group already exists: call :func:`init_gloo_process_group` first
  (``ssopd_verl.cpu.engine`` does; a Ray worker calls :meth:`CPUPlatform.prepare_process_group` before
  ``TrainingWorker.__init__``).
* ``get_device_id()`` is used as ``tensor.to(get_device_id())``: :meth:`CPUPlatform.current_device` therefore
  returns the string ``"cpu"`` (as ``torch.cpu.current_device()`` does), never an int (``.to(0)`` means cuda:0).
* ``get_torch_device()`` returns :data:`cpu_device_module`, ``torch.cpu`` plus the CUDA-style calls verl makes
  on it (memory statistics, ``empty_cache``, RNG state, ...). Memory statistics report this process's resident
  set size (current / peak), so ``perf/max_memory_allocated_gb`` is meaningful on CPU.
* Attention: HF configs default to flash-attention in ``HFModelConfig``; pass
  ``override_config={"attn_implementation": "sdpa"}``. Also use ``use_torch_compile=False`` and fp32 mixed
  precision (``mixed_precision={"param_dtype": "fp32", ...}``) for exact CPU results (see ``ssopd_verl.cpu.engine``).
* Ray: every trainer rank holds one *logical* Ray GPU (``ray_resource_name()`` is "GPU",
  ``ray_resource_options(n)`` is ``{"num_gpus": n}``; the ``+platform=cpu`` overlay declares
  ``ray_init.num_gpus`` = trainer ranks). Nothing runs on a GPU: Ray only counts them. Two places in verl read
  them: ``ResourcePoolManager._check_resource_available`` counts "GPU"/"NPU" resources, and verl's vLLM replica
  (``vLLMReplica.launch_servers``) reads each rank's ``get_accelerator_ids()[get_resource_name()][0]``, which
  exists for accelerator resources only (Ray has no accelerator id for "CPU"). Ray sets ``CUDA_VISIBLE_DEVICES``
  in the ranks, which the CPU torch wheel ignores.
* Rollout engines: ``rollout_env_vars()`` gives verl's vLLM server its KV-cache size (``VLLM_CPU_KVCACHE_SPACE``
  in GiB, default 1; vLLM's CPU backend otherwise reserves ``gpu_memory_utilization`` of the host's memory), and
  ``is_ipc_supported()`` is False, so verl sends the actor's weights to vLLM through shared memory
  (``ssopd_verl.cpu.vllm``).

Importing this module does not import verl (``CPUPlatform`` is built on first use; see ``_CPUPlatformMethods``).
Registering the engines imports verl's FSDP engine module, whose import resolves verl's platform
(``device_name = get_device_name()`` at module level), so :func:`register_cpu_platform` registers them only when
``VERL_PLATFORM=cpu`` is already set (safe to call from the ``verl.plugins`` entry point during ``import verl``,
provided it runs before anything there imports verl's engine or trainer modules); :func:`register_cpu_engines`
forces it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import resource
import sys
import types
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"
DEVICE_NAME = "cpu"
COMMUNICATION_BACKEND = "gloo"
VISIBLE_DEVICES_ENVVAR = "VERL_CPU_VISIBLE_DEVICES"  # nothing reads it; keeps CUDA_VISIBLE_DEVICES untouched

__all__ = [
    "CPUPlatform",
    "cpu_device_module",
    "register_cpu_platform",
    "register_cpu_engines",
    "init_gloo_process_group",
    "is_cpu_platform_active",
]


# ----------------------------------------------------------------------------------------------------------------
# The device module returned by get_torch_device()
# ----------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a verl dependency
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _host_memory() -> tuple[int, int]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except Exception:  # pragma: no cover
        return 0, 0


class _CPUMemoryNamespace:
    """``device.memory`` (only reached by verl's memory profiler): no allocator history on CPU."""

    @staticmethod
    def _record_memory_history(*args, **kwargs) -> None:
        return None

    @staticmethod
    def _snapshot(*args, **kwargs) -> dict:
        return {"segments": [], "device_traces": []}

    @staticmethod
    def _dump_snapshot(*args, **kwargs) -> None:
        return None

    @staticmethod
    def _set_allocator_settings(*args, **kwargs) -> None:
        return None


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the CUDA-style functions verl calls through ``get_torch_device()``.

    Attributes not defined here (``Stream``, ``current_stream``, ``stream``, ``Event``, ``StreamContext``, ...) come
    from ``torch.cpu``. Calls found in verl 0.9.1 on the FSDP2 training / Ray worker paths: ``current_device``,
    ``device_count``, ``is_available``, ``set_device``, ``synchronize``, ``empty_cache``, ``ipc_collect``,
    ``memory_allocated``, ``memory_reserved``, ``max_memory_allocated``, ``max_memory_reserved``, ``mem_get_info``,
    ``reset_peak_memory_stats``, ``reset_accumulated_memory_stats``, ``get_device_properties``,
    ``get_device_name``, ``get_rng_state``, ``set_rng_state``, ``manual_seed(_all)``,
    ``set_per_process_memory_fraction``, ``Stream``, ``current_stream``, ``stream``, ``Event``, ``memory._*``.
    """

    memory = _CPUMemoryNamespace()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    # --- device management -------------------------------------------------------------------------------------
    @staticmethod
    def current_device() -> str:
        return DEVICE_NAME

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"  # verl's FlopsCounter has a "CPU" entry

    @staticmethod
    def get_device_properties(device: Any = None) -> types.SimpleNamespace:
        _, total = _host_memory()
        return types.SimpleNamespace(name="CPU", total_memory=total, major=None, minor=None)

    @staticmethod
    def get_device_capability(device: Any = None) -> tuple[Optional[int], Optional[int]]:
        return None, None

    # --- RNG -----------------------------------------------------------------------------------------------------
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    # --- memory (host RSS of this process) ------------------------------------------------------------------------
    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return _rss_bytes()

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return _rss_bytes()

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return _peak_rss_bytes()

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return _peak_rss_bytes()

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        return _host_memory()

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None  # the peak RSS of a process cannot be reset

    @staticmethod
    def reset_accumulated_memory_stats(device: Any = None) -> None:
        return None


cpu_device_module = _CPUDeviceModule("ssopd_verl.cpu.platform.cpu_device_module")
cpu_device_module.__doc__ = _CPUDeviceModule.__doc__


# ----------------------------------------------------------------------------------------------------------------
# The platform
# ----------------------------------------------------------------------------------------------------------------


class _CPUPlatformMethods:
    """The methods of :class:`CPUPlatform` (``PlatformBase``'s interface), free of verl imports.

    ``CPUPlatform`` itself (this class + ``verl.plugin.platform.PlatformBase``) is created on first use: importing
    verl runs its ``verl.plugins`` entry points, and ours calls back into this module, so this module must not
    import verl at import time (a re-entrant import would see it half-initialised).
    """

    @property
    def device_name(self) -> str:
        return DEVICE_NAME

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return cpu_device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: selected only by VERL_PLATFORM=cpu (see module docstring).
        return False

    def current_device(self) -> str:  # verl annotates int; it is used as `.to(get_device_id())`
        return DEVICE_NAME

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None  # e.g. "expandable_segments:False" is meaningless on CPU

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return COMMUNICATION_BACKEND

    def visible_devices_envvar(self) -> str:
        return VISIBLE_DEVICES_ENVVAR

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"  # a logical Ray GPU per trainer rank (see the module docstring)

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def rollout_env_vars(self) -> dict[str, str]:
        # verl's vLLMReplica passes these to its vLLM server actor (PlatformBase hook); GiB of KV cache
        return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None

    def prepare_process_group(self) -> bool:
        """Create the gloo process group before verl's worker does (see :func:`init_gloo_process_group`).

        Not part of verl's ``PlatformBase``: SSOPD's actor worker calls it when the active platform has it, so
        the worker needs no import of this CPU runtime."""
        return init_gloo_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------

_ENGINE_MODEL_TYPES = (
    ("language_model", "FSDPEngineWithLMHead"),
    ("value_model", "FSDPEngineWithValueHead"),
)
_ENGINE_BACKENDS = ("fsdp", "fsdp2")


def register_cpu_engines() -> None:
    """Register verl's FSDP engines for device "cpu" (idempotent).

    Imports ``verl.workers.engine.fsdp.transformer_impl``, which resolves verl's platform at import time. Also
    registers the CPU Ulysses attention (``attn_implementation=ulysses_sdpa``, :mod:`ssopd_verl.cpu.attention`),
    which a CPU run with ``ulysses_sequence_parallel_size > 1`` must select.
    """
    from ssopd_verl.cpu.attention import register_ulysses_sdpa

    register_ulysses_sdpa()
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl

    for model_type, cls_name in _ENGINE_MODEL_TYPES:
        engine_cls = getattr(transformer_impl, cls_name)
        # EngineRegistry asserts on duplicate keys and has no lookup by device; read its table to stay idempotent.
        by_backend = EngineRegistry._engines.get(model_type, {})
        missing = [b for b in _ENGINE_BACKENDS if DEVICE_NAME not in by_backend.get(b, {})]
        if missing:
            EngineRegistry.register(model_type=model_type, backend=missing, device=DEVICE_NAME)(engine_cls)
        for backend in _ENGINE_BACKENDS:
            registered = EngineRegistry._engines[model_type][backend][DEVICE_NAME]
            if backend not in missing and registered is not engine_cls:
                logger.info("EngineRegistry already has %s/%s/cpu -> %s; kept", model_type, backend, registered)


_PLATFORM_CLS: Optional[type] = None


def _platform_class() -> type:
    """``CPUPlatform``: ``_CPUPlatformMethods`` + verl's ``PlatformBase``, created once."""
    global _PLATFORM_CLS
    if _PLATFORM_CLS is None:
        from verl.plugin.platform import PlatformBase  # may run verl's plugins, which may call back in here

        if _PLATFORM_CLS is None:
            cls = type(
                "CPUPlatform",
                (_CPUPlatformMethods, PlatformBase),
                {"__module__": __name__, "__qualname__": "CPUPlatform", "__doc__": _CPU_PLATFORM_DOC},
            )
            _PLATFORM_CLS = cls
    return _PLATFORM_CLS


_CPU_PLATFORM_DOC = """verl platform for plain CPU hosts: device "cpu", collectives over gloo, no profiler, no IPC."""


def __getattr__(name: str) -> Any:  # PEP 562: `from ssopd_verl.cpu.platform import CPUPlatform` imports verl lazily
    if name == "CPUPlatform":
        return _platform_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_cpu_platform(*, engines: Optional[bool] = None) -> type:
    """Register ``CPUPlatform`` as verl platform "cpu" and verl's FSDP engines for device "cpu". Idempotent.

    Selecting the platform is separate: ``VERL_PLATFORM=cpu`` before verl first resolves it. ``engines``: None (the
    default) registers the engines only when ``VERL_PLATFORM=cpu`` is set, because importing verl's engine module
    resolves (and caches) verl's platform: doing that unconditionally, e.g. from the ``verl.plugins`` entry point
    during ``import verl``, would pin every process that sets ``VERL_PLATFORM`` later to "cuda". True/False force it.
    Returns the ``CPUPlatform`` class.
    """
    cls = _platform_class()
    from verl.plugin.platform import PlatformRegistry

    if PlatformRegistry.get(PLATFORM_NAME) is not cls:
        PlatformRegistry.register(platform=PLATFORM_NAME)(cls)
    if engines is None:
        engines = os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME
    if engines:
        register_cpu_engines()
    return cls


def is_cpu_platform_active() -> bool:
    """Whether verl's (cached) platform in this process is the CPU platform. Resolves it if not yet resolved."""
    from verl.plugin.platform import get_platform

    return get_platform().device_name == DEVICE_NAME


def init_gloo_process_group(timeout_s: Optional[float] = None) -> bool:
    """Initialise the default torch.distributed process group with plain ``gloo`` unless one exists.

    Uses the env:// rendezvous (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) that verl's Ray worker
    group sets; for a single process, defaults are filled in (127.0.0.1, a free port, rank 0 of 1). Call it before
    verl's ``initialize_global_process_group_ray`` so that verl skips its "cpu:gloo,cpu:gloo" backend string.
    Returns True if it initialised the group, False if one already existed.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "WORLD_SIZE" not in os.environ or os.environ.get("WORLD_SIZE") == "1":
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=COMMUNICATION_BACKEND,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        init_method=os.environ.get("DIST_INIT_METHOD", None),
        **kwargs,
    )
    return True


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
