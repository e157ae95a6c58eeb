"""A launch script on a two-node Ray cluster: checkpoints and metrics land at the absolute default paths.

The cluster is two Ray nodes on this machine (``ray.cluster_utils.Cluster``, as Ray's own multi-node tests run
them), each with one logical GPU and its own raylet; nothing tells a worker which node it runs on but Ray. One
launch script, shrunk for CPU (``CPU_SMOKE=1``), runs with ``NNODES=2 N_GPUS_PER_NODE=1`` (``trainer.nnodes=2
trainer.n_gpus_per_node=1``) for one step with a checkpoint, from a working directory of its own and with
``CKPT_ROOT`` and ``LOG_DIR`` left at their defaults: ``common.sh`` makes them absolute against that directory,
so the trainer rank on the second node and verl's driver actor, wherever it runs, write to the same place (on a
real cluster, a filesystem shared by all nodes: docs/reproduction.md).

The script composes its overrides (``DRY_RUN=args``, the arguments it would ``exec`` main_ppo with); they run
through ``main_ppo`` in a process of its own (:func:`ssopd_verl.glue.in_process.main_ppo`), connected to the
cluster (``ray_kwargs.ray_init.address``; a driver joining a cluster passes no ``num_cpus``/``num_gpus``). That
process has its own Ray temp dir (``RAY_TMPDIR``): the cluster's address file must not make another process's
``ray.init()`` on this machine join this cluster. It writes the Ray actor table (the node of every actor) next to
the run's log, and shuts its cluster down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "qwen3_1.7b_ssopd"
PROJECT = "ssopd"  # the launch scripts' PROJECT_NAME
NODES = 2
# per node: one logical GPU (one trainer rank) and the CPU overlay's logical CPUs for the run's other actors
NODE_RESOURCES = dict(num_cpus=8, num_gpus=1)


def script_overrides(cwd: Path) -> list[str]:
    """The overrides the launch script runs main_ppo with, run from ``cwd``, shrunk for CPU on two nodes, with a
    checkpoint at its one step and no validation (the output paths are under test, not the metrics)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "CKPT_ROOT", "LOG_DIR")}
    env.update(CPU_SMOKE="1", DRY_RUN="args", NNODES=str(NODES), N_GPUS_PER_NODE="1", SAVE_FREQ="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "launch" / f"{SCRIPT}.sh"), "trainer.val_before_train=False"],
                          cwd=cwd, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return proc.stdout.splitlines()


def run_on_two_nodes(root: Path) -> None:
    """The driver process: start the cluster, run the script's overrides on it, record where the actors ran."""
    import ray
    from ray.cluster_utils import Cluster

    from fork_client import runtime_env_overrides  # tests/ (this script's folder) is on sys.path

    from ssopd_verl.glue.in_process import main_ppo, output_to
    from ssopd_verl.tiny_default import get_tiny_default

    get_tiny_default()
    cwd = root / "launch"
    # + the Ray workers forked from a server per node that has imported verl (tests/fork_client.py), as in
    # tests/e2e_runs.py: ~1 s per actor instead of ~15 s of imports; the code they run is the same
    overrides = [*script_overrides(cwd), *runtime_env_overrides(root / "fork")]
    (root / "overrides.txt").write_text("\n".join(overrides))
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE_RESOURCES, include_dashboard=False))
    try:
        for _ in range(NODES - 1):
            cluster.add_node(**NODE_RESOURCES)
        cluster.wait_for_nodes()
        with output_to(root / "run.log"):
            # a driver joining a cluster passes no num_cpus/num_gpus (Ray refuses them; the CPU overlay sets them)
            join = [f"++ray_kwargs.ray_init.address={cluster.address}", "ray_kwargs.ray_init.num_cpus=null",
                    "ray_kwargs.ray_init.num_gpus=null"]  # fmt: skip
            main_ppo([*overrides, *join])
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        # the GCS's actor table keeps ended actors with the node they ran on (the state API needs the dashboard)
        actors = [{"class": a["ActorClassName"], "name": a.get("Name", ""), "node": a["Address"]["NodeID"]}
                  for a in ray._private.state.actors().values()]  # fmt: skip
        (root / "actors.json").write_text(json.dumps({"nodes": nodes, "actors": actors}, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The two-node run, in a process of its own (its own Ray temp dir; see the module docstring)."""
    root = tmp_path_factory.mktemp("multinode")
    (root / "launch").mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "RAY_ADDRESS")}
    # as tests/e2e_runs.py: the reward workers' grading budget on a loaded machine, workers at the driver's priority
    env.update(RAY_TMPDIR=ray_tmp, SSOPD_GRADING_TIMEOUT_S="600", SSOPD_GRADING_WORKERS="1", RAY_worker_niceness="0")
    try:
        proc = subprocess.run([sys.executable, __file__, str(root)], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=1200)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (root / "run.log").read_text(errors="replace") if (root / "run.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n--- run.log ---\n{log[-6000:]}"
    return root


def test_the_script_asks_for_two_nodes_and_absolute_output_folders(run):
    overrides = (run / "overrides.txt").read_text().splitlines()
    cwd = run / "launch"
    assert "trainer.nnodes=2" in overrides and "trainer.n_gpus_per_node=1" in overrides
    assert "trainer.save_freq=1" in overrides and "trainer.total_training_steps=1" in overrides
    assert f"trainer.default_local_dir={cwd}/checkpoints/${{trainer.project_name}}/${{trainer.experiment_name}}" in (
        overrides
    )
    assert f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_ROOT={cwd}/logs" in overrides


def test_checkpoint_and_metrics_land_at_the_absolute_paths(run):
    cwd = run / "launch"
    checkpoint = cwd / "checkpoints" / PROJECT / SCRIPT
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    # one model shard per trainer rank: the rank on the second node wrote its own into the shared folder
    shards = sorted(p.name for p in (checkpoint / "global_step_1" / "actor").glob("model_world_size_2_rank_*.pt"))
    assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    steps = [json.loads(line)["step"] for line in (cwd / "logs" / PROJECT / f"{SCRIPT}.jsonl").read_text().splitlines()]
    assert 1 in steps
    assert not (run / "checkpoints").exists() and not (run / "logs").exists()  # nothing relative to the driver's cwd


def test_each_node_hosts_a_trainer_rank(run):
    table = json.loads((run / "actors.json").read_text())
    assert len(table["nodes"]) == NODES
    # verl's worker group: one actor per rank, named "<placement group>WorkerDict_<node's group>:<rank in it>"
    ranks = [a for a in table["actors"] if a["class"].endswith("WorkerDict")]
    assert len(ranks) == NODES, table["actors"]
    assert sorted(a["node"] for a in ranks) == sorted(table["nodes"])


if __name__ == "__main__":
    os.environ.pop("VERL_PLATFORM", None)  # the +platform=cpu overlay selects it (in Ray's runtime env)
    run_on_two_nodes(Path(sys.argv[1]))
