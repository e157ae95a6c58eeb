"""The actor loss: verl's GRPO policy loss plus the SSOPD distillation term.

    loss = ppo_loss(...)  +  lambda * sum_g w(p_g) * L_g / G

`L_g` is the token-mean, over the target's response, of the clipped forward KL from the self-teacher
(`ssopd_verl.losses`); `w(p_g)` the frontier weight (`ssopd_verl.pairing`); `G` the number of prompts in the
optimizer step's mini-batch. Per-row weights `w * share` arrive in the batch as `ssopd_weight` (0 for rows that
are not targets, and for the padding rows verl adds to balance data-parallel ranks).

Normalisation, so that lambda means the same at every batch size, micro-batch size and data-parallel size:
each micro-batch on each rank contributes `lambda * sum_{its target rows} w*share*L / G * dp_size`. Gradient
accumulation sums micro-batches and FSDP averages ranks, so the step's gradient is that of
`lambda * sum_{all targets} w*share*L / G` -- the same recipe verl's `agg_loss` uses for the policy loss.
`G = global_batch_size / rollout.n`, where verl sets `global_batch_size = ppo_mini_batch_size * n`.

How it reaches the student logits (verl 0.9.1 hook, SSOPD_SPEC.md 6a): the FSDP engine calls the actor loss a
first time as a *logits processor* when the micro-batch carries `distillation_use_topk=True` (set by
`SSOPDActorRolloutRefWorker.update_actor`): `fn(student_logits=(1, N, V) / temperature, data=micro_batch)` must
return per-position tensors shaped (1, N). We run the teacher there and return the per-position loss, KL and
clip fraction; the engine nests them per row into `model_output`, and calls `fn(model_output=..., data=...)`
for the loss proper. Nothing of verl is patched: the function is installed with `set_loss_fn`.

Under Ulysses sequence parallelism the hook sees this rank's slice of the packed micro-batch's logits; it computes
the terms of the distilled positions in that slice (the teacher states of all positions are gathered by
`TeacherForward`), and the engine all-gathers the per-position outputs across the SP group, as it does the
log-probs, with the gradient of each slice flowing back to the rank that holds it.

Memory: the loss keeps a gradient buffer for the distilled positions only, and adds it into the gradient that
verl's policy loss gives the same logits (`gradient_sink`, a `Tensor.register_hook` on the engine's logits, see
`ssopd_verl.losses`): positions that are not distilled cost nothing of size [tokens x vocabulary] beyond what
GRPO holds. A micro-batch without a distilled position returns a zero loss whose backward gives the logits no
gradient at all (`_ZeroLoss`), and the lm_head the loss projects with is the one the teacher forward gathered
(`TeacherForward.take_head`: no collective of its own, no fp32 copy). Nothing here reads the logits in backward,
so verl's flash-attn cross-entropy, which overwrites them with their gradient, is safe (tests/test_gpu_path_cpu.py).

Metrics mean the same on any layout (one rank, N data-parallel ranks, Ulysses SP, any micro-batching): every
micro-batch on every rank reports every `ssopd/*` metric (verl's `Metric.aggregate_dp` needs as many values per
rank), and the per-position means (`ssopd/kl_unclipped`, the shares, ...) are sent as a sum and a count, each
scaled by the data-parallel size with SUM aggregation, so that verl's mean over ranks and sum over micro-batches
yields the totals; `finalize_metrics` (called by the trainer) divides them. Positions whose teacher logits were
not finite are left out of every mean, L_g's included.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import torch
from tensordict import TensorDict

from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.glue.teacher_forward import TeacherForward, local_positions, response_logit_positions
from ssopd_verl.losses import chunked_clipped_forward_kl

logger = logging.getLogger(__name__)

# Per-row batch fields written by the trainer (every row carries them; see SSOPDTrainer).
TEACHER_IDS = "ssopd_teacher_ids"  # nested int64: teacher prompt + target response
TEACHER_PROMPT_LEN = "ssopd_teacher_prompt_len"  # int64 (B,)
ROW_WEIGHT = "ssopd_weight"  # float32 (B,): w(p) * target share; 0 = no distillation on this row
TARGET_SCORE = "ssopd_target_score"  # float32 (B,): a target's reward (NaN on other rows), for the token view
WITNESS_SCORE = "ssopd_witness_score"  # float32 (B,): its witness's reward (NaN: reference solution, or no target)

# Per-position outputs of the logits hook, nested per row by the engine (0 outside the distilled positions).
OUT_LOSS = "ssopd_loss"  # the clipped forward KL l[t] (with grad)
# Diagnostics, each reported as the token mean over the distilled positions under `ssopd/<name>`:
DIAGNOSTICS = {
    "ssopd_kl": "kl_unclipped",  # sum_v d[t, v] before clipping
    "ssopd_clipped_mass": "clipped_teacher_mass",  # teacher probability mass in clipped entries
    "ssopd_teacher_logp": "teacher_logp_sampled",  # log p_T of the token the student sampled
    "ssopd_student_logp": "student_logp_sampled",  # log p_S of that token
    "ssopd_argmax_differs": "teacher_argmax_differs",  # 1 where the teacher's argmax is another token
    # which way the clipped loss moves the student (ssopd_verl.losses, "Which way"): 1 where its gradient step on the
    # logits lowers log p_S of the teacher's argmax (first order) while the exact forward KL's would raise it;
    # teacher mass in all entries so reversed
    "ssopd_argmax_reversed": "teacher_argmax_reversed",
    "ssopd_reversed_mass": "reversed_teacher_mass",
}
OUT_NONFINITE = "ssopd_teacher_nonfinite"  # 1 at positions whose teacher logits were NaN/inf (masked out)
# Worker-level metric keys behind the per-position means: `finalize_metrics` turns SUM_PREFIX + name / COUNT into
# `ssopd/<name>` (no "max"/"min" in these names: verl's reduce_metrics would take the max of a list over them).
SUM_PREFIX = "ssopd/sum_"
COUNT = "ssopd/sum_distilled_positions"
OUT_ARGMAX = "ssopd_teacher_argmax"  # the teacher's most likely token (as float; -1 = none), for the token view
HOOK_OUTPUTS = (OUT_LOSS, *DIAGNOSTICS, OUT_NONFINITE, OUT_ARGMAX)  # the hook's outputs, in a fixed order
# Non-tensor field the trainer adds to an update batch when a token view is due (ssopd.token_view_every): the step.
TOKEN_VIEW_STEP = "ssopd_token_view_step"
TOKEN_VIEW_PATH = "ssopd_token_view_path"  # and the HTML file rank 0 writes


def teacher_tokens(data: TensorDict) -> torch.Tensor:
    """Teacher tokens per row of an update batch: its teacher sequence's length for a target, 0 otherwise (rows
    that are not targets carry a one-token placeholder)."""
    return data[TEACHER_IDS].offsets().diff() * (data[ROW_WEIGHT] > 0).to(torch.long)


def mark_for_distillation(data: TensorDict, ssopd: SSOPDConfig) -> None:
    """Ask the engine to call the loss as a logits processor on this update batch (only when lambda > 0).

    `distillation_only=False`: verl must still compute the log-probs for the policy loss.
    """
    if ssopd.enabled:
        tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=False)


class SSOPDActorLoss:
    """Callable installed with `set_loss_fn`; dispatches on how the engine calls it (hook or loss)."""

    def __init__(self, base_loss: Callable, ssopd: SSOPDConfig, rollout_n: int, engine=None,
                 teacher_max_tokens: Optional[int] = None):
        if rollout_n < 2:
            raise ValueError(f"SSOPD needs grouped sampling: actor_rollout_ref.rollout.n must be >= 2, got {rollout_n}")
        self.base_loss = base_loss  # functools.partial(verl ppo_loss, config=actor_config)
        self.ssopd = ssopd
        self.rollout_n = rollout_n
        # teacher_max_tokens: the most tokens one teacher forward may hold (the actor's dynamic-batch budget)
        self.teacher = (
            TeacherForward(engine, adapters=ssopd.teacher == "live", max_tokens=teacher_max_tokens)
            if engine is not None
            else None
        )
        self._teacher_seconds = 0.0  # teacher forward + loss time since the last loss call (timing metric)
        self._warned_sink = False
        self.view_records: list[dict] = []  # token-view records of the current update (TokenViewRecord fields)

    def __call__(self, model_output=None, data: TensorDict = None, dp_group=None, student_logits=None):
        if student_logits is not None:
            return self.logits_hook(student_logits, data)
        return self.loss(model_output, data, dp_group)

    # ---- first call: per-position distillation terms from the student logits -------------------------------
    def logits_hook(self, student_logits: torch.Tensor, data: TensorDict) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("SSOPDActorLoss needs the actor engine for the teacher forward (pass engine=)")
        started = _clock(student_logits.device)  # after the student forward's kernels: not counted
        logits = student_logits.squeeze(0)  # (N, V), divided by temperature, with grad; under SP, this rank's slice
        num_positions = logits.shape[0]
        seq_lens = data["input_ids"].offsets().diff().cpu()
        prompt_lens = data["prompts"].offsets().diff().cpu()
        weights = data[ROW_WEIGHT].float().cpu()
        rows = torch.nonzero(weights > 0).flatten().tolist()

        # Every rank runs the same number of teacher forwards per micro-batch (the forward's gathers are collectives
        # under FSDP2); a rank without targets runs one-token dummies (TeacherForward), none when no rank has one.
        teacher_seqs = [data[TEACHER_IDS][r] for r in rows]
        states, teacher_starts = self.teacher.hidden_states(teacher_seqs, data)
        # The student's logits come from the lm_head in the forward's compute dtype (bf16 under verl's mixed
        # precision): project the teacher's states with the same weight in the same dtype, so that a teacher
        # with the student's own context gives a KL of 0, not a precision bias on every token. The teacher forward
        # gathered exactly that weight (TeacherForward.take_head: no collective of its own, no fp32 copy).
        head = self.teacher.take_head() if rows else None

        zeros = logits.new_zeros(num_positions, dtype=torch.float32)
        if rows:
            plan = self._distilled_positions(data, rows, teacher_seqs, teacher_starts, seq_lens, prompt_lens)
            # Under Ulysses SP, keep the positions of this rank's slice of the packed sequence (all of them without SP).
            local, plan["student_pos"] = local_positions(plan["student_pos"], num_positions)
            for key in ("teacher_pos", "sampled", "temperature"):
                plan[key] = plan[key][local]
        if not rows or len(plan["student_pos"]) == 0:
            # A zero loss still attached to the logits, so that every rank's outputs take part in the same autograd
            # graph (under SP the engine gathers them with a differentiable collective), but whose backward gives
            # the logits no gradient at all: `0 * logits.sum(-1)` would backpropagate a dense [tokens x vocabulary]
            # zero tensor, one more logits-sized buffer next to the policy loss's gradient.
            loss = _ZeroLoss.apply(logits)
            self._teacher_seconds += _elapsed(started, logits.device)
            return _hook_outputs({OUT_LOSS: loss} | {key: zeros for key in HOOK_OUTPUTS if key != OUT_LOSS})

        student_pos = plan["student_pos"].to(logits.device)
        terms = chunked_clipped_forward_kl(
            logits,  # the whole micro-batch (slice); only the target rows' distilled positions are read (student_rows)
            states[plan["teacher_pos"].to(states.device)],
            head.to(states.dtype),
            tau=self.ssopd.tau,
            clip=self.ssopd.clip,
            temperature=plan["temperature"].to(logits.device),
            student_prescaled=True,
            chunk_size=self.ssopd.chunk_size,
            student_rows=student_pos,
            sampled_ids=plan["sampled"].to(logits.device),
            gradient_sink=self._gradient_sink(student_logits, logits),
        )
        place = lambda values: zeros.detach().index_put((student_pos,), values.detach().float())  # noqa: E731
        out = {
            OUT_LOSS: zeros.index_put((student_pos,), terms.loss.float()),
            "ssopd_kl": place(terms.kl),
            "ssopd_clipped_mass": place(terms.clipped_mass),
            "ssopd_teacher_logp": place(terms.teacher_logp_sampled),
            "ssopd_student_logp": place(terms.student_logp_sampled),
            "ssopd_argmax_differs": place(terms.teacher_argmax_differs),
            "ssopd_argmax_reversed": place(terms.teacher_argmax_reversed),
            "ssopd_reversed_mass": place(terms.reversed_teacher_mass),
            OUT_NONFINITE: place(terms.teacher_nonfinite),
            OUT_ARGMAX: place(terms.teacher_argmax),  # token ids < 2**24: exact in float32
        }
        self._teacher_seconds += _elapsed(started, logits.device)
        return _hook_outputs(out)

    def _gradient_sink(self, student_logits: torch.Tensor, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """The engine's logits tensor that ``student_logits`` views: verl's log-prob path reads it too, so the
        distilled rows' gradient can be added into the policy loss's logit gradient (``ssopd_verl.losses``).
        None (a separate (M, V) gradient at backward, correct but larger) when the hook's argument is not a
        plain view of the whole of one tensor; said once."""
        base = student_logits._base
        if (base is not None and base.numel() == logits.numel() and base.data_ptr() == logits.data_ptr()
                and base.is_contiguous() and logits.is_contiguous()):  # fmt: skip
            return base
        if not self._warned_sink:
            self._warned_sink = True
            logger.warning("ssopd: the student logits are not a view of the engine's logits tensor; the distillation "
                           "gradient is returned as a separate [tokens x vocabulary] tensor (more memory)")
        return None

    @staticmethod
    def _distilled_positions(data: TensorDict, rows, teacher_seqs, teacher_starts, seq_lens, prompt_lens) -> dict:
        """For every distilled token of the target ``rows``: its student logit position in the packed micro-batch,
        its teacher state position, the token the student sampled there and the row's temperature.

        The distilled tokens are the target tokens in the teacher sequence (all of the response, or its first
        ssopd.max_distill_tokens; the trainer put only those there).
        """
        index = torch.tensor(rows)
        seq_starts = torch.cumsum(seq_lens, 0) - seq_lens
        teacher_prompt_lens = data[TEACHER_PROMPT_LEN].cpu()[index]
        distilled = torch.tensor([len(seq) for seq in teacher_seqs]) - teacher_prompt_lens
        student_pos = response_logit_positions(seq_starts[index], prompt_lens[index], distilled)
        values = data["input_ids"].values()
        # Same temperature on both sides: the engine divided the student logits by the row's temperature.
        temperature = _row_temperature(data, len(seq_lens)).cpu()[index]
        return {
            "student_pos": student_pos,
            "teacher_pos": response_logit_positions(teacher_starts, teacher_prompt_lens, distilled),
            # the token each distilled position predicts: the next input id of the student's sequence
            "sampled": values[student_pos.to(values.device) + 1].cpu(),
            "temperature": torch.repeat_interleave(temperature, distilled),
        }

    # ---- second call: the loss ----------------------------------------------------------------------------------
    def loss(self, model_output, data: TensorDict, dp_group=None):
        policy_loss, metrics = self.base_loss(model_output=model_output, data=data, dp_group=dp_group)
        if OUT_LOSS not in model_output:
            if self.ssopd.enabled:
                raise RuntimeError(
                    "the SSOPD logits hook did not run: the micro-batch lacks distillation_use_topk=True "
                    "(use SSOPDActorRolloutRefWorker) or fused kernels are on (set model.use_fused_kernels=false)"
                )
            return policy_loss, metrics

        per_token = no_padding_2_padding(model_output[OUT_LOSS], data)  # (b, R), aligned with response_mask
        mask = _padded(data, "response_mask").to(per_token.dtype)
        # L_g is the token mean over the distilled positions: the first `distilled` response tokens of the row
        # (its whole response, or the first ssopd.max_distill_tokens of it), less those whose teacher logits were
        # not finite (their loss is 0 and they carry no teacher distribution: left out of the mean).
        distilled = data[TEACHER_IDS].offsets().diff().to(mask.device) - data[TEACHER_PROMPT_LEN].to(mask.device)
        positions = torch.arange(mask.shape[-1], device=mask.device)
        mask = mask * (positions[None, :] < distilled[:, None]).to(mask.dtype)
        nonfinite = no_padding_2_padding(model_output[OUT_NONFINITE], data).to(mask.dtype) * mask
        mask = mask - nonfinite
        tokens = mask.sum(-1).clamp(min=1)
        per_row = (per_token * mask).sum(-1) / tokens  # L for each row
        weights = data[ROW_WEIGHT].to(per_row.device, per_row.dtype)

        global_batch_size = data["global_batch_size"]
        if global_batch_size is None:
            raise ValueError("SSOPD needs global_batch_size in the micro-batch (set by verl's v1 trainer)")
        num_prompts = global_batch_size / self.rollout_n
        dp_size = data["dp_size"]
        # sum_g w*share*L / G, scaled like verl's agg_loss (see module docstring); lambda applied below.
        distill = (weights * per_row).sum() / num_prompts * dp_size

        with torch.no_grad():
            # Every metric on every micro-batch of every rank (see the module docstring). A total: the local value
            # times dp_size, SUM-aggregated (verl averages over ranks, sums over micro-batches).
            total = lambda value: Metric(value=float(value) * dp_size, aggregation=AggregationType.SUM)  # noqa: E731
            # What this micro-batch holds per rank, student + teacher tokens (the teacher_in_token_budget check).
            tokens = data["input_ids"].offsets().diff().sum() + teacher_tokens(data).sum()
            metrics["ssopd/micro_batch_tokens_max"] = Metric(value=float(tokens), aggregation=AggregationType.MAX)
            # Same normalisation and aggregation (SUM over micro-batches) as verl's actor/pg_loss metric.
            metrics["ssopd/distill_loss"] = Metric(value=distill.detach(), aggregation=AggregationType.SUM)
            metrics["ssopd/teacher_time_s"] = Metric(value=self._teacher_seconds, aggregation=AggregationType.SUM)
            self._teacher_seconds = 0.0
            target_mask = mask * (weights > 0).unsqueeze(-1).to(mask.dtype)
            metrics[COUNT] = total(target_mask.sum())
            for key, name in DIAGNOSTICS.items():
                value = (no_padding_2_padding(model_output[key], data) * target_mask).sum()
                metrics[SUM_PREFIX + name] = total(value)
            metrics["ssopd/teacher_nonfinite"] = total((nonfinite * (weights > 0).unsqueeze(-1)).sum())
            step = tu.get_non_tensor_data(data, TOKEN_VIEW_STEP, None)
            if (step is not None and bool((weights > 0).any()) and _is_rank_zero()
                    and len(self.view_records) < self.ssopd.token_view_targets):  # fmt: skip
                self._collect_view(int(step), model_output, data, mask, weights)
        return policy_loss + self.ssopd.lam * distill, metrics

    def _collect_view(self, step: int, model_output, data: TensorDict, mask: torch.Tensor, weights) -> None:
        """Keep this micro-batch's targets for the token view (ssopd_verl.token_view), up to token_view_targets:
        per distilled token its loss, unclipped KL, teacher/student log-prob of the sampled token and the
        teacher's argmax; the teacher's whole prompt stands in for the witness (the witness row may sit in
        another micro-batch)."""
        per_token = {key: no_padding_2_padding(model_output[key], data).detach().float().cpu()
                     for key in (OUT_LOSS, "ssopd_kl", "ssopd_teacher_logp", "ssopd_student_logp", OUT_ARGMAX)}  # fmt: skip
        counts = mask.sum(-1).long().cpu()
        prompt_lens = data["prompts"].offsets().diff().cpu()
        scores = {key: data[key].float().cpu() if key in data.keys() else None for key in (TARGET_SCORE, WITNESS_SCORE)}
        reward = lambda key, row: (  # noqa: E731  (None: unknown, or the witness is a reference solution)
            None if scores[key] is None or not math.isfinite(float(scores[key][row])) else float(scores[key][row]))
        for row in torch.nonzero(weights > 0).flatten().tolist():
            if len(self.view_records) >= self.ssopd.token_view_targets:
                break
            n, p = int(counts[row]), int(prompt_lens[row])
            ids = data["input_ids"][row].cpu()
            teacher_ids = data[TEACHER_IDS][row].cpu()
            values = {key: per_token[key][row, :n].tolist() for key in per_token}
            self.view_records.append(dict(
                step=step, uid=f"row {len(self.view_records)}", weight=float(weights[row]),
                problem=ids[:p].tolist(), witness_ids=teacher_ids[: int(data[TEACHER_PROMPT_LEN][row])].tolist(),
                target_ids=ids[p : p + n].tolist(), loss=values[OUT_LOSS], kl=values["ssopd_kl"],
                teacher_logp=values["ssopd_teacher_logp"], student_logp=values["ssopd_student_logp"],
                teacher_argmax=[int(a) for a in values[OUT_ARGMAX]], witness_is_teacher_prompt=True,
                reward_target=reward(TARGET_SCORE, row), reward_witness=reward(WITNESS_SCORE, row),
            ))  # fmt: skip


class _ZeroLoss(torch.autograd.Function):
    """Per-position zeros of (N, V) logits, differentiable, whose backward returns no gradient (None: autograd adds
    nothing into the logits' gradient and allocates nothing for it)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        return logits.new_zeros(logits.shape[0], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return None


def _clock(device: torch.device) -> float:
    """`time.perf_counter()` once the device has run every kernel queued so far: the teacher forward and the loss
    are asynchronous on an accelerator, and the clock alone would miss their last kernels (or count the student
    forward's)."""
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        module.synchronize(device)
    return time.perf_counter()


def _elapsed(started: float, device: torch.device) -> float:
    return _clock(device) - started


def _hook_outputs(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logits hook's per-position outputs, shaped (1, N), always in the order of HOOK_OUTPUTS: under Ulysses SP
    the engine all-gathers them key by key in dict order, so every rank of the group must list the same keys in
    the same order (a rank whose slice holds no distilled position included), or the gathers pair one rank's KL
    with another's flags."""
    return {key: values[key].unsqueeze(0) for key in HOOK_OUTPUTS}


def finalize_metrics(metrics: dict) -> dict:
    """The trainer's side of the layout-independent means: ``ssopd/<name>`` = the summed values over the summed
    count of distilled positions, for every diagnostic; the helper keys are removed. Absent when nothing was
    distilled (a mean over no position). ``metrics`` holds verl's reduced actor metrics with ``actor/`` stripped
    (each helper key the mean over mini-batches of a total, so the ratio is the step's)."""
    count = metrics.pop(COUNT, None)
    for name in DIAGNOSTICS.values():
        value = metrics.pop(SUM_PREFIX + name, None)
        if value is not None and count:
            metrics[f"ssopd/{name}"] = float(value) / float(count)
    return metrics


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _padded(data: TensorDict, key: str) -> torch.Tensor:
    value = data[key]
    return value.to_padded_tensor(0) if value.is_nested else value


def _row_temperature(data: TensorDict, num_rows: int) -> torch.Tensor:
    temperature = data["temperature"]
    if isinstance(temperature, torch.Tensor):
        return temperature.float().reshape(-1).expand(num_rows) if temperature.numel() == 1 else temperature.float()
    return torch.full((num_rows,), float(temperature))
