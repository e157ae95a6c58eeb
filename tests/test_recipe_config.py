"""The Hydra overlay `+recipe=ssopd`, composed by verl's real entry point, and the typed config behind it."""

import subprocess
from pathlib import Path

import forked
import pytest
import yaml

from ssopd_verl.config import SSOPDConfig

REPO = Path(__file__).resolve().parents[1]
OVERLAY = REPO / "ssopd_verl" / "conf" / "recipe" / "ssopd.yaml"


def compose(tmp_path, *overrides):
    """`python -m verl.trainer.main_ppo +recipe=ssopd --cfg job` from a directory outside the repo (in a process
    forked with verl imported: what Hydra composes is looked up at run time)."""
    proc = subprocess.run(
        forked.command("-m", "verl.trainer.main_ppo", "+recipe=ssopd", *overrides, "--cfg", "job"),
        cwd=tmp_path,
        env=forked.environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    return compose(tmp_path_factory.mktemp("elsewhere"))


def test_recipe_composes_from_outside_the_repo(composed):
    assert composed["algorithm"]["adv_estimator"] == "ssopd"
    assert composed["trainer"]["v1"]["trainer_mode"] == "ssopd"
    assert composed["critic"]["enable"] is False
    assert composed["actor_rollout_ref"]["rollout"]["n"] >= 2
    assert composed["actor_rollout_ref"]["model"]["use_fused_kernels"] is False
    # FSDP2: the teacher forward gathers the lm_head as a DTensor; the ref follows the actor's strategy
    assert composed["actor_rollout_ref"]["actor"]["strategy"] == "fsdp2"
    assert composed["actor_rollout_ref"]["ref"]["strategy"] == "${actor_rollout_ref.actor.strategy}"
    assert composed["ssopd"]["lambda"] == 1.0 and composed["ssopd"]["clip"] == "pointwise"
    # the worker's copy is an interpolation of the top-level block
    assert composed["actor_rollout_ref"]["ssopd"] == "${ssopd}"


def test_overrides_of_ssopd_keys_take_effect(tmp_path):
    # ssopd.teacher=initial composes: `--cfg job` runs no start-up check (its LoRA requirement is checked when a
    # run starts, tests/test_startup_checks.py).
    cfg = compose(
        tmp_path, "ssopd.lambda=0", "ssopd.clip=token", "ssopd.witness_source=reference_solution",
        "ssopd.teacher=initial",
    )
    assert cfg["ssopd"]["teacher"] == "initial"
    assert cfg["ssopd"]["lambda"] == 0
    assert cfg["ssopd"]["clip"] == "token"
    assert cfg["ssopd"]["witness_source"] == "reference_solution"
    assert SSOPDConfig.from_mapping(cfg["ssopd"]).enabled is False


def test_overlay_defaults_equal_the_typed_defaults():
    block = yaml.safe_load(OVERLAY.read_text())["ssopd"]
    assert SSOPDConfig.from_mapping(block) == SSOPDConfig()
    assert set(block) == set(SSOPDConfig().to_yaml_dict())


def test_overlay_starts_with_the_global_package_header():
    assert OVERLAY.read_text().splitlines()[0] == "# @package _global_"


def test_recipe_dir_carries_the_same_overlay():
    assert (REPO / "recipe" / "ssopd" / "ssopd.yaml").read_text() == OVERLAY.read_text()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tau": 0}, "tau"),
        ({"lambda": -1}, "lambda"),
        ({"clip": "sometimes"}, "clip"),
        ({"frontier_weight": "cubic"}, "frontier_weight"),
        ({"witness_source": "oracle"}, "witness_source"),
        ({"target_rule": "shortest_wrong"}, "target_rule"),
        ({"witness_thinking": "maybe"}, "witness_thinking"),
        ({"template": "no placeholders"}, "template"),
        ({"max_witness_tokens": 0}, "max_witness_tokens"),
        ({"typo_key": 1}, "unknown ssopd"),
    ],
)
def test_bad_config_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        SSOPDConfig.from_mapping(bad)


def test_missing_block_says_how_to_fix():
    with pytest.raises(ValueError, match=r"\+recipe=ssopd"):
        SSOPDConfig.from_mapping(None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("actor_rollout_ref.rollout.n=1", "rollout.n must be >= 2"),
        ("algorithm.adv_estimator=grpo", "adv_estimator=ssopd"),
        ("actor_rollout_ref.model.use_fused_kernels=true", "use_fused_kernels=false"),
        ("algorithm.use_kl_in_reward=true", "use_kl_in_reward"),
        ("ssopd.tau=-1", "tau"),
    ],
)
def test_trainer_refuses_configs_it_cannot_run(override, message):
    """SSOPDTrainer's start-up check, on configs composed in-process by Hydra with the recipe overlay."""
    from hydra import compose, initialize_config_module

    from ssopd_verl.glue.checks import check_config

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        good = compose(config_name="ppo_trainer", overrides=["+recipe=ssopd"])
        bad = compose(config_name="ppo_trainer", overrides=["+recipe=ssopd", override])
    assert check_config(good).enabled
    with pytest.raises(ValueError, match=message):
        check_config(bad)
