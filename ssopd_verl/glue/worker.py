"""The actor worker: verl's `ActorRolloutRefWorker` with the SSOPD loss bound to its engine.

Two small overrides, both through verl's public surface:
* `init_model`: after verl builds the actor, wrap its `ppo_loss` in `SSOPDActorLoss` and install it with
  `set_loss_fn` (the loss needs the engine for the teacher forward).
* `update_actor`: mark the micro-batches with `distillation_use_topk=True`, the flag on which verl's FSDP engine
  calls the loss as a logits processor (SSOPD_SPEC.md 6a). Only the update pass: the old-log-prob pass must not
  see it. With lambda = 0 the flag stays off and the update is verl's GRPO update, unchanged.

The trainer maps the actor role to this class (`SSOPDTrainer._init_resource_pool_mgr`). The `ssopd:` block
reaches it as `actor_rollout_ref.ssopd`, an interpolation of the top-level block set by the recipe overlay.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from verl.plugin.platform import get_platform

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.glue.actor_loss import SSOPDActorLoss, mark_for_distillation


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
            self.loss_fn = SSOPDActorLoss(
                base_loss=self.loss_fn, ssopd=self.ssopd, rollout_n=self.config.rollout.n, engine=self.actor.engine
            )
            self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        mark_for_distillation(data, self.ssopd)
        return super().update_actor(data)
