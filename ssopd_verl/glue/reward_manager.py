"""The reward manager `ssopd`: verl's `naive` manager plus the degeneration flags of every completion.

Registered in verl's reward-manager registry (`verl.experimental.reward_loop.reward_manager.register`), selected
by the recipe overlay (`reward.reward_manager.name=ssopd`). It scores exactly as `naive` does (the configured
`compute_score`, on the decoded response) and adds to each sample's `reward_extra_info`, from the response's token
ids (`ssopd_verl.degeneration.completion_flags`, bounded in time by its tail window):

* `length_limit`: 1.0 if the completion stopped at the rollout's response length, not at an end token;
* `repetition_loop`: 1.0 if it ends in (or is cut inside) a repetition loop;
* `response_tokens`: its length.

verl averages reward_extra_info per data source at validation, so every validation logs
`val-aux/<source>/repetition_loop/mean@<n>` etc.; in training the SSOPD trainer computes the same numbers over the
step's completions (`degeneration/*`) from the ids it already reads, whichever reward manager runs.
"""

from __future__ import annotations

from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

from ssopd_verl.degeneration import completion_flags

NAME = "ssopd"


def end_token_ids(tokenizer) -> set[int]:
    """Ids that end a completion: eos and pad (a loop followed by them still ends the completion)."""
    return {int(i) for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


@register(NAME)
class SSOPDRewardManager(NaiveRewardManager):
    async def run_single(self, data):
        result = await super().run_single(data)
        item = data[-1:][0]  # as the naive manager: the last sequence of a multi-sequence output
        response = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-response.shape[-1] :].sum())
        ids = response[:valid].tolist()
        max_length = int(self.config.actor_rollout_ref.rollout.response_length)
        result["reward_extra_info"].update(
            completion_flags(ids, max_length=max_length, end_ids=end_token_ids(self.tokenizer))
        )
        return result
