"""``python -m verl.trainer.main_ppo <overrides>``, several times in one Python process, with one Ray start.

A run of the tiny default spends ~20-40 s of its ~2 minutes before verl's first worker starts: Python and verl
imports in the driver, then ``ray.init`` (a local Ray instance). :func:`main_ppo` runs what verl's ``main_ppo``
runs, from a process that may have run others:

1. Hydra's compose API over verl's ``ppo_trainer`` config with the overrides (our overlays are found through the
   ``SearchPathPlugin`` as on the command line);
2. the Hydra callbacks that the composed config lists in ``hydra.callbacks`` (our overlays' start-up checks),
   instantiated and called with ``on_job_start`` as Hydra calls them (compose runs no callbacks);
3. verl's ``main``, without Hydra: ``auto_set_device``, ``validate_config``, ``run_ppo(config, TaskRunnerV1)``.
   As on the command line, ``+platform=cpu`` among the overrides selects verl's CPU platform in this process
   before verl's trainer is imported (:func:`prepare`).
   ``run_ppo`` calls ``ray.init`` only when Ray is not initialised, so the first run's ``ray_kwargs.ray_init``
   holds for the process; a later run whose ``ray_kwargs`` differ is refused rather than run with the first's.
   A ``ray.init`` that gives up (it waits a fixed 30 s for its raylet, which a loaded machine can exceed) is tried
   again, up to :data:`RAY_START_ATTEMPTS` times, after ending the processes it left.

Every run gets fresh Ray actors (TaskRunner, workers, rollout server, TransferQueue): nothing but the Ray
instance is shared. Each run's Hydra job (``hydra.job.env_set``, output directory, log files) is not reproduced:
the overlays here set none. Where verl's ``file`` logger writes is read from the environment of the TaskRunner's
process, i.e. of this process when Ray started (``VERL_FILE_LOGGER_ROOT``, ``VERL_FILE_LOGGER_PATH``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

_RAY_KWARGS: Optional[dict] = None  # the ray_kwargs of the run that started Ray in this process


def compose(overrides: Sequence[str]) -> DictConfig:
    """verl's ``ppo_trainer`` config with ``overrides``, the ``hydra`` node included (for its callbacks)."""
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=list(overrides), return_hydra_config=True)


def run_callbacks(config: DictConfig) -> None:
    """``on_job_start`` of every callback in ``config.hydra.callbacks``, as Hydra's ``run_job`` calls it."""
    from hydra.utils import instantiate

    for callback in (OmegaConf.select(config, "hydra.callbacks") or {}).values():
        instantiate(callback).on_job_start(config=config)


def prepare(overrides: Sequence[str]) -> DictConfig:
    """What verl's ``main`` does before ``run_ppo``: the composed config, the start-up callbacks run, the device
    set; the ``hydra`` node removed."""
    from ssopd_verl.cpu import select_cpu_platform

    # as on the command line (the plugin reads argv there): +platform=cpu selects verl's CPU platform in this
    # process too, before verl's trainer is imported; else verl resolves "cuda" here and main_ppo's
    # auto_set_device turns trainer.device=cpu into cuda
    select_cpu_platform(list(overrides))
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    config = compose(overrides)
    run_callbacks(config)
    with open_dict(config):
        del config["hydra"]
    if not config.trainer.use_v1:
        raise ValueError("main_ppo in process runs verl's v1 trainer only (trainer.use_v1=true)")
    device = config.trainer.device
    auto_set_device(config)
    if device == "cpu" and config.trainer.device != device:
        raise RuntimeError(
            f"trainer.device=cpu but verl resolved this process's platform as {config.trainer.device} before "
            "the first run: run the CPU overlay in a process where VERL_PLATFORM=cpu is set before verl is imported"
        )
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    return config


def main_ppo(overrides: Sequence[str]) -> None:
    """One ``main_ppo`` run with these command-line overrides; returns when it has finished."""
    global _RAY_KWARGS
    config = prepare(overrides)
    import ray

    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

    ray_kwargs = OmegaConf.to_container(config.ray_kwargs, resolve=True)
    if ray.is_initialized():
        if ray_kwargs != _RAY_KWARGS:
            raise ValueError(
                "this run's ray_kwargs differ from those Ray was started with in this process; "
                f"run it in a process of its own:\n{ray_kwargs}\n!=\n{_RAY_KWARGS}"
            )
    else:
        _RAY_KWARGS = ray_kwargs
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        runner = _KeepHandle(TaskRunnerV1)
        try:
            run_ppo(config, task_runner_class=runner)
            return
        except Exception as error:
            # run_ppo's only step before the TaskRunner is ray.init: Ray not initialised after it raised = Ray did
            # not start. What the attempt spawned is ended either way; a start that gave up is tried again (on a
            # loaded machine ray.init gives up after a fixed 30 s wait for its raylet), a refused argument is not.
            if ray.is_initialized():
                raise
            left = end_processes_of_failed_ray_start()
            if isinstance(error, (ValueError, TypeError)) or attempt == RAY_START_ATTEMPTS:
                raise
            print(f"Ray did not start ({error}); ended what the attempt left ({left} processes) and starting it again "
                  f"(attempt {attempt + 1} of {RAY_START_ATTEMPTS})", file=sys.stderr, flush=True)
        finally:
            if runner.handle is not None:  # ends its workers too (they are its children); Ray would, some time later
                ray.kill(runner.handle)
            if ray.is_initialized():  # never a call that would start a Ray instance (Ray's auto-init): see below
                wait_for_run_gone()


RAY_START_ATTEMPTS = 3

# What a local ray.init spawns (besides the workers, which are the raylet's children): the GCS and raylet
# binaries and Ray's own Python processes (reaper, log monitor, dashboard and its agents, runtime-env agent)
_RAY_PROCESS_NAMES = ("gcs_server", "raylet")
_RAY_SCRIPT_MARKERS = ("/ray/_private/", "/ray/dashboard/", "/ray/autoscaler/")


def end_processes_of_failed_ray_start() -> int:
    """Kill the Ray processes a failed ``ray.init`` of this process left (its GCS, raylet, agents and their children):
    ``ray.shutdown()`` cannot, since the failed start never became this process's Ray node. Called only while Ray is
    not initialised here, so that every Ray process among this process's children is one of them. Returns how many
    processes it ended."""
    import psutil

    def is_ray(process: "psutil.Process") -> bool:
        try:
            return process.name() in _RAY_PROCESS_NAMES or any(
                marker in arg for arg in process.cmdline() for marker in _RAY_SCRIPT_MARKERS)
        except psutil.Error:
            return False

    doomed = []
    for child in psutil.Process().children():
        if is_ray(child):
            with contextlib.suppress(psutil.Error):
                doomed += [child, *child.children(recursive=True)]
    for process in doomed:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(doomed, timeout=30)
    return len(doomed)


class _KeepHandle:
    """The TaskRunner actor class as ``run_ppo`` uses it (``.remote()``), keeping the handle it creates."""

    def __init__(self, actor_class):
        self.actor_class, self.handle = actor_class, None

    def remote(self, *args, **kwargs):
        self.handle = self.actor_class.remote(*args, **kwargs)
        return self.handle


def wait_for_run_gone(timeout_s: float = 120.0) -> None:
    """Clear what a finished run leaves in the Ray instance for the next run: verl's placement groups outlive the
    TaskRunner that created them (their names are the same in every run, so the next run's creation fails):
    remove them, which ends the actors placed in them; then wait until no named actor (the rollout server,
    TransferQueue's) is left and every CPU and GPU resource is free again (every actor of the run has ended), since
    Ray ends them asynchronously and two runs' processes side by side can exhaust the memory.

    Only while Ray is initialised: Ray's state API starts a default Ray instance when it is not (no GPUs, not this
    process's ray_kwargs), which every later run of the process would then find and use."""
    import time

    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    for group in ray.util.placement_group_table().values():
        if group.get("state") != "REMOVED" and group.get("name"):
            remove_placement_group(get_placement_group(group["name"]))
    deadline = time.monotonic() + timeout_s
    while True:
        names = ray.util.list_named_actors()
        groups = [g.get("name") for g in ray.util.placement_group_table().values() if g.get("state") != "REMOVED"]
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {k: total[k] - free.get(k, 0.0) for k in ("CPU", "GPU") if total.get(k, 0.0) - free.get(k, 0.0) > 1e-6}
        if not names and not groups and not held:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the last run's actors {names}, placement groups {groups}, resources {held} remain")
        time.sleep(0.2)


@contextlib.contextmanager
def output_to(path: Path):
    """fds 1 and 2 (this process's output and the workers' lines Ray forwards to it) into ``path``: one log per run
    when several runs share the process."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
