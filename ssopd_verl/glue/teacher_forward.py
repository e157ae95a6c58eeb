"""The self-teacher's forward pass, run inside the actor update by the engine that holds the policy.

The teacher is the policy itself (same FSDP2 module, same weights, this very micro-batch), evaluated without
gradient on the teacher context: student prompt with the witness as a reference solution, then the target's
response ids verbatim (`ssopd_verl.teacher_context`). We take its *final hidden states* at the target's
response positions, not its logits: the vocabulary projection happens chunk by chunk inside
`ssopd_verl.losses.chunked_clipped_forward_kl`, so no [tokens x vocabulary] teacher tensor ever exists.

The inputs go through the engine's own `prepare_model_inputs`, so the teacher sees exactly the layout the
student saw (packed with remove-padding, or padded), and through the engine's module, so FSDP2 gathers and
reshards parameters as in any forward.

Which weights (`ssopd.teacher`): `live` runs the module as it is (with a LoRA actor: adapters on, i.e. the
adapter-merged policy). `initial` runs it inside the engine's `disable_adapter()` (verl's own context, the one its
reference pass uses for a LoRA actor): the base model, i.e. the policy at step 0, frozen, at no memory cost. It
needs a LoRA actor; with full fine-tuning the step-0 weights no longer exist in the actor (start-up refuses it).

Bounded pieces (``max_tokens``, the actor's dynamic-batch budget ``ppo_max_token_len_per_gpu``): the teacher
sequences of a micro-batch are packed, in order, into forwards of at most ``max_tokens`` tokens (a longer
sequence gets a forward of its own), so that no teacher forward holds more tokens than verl lets a student
forward hold. Every forward is a collective under FSDP2, so the ranks first agree on the number of forwards (an
all-reduce of the maximum) and a rank with fewer pieces, or no target at all, runs one-token dummy forwards.

The lm_head for the loss (``TeacherForward.head``): the teacher forward runs the output layer on one token
(``logits_to_keep=1``), for which FSDP2 gathers its weight anyway, in the forward's compute dtype (bf16 under
verl's mixed precision, cast from the fp32 master shards *before* the all-gather). A pre-hook on the output layer
copies that gathered weight: the loss projects the teacher states with exactly the weight the student's lm_head
used, and no further collective, fp32 copy or cast runs (`lm_head_weight`, a gather of its own, is kept for
callers outside a teacher forward). The copy lives from the teacher forward to the end of the logits hook only:
not held through the backward, where FSDP2 gathers the weight again for the student's gradient.

Ulysses sequence parallelism (``actor.fsdp_config.ulysses_sequence_parallel_size = sp > 1``): the ranks of an SP
group hold the same micro-batch, and the engine gives each the logits of one slice of the packed student sequence.
The teacher forward goes through the same ``prepare_model_inputs``, so each rank forwards one slice of the packed
teacher sequence (the attention's all-to-alls join them), then the slices' final states are all-gathered, without
gradient: [teacher tokens x hidden] per rank, never [tokens x vocabulary]. The loss reads, for each student position
of its own slice (:func:`local_positions`), the teacher state of the matching target token wherever it was computed.
A piece then holds up to ``max_tokens * sp`` tokens, ``max_tokens`` per rank, as verl sizes the student's
micro-batches under SP. Every rank of the group runs the same pieces, so the collectives stay in step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
from tensordict import TensorDict
from torch.distributed.tensor import DTensor

from verl.utils import tensordict_utils as tu
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.utils.ulysses import gather_outputs_and_unpad, get_ulysses_sequence_parallel_rank


def response_logit_positions(seq_starts: torch.Tensor, prompt_lens: torch.Tensor, resp_lens: torch.Tensor) -> torch.Tensor:
    """Flat positions of the logits that predict each response token, row after row.

    A sequence of `prompt_len + resp_len` tokens laid out from `seq_start` predicts response token `t` from
    the logits at `seq_start + prompt_len - 1 + t` (next-token prediction), for t in [0, resp_len).
    """
    pieces = [
        torch.arange(int(s) + int(p) - 1, int(s) + int(p) - 1 + int(r), dtype=torch.long)
        for s, p, r in zip(seq_starts.tolist(), prompt_lens.tolist(), resp_lens.tolist(), strict=True)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def local_positions(positions: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the packed-sequence ``positions`` lie in this rank's shard, and where in it.

    Under Ulysses SP the engine hands the logits hook this rank's slice of the packed (and padded) micro-batch:
    ``num_local`` positions starting at ``sp_rank * num_local`` (verl's ``ulysses_pad_and_slice_inputs``). Without
    SP the rank is 0 and every position is local. Returns (mask over ``positions``, local index of those kept).
    """
    start = get_ulysses_sequence_parallel_rank() * num_local
    keep = (positions >= start) & (positions < start + num_local)
    return keep, positions[keep] - start


def output_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The module's output projection (lm_head); refused when a LoRA adapter wraps it."""
    head = module.get_output_embeddings()
    if hasattr(head, "base_layer"):
        # A LoRA adapter on the output layer: its weight alone is not the projection the student used.
        raise NotImplementedError(
            "SSOPD projects the teacher with the lm_head weight: exclude lm_head from the LoRA target modules "
            "(actor_rollout_ref.model.target_modules; verl's default all-linear excludes it)"
        )
    return head


def lm_head_weight(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The output projection as a plain tensor, without gradient, in ``dtype`` (default: the weight's own).

    Outside a forward, FSDP2 holds the weight as a sharded DTensor: each rank casts its shard to ``dtype`` first,
    then `full_tensor()` gathers (a collective: every rank must call it), so a bf16 projection never makes an
    fp32 copy of the whole weight. The loss does not call this: it uses `TeacherForward.head` (no collective).
    """
    with torch.no_grad():
        weight = output_layer(module).weight.detach()
        if dtype is not None:
            weight = weight.to(dtype)
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        return weight


def pack_in_order(lengths: list[int], max_tokens: Optional[int]) -> list[list[int]]:
    """Indices of consecutive sequences grouped so that each group holds at most ``max_tokens`` tokens (a longer
    sequence alone); one group when ``max_tokens`` is None."""
    if max_tokens is None:
        return [list(range(len(lengths)))] if lengths else []
    groups, current, tokens = [], [], 0
    for i, n in enumerate(lengths):
        if current and tokens + n > max_tokens:
            groups.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    return groups + ([current] if current else [])


def student_token_budget(budget: int, student_lens: Sequence[int], teacher_lens: Sequence[int], sp: int = 1,
                         device=None, group=None) -> int:
    """The ``max_token_len_per_gpu`` to give verl's dynamic batching for an update whose rows also carry teacher
    sequences, so that no micro-batch holds more than ``budget`` student + teacher tokens per rank.

    verl forms micro-batches by student length alone (``seqlen_balancing.rearrange_micro_batches`` reads the
    ``input_ids`` offsets; it takes no per-row length), but ``TrainingWorker`` keeps a ``max_token_len_per_gpu`` the
    caller put in the batch. Each row carries at most ``r = max_i (s_i + t_i) / s_i`` times its student tokens in
    all (``t_i = 0`` for rows that are not targets), so micro-batches of at most ``budget / r`` student tokens hold
    at most ``budget`` tokens. Never below the longest row's share per rank, ``ceil(max_i s_i / sp)`` (verl requires
    a row to fit); a target longer than that on its own still has its teacher forward split (``TeacherForward``).

    The ranks must agree: ``rearrange_micro_batches`` checks every rank's rows against the longest row of *all*
    data-parallel ranks, so a rank whose own limit were lower would raise while the others wait in its next
    collective. ``r`` and the longest row are therefore the maxima over the ranks of ``group`` (an all-reduce,
    when torch.distributed is initialised; every rank calls this with its own rows), and every rank returns the
    same budget.
    """
    if not student_lens or min(student_lens) < 1:
        raise ValueError("student_token_budget needs at least one row and rows of >= 1 token")
    ratio = max((s + t) / s for s, t in zip(student_lens, teacher_lens, strict=True))
    ratio, longest = agreed_max([ratio, float(max(student_lens))], device=device, group=group)
    return max(int(budget // ratio), -(-int(longest) // sp))


def agreed_max(values: list[float], device=None, group=None) -> list[float]:
    """The element-wise maximum of ``values`` over the ranks of ``group`` (the values themselves without
    torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=group)
    return tensor.tolist()


def agreed_count(count: int, device) -> int:
    """The largest ``count`` over all ranks (every rank must call the sharded module the same number of times)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    value = torch.tensor([count], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


class TeacherForward:
    """Runs the teacher over a list of sequences with the engine's module and returns per-position states."""

    def __init__(self, engine, adapters: bool = True, max_tokens: Optional[int] = None):
        self.engine = engine
        self.adapters = adapters  # False: run the base model (ssopd.teacher=initial with a LoRA actor)
        if max_tokens is not None and int(max_tokens) < 1:
            raise ValueError(f"teacher forward max_tokens must be >= 1 or None, got {max_tokens!r}")
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.forwards = 0  # teacher forwards run (dummies included), for tests and benchmarks
        # The output layer's weight as the last teacher forward gathered it (module docstring); `take_head` hands
        # it over and drops it.
        self._head: Optional[torch.Tensor] = None
        if not adapters and not hasattr(engine.module, "disable_adapter"):
            raise ValueError(
                "ssopd.teacher=initial needs a LoRA actor (actor_rollout_ref.model.lora_rank > 0): the frozen "
                "initial teacher is the base model with the adapters disabled"
            )

    def hidden_states(self, sequences: list[torch.Tensor], micro_batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (post-norm) hidden states of every token of `sequences`, packed: returns (states, starts).

        `states` is (total_tokens, hidden); `starts[i]` is where sequence i begins in it. Layout flags
        (remove-padding, pad mode) are taken from the student's micro-batch, so both sides match. With no
        sequences (a rank or micro-batch without targets) it still takes part in every forward, on one token of
        the micro-batch, and returns empty tensors.
        """
        lengths = [len(s) for s in sequences]
        groups = pack_in_order(lengths, None if self.max_tokens is None else self.max_tokens * self._sp_size())
        total = agreed_count(len(groups), micro_batch["input_ids"].device)
        self._head = None
        states = [self._forward([sequences[i] for i in group], micro_batch, keep_head=True) for group in groups]
        for _ in range(total - len(groups)):  # collectives in step with the rank that has the most pieces
            self._forward([micro_batch["input_ids"][0][:1]], micro_batch, keep_head=False)
        if not sequences:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        lengths = torch.tensor(lengths)
        return torch.cat(states), torch.cumsum(lengths, 0) - lengths

    def take_head(self) -> torch.Tensor:
        """The lm_head weight of the last teacher forward, in its compute dtype (module docstring), released here
        so that it is not held through the backward pass."""
        if self._head is None:
            raise RuntimeError("TeacherForward.take_head: no teacher forward has run since the last call")
        head, self._head = self._head, None
        return head

    def _sp_size(self) -> int:
        """The Ulysses sequence-parallel size of the engine (1 without SP)."""
        return self.engine.ulysses_sequence_parallel_size if getattr(self.engine, "use_ulysses_sp", False) else 1

    def _forward(self, sequences: list[torch.Tensor], micro_batch: TensorDict, keep_head: bool) -> torch.Tensor:
        """One forward of the engine's module over ``sequences``; their final hidden states, packed. ``keep_head``:
        copy the output layer's gathered weight for `take_head` (not in dummy forwards: nobody would take it)."""
        self.forwards += 1
        device = micro_batch["input_ids"].device
        ids = torch.nested.as_nested_tensor([s.to(device) for s in sequences], layout=torch.jagged)
        positions = torch.nested.as_nested_tensor(
            [torch.arange(len(s), device=device) for s in sequences], layout=torch.jagged
        )
        batch = TensorDict(
            {"input_ids": ids, "position_ids": positions, "temperature": torch.ones(len(sequences), device=device)},
            batch_size=[len(sequences)],
        )
        for key in ("use_remove_padding", "pad_mode"):
            value = tu.get_non_tensor_data(data=micro_batch, key=key, default=None)
            if value is not None:
                tu.assign_non_tensor(batch, **{key: value})
        tu.assign_non_tensor(batch, use_fused_kernels=False)
        if tu.get_non_tensor_data(data=batch, key="pad_mode", default=DatasetPadMode.NO_PADDING) != DatasetPadMode.NO_PADDING:
            raise NotImplementedError("SSOPD's teacher forward supports verl's NO_PADDING layout only")

        # Under Ulysses SP this pads the packed teacher sequence to a multiple of sp and keeps this rank's shard.
        model_inputs, output_args = self.engine.prepare_model_inputs(micro_batch=batch)
        lengths = torch.tensor([len(s) for s in sequences])
        captured = {}

        def keep_last_hidden_state(_module, _inputs, output):
            captured["states"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        # The decoder's output is the final (post-norm) hidden state. A hook on it, rather than
        # output_hidden_states=True, which would keep every layer's states alive. The call goes through the root
        # module so that FSDP2 gathers the root-owned parameters (embeddings, norm) as in any forward.
        def keep_head_weight(head, _inputs):
            # Runs after FSDP2's own pre-forward hook has gathered the weight (registered first): the gathered
            # compute-dtype tensor, freed again by FSDP2 after the layer, hence the copy. A still-sharded DTensor
            # would mean another FSDP hook order: gathered here in the compute dtype then, a collective, so on
            # every rank and in every forward alike, dummies included (kept only where asked).
            weight = head.weight.detach()
            if isinstance(weight, DTensor):
                weight = weight.full_tensor()
            elif keep_head:
                weight = weight.clone()
            if keep_head:
                self._head = weight

        handle = self.engine.module.get_decoder().register_forward_hook(keep_last_hidden_state)
        head_handle = output_layer(self.engine.module).register_forward_pre_hook(keep_head_weight)
        try:
            weights = contextlib.nullcontext() if self.adapters else self.engine.disable_adapter()
            with torch.no_grad(), weights:
                # logits_to_keep=1: the teacher's logits are projected chunkwise by the loss, never here.
                self.engine.module(**model_inputs, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
            head_handle.remove()
        states = captured["states"]
        if self._sp_size() > 1:
            # This rank's shard of the packed teacher sequence -> all of it, as verl gathers the student's outputs
            # (no gradient: the teacher is stop-gradient). The loss then reads the teacher state of any position.
            states = gather_outputs_and_unpad(states, gather_dim=1, unpad_dim=1, padding_size=output_args["pad_size"],
                                              grad_scaler=False)  # fmt: skip
        if tu.get_non_tensor_data(data=batch, key="use_remove_padding", default=True):
            states = states.reshape(-1, states.shape[-1])[: int(lengths.sum())]  # packed (1, total [+pad], H)
        else:
            # padded (b, max_len, H): keep each row's real tokens, in the packed layout
            states = torch.cat([states[i, :n] for i, n in enumerate(lengths.tolist())])
        return states.detach()
