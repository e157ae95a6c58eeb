"""Start-up checks: a config SSOPD cannot run is refused before any worker or rollout starts, naming the key.

`check_config` runs in `SSOPDTrainer.__init__`, i.e. in verl's TaskRunner before the trainer builds its worker
groups, so a bad value costs seconds, not a validation pass and a rollout.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.glue import estimator


def check_config(config) -> SSOPDConfig:
    """Fail at start-up, with the key to change, on a config that cannot run SSOPD."""
    ssopd = SSOPDConfig.from_mapping(plain(config.get("ssopd", None)))
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
    if ssopd.enabled and config.actor_rollout_ref.actor.get("ulysses_sequence_parallel_size", 1) > 1:
        raise ValueError("SSOPD does not support Ulysses sequence parallelism yet (teacher positions are shard-local)")
    if config.actor_rollout_ref.get("ssopd", None) is None:
        raise ValueError("actor_rollout_ref.ssopd is missing: the recipe overlay sets it to ${ssopd}")
    return ssopd



def plain(value):
    if value is None:
        return None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
