"""Start-up checks: a config SSOPD cannot run is refused before any worker or rollout starts, naming the key.

A Qwen3 run with 16k-token responses spends a validation pass and a full rollout before its first actor update,
so every setting that would fail (or silently do nothing) there is refused here, with the key, the value and
what to do. `check_config` runs at two points, both before Ray starts any worker:

* in the driver, from the Hydra callback `StartupCheck` that the recipe overlay installs
  (`hydra.callbacks.ssopd_startup_check`). Hydra calls `on_job_start` after composing the config and before it
  calls verl's `main()`: before `validate_config`, before `ray.init`, on verl's v1 *and* legacy path. It is the
  only hook that sees `trainer.use_v1=false`: the legacy `RayPPOTrainer` never builds `SSOPDTrainer`, so without
  it SSOPD would be silently off. Hydra turns an exception in a callback into a warning, so a refusal leaves as
  `SystemExit` (exit status 1, the message on stderr). `--cfg job` composes without running any callback.
* in `SSOPDTrainer.__init__` (verl's TaskRunner, before the trainer builds its worker groups), for entry points
  that do not go through Hydra's `main`.

Warnings (the teacher context may not fit) come from the second call only, and again from the trainer once it
knows the model's `max_position_embeddings` (`warn_if_teacher_may_not_fit`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.glue import estimator

logger = logging.getLogger(__name__)

STRATEGY = "fsdp2"
ULYSSES_KEYS = (
    "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",  # verl 0.9.1's key
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size",  # deprecated; verl copies it into fsdp_config later
)
PAD_TO_LENGTH_KEYS = (
    "actor_rollout_ref.actor.pad_to_length",  # verl copies it into fsdp_config (an interpolation)
    "actor_rollout_ref.actor.fsdp_config.pad_to_length",  # what the engine reads
)
OUTPUT_LAYER = "lm_head"  # the output layer's module name in Qwen3 (and every model verl's recipes train)
CPU_ULYSSES_ATTENTION = "ulysses_sdpa"  # ssopd_verl.cpu.attention.NAME (glue does not import the CPU runtime)
# Rows of each training file read for witness_source=reference_solution.
SOLUTION_ROWS = 8
_PLACEHOLDER = re.compile(r"\{(problem|witness)\}")


def check_config(config, *, warn: bool = True) -> SSOPDConfig:
    """Fail at start-up, with the key to change, on a config that cannot run SSOPD. Returns the typed block."""
    ssopd = SSOPDConfig.from_mapping(plain(config.get("ssopd", None)))
    _check_trainer_path(config)
    if config.algorithm.adv_estimator != estimator.NAME:
        raise ValueError(
            f"trainer.v1.trainer_mode=ssopd pairs completions from the ssopd advantage estimator: set "
            f"algorithm.adv_estimator=ssopd (got {config.algorithm.adv_estimator})"
        )
    if config.algorithm.get("use_kl_in_reward", False):
        raise ValueError(
            "SSOPD judges correctness from the rewards the advantages use; with algorithm.use_kl_in_reward=true "
            "they include the KL penalty. Use actor_rollout_ref.actor.use_kl_loss for a KL term instead."
        )
    n = config.actor_rollout_ref.rollout.n
    if n < 2:
        raise ValueError(f"SSOPD needs groups: actor_rollout_ref.rollout.n must be >= 2, got {n}")
    if ssopd.enabled and config.actor_rollout_ref.model.get("use_fused_kernels", False):
        raise ValueError("SSOPD reads the full student logits: set actor_rollout_ref.model.use_fused_kernels=false")
    if ssopd.enabled and config.actor_rollout_ref.model.get("enable_activation_offload", False):
        raise ValueError(
            "actor_rollout_ref.model.enable_activation_offload=true: verl's activation offload keeps per-forward "
            "bookkeeping that the SSOPD teacher forward (a second forward of the same module inside the update, "
            "before its backward) runs twice, and the first update crashes. Set "
            "actor_rollout_ref.model.enable_activation_offload=false (gradient checkpointing, "
            "actor_rollout_ref.model.enable_gradient_checkpointing=true, is supported)."
        )
    _check_loss_aggregation(config)
    _check_strategy(config)
    _check_ulysses(config)
    _check_verl_distillation(config)
    if ssopd.enabled:
        _check_teacher(config, ssopd)
        _check_static_padding(config)
        _check_lora_output_layer(config)
    if config.actor_rollout_ref.get("ssopd", None) is None:
        raise ValueError("actor_rollout_ref.ssopd is missing: the recipe overlay sets it to ${ssopd}")
    _check_teacher_length(config, ssopd, warn=warn)
    if ssopd.witness_source == "reference_solution":
        check_reference_solutions(config, ssopd)
    return ssopd


def startup_warnings(config) -> list[str]:
    """Settings that run but are probably not what the user meant, each naming the key (printed before Ray starts
    by `StartupCheck`, and logged again by the trainer)."""
    notes = []
    temperature = OmegaConf.select(config, "actor_rollout_ref.rollout.temperature", default=1.0)
    if temperature is not None and float(temperature) == 0.0:
        notes.append(
            "actor_rollout_ref.rollout.temperature=0: training rollouts are greedy, so the n completions of a group "
            "are identical: no group is mixed, SSOPD forms no pair and GRPO's advantages are all 0. Set "
            "actor_rollout_ref.rollout.temperature > 0 (e.g. 1.0); greedy validation is "
            "actor_rollout_ref.rollout.val_kwargs.temperature."
        )
    return notes


class StartupCheck(Callback):
    """Hydra callback (installed by the recipe overlay): `check_config` in the driver, before verl's `main()`."""

    def on_job_start(self, config, **kwargs: Any) -> None:
        try:
            check_config(config, warn=False)
        except ValueError as error:
            # Hydra reports an Exception raised by a callback as a warning and goes on; SystemExit ends the run.
            raise SystemExit(f"ssopd-verl: refusing to start: {error}") from None
        for note in startup_warnings(config):
            print(f"ssopd-verl: warning: {note}", file=sys.stderr, flush=True)


# ---- the trainer that runs ---------------------------------------------------------------------------------------
def _check_trainer_path(config) -> None:
    if not config.trainer.get("use_v1", True):
        raise ValueError(
            "trainer.use_v1=false selects verl's legacy RayPPOTrainer (main_ppo_v0), which never runs the SSOPD "
            "trainer (trainer.v1.trainer_mode=ssopd): the run would train plain GRPO with SSOPD silently off. "
            "Remove the override (trainer.use_v1=true is verl 0.9.1's default); for plain GRPO through the same "
            "path use ssopd.lambda=0."
        )
    mode = OmegaConf.select(config, "trainer.v1.trainer_mode", default=None)
    if mode != "ssopd":
        raise ValueError(
            f"trainer.v1.trainer_mode={mode}: SSOPD runs as trainer mode ssopd (set by +recipe=ssopd); any other "
            f"mode trains without the pairing step, SSOPD silently off. Remove the override; for plain GRPO "
            f"through the same path use ssopd.lambda=0."
        )


# ---- the actor engine --------------------------------------------------------------------------------------------
def _check_strategy(config) -> None:
    strategy = config.actor_rollout_ref.actor.get("strategy", None)
    if strategy == STRATEGY:
        return
    why = {
        "fsdp": "FSDP1 is not supported: the teacher forward inside the actor update gathers the lm_head weight as "
        "an FSDP2 DTensor (full_tensor()), and FSDP1 cannot be tested on CPU (it refuses CPU parameters)",
        "megatron": "Megatron is not supported: the teacher forward runs inside verl's FSDP2 engine (its logits "
        "hook and the lm_head gather); there is no Megatron implementation",
    }.get(strategy, "only verl's FSDP2 engine runs the SSOPD teacher forward")
    raise ValueError(
        f"actor_rollout_ref.actor.strategy={strategy}: {why}. Set actor_rollout_ref.actor.strategy=fsdp2 (the "
        f"recipe's default; actor_rollout_ref.ref.strategy follows it)."
    )


def _check_ulysses(config) -> None:
    """Ulysses SP runs (the teacher forward and loss are sequence-parallel, see glue/teacher_forward.py), but on CPU
    only with the CPU runtime's Ulysses attention: verl's all-to-alls live in its flash-attention patch, and plain
    sdpa would let each rank attend within its own slice only, a silently wrong model."""
    sizes = {key: OmegaConf.select(config, key, default=1) or 1 for key in ULYSSES_KEYS}
    sp_key, size = max(sizes.items(), key=lambda item: item[1])
    if size == 1 or OmegaConf.select(config, "trainer.device", default=None) != "cpu":
        return
    key = "actor_rollout_ref.model.override_config.attn_implementation"
    attention = OmegaConf.select(config, key, default=None)
    if attention != CPU_ULYSSES_ATTENTION:
        raise ValueError(
            f"{sp_key}={size} on CPU needs {key}={CPU_ULYSSES_ATTENTION} (got {attention}): verl's Ulysses "
            f"all-to-alls are in its flash-attention patch, and CPU has no flash-attention"
        )


def _check_verl_distillation(config) -> None:
    """verl's own distillation from an external teacher (`distillation.enabled`) with a top-K loss computes that loss
    in the engine's logits hook, the hook SSOPD's loss occupies: verl's loss then reads top-K outputs that the SSOPD
    hook never produced (a KeyError on `distillation_losses` in the first actor update; lambda=0 included, since
    verl sets the hook's flag from its own config). Its single-sample estimator losses (k1, k3, ...) read only the
    log-probs and are not refused."""
    if not OmegaConf.select(config, "distillation.enabled", default=False):
        return
    key = "distillation.distillation_loss.loss_mode"
    mode = OmegaConf.select(config, key, default=None)
    from verl.trainer.distillation.losses import get_distillation_loss_settings

    if get_distillation_loss_settings(mode).use_topk:
        raise ValueError(
            f"distillation.enabled=true with {key}={mode}: verl computes its top-K distillation loss in the engine's "
            f"logits hook, where SSOPD's self-teacher loss runs: the first actor update fails. Set "
            f"distillation.enabled=false (SSOPD's teacher is set with ssopd.teacher), or a single-sample estimator "
            f"{key} (e.g. k3)."
        )


def _check_static_padding(config) -> None:
    """verl's engine raises in the first update's `prepare_model_inputs` when a micro-batch asks for the logits hook
    (`distillation_use_topk`) and `pad_to_length` is on: the hook's per-position outputs follow the unpadded
    packed layout."""
    for key in PAD_TO_LENGTH_KEYS:
        if OmegaConf.select(config, key, default=False):
            raise ValueError(
                f"{key}=true: verl's FSDP engine refuses static padding of packed micro-batches when a loss reads "
                f"the logits through its hook, as SSOPD's does (RuntimeError in the first actor update, after a "
                f"full rollout). Set {key}=false (verl's default), or ssopd.lambda=0 for plain GRPO."
            )


def _check_lora_output_layer(config) -> None:
    """The teacher is projected with the lm_head weight (`teacher_forward.lm_head_weight`): a LoRA adapter on the
    output layer would change the student's projection but not the teacher's, so it raises NotImplementedError in
    the first actor update (tied embeddings, as Qwen3-1.7B/4B; with untied ones, as Qwen3-8B, verl's FSDP2 wrapping
    of the adapted layer already fails when the actor is built, on CPU: torch's `fully_shard` class swap). peft's
    `all-linear` leaves the output layer out; a list or a regex may name it."""
    model = config.actor_rollout_ref.model
    if (model.get("lora_rank", 0) or 0) <= 0:
        return
    key = "actor_rollout_ref.model.target_modules"
    targets = plain(model.get("target_modules", None))
    excluded = plain(model.get("exclude_modules", None))
    if _peft_targets(targets, OUTPUT_LAYER) and not _peft_targets(excluded, OUTPUT_LAYER):
        raise ValueError(
            f"{key}={targets} puts a LoRA adapter on the output layer ({OUTPUT_LAYER}): SSOPD projects the teacher "
            f"with the output layer's base weight, so the first actor update fails. Leave {OUTPUT_LAYER} out of "
            f"{key} (all-linear, verl's default, leaves it out) or add it to actor_rollout_ref.model.exclude_modules."
        )
    adapter = model.get("lora_adapter_path", None)
    manifest = os.path.join(os.path.expanduser(str(adapter)), "adapter_config.json") if adapter else None
    if manifest and os.path.isfile(manifest):  # a local adapter: verl loads it with the target modules it was made with
        import json

        with open(manifest) as handle:
            saved = json.load(handle)
        if _peft_targets(saved.get("target_modules"), OUTPUT_LAYER) and not _peft_targets(
                saved.get("exclude_modules"), OUTPUT_LAYER):  # fmt: skip
            raise ValueError(
                f"actor_rollout_ref.model.lora_adapter_path={adapter} was trained with an adapter on the output "
                f"layer ({OUTPUT_LAYER}; target_modules {saved.get('target_modules')} in {manifest}): SSOPD projects "
                f"the teacher with the output layer's base weight, so the first actor update fails. Use an adapter "
                f"without one on {OUTPUT_LAYER}, or merge it into the base model (actor_rollout_ref.model.path)."
            )


def _peft_targets(modules, name: str) -> bool:
    """Whether peft's `target_modules` / `exclude_modules` value selects the top-level module `name`, by peft's own
    rule (`check_target_module_exists`): a string is a regex matched against the whole module name, except
    `all-linear` (every linear layer but the output layer); a list names a module by its name or a dotted suffix of
    it, which for a top-level module is the name itself."""
    if not modules:
        return False
    if isinstance(modules, str):
        return modules != "all-linear" and re.fullmatch(modules, name) is not None
    return name in [str(module) for module in modules]


def _check_loss_aggregation(config) -> None:
    """verl's policy-loss aggregation must not depend on how a mini-batch is cut into micro-batches: the SSOPD term
    is normalised globally (per prompt of the mini-batch), so lambda weighs it against a GRPO term that must be
    too. `seq-mean-token-sum-norm` without `loss_scale_factor` divides by the micro-batch's padded response length
    (verl's `agg_loss`: `loss_mask.shape[-1]`), which changes with the micro-batch split and dynamic batching."""
    actor = config.actor_rollout_ref.actor
    mode = actor.get("loss_agg_mode", "token-mean")
    if mode == "seq-mean-token-sum-norm" and actor.get("loss_scale_factor", None) is None:
        raise ValueError(
            "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm without "
            "actor_rollout_ref.actor.loss_scale_factor: verl then divides each micro-batch's policy loss by that "
            "micro-batch's padded response length, so the GRPO term (and its balance with SSOPD's lambda) depends on "
            "the micro-batch split. Set actor_rollout_ref.actor.loss_scale_factor (e.g. data.max_response_length) "
            "or use loss_agg_mode=token-mean (the recipe's default)."
        )


def _check_teacher(config, ssopd: SSOPDConfig) -> None:
    if ssopd.teacher != "initial":
        return
    lora_rank = config.actor_rollout_ref.model.get("lora_rank", 0) or 0
    adapter = config.actor_rollout_ref.model.get("lora_adapter_path", None)
    if lora_rank > 0 and adapter:
        raise ValueError(
            f"ssopd.teacher=initial with actor_rollout_ref.model.lora_adapter_path={adapter}: the initial teacher "
            f"runs the actor with its adapters disabled, i.e. the bare base model, not the policy at step 0 "
            f"(base + the loaded adapter). Merge the adapter into the base model and point "
            f"actor_rollout_ref.model.path at the merged checkpoint (then lora_adapter_path=null), or use "
            f"ssopd.teacher=live."
        )
    if lora_rank > 0:
        return
    raise ValueError(
        f"ssopd.teacher=initial with full fine-tuning (actor_rollout_ref.model.lora_rank={lora_rank}): the frozen "
        f"initial teacher is supported with a LoRA actor (the base model with adapters disabled). Set "
        f"actor_rollout_ref.model.lora_rank>0 or use ssopd.teacher=live. (lora_adapter_path alone is not enough: "
        f"verl's FSDP2 engine builds adapters only when lora_rank>0. An exact full-vocabulary frozen copy of a fully "
        f"fine-tuned model would need a second full model resident in the actor update: not supported in this "
        f"release.)"
    )


# ---- teacher sequence length -------------------------------------------------------------------------------------
def _check_teacher_length(config, ssopd: SSOPDConfig, *, warn: bool) -> None:
    limit = ssopd.max_teacher_length
    if limit is None:  # the model's max_position_embeddings: known once the trainer reads the model config
        return
    prompt, response = _student_lengths(config)
    if prompt is None or response is None:
        return
    if limit < prompt + response:
        raise ValueError(
            f"ssopd.max_teacher_length={limit} is shorter than the student's sequence, data.max_prompt_length + "
            f"data.max_response_length = {prompt} + {response} = {prompt + response}: the teacher sequence holds "
            f"the student's prompt and response plus the template and the witness. Set ssopd.max_teacher_length >= "
            f"{prompt + response} plus room for the template and the witness, or null (the model's "
            f"max_position_embeddings)."
        )
    if warn:
        warn_if_teacher_may_not_fit(ssopd, config, limit)


def warn_if_teacher_may_not_fit(ssopd: SSOPDConfig, config, max_teacher_length: Optional[int], tokenizer=None):
    """Log a warning when prompt + response + the teacher template's own tokens can exceed the teacher's limit.

    max_teacher_length: `ssopd.max_teacher_length`, or the model's `max_position_embeddings` when that is null.
    The template's tokens: with a tokenizer, `ssopd.template` with empty problem and witness, encoded; without
    one, its UTF-8 byte count, an upper bound for byte-level BPE tokenizers (Qwen's; about 4x the real count for
    the default English template). Such targets are skipped at run time and counted (`ssopd/targets_skipped`).
    Returns the message, or None when everything fits.
    """
    if max_teacher_length is None:
        return None
    prompt, response = _student_lengths(config)
    if prompt is None or response is None:
        return None
    template, how = template_tokens(ssopd.template, tokenizer)
    need = prompt + response + template
    if need <= max_teacher_length:
        return None
    source = (
        f"ssopd.max_teacher_length={max_teacher_length}"
        if ssopd.max_teacher_length is not None
        else f"the model's max_position_embeddings={max_teacher_length} (ssopd.max_teacher_length=null)"
    )
    message = (
        f"ssopd: a teacher sequence can exceed {source}: data.max_prompt_length ({prompt}) + "
        f"data.max_response_length ({response}) + the teacher template's own tokens ({template}, {how}) = {need}. "
        f"A target whose teacher sequence does not fit even with an empty witness is skipped and counted "
        f"(ssopd/targets_skipped); long ones get a shortened witness. Raise ssopd.max_teacher_length or lower "
        f"data.max_response_length."
    )
    logger.warning(message)
    return message


def template_tokens(template: str, tokenizer=None) -> tuple[int, str]:
    """Tokens of the teacher template's own text (problem and witness empty), and how they were counted."""
    text = _PLACEHOLDER.sub("", template)
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False)), "tokenized"
    return len(text.encode("utf-8")), "upper bound: UTF-8 bytes"


def _student_lengths(config) -> tuple[Optional[int], Optional[int]]:
    data = config.get("data", None)
    if data is None:
        return None, None
    return data.get("max_prompt_length", None), data.get("max_response_length", None)


# ---- reference solutions (witness_source=reference_solution) ------------------------------------------------------
def check_reference_solutions(config, ssopd: SSOPDConfig, rows: int = SOLUTION_ROWS) -> None:
    """The first `rows` rows of each local parquet file in `data.train_files` must hold a non-empty string under
    `ssopd.reference_solution_key` (dotted: `extra_info.solution` = column `extra_info`, field `solution`).

    Files that are not local parquet files (hdfs://, other formats, missing) are skipped with a warning: verl
    reports a missing file itself when it loads the data."""
    files = plain(config.data.get("train_files", None))
    files = [files] if isinstance(files, str) else list(files or [])
    key = ssopd.reference_solution_key
    root, *path = key.split(".")
    fix = (
        "Use a training set with reference solutions (scripts/prepare_data.py openthoughts or math writes them "
        "to extra_info.solution), point ssopd.reference_solution_key at the field that holds them, or use "
        "ssopd.witness_source=shortest_correct."
    )
    for name in files:
        local = os.path.expanduser(str(name))
        if "://" in local or not os.path.isfile(local) or not local.endswith(".parquet"):
            logger.warning(
                "ssopd: cannot check %s for reference solutions (%s) before the run: not a local parquet file",
                name, key,
            )
            continue
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(local)
        columns = parquet.schema_arrow.names
        if root not in columns:
            raise ValueError(
                f"ssopd.witness_source=reference_solution reads each prompt's witness from "
                f"ssopd.reference_solution_key={key}, but data.train_files {name} has no column {root!r} "
                f"(columns: {columns}). {fix}"
            )
        batch = next(parquet.iter_batches(batch_size=rows, columns=[root]), None)
        for row, value in enumerate(batch.column(0).to_pylist() if batch is not None else []):
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if not isinstance(value, str) or not value.strip():
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise ValueError(
                    f"ssopd.witness_source=reference_solution reads each prompt's witness from "
                    f"ssopd.reference_solution_key={key}, but row {row} of data.train_files {name} has "
                    f"{shown} there, not a non-empty string. {fix}"
                )


def plain(value):
    if value is None:
        return None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
