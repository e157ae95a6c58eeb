"""The actor worker: verl's `ActorRolloutRefWorker` with the SSOPD loss bound to its engine.

Two small overrides, both through verl's public surface:
* `init_model`: after verl builds the actor, wrap its `ppo_loss` in `SSOPDActorLoss` and install it with
  `set_loss_fn` (the loss needs the engine for the teacher forward).
* `update_actor`: reduce the `ssopd/*` metrics over the step's mini-batches itself (`step_values`): verl's
  `reduce_metrics` picks max / min / mean by a key's *name* ("...argmax..." is a max), so the sums behind the
  per-position means and the teacher time must reach it as one value each. With dynamic batching, lower the
  batch's `max_token_len_per_gpu` so that the teacher tokens count in the budget (`student_token_budget`, `ssopd.teacher_in_token_budget`); mark the micro-batches with
  `distillation_use_topk=True`, the flag on which verl's FSDP engine calls the loss as a logits processor
  (SSOPD_SPEC.md 6a). Only the update pass: the old-log-prob pass must not see it. With lambda = 0 the flag stays
  off and the update is verl's GRPO update, unchanged. When the trainer asked for a token view of the step
  (`TOKEN_VIEW_STEP` and `TOKEN_VIEW_PATH` in the batch), rank 0 writes the targets its loss kept.

The trainer maps the actor role to this class (`SSOPDTrainer._init_resource_pool_mgr`). The `ssopd:` block
reaches it as `actor_rollout_ref.ssopd`, an interpolation of the top-level block set by the recipe overlay.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker

from verl.plugin.platform import get_platform
from verl.utils.device import get_device_name

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.glue.actor_loss import (
    COUNT,
    SUM_PREFIX,
    TOKEN_VIEW_PATH,
    SSOPDActorLoss,
    mark_for_distillation,
    teacher_tokens,
)
from ssopd_verl.glue.teacher_forward import student_token_budget
from ssopd_verl.token_view import write_token_view


class SSOPDActorRolloutRefWorker(ActorRolloutRefWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        block = self.config.get("ssopd", None)
        self.ssopd = SSOPDConfig.from_mapping(OmegaConf.to_container(block, resolve=True) if block is not None else None)
        # The CPU runtime's platform (ssopd_verl.cpu) creates the gloo process group itself: verl would build the
        # backend string "cpu:gloo,cpu:gloo", which torch rejects, and skips its own initialisation when a group
        # exists. verl's own platforms have no such method; duck-typed so that this glue never imports the runtime.
        prepare = getattr(get_platform(), "prepare_process_group", None)
        if prepare is not None:
            prepare()
        super().init_model()
        if self.actor is not None:
            actor = self.config.actor
            # verl's dynamic batching caps a student micro-batch at ppo_max_token_len_per_gpu tokens: no teacher
            # forward holds more (the teacher sequences are split into pieces; TeacherForward).
            budget = actor.ppo_max_token_len_per_gpu if actor.get("use_dynamic_bsz", False) else None
            self.loss_fn = SSOPDActorLoss(
                base_loss=self.loss_fn, ssopd=self.ssopd, rollout_n=self.config.rollout.n, engine=self.actor.engine,
                teacher_max_tokens=budget,
            )
            self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        mark_for_distillation(data, self.ssopd)
        actor = self.config.actor
        if self.ssopd.enabled and self.ssopd.teacher_in_token_budget and actor.get("use_dynamic_bsz", False):
            # verl keeps a max_token_len_per_gpu already in the batch (TrainingWorker.train_batch): a smaller one
            # so that each micro-batch's student + teacher tokens fit ppo_max_token_len_per_gpu.
            # Agreed by all ranks (an all-reduce over the actor's ranks): verl checks each rank's rows against the
            # longest row of every rank.
            budget = student_token_budget(actor.ppo_max_token_len_per_gpu, data["input_ids"].offsets().diff().tolist(),
                                          teacher_tokens(data).tolist(), sp=self.actor.engine.ulysses_sequence_parallel_size,
                                          device=get_device_name())  # fmt: skip
            tu.assign_non_tensor(data, max_token_len_per_gpu=budget)
        output = super().update_actor(data)
        if output is not None:  # the rank that returns the metrics (one value per mini-batch for each key)
            tu.assign_non_tensor(output, metrics=step_values(tu.get(output, "metrics")))
        records, self.loss_fn.view_records = self.loss_fn.view_records, []
        if records:  # kept on rank 0 only
            tokenizer = self.actor.model_config.tokenizer
            for record in records:  # the student prompt, as text
                record["problem"] = tokenizer.decode(record["problem"])
            write_token_view(tu.get_non_tensor_data(data, TOKEN_VIEW_PATH, None), records, tokenizer,
                             scale=_token_view_scale(self.ssopd))  # fmt: skip
        return output


# How each worker-level `ssopd/*` metric combines over the mini-batches (and ppo_epochs passes) of one update:
# verl averages them, except that a name containing "max" / "min" gets np.max / np.min (reduce_metrics).
STEP_MEAN = ("ssopd/distill_loss",)  # like verl's actor/pg_loss: the mean of the mini-batches' losses
STEP_MAX = ("ssopd/micro_batch_tokens_max",)  # the largest micro-batch of the step
STEP_SUM = ("ssopd/teacher_time_s", "ssopd/teacher_nonfinite", COUNT)  # step totals (and every SUM_PREFIX key)


def step_values(metrics: dict) -> dict:
    """The step's value of every ``ssopd/*`` key, as a one-element list (which any of verl's name-based reductions
    leaves as it is): sums for totals (the per-position sums and their count, the teacher time, non-finite teacher
    positions), the max for the micro-batch size, the mean for the loss. Other keys are verl's, left alone. An
    ``ssopd/*`` key this table does not know is an error, not a guess."""
    for key, values in metrics.items():
        if not key.startswith("ssopd/"):
            continue
        values = [float(v) for v in (values if isinstance(values, list) else [values])]
        if key in STEP_MEAN:
            metrics[key] = [sum(values) / len(values)]
        elif key in STEP_MAX:
            metrics[key] = [max(values)]
        elif key in STEP_SUM or key.startswith(SUM_PREFIX):
            metrics[key] = [sum(values)]
        else:
            raise KeyError(f"{key}: how it combines over mini-batches is not set (ssopd_verl.glue.worker.step_values)")
    return metrics


def _token_view_scale(ssopd: SSOPDConfig) -> float:
    """The loss drawn as saturated red: a token's clipped loss is at most tau (clip=token), and in practice a few
    tau (clip=pointwise: each vocabulary entry is capped at tau); unclipped KLs get the page's default, 1 nat."""
    return {"token": ssopd.tau, "pointwise": 4 * ssopd.tau}.get(ssopd.clip, 1.0)
