"""What makes a seed reproduce its run, and what lets several runs share a process, without running one: the
trainer orders a step's rows by content, `+platform=cpu` seeds the actor engine and polls for rollouts every
0.1 s, and `glue.in_process` runs the overlays' start-up checks as Hydra does. (Two real runs of one seed give
equal tracker values: `scripts/experiment_cpu.py`, see docs/evidence.md.)"""

import random

import pytest
from hydra import compose, initialize_config_module
from transfer_queue import KVBatchMeta

from ssopd_verl.glue import in_process, trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync


def composed(*overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=["+recipe=ssopd", "+platform=cpu", *overrides])


def test_a_steps_rows_reach_verls_balancing_sorted_by_content(monkeypatch):
    # rows of two prompts, in completion order; two completions are identical (ties are identical rows)
    content = {"u1_0_0": ([5, 6], [9, 2]), "u1_1_0": ([5, 6], [3]), "u2_0_0": ([4], [7, 7]), "u1_2_0": ([5, 6], [3]),
               "u2_1_0": ([4], [1])}  # fmt: skip
    monkeypatch.setattr(trainer.tq, "kv_batch_get", lambda keys, partition_id, select_fields: {
        "prompts": [_Ids(content[k][0]) for k in keys], "responses": [_Ids(content[k][1]) for k in keys]})  # fmt: skip
    seen = []
    monkeypatch.setattr(PPOTrainerSync, "_balance_batch", lambda self, batch, metrics, **kw: seen.append(batch.keys))
    ssopd_trainer = trainer.SSOPDTrainer.__new__(trainer.SSOPDTrainer)
    orders = [list(content), list(reversed(content))] + [random.Random(s).sample(list(content), 5) for s in range(5)]
    for keys in orders:
        ssopd_trainer._balance_batch(KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys]), {})
    rows = [[content[k] for k in keys] for keys in seen]
    assert rows[0] == sorted(content.values()) and all(r == rows[0] for r in rows)
    assert all(sorted(keys) == sorted(content) for keys in seen)  # a permutation, nothing lost


class _Ids(list):
    def tolist(self):
        return list(self)


def test_cpu_platform_seeds_the_actor_engine_and_polls_for_rollouts_every_tenth_of_a_second():
    cfg = composed()
    assert cfg.actor_rollout_ref.actor.fsdp_config.full_determinism is True  # verl seeds torch before the model
    assert cfg.ray_kwargs.ray_init.include_dashboard is False
    ssopd_trainer = trainer.SSOPDTrainer.__new__(trainer.SSOPDTrainer)
    ssopd_trainer.config, ssopd_trainer.trainer_mode = cfg, "sync"
    assert ssopd_trainer._build_replay_buffer().poll_interval == 0.1
    ssopd_trainer.config = composed("trainer.v1.sampler.sampler_kwargs.poll_interval=null")
    assert ssopd_trainer._build_replay_buffer().poll_interval == 2.0  # verl's own default, when not set


def test_in_process_runs_the_overlays_start_up_checks_as_hydra_does():
    cfg = in_process.compose(["+recipe=ssopd", "+platform=cpu"])
    assert set(cfg.hydra.callbacks) == {"ssopd_startup_check", "ssopd_cpu_startup_check"}
    in_process.run_callbacks(cfg)  # a good config passes
    for bad, key in (("actor_rollout_ref.rollout.n=1", "rollout.n"), ("actor_rollout_ref.model.lora_rank=8", "merge")):
        with pytest.raises(SystemExit, match=key):
            in_process.run_callbacks(in_process.compose(["+recipe=ssopd", "+platform=cpu", bad]))


def test_in_process_selects_the_cpu_platform_from_the_overrides_as_the_command_line_does(tmp_path):
    """In a fresh process without VERL_PLATFORM (what scripts/experiment_cpu.py and tests/e2e_runs.py run in),
    `+platform=cpu` among the overrides must leave trainer.device=cpu and verl's platform cpu: before, verl resolved
    "cuda" in that process and main_ppo's auto_set_device rewrote trainer.device to cuda."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from ssopd_verl.glue import in_process; "
            "cfg = in_process.prepare(['+recipe=ssopd', '+platform=cpu', '+tiny=default']); "
            "from verl.utils.device import get_platform; "
            "print(json.dumps([cfg.trainer.device, get_platform().device_name]))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["cpu", "cpu"]


FAILED_RAY_START = '''
import json, subprocess, sys
import psutil, ray
from ssopd_verl.glue import in_process

# one of Ray's own processes as a failed start leaves them (matched by its script's path), and a child that is not;
# neither holds this process's output open
sleep = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
nap = [sys.executable, "-c", "import time; time.sleep(300)"]
fake_agent = subprocess.Popen([*nap, "/x/ray/_private/agent.py"], **sleep)
other = subprocess.Popen(nap, **sleep)
try:
    try:
        in_process.main_ppo(["+recipe=ssopd", "+platform=cpu", "+tiny=default",
                             "++ray_kwargs.ray_init.object_store_memory=1"])
    except ValueError as error:
        print("refused:", error)
    names = [c.name() for c in psutil.Process().children(recursive=True) if c.pid != other.pid]
    print(json.dumps({"initialized": ray.is_initialized(), "children": names, "agent": fake_agent.poll(),
                      "other": other.poll()}))
finally:
    other.kill(), fake_agent.kill()
'''


def test_in_process_ends_what_a_failed_ray_start_left_and_starts_no_other_ray(tmp_path):
    """A ray.init that fails (here: a refused object-store size, after Ray has spawned its GCS) leaves this process
    without Ray: nothing may then start a default instance (Ray's state API auto-initialises; before, the run's
    clean-up did, and every later run of the process used that instance: 0 GPUs, 'Total available GPUs 0'), and the
    failed start's processes are ended. A refused argument is not retried."""
    import json
    import subprocess

    from tests import forked

    (tmp_path / "start.py").write_text(FAILED_RAY_START)
    out = subprocess.run(forked.command(str(tmp_path / "start.py")), env=forked.environment(), capture_output=True,
                         text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: Attempting to cap object store memory" in out.stdout and "starting it again" not in out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["initialized"] is False and result["children"] == []
    assert result["agent"] is not None and result["other"] is None  # Ray's process ended, the other one left alone
