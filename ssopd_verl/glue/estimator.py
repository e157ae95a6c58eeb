"""The `ssopd` advantage estimator: GRPO group advantages, remembered for the pairing.

SSOPD leaves the policy-gradient side untouched: advantages are verl's own GRPO outcome advantages (same code,
so lambda = 0 reproduces GRPO bit for bit). The estimator is registered under its own name
(`core_algos.register_adv_est`, verl's registry) so that a run says what it is, and so that the trainer pairs
completions from exactly the scores and group ids the advantages were computed from: the estimator keeps its
last inputs, and `SSOPDTrainer` reads them instead of fetching and summing the rewards a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verl.trainer.ppo import core_algos

NAME = "ssopd"


@dataclass(frozen=True)
class GroupInputs:
    """What the last advantage computation grouped: one entry per row, in batch order."""

    uids: np.ndarray  # object array of group ids (verl's `uid`)
    scores: torch.Tensor  # (B,) sequence-level reward = sum of token-level rewards


class SSOPDAdvantage:
    def __init__(self):
        self.last: GroupInputs | None = None

    def __call__(self, token_level_rewards, response_mask, config=None, index=None, **_):
        if index is None:
            raise ValueError("the ssopd estimator needs group ids (`uid`) in the batch")
        norm_by_std = _get(config, "norm_adv_by_std_in_grpo", True)
        advantages, returns = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=token_level_rewards,
            response_mask=response_mask,
            index=index,
            norm_adv_by_std_in_grpo=norm_by_std,
            config=config,
        )
        self.last = GroupInputs(uids=np.asarray(index, dtype=object), scores=token_level_rewards.sum(dim=-1).detach().cpu())
        return advantages, returns

    def take(self) -> GroupInputs:
        """The inputs of the last call, once: a second take without a new call is a bug and raises."""
        if self.last is None:
            raise RuntimeError("the ssopd advantage estimator has not run for this batch (algorithm.adv_estimator=ssopd?)")
        last, self.last = self.last, None
        return last


def _get(config, key, default):
    if config is None:
        return default
    getter = getattr(config, "get", None)
    return getter(key, default) if getter is not None else getattr(config, key, default)


ssopd_advantage = SSOPDAdvantage()


def register() -> None:
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME) is not ssopd_advantage:
        core_algos.register_adv_est(NAME)(ssopd_advantage)
