"""A batch that lost completions (failed rollout requests, e.g. a dead vLLM engine) stops the step.

verl 0.9.1 pads over failed groups and trains on what survived; `SSOPDTrainer._compute_advantage` calls
`check_complete_rollout` first. (Measured with vLLM on CPU, its engine process killed after step 1: without the
check, step 2 trained on 8 real completions padded with 56 synthetic rows, then the run hung; docs/vllm_cpu.md.)
"""

import pytest

from ssopd_verl.glue.trainer import check_complete_rollout


def rows(counts: dict[str, int], padding: int = 0):
    keys = [f"{uid}_{s}_0" for uid, c in counts.items() for s in range(c)] + [f"padx_{i}_0" for i in range(padding)]
    tags = [{} for uid, c in counts.items() for _ in range(c)] + [{"is_padding": True}] * padding
    return keys, tags


def test_a_complete_batch_passes_padding_rows_aside():
    check_complete_rollout(*rows({"a": 4, "b": 4}, padding=0), prompts=2, n=4, step=1)
    check_complete_rollout(*rows({"a": 4, "b": 4}, padding=8), prompts=2, n=4, step=1)  # verl pads to a multiple


@pytest.mark.parametrize("counts", [{"a": 4, "b": 3}, {"a": 4}, {"a": 1}])
def test_lost_completions_stop_the_step(counts):
    keys, tags = rows(counts, padding=16 - sum(counts.values()))  # what verl hands over after padding
    with pytest.raises(RuntimeError, match=r"step 2: the rollout returned \d+ of 8 completions"):
        check_complete_rollout(keys, tags, prompts=2, n=4, step=2)
