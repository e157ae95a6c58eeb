"""Batch-level pairing: scores -> pairs -> teacher sequences and row weights (pure, real Qwen3 tokenizer)."""

import math

import numpy as np
import pytest

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.distill_plan import plan_distillation
from ssopd_verl.pairing import frontier_weight


def chat(problem):
    return [{"role": "user", "content": problem}]


@pytest.fixture
def batch(qwen_tokenizer):
    enc = lambda s: qwen_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    # group a: 1 of 4 correct (frontier); group b: all correct; group c: 2 of 4 correct (frontier)
    responses = [
        enc("I think 5. \\boxed{5}"),  # a0 wrong
        enc("2+2 is 4, so \\boxed{4}"),  # a1 correct
        enc("Long wrong reasoning that goes on and on \\boxed{7}"),  # a2 wrong, longest
        enc("\\boxed{3}"),  # a3 wrong
        enc("\\boxed{9}"), enc("\\boxed{9}"), enc("\\boxed{9}"), enc("\\boxed{9}"),  # b: all correct
        enc("short \\boxed{1}"),  # c0 correct, shortest
        enc("a longer correct one \\boxed{1}"),  # c1 correct
        enc("wrong \\boxed{2}"),  # c2 wrong
        enc("wrong again and longer \\boxed{2}"),  # c3 wrong, longest
    ]
    return dict(
        uids=["a"] * 4 + ["b"] * 4 + ["c"] * 4,
        scores=[0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
        response_ids=responses,
        prompt_messages=[chat("What is 2+2?")] * 4 + [chat("3*3?")] * 4 + [chat("1*1?")] * 4,
        tokenizer=qwen_tokenizer,
    )


def test_pairs_targets_and_weights(batch):
    plan = plan_distillation(**batch, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=None)
    assert plan.num_targets == 2
    assert plan.weight[2] == pytest.approx(frontier_weight(0.25)) and plan.weight[11] == pytest.approx(1.0)
    assert [w for i, w in enumerate(plan.weight) if i not in (2, 11)] == [0.0] * 10
    # target response ids verbatim at the end of the teacher sequence; witness text inside the prompt
    for target, witness in ((2, 1), (11, 8)):
        ids, start = plan.teacher_ids[target], plan.teacher_prompt_len[target]
        assert ids[start:] == batch["response_ids"][target]
        prompt_text = batch["tokenizer"].decode(ids[:start])
        assert batch["tokenizer"].decode(batch["response_ids"][witness]) in prompt_text
        assert prompt_text.rstrip().endswith("<|im_start|>assistant")
    assert plan.metrics["ssopd/frontier_frac"] == pytest.approx(2 / 3)
    assert plan.metrics["ssopd/pairs"] == 2
    assert plan.metrics["ssopd/witness_truncations"] == 0


def test_truncated_correct_completion_is_wrong(batch):
    # a max response length equal to the correct a1's length makes it truncated: group a has no correct left
    limit = len(batch["response_ids"][1])
    assert all(len(batch["response_ids"][i]) < limit for i in (8, 10, 11))  # group c is unaffected
    plan = plan_distillation(**batch, cfg=SSOPDConfig(), max_response_length=limit, max_teacher_length=None)
    assert plan.weight[2] == 0.0  # group a is no longer a frontier group


def test_padding_rows_take_no_part(batch):
    padded = {k: (v + [v[1]] if isinstance(v, list) else v) for k, v in batch.items()}  # copy of row 1
    plan = plan_distillation(
        **padded, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=None,
        is_padding=[False] * 12 + [True],
    )
    assert plan.weight[12] == 0.0 and plan.teacher_ids[12] == []
    assert plan.weight[2] == pytest.approx(frontier_weight(0.25))  # group a still 1/4, not 2/5


def test_teacher_length_limit_shortens_the_witness(batch):
    full = plan_distillation(**batch, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=None)
    row = max((2, 11), key=lambda r: len(full.teacher_ids[r]))
    limit = len(full.teacher_ids[row]) - 3
    plan = plan_distillation(**batch, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=limit)
    assert len(plan.teacher_ids[row]) <= limit
    assert plan.teacher_ids[row][plan.teacher_prompt_len[row]:] == batch["response_ids"][row]
    assert plan.metrics["ssopd/witness_truncations"] >= 1


def test_reference_solution_witness(batch):
    solutions = [f"solution of row {i}" for i in range(12)]
    cfg = SSOPDConfig(witness_source="reference_solution")
    plan = plan_distillation(
        **batch, cfg=cfg, max_response_length=1000, max_teacher_length=None, reference_solutions=solutions
    )
    text = batch["tokenizer"].decode(plan.teacher_ids[2][: plan.teacher_prompt_len[2]])
    assert "solution of row 2" in text
    with pytest.raises(ValueError, match="reference_solution"):
        plan_distillation(**batch, cfg=cfg, max_response_length=1000, max_teacher_length=None)


def test_all_wrong_splits_the_group_weight(batch):
    plan = plan_distillation(
        **batch, cfg=SSOPDConfig(target_rule="all_wrong", frontier_weight="binary"),
        max_response_length=1000, max_teacher_length=None,
    )
    assert sum(plan.weight[:4]) == pytest.approx(1.0) and plan.weight[1] == 0.0
    assert plan.weight[10] == plan.weight[11] == pytest.approx(0.5)


def test_random_variants_are_seeded(batch):
    cfg = SSOPDConfig(witness_source="random_correct", target_rule="random_wrong")
    run = lambda seed: plan_distillation(  # noqa: E731
        **batch, cfg=cfg, max_response_length=1000, max_teacher_length=None, rng=np.random.default_rng(seed)
    ).teacher_ids
    assert run(3) == run(3)


def test_nonfinite_rewards_are_never_witness_or_target(batch):
    """A NaN or inf reward compares False with the threshold: without care its completion would be 'wrong' and
    become the target. Such rows leave the group instead, and are counted."""
    scores = list(batch["scores"])
    scores[2] = float("nan")  # group a's longest wrong
    scores[8] = float("inf")  # group c's shortest correct
    plan = plan_distillation(
        **{**batch, "scores": scores}, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=None
    )
    assert plan.metrics["ssopd/nonfinite_rewards"] == 2
    assert plan.weight[2] == 0.0 and plan.weight[8] == 0.0
    # group a (1 correct of the 3 finite): its longest finite wrong completion is now row 0 ("I think 5. ...")
    assert plan.weight[0] == pytest.approx(frontier_weight(1 / 3))
    # group c: the witness is now c1; the NaN-free target is still c3
    text = batch["tokenizer"].decode(plan.teacher_ids[11][: plan.teacher_prompt_len[11]])
    assert "a longer correct one" in text and "short \\boxed{1}" not in text


def test_targets_carry_their_score_and_their_witness_score(batch):
    plan = plan_distillation(**batch, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=None)
    targets = [i for i, w in enumerate(plan.weight) if w > 0]
    assert targets and all(plan.target_score[i] == batch["scores"][i] == 0 for i in targets)
    assert all(plan.witness_score[i] == 1 for i in targets)
    others = [i for i in range(len(plan.weight)) if i not in targets]
    assert all(math.isnan(plan.target_score[i]) and math.isnan(plan.witness_score[i]) for i in others)


def test_group_left_with_one_usable_completion_is_skipped_and_counted(batch):
    """Scores [1, nan, nan, nan] for group a: one finite completion is left, which cannot pair. The step goes on
    (before: select_pairs raised and the step died) and the group is counted."""
    scores = list(batch["scores"])
    scores[0], scores[2], scores[3] = float("nan"), float("nan"), float("nan")
    plan = plan_distillation(
        **{**batch, "scores": scores}, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=None
    )
    assert plan.metrics["ssopd/groups_too_small"] == 1 and plan.metrics["ssopd/nonfinite_rewards"] == 3
    assert plan.weight[:4] == [0.0] * 4
    assert plan.weight[10] > 0 or plan.weight[11] > 0  # group c still pairs


def test_target_that_cannot_fit_is_skipped_and_counted(batch):
    from ssopd_verl.teacher_context import build_teacher_context

    tok = batch["tokenizer"]
    bare = lambda row: len(  # noqa: E731  (teacher sequence with an empty witness)
        build_teacher_context(tok, batch["prompt_messages"][row], [], batch["response_ids"][row]).input_ids
    )
    limit = bare(2) - 1  # target 2 cannot fit even without a witness; target 11 can
    assert bare(11) <= limit
    plan = plan_distillation(**batch, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=limit)
    assert plan.metrics["ssopd/targets_skipped"] == 1
    assert plan.weight[2] == 0.0 and plan.teacher_ids[2] == []
    assert plan.weight[11] > 0 and len(plan.teacher_ids[11]) <= limit


def test_max_distill_tokens_keeps_the_first_k_target_tokens(batch):
    cfg = SSOPDConfig(max_distill_tokens=3)
    plan = plan_distillation(**batch, cfg=cfg, max_response_length=1000, max_teacher_length=None)
    for row in (2, 11):
        assert plan.teacher_ids[row][plan.teacher_prompt_len[row]:] == batch["response_ids"][row][:3]
    assert plan.metrics["ssopd/distilled_tokens"] == 6
    full = plan_distillation(**batch, cfg=SSOPDConfig(), max_response_length=1000, max_teacher_length=None)
    assert full.metrics["ssopd/distilled_tokens"] == len(batch["response_ids"][2]) + len(batch["response_ids"][11])
