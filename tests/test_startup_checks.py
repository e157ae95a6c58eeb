"""Settings SSOPD cannot run are refused at start-up, naming the key, before any worker or rollout starts.

In-process: the recipe overlay composed once by Hydra (verl's `ppo_trainer` + `+recipe=ssopd`), then each bad
setting applied as Hydra parses it from the command line, then `check_config`. Subprocess: a real
`python -m verl.trainer.main_ppo +recipe=ssopd +platform=cpu +tiny=default <bad>` run exits non-zero,
naming the key, without starting Ray (verl prints "ray init kwargs" just before `ray.init`), a
validation pass or a training step: the recipe's Hydra callback refuses them before verl's `main()` runs.
"""

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.glue.checks import check_config, template_tokens, warn_if_teacher_may_not_fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=["+recipe=ssopd"])
    assert check_config(cfg).enabled
    return cfg


def config_with(good, *overrides):
    """The composed config with command-line overrides applied, each value parsed as Hydra parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = copy.deepcopy(good)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(cfg, override.key_or_group, override.value(), force_add=True)
    return cfg


def refused(good, *overrides) -> str:
    with pytest.raises(ValueError) as error:
        check_config(config_with(good, *overrides))
    return str(error.value)


# ---- verl settings ----------------------------------------------------------------------------------------------
def test_overlay_selects_fsdp2_for_actor_and_ref(good):
    assert good.actor_rollout_ref.actor.strategy == "fsdp2"
    assert good.actor_rollout_ref.ref.strategy == "fsdp2"  # verl: ${actor_rollout_ref.actor.strategy}


@pytest.mark.parametrize("strategy, why", [("fsdp", "FSDP1"), ("megatron", "Megatron")])
def test_strategy_other_than_fsdp2_is_refused(good, strategy, why):
    message = refused(good, f"actor_rollout_ref.actor.strategy={strategy}")
    assert f"actor_rollout_ref.actor.strategy={strategy}:" in message and why in message
    assert "actor_rollout_ref.actor.strategy=fsdp2" in message


@pytest.mark.parametrize("key", ["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
                                 "actor_rollout_ref.actor.ulysses_sequence_parallel_size"])  # fmt: skip
def test_ulysses_runs_but_on_cpu_only_with_the_cpu_ulysses_attention(good, key):
    check_config(config_with(good, f"{key}=2"))  # on GPU: verl's flash-attention patch does the all-to-alls
    message = refused(good, f"{key}=2", "trainer.device=cpu")
    assert f"{key}=2 on CPU" in message and "attn_implementation=ulysses_sdpa" in message
    check_config(config_with(good, f"{key}=2", "trainer.device=cpu",
                             "+actor_rollout_ref.model.override_config.attn_implementation=ulysses_sdpa"))  # fmt: skip


def test_legacy_trainer_is_refused(good):
    message = refused(good, "trainer.use_v1=false")
    assert "trainer.use_v1=false" in message and "silently off" in message


def test_other_trainer_mode_is_refused(good):
    assert "trainer.v1.trainer_mode=sync" in refused(good, "trainer.v1.trainer_mode=sync")


def test_initial_teacher_needs_a_lora_actor(good):
    message = refused(good, "ssopd.teacher=initial")
    assert "ssopd.teacher=initial" in message and "actor_rollout_ref.model.lora_rank>0" in message
    assert "ssopd.teacher=live" in message
    assert check_config(config_with(good, "ssopd.teacher=initial", "actor_rollout_ref.model.lora_rank=8")).teacher == (
        "initial"
    )


def test_initial_teacher_with_a_loaded_adapter_is_refused(good):
    """With lora_adapter_path the step-0 policy is base + that adapter; disabling adapters would give the bare base
    model instead, so the combination is refused (docs: merge the adapter into the base model first)."""
    message = refused(good, "ssopd.teacher=initial", "actor_rollout_ref.model.lora_rank=8",
                      "actor_rollout_ref.model.lora_adapter_path=/ckpt/adapter")  # fmt: skip
    assert "lora_adapter_path=/ckpt/adapter" in message and "bare base model" in message
    assert "ssopd.teacher=live" in message
    check_config(config_with(good, "ssopd.teacher=live", "actor_rollout_ref.model.lora_rank=8",
                             "actor_rollout_ref.model.lora_adapter_path=/ckpt/adapter"))  # fmt: skip


def test_activation_offload_is_refused(good):
    message = refused(good, "actor_rollout_ref.model.enable_activation_offload=true")
    assert "actor_rollout_ref.model.enable_activation_offload=false" in message
    check_config(config_with(good, "actor_rollout_ref.model.enable_activation_offload=true", "ssopd.lambda=0"))


def test_loss_aggregation_that_depends_on_the_micro_batch_split_is_refused(good):
    message = refused(good, "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm")
    assert "loss_agg_mode=seq-mean-token-sum-norm" in message and "actor_rollout_ref.actor.loss_scale_factor" in message
    check_config(config_with(good, "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
                             "actor_rollout_ref.actor.loss_scale_factor=1024"))  # fmt: skip
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"):
        check_config(config_with(good, f"actor_rollout_ref.actor.loss_agg_mode={mode}"))


@pytest.mark.parametrize("key", ["actor_rollout_ref.actor.pad_to_length",
                                 "actor_rollout_ref.actor.fsdp_config.pad_to_length"])  # fmt: skip
def test_static_padding_is_refused(good, key):
    """verl's engine raises in the first update when a micro-batch asks for the logits hook with pad_to_length on
    (FSDPEngineWithLMHead.prepare_model_inputs); fine for plain GRPO (no hook)."""
    message = refused(good, f"{key}=true")
    assert message.startswith(f"{key}=true:") and f"Set {key}=false" in message
    check_config(config_with(good, f"{key}=true", "ssopd.lambda=0"))


LORA = "actor_rollout_ref.model.lora_rank=8"
TARGETS = "actor_rollout_ref.model.target_modules"


@pytest.mark.parametrize("targets", ["[q_proj,v_proj,lm_head]", "lm_head", "'.*_proj|lm_head'", "'.*'"])
def test_lora_on_the_output_layer_is_refused(good, targets):
    """teacher_forward.lm_head_weight raises NotImplementedError on an adapted output layer (first actor update)."""
    message = refused(good, LORA, f"{TARGETS}={targets}")
    assert f"{TARGETS}=" in message and "output layer (lm_head)" in message and "exclude_modules" in message
    check_config(config_with(good, LORA, f"{TARGETS}={targets}", "ssopd.lambda=0"))  # no teacher projection
    check_config(config_with(good, f"{TARGETS}={targets}"))  # full fine-tuning: target_modules unused
    check_config(config_with(good, LORA, f"{TARGETS}={targets}", "actor_rollout_ref.model.exclude_modules=[lm_head]"))


@pytest.mark.parametrize("targets", ["all-linear", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                                     "'.*_proj'", "[lm_head_proj]"])  # fmt: skip
def test_lora_without_the_output_layer_passes(good, targets):
    """all-linear is verl's default and peft leaves the output layer out of it (the LoRA engine tests use it)."""
    check_config(config_with(good, LORA, f"{TARGETS}={targets}"))


def test_a_loaded_lora_adapter_on_the_output_layer_is_refused(good, tmp_path):
    import json

    with_head, without = tmp_path / "with_head", tmp_path / "without"
    for folder, targets in ((with_head, ["q_proj", "lm_head"]), (without, ["q_proj", "v_proj"])):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"target_modules": targets, "r": 8}))
    message = refused(good, LORA, f"actor_rollout_ref.model.lora_adapter_path={with_head}")
    assert f"lora_adapter_path={with_head}" in message and "adapter on the output layer (lm_head;" in message
    check_config(config_with(good, LORA, f"actor_rollout_ref.model.lora_adapter_path={without}"))


def test_verl_top_k_distillation_is_refused(good):
    """verl's top-K distillation loss occupies the engine's logits hook too (a KeyError on its `distillation_losses`
    output in the first update), also with ssopd.lambda=0: verl sets the hook's flag from its own config."""
    top_k = ("distillation.enabled=true", "distillation.distillation_loss.loss_mode=forward_kl_topk")
    for extra in ((), ("ssopd.lambda=0",)):
        message = refused(good, *top_k, *extra)
        assert message.startswith("distillation.enabled=true with distillation.distillation_loss.loss_mode="
                                  "forward_kl_topk:") and "distillation.enabled=false" in message  # fmt: skip
    check_config(config_with(good, "distillation.enabled=true"))  # verl's default k3 estimator: log-probs only


def test_greedy_training_rollout_gets_a_warning_naming_the_key(good):
    from ssopd_verl.glue.checks import startup_warnings

    assert startup_warnings(good) == []
    (note,) = startup_warnings(config_with(good, "actor_rollout_ref.rollout.temperature=0"))
    assert note.startswith("actor_rollout_ref.rollout.temperature=0:") and "no group is mixed" in note


def test_cpu_rollout_refuses_a_lora_actor_without_merged_weights(good):
    from ssopd_verl.cpu.checks import check_cpu_config

    lora = ["actor_rollout_ref.rollout.name=hf", "actor_rollout_ref.model.lora_rank=8"]
    with pytest.raises(ValueError, match="actor_rollout_ref.model.lora.merge=True"):
        check_cpu_config(config_with(good, *lora))
    check_cpu_config(config_with(good, *lora, "actor_rollout_ref.model.lora.merge=True"))
    check_cpu_config(config_with(good, "actor_rollout_ref.rollout.name=hf"))  # full fine-tuning


def test_platform_overlay_installs_its_check_next_to_the_recipe_check():
    """Both Hydra callbacks run before verl's main(): the recipe's (SSOPD) and the CPU platform's (its rollout)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=["+recipe=ssopd", "+platform=cpu"], return_hydra_config=True)
    targets = {name: cb._target_ for name, cb in cfg.hydra.callbacks.items()}
    assert targets == {"ssopd_startup_check": "ssopd_verl.glue.checks.StartupCheck",
                       "ssopd_cpu_startup_check": "ssopd_verl.cpu.checks.CPUStartupCheck"}  # fmt: skip


# ---- teacher length -------------------------------------------------------------------------------------------
def test_teacher_shorter_than_the_student_sequence_is_refused(good):
    message = refused(good, "data.max_prompt_length=512", "data.max_response_length=1024", "ssopd.max_teacher_length=1500")
    assert "ssopd.max_teacher_length=1500" in message and "512 + 1024 = 1536" in message


def test_teacher_without_room_for_the_template_warns(good, caplog):
    lengths = ("data.max_prompt_length=512", "data.max_response_length=1024")
    with caplog.at_level(logging.WARNING, logger="ssopd_verl.glue.checks"):
        check_config(config_with(good, *lengths, "ssopd.max_teacher_length=1600"))
    assert "ssopd.max_teacher_length=1600" in caplog.text and "data.max_response_length (1024)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssopd_verl.glue.checks"):
        check_config(config_with(good, *lengths, "ssopd.max_teacher_length=8192"))
    assert caplog.text == ""


def test_trainer_side_warning_counts_template_tokens_with_the_tokenizer(good, qwen_tokenizer):
    ssopd = SSOPDConfig()
    exact, how = template_tokens(ssopd.template, qwen_tokenizer)
    bound, _ = template_tokens(ssopd.template)
    assert how == "tokenized" and 40 < exact < bound  # the byte count is a safe upper bound
    cfg = config_with(good, "data.max_prompt_length=512", "data.max_response_length=1024")
    # ssopd.max_teacher_length=null: the limit is the model's max_position_embeddings, named as such
    message = warn_if_teacher_may_not_fit(ssopd, cfg, 1536 + exact - 1, tokenizer=qwen_tokenizer)
    assert "max_position_embeddings=" in message and "data.max_response_length (1024)" in message
    assert warn_if_teacher_may_not_fit(ssopd, cfg, 1536 + exact, tokenizer=qwen_tokenizer) is None


# ---- reference solutions --------------------------------------------------------------------------------------
def _parquet(path, extra_info):
    pq.write_table(pa.table({"prompt": ["q"] * len(extra_info), "extra_info": extra_info}), path)
    return str(path)


@pytest.mark.parametrize(
    "extra_info, what",
    [
        ([{"split": "train", "index": 0}], "has None there"),
        ([{"solution": "x = 1"}] * 3 + [{"solution": ""}], "row 3"),
    ],
    ids=["no-solution-field", "empty-solution"],
)
def test_reference_solution_witness_needs_solutions_in_the_data(good, tmp_path, extra_info, what):
    good_file = _parquet(tmp_path / "with.parquet", [{"solution": "x = 1"}] * 10)
    bad_file = _parquet(tmp_path / "without.parquet", extra_info)
    source = "ssopd.witness_source=reference_solution"
    assert check_config(config_with(good, source, f"data.train_files=['{good_file}']")).witness_source == (
        "reference_solution"
    )
    message = refused(good, source, f"data.train_files=['{good_file}','{bad_file}']")
    assert bad_file in message and "ssopd.reference_solution_key=extra_info.solution" in message and what in message


def test_reference_solution_key_must_name_a_column(good, tmp_path):
    file = _parquet(tmp_path / "train.parquet", [{"solution": "x = 1"}])
    message = refused(good, "ssopd.witness_source=reference_solution", f"data.train_files='{file}'",
                      "ssopd.reference_solution_key=meta.solution")
    assert file in message and "no column 'meta'" in message and "ssopd.reference_solution_key=meta.solution" in message


# ---- ssopd.* types and ranges ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, expected",
    [
        ("ssopd.chunk_size=1.5", "ssopd.chunk_size must be a positive integer, got 1.5 (float)"),
        ("ssopd.chunk_size=true", "ssopd.chunk_size must be a positive integer, got True (bool)"),
        ("ssopd.max_witness_tokens=2.5", "ssopd.max_witness_tokens must be a positive integer, got 2.5"),
        ("ssopd.max_witness_tokens=null", "ssopd.max_witness_tokens must be a positive integer, got None"),
        ("ssopd.correct_threshold='0.5'", "ssopd.correct_threshold must be a finite number, got '0.5' (str)"),
        ("ssopd.correct_threshold=null", "ssopd.correct_threshold must be a finite number, got None"),
        ("ssopd.correct_threshold=nan", "ssopd.correct_threshold must be a finite number, got nan"),
        ("ssopd.correct_threshold=1.0", "ssopd.correct_threshold must be < 1.0, got 1.0: a completion is correct "
         "when its score > correct_threshold"),
        ("ssopd.chat_template_kwargs=enable_thinking", "ssopd.chat_template_kwargs must be a mapping"),
        ("ssopd.seed=-1", "ssopd.seed must be an integer >= 0, got -1"),
        ("ssopd.lambda=inf", "ssopd.lambda must be a finite number >= 0, got inf"),
        ("ssopd.lambda=nan", "ssopd.lambda must be a finite number >= 0, got nan"),
        ("ssopd.tau=inf", "ssopd.tau must be a finite number > 0, got inf"),
        ("ssopd.tau=nan", "ssopd.tau must be a finite number > 0, got nan"),
        ("ssopd.lambda='1.0'", "ssopd.lambda must be a finite number >= 0, got '1.0' (str)"),
        ("ssopd.teacher=ema", "ssopd.teacher must be one of live, initial, got 'ema'"),
        ("ssopd.max_distill_tokens=0", "ssopd.max_distill_tokens must be a positive integer or null, got 0"),
        ("ssopd.max_distill_tokens=8.0", "ssopd.max_distill_tokens must be a positive integer or null, got 8.0"),
        ("ssopd.max_teacher_length=true", "ssopd.max_teacher_length must be a positive integer or null, got True"),
        ("ssopd.clip=null", "ssopd.clip must be one of pointwise, token, none, got None"),
        ("ssopd.reference_solution_key=''", "ssopd.reference_solution_key must be a dotted field name"),
    ],
)
def test_ssopd_key_of_the_wrong_type_or_range_is_refused(good, override, expected):
    assert expected in refused(good, override)


@pytest.mark.parametrize(
    "override, value",
    [
        ("ssopd.chat_template_kwargs={enable_thinking:false}", {"enable_thinking": False}),
        ("ssopd.max_distill_tokens=256", 256),
        ("ssopd.correct_threshold=0.5", 0.5),
        ("ssopd.lambda=0", 0),
    ],
)
def test_valid_values_pass(good, override, value):
    key = override.split("=")[0].split(".")[1]
    block = check_config(config_with(good, override)).to_yaml_dict()
    assert block[key] == value


# ---- the real entry point: refused before Ray, a rollout or validation ----------------------------------------
# One real run (~10-20 s of verl imports): a wrong ssopd.* value; every other refusal goes through the same callback
# (check_config) and is checked in-process above.
BAD_RUNS = {
    "ssopd-type": ("ssopd.lambda='1.0'", "ssopd.lambda must be a finite number >= 0, got '1.0' (str)"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """The runs from the repo root (Hydra's output directory under tmp), one after the other."""
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}  # +platform=cpu selects it, as in use
    out = {}
    for name, (override, _) in BAD_RUNS.items():
        cmd = [
            sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=ssopd", "+platform=cpu", "+tiny=default",
            override, f"hydra.run.dir={tmp_path_factory.mktemp(name)}",
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
        out[name] = (proc.returncode, proc.stdout)
    return out


@pytest.mark.parametrize("name", BAD_RUNS)
def test_main_ppo_refuses_before_ray_starts(bad_runs, name):
    returncode, output = bad_runs[name]
    assert returncode == 1, output[-3000:]
    assert "ssopd-verl: refusing to start: " in output and BAD_RUNS[name][1] in output, output[-3000:]
    assert "ray init kwargs" not in output  # verl prints it just before ray.init
    assert "step:" not in output and "val-core" not in output
