"""The reward manager `ssopd` (verl's registry): verl's naive scoring plus each completion's degeneration flags."""

import numpy as np
import torch
from omegaconf import OmegaConf

from verl import DataProto


def _sample(tokenizer, prompt: str, response_ids: list[int], width: int) -> DataProto:
    """One sample as verl's reward loop hands it to a manager: right-padded responses and an attention mask."""
    prompt_ids = tokenizer.encode(prompt)
    responses = torch.full((1, width), tokenizer.pad_token_id)
    responses[0, : len(response_ids)] = torch.tensor(response_ids)
    mask = torch.cat([torch.ones(1, len(prompt_ids)), (torch.arange(width) < len(response_ids))[None].float()], 1)
    return DataProto.from_dict(
        tensors={"prompts": torch.tensor([prompt_ids]), "responses": responses, "attention_mask": mask.long()},
        non_tensors={"data_source": np.array(["tiny"], dtype=object),
                     "reward_model": np.array([{"ground_truth": "7"}], dtype=object),
                     "extra_info": np.array([{}], dtype=object)},
    )  # fmt: skip


def test_scores_as_naive_and_adds_degeneration_flags(qwen_tokenizer):
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

    from ssopd_verl.evaluation.grading import compute_score
    from ssopd_verl.glue.reward_manager import SSOPDRewardManager

    assert get_reward_manager_cls("ssopd") is SSOPDRewardManager  # registered by `import verl` (the plugin)
    tok = qwen_tokenizer
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"response_length": 24}}})
    manager = SSOPDRewardManager(config, tok, compute_score)
    eos = tok.eos_token_id
    right = tok.encode("3+4 = \\boxed{7}") + [eos]
    loop = (tok.encode("Let me check. ") * 12)[:24]  # looping until cut at the limit
    run = lambda ids: manager.loop.run_until_complete(manager.run_single(_sample(tok, "What is 3+4?", ids, 24)))  # noqa: E731
    results = [run(ids) for ids in (right, loop)]  # on the loop the manager was built with, as verl runs it
    assert [r["reward_score"] for r in results] == [1.0, 0.0]
    flags = [{k: r["reward_extra_info"][k] for k in ("length_limit", "repetition_loop", "response_tokens")}
             for r in results]  # fmt: skip
    assert flags == [{"length_limit": 0.0, "repetition_loop": 0.0, "response_tokens": float(len(right))},
                     {"length_limit": 1.0, "repetition_loop": 1.0, "response_tokens": 24.0}]  # fmt: skip
    assert results[0]["reward_extra_info"]["grading_timeout"] == 0  # the grader's own flags are kept
