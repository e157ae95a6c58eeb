"""The SSOPD trainer: verl's v1 sync trainer plus the pairing step.

Registered as trainer mode `ssopd` (`register_trainer`, verl's trainer registry); the recipe overlay selects it
with `trainer.v1.trainer_mode=ssopd`. The step is verl's, in verl's order
(sample -> reward -> balance -> old log-prob -> [ref] -> advantage -> update actor), with these additions:

* `_balance_batch`: the step's rows are sorted by content (prompt, response) before verl's balancing, so that
  their order, and every sum that follows it, does not depend on which completion finished first.
* `_compute_advantage`: after verl computes the GRPO advantages (through our `ssopd` estimator), pair the
  completions of each frontier group and write the teacher sequences and row weights into TransferQueue next
  to the batch (`distill_plan.plan_distillation`); count the completions whose grading timed out, was skipped
  or failed (`reward/grading_*`, from the grader's reward_extra_info; verl logs those for validation only), and
  measure their degeneration (`degeneration/*`: length-limit hits, repetition loops, mean length).
  This runs after `_balance_batch`, so the rows verl pads and reorders already carry their final fields; padding
  rows get weight 0.
* `_update_actor`: verl's, then the worker's `actor/ssopd/*` metrics are reported as `ssopd/*`; every
  `ssopd.token_view_every` steps it asks the worker for a token view (`ssopd_verl.token_view`) and prints its path.
* `_compute_metrics`: verl's, plus the teacher's cost (`timing_s/ssopd_teacher`, the step's total over its
  mini-batches, and its share of `timing_s/update_actor`) and one compact console line per step (`ssopd_verl.console`).
* `_init_resource_pool_mgr`: the actor role runs `SSOPDActorRolloutRefWorker` instead of verl's worker.
* `_compute_advantage` first refuses a batch that lost completions (`check_complete_rollout`): verl pads over
  failed rollout requests and trains on; a dead rollout engine must stop the run instead.
* `_build_replay_buffer`: `trainer.v1.sampler.sampler_kwargs.poll_interval` sets how often it polls for rollouts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import torch
from omegaconf import OmegaConf, open_dict
from tensordict import TensorDict

import transfer_queue as tq
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from ssopd_verl import console
from ssopd_verl.config import SSOPDConfig
from ssopd_verl.degeneration import degeneration_metrics, degeneration_summary
from ssopd_verl.distill_plan import plan_distillation
from ssopd_verl.evaluation.grading import GRADING_FLAGS
from ssopd_verl.glue import estimator
from ssopd_verl.glue.actor_loss import (
    ROW_WEIGHT,
    TARGET_SCORE,
    TEACHER_IDS,
    TEACHER_PROMPT_LEN,
    TOKEN_VIEW_PATH,
    TOKEN_VIEW_STEP,
    WITNESS_SCORE,
    finalize_metrics,
)
from ssopd_verl.glue.checks import check_config, plain as _plain, startup_warnings, warn_if_teacher_may_not_fit
from ssopd_verl.glue.reward_manager import end_token_ids
from ssopd_verl.glue.worker import SSOPDActorRolloutRefWorker

TRAINER_MODE = "ssopd"
logger = logging.getLogger(__name__)


@register_trainer(TRAINER_MODE)
class SSOPDTrainer(PPOTrainerSync):
    def __init__(self, config):
        self.ssopd = check_config(config)
        for note in startup_warnings(config):
            logger.warning("ssopd: %s", note)
        # verl branches on the literal mode "sync" (replay buffer, checkpoints, refill); this trainer *is* the
        # sync trainer, so once the registry has resolved "ssopd" to this class it runs under that name.
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    def _build_replay_buffer(self):
        """verl's; ``trainer.v1.sampler.sampler_kwargs.poll_interval`` (s), if set, replaces its fixed 2 s wait
        between polls for finished rollouts (every step's generation and every validation waits for the next poll:
        on the tiny default a 1-2 s rollout took 4 s)."""
        buffer = super()._build_replay_buffer()
        poll = (self.config.trainer.v1.sampler.get("sampler_kwargs") or {}).get("poll_interval")
        if poll is not None:
            buffer.poll_interval = float(poll)
        return buffer

    # ---- workers ----------------------------------------------------------------------------------------------
    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role in (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(SSOPDActorRolloutRefWorker)

    def _init_tokenizer(self):
        super()._init_tokenizer()
        self.max_teacher_length = self.ssopd.max_teacher_length
        if self.max_teacher_length is None:
            # verl's _init_tokenizer keeps only the tokenizer of the model config it builds; the HF config is
            # read again here, once, only when the limit has to come from the model.
            from verl.utils.config import omega_conf_to_dataclass

            hf_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.model).hf_config
            self.max_teacher_length = getattr(hf_config, "max_position_embeddings", None)
            if self.max_teacher_length is not None:
                warn_if_teacher_may_not_fit(self.ssopd, self.config, self.max_teacher_length, tokenizer=self.tokenizer)

    def fit(self, agent_loop_manager):
        keep_previous_tracker_file(self.config.trainer)
        return super().fit(agent_loop_manager)

    # ---- step ------------------------------------------------------------------------------------------------
    def _balance_batch(self, batch, metrics, *args, **kwargs):
        """verl's, on the rows sorted by content first. verl lists a step's rows in the order their completions
        reached TransferQueue (timing); every later sum (micro-batches, losses, gradients) follows the list, and
        float sums in another order differ in the last bits, enough to flip a sampled token steps later. Sorted by
        (prompt, response) the same completions give the same numbers in every run (ties are identical rows)."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["prompts", "responses"])
        content = [(data["prompts"][i].tolist(), data["responses"][i].tolist()) for i in range(len(batch.keys))]
        batch.reorder(sorted(range(len(content)), key=content.__getitem__))
        return super()._balance_batch(batch, metrics, *args, **kwargs)

    def _compute_advantage(self, batch, metrics):
        prompts = self.config.data.train_batch_size // self.parameter_sync_step  # what verl's step sampled
        n = self.config.actor_rollout_ref.rollout.n
        check_complete_rollout(batch.keys, batch.tags, prompts, n, self.global_steps)
        batch = super()._compute_advantage(batch, metrics)
        return self._plan_distillation(batch, metrics)

    def _update_actor(self, batch, metrics):
        view = self._token_view_path()
        batch.extra_info.pop(TOKEN_VIEW_STEP, None)
        batch.extra_info.pop(TOKEN_VIEW_PATH, None)
        if view is not None:  # verl hands extra_info to the worker's micro-batches as non-tensor fields
            view.unlink(missing_ok=True)  # a page left by an earlier run of this step must not pass for this one
            batch.extra_info.update({TOKEN_VIEW_STEP: self.global_steps, TOKEN_VIEW_PATH: str(view)})
        batch = super()._update_actor(batch, metrics)
        if view is not None:
            # rank 0 writes it when its micro-batches held targets; on a multi-node job the file is on rank 0's node
            state = "written" if view.exists() else "not written (no target on rank 0 this step)"
            if view.exists() and log_token_view(view, self.global_steps, self.config.trainer.get("logger", [])):
                state += ", logged to wandb"
            print(f"ssopd: token view of step {self.global_steps}: {view} {state}", flush=True)
        for key in [k for k in metrics if k.startswith("actor/ssopd/")]:
            metrics[key[len("actor/") :]] = metrics.pop(key)
        finalize_metrics(metrics)
        return batch

    def _token_view_path(self) -> Optional[Path]:
        """``ssopd.token_view_dir`` (default ``<trainer.default_local_dir>/token_view``)/step_<N>.html on the steps
        ``ssopd.token_view_every`` asks for; None on the others, when off, or when nothing is distilled."""
        every = self.ssopd.token_view_every
        if not self.ssopd.enabled or every <= 0 or self.global_steps % every:
            return None
        directory = self.ssopd.token_view_dir or os.path.join(self.config.trainer.default_local_dir, "token_view")
        return Path(directory).absolute() / f"step_{self.global_steps:06d}.html"

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        # The teacher forward + loss time of the whole update: summed over micro-batches by the loss and over
        # mini-batches by the worker (step_values); the mean over data-parallel ranks (verl's aggregate_dp).
        teacher = metrics.pop("ssopd/teacher_time_s", None)
        if teacher is not None:
            metrics["timing_s/ssopd_teacher"] = float(teacher)
            update = metrics.get("timing_s/update_actor")
            if update:
                metrics["ssopd/teacher_time_share"] = float(teacher) / float(update)
        print(console.step_line(metrics, global_steps, self.total_training_steps), flush=True)

    def on_train_begin(self):
        super().on_train_begin()
        self._training = True

    def _validate(self, *args, **kwargs):
        val_metrics = super()._validate(*args, **kwargs)
        if not getattr(self, "_training", False):  # before training; later ones are in the step's line
            print(console.validation_line(val_metrics, self.global_steps), flush=True)
        return val_metrics

    def _plan_distillation(self, batch, metrics):
        """Pair the batch's frontier groups; returns the batch meta, extended with the SSOPD fields."""
        grouped = estimator.ssopd_advantage.take()
        if any(not key.endswith("_0") for key in batch.keys):
            # verl keys rows {uid}_{session}_{output index}; index > 0 means a multi-output agent loop.
            raise NotImplementedError("SSOPD pairs single-turn completions; this batch has multi-output sessions")
        # extra_fields: the agent loop's per-sample dict, with the reward loop's reward_extra_info
        fields = ["uid", "prompts", "responses", "raw_prompt", "extra_fields"]
        if self.ssopd.witness_source == "reference_solution":
            fields.append(self.ssopd.reference_solution_key.split(".")[0])
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        uids = [str(u) for u in data["uid"]]
        if uids != [str(u) for u in grouped.uids]:
            raise RuntimeError("SSOPD pairing: batch rows are not in the order the advantages were computed in")

        responses = data["responses"]
        response_ids = [responses[i].tolist() for i in range(len(uids))]
        rng = np.random.default_rng([self.ssopd.seed, self.global_steps])
        plan = plan_distillation(
            uids=uids,
            scores=grouped.scores.tolist(),
            response_ids=response_ids,
            prompt_messages=[_messages(m) for m in data["raw_prompt"]],
            tokenizer=self.tokenizer,
            cfg=self.ssopd,
            max_response_length=self.config.actor_rollout_ref.rollout.response_length,
            max_teacher_length=self.max_teacher_length,
            chat_template_kwargs=_plain(self.config.data.get("apply_chat_template_kwargs", None)),
            is_padding=[tag.get("is_padding", False) for tag in batch.tags],
            reference_solutions=_lookup(data, self.ssopd.reference_solution_key)
            if self.ssopd.witness_source == "reference_solution"
            else None,
            rng=rng,
        )
        metrics.update(plan.metrics)
        # Degeneration of the step's completions (length-limit hits, terminal repetition loops, mean length),
        # padding rows left out; bounded per completion by the loop test's tail window.
        real_ids = [ids for ids, tag in zip(response_ids, batch.tags) if not tag.get("is_padding", False)]
        metrics.update(degeneration_metrics(degeneration_summary(
            real_ids, max_length=self.config.actor_rollout_ref.rollout.response_length,
            end_ids=end_token_ids(self.tokenizer))))  # fmt: skip
        extra = data["extra_fields"]
        extra = extra.tolist() if hasattr(extra, "tolist") else list(extra)
        real = [getattr(e, "data", e) for e, tag in zip(extra, batch.tags) if not tag.get("is_padding", False)]
        metrics.update(grading_counts(real))
        prompts = data["prompts"]
        student_tokens = sum(len(prompts[i]) + len(response_ids[i]) for i in range(len(uids)))
        teacher_tokens = sum(len(ids) for ids in plan.teacher_ids)
        metrics["ssopd/teacher_tokens_per_token"] = teacher_tokens / max(student_tokens, 1)
        if not self.ssopd.enabled:
            return batch  # lambda = 0: plain GRPO, nothing for the worker to read

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Every row must carry every field (TransferQueue drops a field missing on some rows): non-targets get a
        # one-token placeholder and weight 0.
        teacher = [torch.tensor(ids or [pad], dtype=torch.int64) for ids in plan.teacher_ids]
        fields = TensorDict(
            {
                TEACHER_IDS: torch.nested.as_nested_tensor(teacher, layout=torch.jagged),
                TEACHER_PROMPT_LEN: torch.tensor(plan.teacher_prompt_len, dtype=torch.int64),
                ROW_WEIGHT: torch.tensor(plan.weight, dtype=torch.float32),
                TARGET_SCORE: torch.tensor(plan.target_score, dtype=torch.float32),
                WITNESS_SCORE: torch.tensor(plan.witness_score, dtype=torch.float32),
            },
            batch_size=len(uids),
        )
        # The returned meta lists the new fields: the worker's fetch reads only the fields its meta names.
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)


def check_complete_rollout(keys, tags, prompts: int, n: int, step) -> None:
    """Refuse a batch that lost completions: every sampled prompt must come back with its n completions.

    When a rollout request fails (a dead rollout engine: every request raises), verl 0.9.1's agent loop marks the
    prompt's group as failed and its sync replay buffer keeps it "sampleable": the missing completions are left
    out and the batch is padded with synthetic rows (``padding_utils.upsample_batch_to_divisible_size``), so the
    step would train on what survived and the run would go on, or hang on the next weight sync. That must fail the
    step, loudly. Rows are keyed ``{uid}_{session}_{index}``; verl's padding rows carry ``is_padding``.
    """
    per_prompt: dict[str, int] = {}
    for key, tag in zip(keys, tags):
        if not tag.get("is_padding", False):
            uid = key.split("_")[0]
            per_prompt[uid] = per_prompt.get(uid, 0) + 1
    short = sorted(uid for uid, count in per_prompt.items() if count < n)
    got = sum(per_prompt.values())
    if len(per_prompt) < prompts or short:
        raise RuntimeError(
            f"step {step}: the rollout returned {got} of {prompts * n} completions ({prompts} prompts x n={n}; "
            f"{prompts - len(per_prompt)} prompts came back empty, {len(short)} incomplete): rollout requests "
            f"failed (see the rollout server's errors above, e.g. a dead vLLM engine). verl would pad the batch "
            f"and train on the rest; stopping instead."
        )


def keep_previous_tracker_file(trainer_config) -> Optional[Path]:
    """verl's `file` logger truncates `<root>/<project>/<experiment>.jsonl` when a run starts, so a resumed run
    would erase the metrics of the steps before the checkpoint. Move an existing file aside first, to
    `<experiment>.<k>.jsonl` (k = 1, 2, ...): the segments of a run stay next to each other."""
    loggers = trainer_config.get("logger", [])
    loggers = [loggers] if isinstance(loggers, str) else list(loggers or [])
    if "file" not in loggers:
        return None
    path = os.getenv("VERL_FILE_LOGGER_PATH")  # the same resolution as verl.utils.tracking.FileLogger
    if path is None:
        root = os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", "."))
        path = os.path.join(root, trainer_config.project_name, f"{trainer_config.experiment_name}.jsonl")
    current = Path(path)
    if not current.exists() or current.stat().st_size == 0:
        return None
    k = 1
    while (kept := current.with_name(f"{current.stem}.{k}{current.suffix}")).exists():
        k += 1
    current.rename(kept)
    print(f"ssopd: kept the previous tracker file as {kept} (verl's file logger starts a new one)")
    return kept


def log_token_view(path: Path, step: int, loggers) -> bool:
    """Hand the token view page to the trackers that display HTML: wandb (``wandb.Html``, under
    ``ssopd/token_view``), when verl's tracking started a wandb run in this process. Returns whether one took it."""
    loggers = [loggers] if isinstance(loggers, str) else list(loggers or [])
    if "wandb" not in loggers:
        return False
    import wandb

    if wandb.run is None:
        return False
    wandb.log({"ssopd/token_view": wandb.Html(path.read_text(encoding="utf-8"))}, step=step)
    return True


def grading_counts(extra_fields) -> dict[str, float]:
    """Completions of the step whose grading timed out, was skipped (answer too long, nothing to grade) or failed,
    from the reward_extra_info that `ssopd_verl.evaluation.grading.compute_score` returns (verl logs it for
    validation only): `reward/grading_timeout` etc. Absent when the reward function reports no such flags."""
    infos = [e.get("reward_extra_info", {}) if isinstance(e, dict) else {} for e in extra_fields]
    counts = {}
    for flag in GRADING_FLAGS:
        values = [info[flag] for info in infos if flag in info]
        if values:
            counts[f"reward/{flag}"] = float(sum(bool(v) for v in values))
    return counts


def _messages(raw):
    """verl stores `raw_prompt` as a list of chat messages (possibly a numpy array of dicts)."""
    return [dict(m) for m in list(raw)]


def _lookup(data, dotted_key: str) -> list:
    root, *path = dotted_key.split(".")
    values = []
    for item in data[root]:
        for key in path:
            item = item.get(key) if isinstance(item, dict) else None
        values.append(item)
    return values
