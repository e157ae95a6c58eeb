"""The nine launch scripts compose against verl's real config, through the script's own overrides.

Each script prints its Hydra overrides (`DRY_RUN=args`, bash only); they are composed here in one process with
Hydra's compose API against verl's `ppo_trainer` config, as `main_ppo` composes them, and SSOPD's start-up check
runs on each. One script also runs for real as `--dry-run` (`python -m verl.trainer.main_ppo ... --cfg job`, the
Hydra callback included) with command-line overrides, and must print the same config as its in-process twin.
Then the composed configs are checked: the shared base values, the per-size values, the method lines, verl's own
config validation, and that the three methods of a size differ only in the ssopd.* lines (and their names).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "scripts" / "launch"
SIZES = {"1.7b": "Qwen/Qwen3-1.7B", "4b": "Qwen/Qwen3-4B", "8b": "Qwen/Qwen3-8B"}
METHODS = ("grpo", "opsd", "ssopd")
SCRIPTS = [f"qwen3_{size}_{method}" for size in SIZES for method in METHODS]
DATA_DIR = "/data/ssopd-test"


def _launch(script, cwd, env, *args):
    return subprocess.Popen(
        ["bash", str(LAUNCH / f"{script}.sh"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _compose(overrides: list[str]) -> dict:
    """What `main_ppo ... --cfg job` prints (interpolations unresolved), composed in this process; plus the check
    that the recipe's Hydra callback runs before verl's main()."""
    from hydra import compose, initialize_config_module

    from ssopd_verl.glue.checks import check_config

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    check_config(cfg)
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """{script name: composed config}, from `DRY_RUN=1 bash <script>` run outside the repo, all at once; plus
    "passthrough": qwen3_4b_ssopd with `--dry-run`, env knobs and command-line overrides."""
    cwd = tmp_path_factory.mktemp("launch")
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": DATA_DIR, "LOG_DIR": "/logs/x"}
    for key in ("MODEL_PATH", "TRAIN_FILES", "VAL_FILES", "NNODES", "EXPERIMENT_NAME", "ROLLOUT_N", "DRY_RUN"):
        env.pop(key, None)  # the defaults are under test
    env.pop("VERL_PLATFORM", None)  # conftest selects the CPU platform for in-process tests; these target GPUs
    passthrough = ("ssopd.tau=0.1", "trainer.total_training_steps=7")
    passthrough_env = {**env, "MODEL_PATH": "/models/mine", "NNODES": "4"}
    real = _launch("qwen3_4b_ssopd", cwd, passthrough_env, "--dry-run", *passthrough)  # runs while we compose
    procs = {name: _launch(name, cwd, {**env, "DRY_RUN": "args"}) for name in SCRIPTS}
    procs["full"] = _launch("qwen3_8b_ssopd", cwd, {**env, "DRY_RUN": "args", "SETUP": "full"})
    procs["smoke"] = _launch("qwen3_8b_ssopd", cwd, {**env, "DRY_RUN": "args", "CPU_SMOKE": "1"})
    procs["passthrough"] = _launch("qwen3_4b_ssopd", cwd, {**passthrough_env, "DRY_RUN": "args"}, *passthrough)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)  # hang guards: a loaded machine needs minutes
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        out[name] = _compose(stdout.splitlines())
    stdout, stderr = real.communicate(timeout=600)
    assert real.returncode == 0, stderr[-3000:]
    out["real"] = yaml.safe_load(stdout)
    return out


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        items = {}
        for key, value in tree.items():
            items.update(_flatten(value, f"{prefix}{key}."))
        return items
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_composes_with_the_expected_values(composed, name):
    cfg = composed[name]
    size, method = name.split("_")[1:]
    arr = cfg["actor_rollout_ref"]
    assert arr["model"]["path"] == SIZES[size]
    assert arr["rollout"]["name"] == "vllm"
    assert arr["rollout"]["n"] == 8
    assert arr["rollout"]["temperature"] == 1.0
    assert cfg["data"]["train_batch_size"] == 128
    assert cfg["data"]["max_prompt_length"] == 1024
    assert cfg["data"]["max_response_length"] == 16384
    assert cfg["data"]["apply_chat_template_kwargs"] == {"enable_thinking": True}
    assert cfg["data"]["train_files"] == [f"{DATA_DIR}/openthoughts_math/train.parquet"]
    assert cfg["data"]["val_files"] == [f"{DATA_DIR}/eval/{b}.parquet" for b in ("aime24", "aime25", "hmmt25_feb")]
    assert arr["actor"]["strategy"] == "fsdp2" and arr["actor"]["use_dynamic_bsz"] is True
    # the reported setup (SSOPD_SPEC.md 1b) is the default: LoRA as the OPSD reference code, frozen initial teacher
    assert arr["actor"]["optim"]["lr"] == 2e-5
    assert (arr["model"]["lora_rank"], arr["model"]["lora_alpha"]) == (64, 128)
    assert arr["model"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert arr["model"]["lora"]["merge"] is True  # vLLM receives merged weights
    assert arr["rollout"]["val_kwargs"]["top_p"] == 0.95
    assert cfg["reward"]["custom_reward_function"] == {
        "path": "pkg://ssopd_verl.evaluation.grading",
        "name": "compute_score",
    }
    assert cfg["trainer"]["logger"] == ["console", "file"]
    assert cfg["trainer"]["experiment_name"] == name
    assert cfg["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]["VERL_FILE_LOGGER_ROOT"] == "/logs/x"
    # CKPT_ROOT unset: the launch directory's checkpoints/, absolute (test_output_folders_are_absolute)
    checkpoints = cfg["trainer"]["default_local_dir"]
    assert checkpoints.startswith("/")
    assert checkpoints.endswith("/checkpoints/${trainer.project_name}/${trainer.experiment_name}")
    # the recipe block is there (not the silent `recipe: ssopd` of a missing search path)
    assert cfg["algorithm"]["adv_estimator"] == "ssopd"
    assert cfg["trainer"]["v1"]["trainer_mode"] == "ssopd"
    assert "recipe" not in cfg
    ssopd = cfg["ssopd"]
    expected = {
        "grpo": {"lambda": 0, "witness_source": "shortest_correct"},
        "opsd": {"lambda": 0.5, "witness_source": "reference_solution"},
        "ssopd": {"lambda": 0.5, "witness_source": "shortest_correct"},
    }[method]
    assert {k: ssopd[k] for k in expected} == expected
    assert ssopd["teacher"] == "initial" and ssopd["max_distill_tokens"] == 2048
    assert ssopd["clip"] == "pointwise" and ssopd["tau"] == 0.05


def test_full_fine_tuning_setup_is_the_live_teacher_over_every_token(composed):
    cfg, reported = composed["full"], composed["qwen3_8b_ssopd"]
    arr = cfg["actor_rollout_ref"]
    assert arr["model"]["lora_rank"] == 0 and arr["actor"]["optim"]["lr"] == 1e-6
    assert arr["rollout"]["val_kwargs"]["top_p"] == 1.0
    assert cfg["ssopd"]["teacher"] == "live" and cfg["ssopd"]["max_distill_tokens"] is None
    assert cfg["ssopd"]["lambda"] == 1.0
    # everything else is the reported setup's
    differing = {k for k in set(_flatten(cfg)) | set(_flatten(reported)) if _flatten(cfg).get(k) != _flatten(reported).get(k)}
    assert all(k.startswith(("ssopd.", "actor_rollout_ref.model.lora", "actor_rollout_ref.model.target_modules",
                             "actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.rollout.val_kwargs.top_p"))
               for k in differing), differing


def test_sizes_get_their_parallelism_and_nodes(composed):
    tp = {s: composed[f"qwen3_{s}_ssopd"]["actor_rollout_ref"]["rollout"]["tensor_model_parallel_size"] for s in SIZES}
    nodes = {s: composed[f"qwen3_{s}_ssopd"]["trainer"]["nnodes"] for s in SIZES}
    actors = {s: composed[f"qwen3_{s}_ssopd"]["actor_rollout_ref"]["actor"] for s in SIZES}
    offload = {s: actor["fsdp_config"]["param_offload"] for s, actor in actors.items()}
    assert tp == {"1.7b": 1, "4b": 2, "8b": 2}
    assert nodes == {"1.7b": 1, "4b": 1, "8b": 2}
    assert offload == {"1.7b": False, "4b": False, "8b": True}
    for size in SIZES:  # verl's dynamic batching needs the longest sequence to fit one micro-batch
        actor = composed[f"qwen3_{size}_ssopd"]["actor_rollout_ref"]["actor"]
        assert actor["ppo_max_token_len_per_gpu"] >= 1024 + 16384


@pytest.mark.parametrize("size", SIZES)
def test_methods_differ_only_in_the_ssopd_lines(composed, size):
    flat = {m: _flatten(composed[f"qwen3_{size}_{m}"]) for m in METHODS}
    for method in ("grpo", "opsd"):
        a, b = flat["ssopd"], flat[method]
        differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert differing, "the variants must differ"
        assert all(k.startswith("ssopd.") or k == "trainer.experiment_name" for k in differing), differing


@pytest.mark.parametrize("name", ["qwen3_1.7b_ssopd", "qwen3_8b_opsd", "full"])
def test_composed_config_passes_verl_and_ssopd_validation(composed, name):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from ssopd_verl.glue.checks import check_config

    cfg = OmegaConf.create(composed[name])
    assert need_critic(cfg) is False
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=False)
    check_config(cfg)


def test_command_line_overrides_and_env_knobs_pass_through(composed):
    cfg = composed["passthrough"]
    assert cfg["ssopd"]["tau"] == 0.1
    assert cfg["trainer"]["total_training_steps"] == 7
    assert cfg["actor_rollout_ref"]["model"]["path"] == "/models/mine"
    assert cfg["trainer"]["nnodes"] == 4
    assert composed["qwen3_4b_ssopd"]["trainer"]["total_training_steps"] == 300


def test_the_real_dry_run_prints_what_the_in_process_compose_gives(composed):
    """`bash qwen3_4b_ssopd.sh --dry-run ...` through verl's main_ppo (and the recipe's start-up callback)."""
    assert composed["real"] == composed["passthrough"]


def _dry_run_args(cwd, **knobs):
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT_ROOT", "LOG_DIR", "DATA_DIR", "MODEL_PATH")}
    proc = subprocess.run(["bash", str(LAUNCH / "qwen3_8b_opsd.sh")], cwd=cwd, env={**env, **knobs, "DRY_RUN": "args"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    overrides = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return overrides, proc.stderr


def test_output_folders_are_absolute_against_the_launch_directory(tmp_path):
    """Ray workers open these paths, each in its own working directory (on a cluster, on another node): the script
    makes them absolute against the directory it is run from, and prints where the outputs go."""
    cwd = tmp_path / "run here"
    (cwd / "models" / "mine").mkdir(parents=True)
    folder = "${trainer.project_name}/${trainer.experiment_name}"
    overrides, printed = _dry_run_args(cwd)  # defaults
    assert overrides["trainer.default_local_dir"] == f"{cwd}/checkpoints/{folder}"
    assert overrides["++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_ROOT"] == f"{cwd}/logs"
    assert f"checkpoints: {cwd}/checkpoints/ssopd/qwen3_8b_opsd" in printed
    assert f"metrics:     {cwd}/logs/ssopd/qwen3_8b_opsd.jsonl" in printed
    overrides, _ = _dry_run_args(cwd, CKPT_ROOT="ck", LOG_DIR="./lg", DATA_DIR="data", MODEL_PATH="models/mine")
    assert overrides["trainer.default_local_dir"] == f"{cwd}/ck/{folder}"
    assert overrides["++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_ROOT"] == f"{cwd}/lg"
    assert overrides["data.train_files"] == f"['{cwd}/data/openthoughts_math/train.parquet']"
    assert overrides["actor_rollout_ref.model.path"] == f"{cwd}/models/mine"
    overrides, _ = _dry_run_args(cwd, CKPT_ROOT="/shared/ck", MODEL_PATH="Qwen/Qwen3-8B")  # absolute; an HF id
    assert overrides["trainer.default_local_dir"] == f"/shared/ck/{folder}"
    assert overrides["actor_rollout_ref.model.path"] == "Qwen/Qwen3-8B"


def test_variant_scripts_differ_only_in_their_method_lines():
    """Each script is MODEL_SIZE + METHOD_ARGS + `source common.sh`; everything else lives in the shared base."""
    for name in SCRIPTS:
        lines = [l for l in (LAUNCH / f"{name}.sh").read_text().splitlines() if l and not l.startswith("#")]
        assert lines[0].startswith("MODEL_SIZE=") and lines[1].startswith("METHOD_ARGS=")
        assert lines[2:] == ['source "$(dirname "${BASH_SOURCE[0]}")/common.sh"'], name


# What CPU_SMOKE=1 substitutes (common.sh, docs/reproduction.md); everything else is the script's own override.
SMOKE_SUBSTITUTES = {
    "actor_rollout_ref.model.path": "${ssopd_tiny:model_path}",
    "data.train_files": "${ssopd_tiny:train_file}",
    "data.val_files": "${ssopd_tiny:val_file}",
    "data.val_max_samples": 8,
    "actor_rollout_ref.rollout.val_kwargs.n": 1,
    "actor_rollout_ref.rollout.name": "hf",
    "trainer.n_gpus_per_node": 2,
    "trainer.nnodes": 1,
    "data.train_batch_size": 4,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 1,
    "data.max_prompt_length": 64,
    "data.max_response_length": 48,
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": 112,  # 17408 * (64 + 48) / (1024 + 16384)
    "ssopd.max_distill_tokens": 16,
    "trainer.total_training_steps": 1,
    "trainer.save_freq": -1,
    "trainer.test_freq": -1,
}


def test_cpu_smoke_substitutes_only_what_cannot_run_on_cpu(composed):
    """`CPU_SMOKE=1` (the switch behind the nine shrunk runs of the e2e suite): the composed config differs from the
    GPU one only in the documented substitutions and in the keys the `+platform=cpu` overlay sets; the 8B script's
    offload, LoRA shape, initial teacher, dynamic batching and rollout tensor parallelism stay as written."""
    from ssopd_verl.glue.checks import check_config

    smoke, gpu = _flatten(composed["smoke"]), _flatten(composed["qwen3_8b_ssopd"])
    overlay = set(_flatten(OmegaConf.to_container(OmegaConf.load(
        REPO / "ssopd_verl" / "conf" / "platform" / "cpu.yaml"))))  # fmt: skip
    for key, value in SMOKE_SUBSTITUTES.items():
        assert smoke[key] == value, key
    differing = {k for k in set(smoke) | set(gpu) if smoke.get(k) != gpu.get(k)}
    assert differing - set(SMOKE_SUBSTITUTES) - overlay - {"hydra"} == set(), differing - set(SMOKE_SUBSTITUTES) - overlay
    kept = ("actor_rollout_ref.actor.fsdp_config.param_offload", "actor_rollout_ref.model.lora_rank", "ssopd.teacher",
            "actor_rollout_ref.actor.use_dynamic_bsz", "actor_rollout_ref.rollout.tensor_model_parallel_size",
            "actor_rollout_ref.model.enable_gradient_checkpointing", "ssopd.lambda")  # fmt: skip
    assert {k: smoke[k] for k in kept} == {k: gpu[k] for k in kept} == {
        "actor_rollout_ref.actor.fsdp_config.param_offload": True, "actor_rollout_ref.model.lora_rank": 64,
        "ssopd.teacher": "initial", "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 2,
        "actor_rollout_ref.model.enable_gradient_checkpointing": True, "ssopd.lambda": 0.5}  # fmt: skip
    check_config(OmegaConf.create(composed["smoke"]))
