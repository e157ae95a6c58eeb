"""From a scored batch of groups to the per-row inputs of the distillation loss.

One function, `plan_distillation`, ties the pure pieces together for a whole batch:

1. correct_i = score_i > threshold, and a completion that hit the maximum response length is wrong;
2. `pairing.select_pairs` picks, in every frontier group (0 < p < 1), the witness and the target(s);
3. `teacher_context.build_teacher_context` builds each target's teacher sequence: the student's chat with the
   witness inserted as a reference solution, then the target's response ids verbatim -- only its first
   `max_distill_tokens` when that is set, since the loss reads no further (the teacher pass is shorter too);
4. every row gets a weight `w(p) * share` (0 for rows that are not targets, and for padding rows).

It returns plain lists, one entry per row, and the `ssopd/` metrics of the pairing. Rows take no part in the
groups when they are padding (verl copies a real row to balance data-parallel ranks) or when their reward is
not a finite number (NaN/inf from a broken reward function: never a witness, never a target; counted in
`ssopd/nonfinite_rewards`). A group left with fewer than two usable completions has no pair and is counted in
`ssopd/groups_too_small`; the step goes on. A target whose teacher sequence cannot fit `max_teacher_length` even with an empty
witness is skipped (weight 0) and counted in `ssopd/targets_skipped`: one over-long completion must not end
the run after its rollout.

Pure module: no verl import (the trainer does the I/O).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.pairing import select_pairs, small_groups
from ssopd_verl.teacher_context import (
    TeacherContextTooLong,
    build_teacher_context,
    encode_untrusted_text,
    strip_thinking,
    witness_from_response,
)


@dataclass
class DistillationPlan:
    teacher_ids: list[list[int]]  # per row: teacher prompt + target response ids; [] if not a target
    teacher_prompt_len: list[int]  # per row: where the response starts in teacher_ids; 0 if not a target
    # (the target tokens in teacher_ids, len(teacher_ids) - teacher_prompt_len, are the distilled positions)
    weight: list[float]  # per row: w(p) * share; 0 if not a target
    metrics: dict[str, float] = field(default_factory=dict)
    # per target row: its own score and its witness's (NaN: not a target, or the witness is a reference solution),
    # shown in the token view
    target_score: list[float] = field(default_factory=list)
    witness_score: list[float] = field(default_factory=list)

    @property
    def num_targets(self) -> int:
        return sum(w > 0 for w in self.weight)


def plan_distillation(
    *,
    uids: Sequence,
    scores: Sequence[float],
    response_ids: Sequence[Sequence[int]],
    prompt_messages: Sequence[list],
    tokenizer,
    cfg: SSOPDConfig,
    max_response_length: int,
    max_teacher_length: int | None,
    chat_template_kwargs: dict | None = None,
    is_padding: Sequence[bool] | None = None,
    reference_solutions: Sequence[str] | None = None,
    rng: np.random.Generator | None = None,
) -> DistillationPlan:
    num_rows = len(uids)
    if not (len(scores) == len(response_ids) == len(prompt_messages) == num_rows):
        raise ValueError("uids, scores, response_ids and prompt_messages must have one entry per row")
    is_padding = [False] * num_rows if is_padding is None else list(is_padding)
    finite = [bool(np.isfinite(float(s))) for s in scores]
    real = [i for i in range(num_rows) if not is_padding[i] and finite[i]]
    if cfg.witness_source == "reference_solution" and reference_solutions is None:
        raise ValueError(
            f"ssopd.witness_source=reference_solution needs the dataset's solutions ({cfg.reference_solution_key})"
        )

    lengths = np.array([len(response_ids[i]) for i in real])
    correct = np.array([float(scores[i]) > cfg.correct_threshold for i in real])
    truncated = lengths >= max_response_length
    pairs = select_pairs(
        [uids[i] for i in real],
        correct,
        lengths,
        truncated=truncated,
        witness_source=cfg.witness_source,
        target_rule=cfg.target_rule,
        frontier_kind=cfg.frontier_weight,
        rng=rng,
        tie_keys=[tuple(response_ids[i]) for i in real],  # content, not batch position, breaks ties
    )

    nan = float("nan")
    plan = DistillationPlan([[] for _ in range(num_rows)], [0] * num_rows, [0.0] * num_rows,
                            target_score=[nan] * num_rows, witness_score=[nan] * num_rows)  # fmt: skip
    witness_lens, target_lens, teacher_lens, distilled, truncations, skipped = [], [], [], [], 0, 0
    template_kwargs = cfg.chat_template_kwargs if cfg.chat_template_kwargs is not None else chat_template_kwargs
    for pair in pairs:
        row = real[pair.target]
        if pair.witness is None:
            text = reference_solutions[row]
            if not isinstance(text, str) or not text:
                raise ValueError(f"row {row}: no reference solution under {cfg.reference_solution_key}")
            if cfg.witness_thinking == "strip":
                text = strip_thinking(text)
            witness = encode_untrusted_text(tokenizer, text)
        else:
            witness_row = real[pair.witness]
            witness = witness_from_response(tokenizer, response_ids[witness_row], cfg.witness_thinking)
            witness_lens.append(len(response_ids[witness_row]))
        target = list(response_ids[row])[: cfg.max_distill_tokens]  # [:None] = all
        try:
            context = build_teacher_context(
                tokenizer,
                prompt_messages[row],
                witness,
                target,
                template=cfg.template,
                max_witness_tokens=cfg.max_witness_tokens,
                max_length=max_teacher_length,
                chat_template_kwargs=template_kwargs,
            )
        except TeacherContextTooLong:
            skipped += 1
            continue
        plan.teacher_ids[row] = context.input_ids
        plan.teacher_prompt_len[row] = context.prompt_length
        plan.weight[row] = pair.weight * pair.target_share
        plan.target_score[row] = float(scores[row])
        if pair.witness is not None:
            plan.witness_score[row] = float(scores[real[pair.witness]])
        target_lens.append(len(response_ids[row]))
        distilled.append(len(target))
        teacher_lens.append(len(context.input_ids))
        truncations += context.witness_truncated

    groups = {uids[i] for i in real}
    frontier = {p.uid: p.weight for p in pairs}
    plan.metrics = {
        "ssopd/groups": float(len(groups)),
        "ssopd/frontier_frac": len(frontier) / max(len(groups), 1),
        "ssopd/pairs": float(len(pairs)),
        "ssopd/frontier_weight_mean": float(np.mean(list(frontier.values()))) if frontier else 0.0,
        "ssopd/witness_len_mean": float(np.mean(witness_lens)) if witness_lens else 0.0,
        "ssopd/target_len_mean": float(np.mean(target_lens)) if target_lens else 0.0,
        "ssopd/teacher_len_mean": float(np.mean(teacher_lens)) if teacher_lens else 0.0,
        "ssopd/distilled_tokens": float(sum(distilled)),
        "ssopd/witness_truncations": float(truncations),
        "ssopd/targets_skipped": float(skipped),
        "ssopd/nonfinite_rewards": float(num_rows - sum(finite)),
        "ssopd/groups_too_small": float(small_groups([uids[i] for i in real])),
        "ssopd/truncated_frac": float(truncated.mean()) if len(real) else 0.0,
    }
    return plan
