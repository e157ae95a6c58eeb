"""SSOPD across ranks (separate processes, gloo, verl's FSDP2 engine on CPU): one batch, three layouts.

The same 8 rows (two groups of 4 and some filler; 4 target rows) run one forward-backward on one rank, on two
data-parallel ranks and under Ulysses sequence parallelism 2, then through verl's own metric path (all-gather
over the data-parallel group, `Metric.aggregate_dp`, the trainer's `finalize_metrics`). Every layout must give:

* the same `ssopd/*` metrics and `actor/pg_loss` (shares in [0, 1]); before, two data-parallel ranks crashed in
  `aggregate_dp` when their micro-batches held targets unevenly, and Ulysses shares read > 1;
* the same gradient of every parameter (fp32, 1e-5);
* a distillation term equal to one computed from plain transformers forwards.

Collectives: the teacher forward's token budget is below two teacher sequences, so a micro-batch with two targets
runs two forwards; the data-parallel rank without any target must run as many one-token dummies to keep every
collective in step (a mismatch would hang, and the test would time out). Under Ulysses, each rank holds half of
every packed micro-batch: in the first micro-batch the second half holds no distilled token, in the second a
target straddles the halves, in the third two targets need two teacher pieces.
"""

import json
import textwrap

import pytest
import torch

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.distill_plan import plan_distillation
from ssopd_verl.losses import clipped_forward_kl
from ranks import run_ranks

N, TEMPERATURE = 4, 1.0
PROBLEMS = ["What is 2+3?", "What is 7*6?"]
TEXTS = [["I guess \\boxed{6}", "2+3=5 \\boxed{5}", "Let me think. 2 and 3 make 7, surely \\boxed{7}", "\\boxed{1}"],
         ["7*6=42 \\boxed{42}", "Seven sixes: 42. \\boxed{42}", "\\boxed{40}", "Hmm, 7*6 is 48 I think \\boxed{48}"]]
SCORES = [0, 1, 0, 0, 1, 1, 0, 0]

# argv: model path, rows (JSON), teacher token budget, Ulysses SP size, path for rank 0's gradients. One
# forward-backward, then verl's own metric path (all-gather over the data-parallel group, Metric.aggregate_dp) and
# the trainer's finalize_metrics; rank 0 saves every parameter's full gradient.
RANK_SCRIPT = textwrap.dedent(
    """
    import functools, json, sys
    import torch
    from torch.distributed.tensor import DTensor
    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine, make_train_tensordict, build_actor_config
    from ssopd_verl.glue.actor_loss import SSOPDActorLoss, mark_for_distillation, ROW_WEIGHT, TEACHER_IDS, TEACHER_PROMPT_LEN
    from ssopd_verl.config import SSOPDConfig
    from verl.workers.utils.losses import ppo_loss

    model_path, rows, budget, sp, grads_path = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    engine = build_cpu_fsdp2_engine(model_path, micro_batch_size_per_gpu=2, ulysses_sequence_parallel_size=sp)
    td = make_train_tensordict(
        [r["prompt"] for r in rows], [r["response"] for r in rows], temperature=1.0, engine=engine,
        global_batch_size=8, compute_loss=True,
        fields={
            "advantages": [torch.full((len(r["response"]),), float(r.get("advantage", 0.0))) for r in rows],
            "old_log_probs": [torch.zeros(len(r["response"])) for r in rows],
            TEACHER_IDS: [torch.tensor(r["teacher_ids"] or [0]) for r in rows],
            TEACHER_PROMPT_LEN: torch.tensor([r["teacher_prompt_len"] for r in rows]),
            ROW_WEIGHT: torch.tensor([r["weight"] for r in rows], dtype=torch.float32),
        },
    )
    cfg = SSOPDConfig()
    mark_for_distillation(td, cfg)
    loss = SSOPDActorLoss(functools.partial(ppo_loss, config=build_actor_config()), cfg, rollout_n=4, engine=engine,
                          teacher_max_tokens=budget)
    from verl.utils.metric import Metric
    from verl.utils.torch_functional import allgather_dict_into_dict
    from ssopd_verl.glue.actor_loss import finalize_metrics
    with engine.train_mode():
        engine.optimizer_zero_grad()
        out = engine.forward_backward_batch(td, loss_function=loss, forward_only=False)
        grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                 for name, p in engine.module.named_parameters() if p.grad is not None}
    if torch.distributed.get_rank() == 0:
        torch.save(grads, grads_path)
    gathered = allgather_dict_into_dict(out["metrics"], group=engine.get_data_parallel_group())
    final = finalize_metrics({k: float(Metric.aggregate_dp(v)) for k, v in gathered.items()
                              if k.startswith("ssopd/") or k == "actor/pg_loss"})
    final.pop("ssopd/teacher_time_s")
    print("RESULT", json.dumps({"metrics": final, "teacher_forwards": loss.teacher.forwards}))
    """
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ssopd_verl.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3_dp"), seed=1)


@pytest.fixture(scope="module")
def planned(model_path):
    """The 8 rows of two groups of 4, with SSOPD's plan: rows 2 and 7 are the targets."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    rows, messages = [], []
    for g, problem in enumerate(PROBLEMS):
        chat = [{"role": "user", "content": problem}]
        prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
        for text in TEXTS[g]:
            rows.append({"prompt": prompt, "response": tokenizer.encode(text, add_special_tokens=False) + eos})
            messages.append(chat)
    plan = plan_distillation(
        uids=[f"g{i // N}" for i in range(8)], scores=SCORES, response_ids=[r["response"] for r in rows],
        prompt_messages=messages, tokenizer=tokenizer, cfg=SSOPDConfig(), max_response_length=1000,
        max_teacher_length=None,
    )
    assert [i for i, w in enumerate(plan.weight) if w > 0] == [2, 7]
    for i, row in enumerate(rows):
        row.update(teacher_ids=plan.teacher_ids[i], teacher_prompt_len=plan.teacher_prompt_len[i], weight=plan.weight[i])
    return rows, plan, tokenizer


def test_one_rank_two_data_parallel_ranks_and_sequence_parallel_agree(model_path, planned, tmp_path):
    from transformers import AutoModelForCausalLM

    rows, plan, tokenizer = planned
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # A long row that is not a target, to put after a short target in one packed micro-batch.
    filler = dict(rows[4], response=tokenizer.encode("Seven sixes. " * 12, add_special_tokens=False) + [eos],
                  teacher_ids=None, teacher_prompt_len=0, weight=0.0)
    for i, row in enumerate(rows):
        row["advantage"] = (-1.0) ** i * 0.5  # a policy loss with a gradient: pg_loss is compared too
    filler["advantage"] = 0.25
    # Micro-batches of 2 rows, packed in order (one rank, and cut in two halves under Ulysses):
    #   [target 2, filler]: the second half holds no distilled token of row 2;
    #   [row 0, target 7]: target 7 straddles the halves;
    #   [target 2, target 7]: two targets, two teacher pieces (the budget below); [rows 1, 4]: no target.
    batch = [rows[2], filler, rows[0], rows[7], rows[2], rows[7], rows[1], rows[4]]
    first_len = len(rows[2]["prompt"]) + len(rows[2]["response"])
    packed = first_len + len(filler["prompt"]) + len(filler["response"])
    assert first_len - 2 < (packed + 1) // 2, "row 2 must lie wholly in the first rank's half"
    budget = (max(len(rows[i]["teacher_ids"]) for i in (2, 7)) + 1) // 2  # per rank: sp * budget < both together
    layouts = {  # per rank: its rows, the Ulysses size
        "one rank": ([batch], 1),
        # rank 0 every target (two micro-batches of two targets: 2 + 2 pieces), rank 1 none (4 dummy forwards)
        "data parallel 2": ([[rows[2], rows[7], rows[2], rows[7]], [filler, rows[0], rows[1], rows[4]]], 1),
        "sequence parallel 2": ([batch, batch], 2),
    }
    results, grads = {}, {}
    for name, (per_rank, sp) in layouts.items():
        path = tmp_path / f"{name}.pt"
        ranks = run_ranks(RANK_SCRIPT, [[model_path, json.dumps(r), str(budget), str(sp), str(path)] for r in per_rank])
        assert len({r["teacher_forwards"] for r in ranks}) == 1, ranks  # every rank in step with the collectives
        if sp == 2:  # both ranks of the SP group hold the whole (gathered) outputs
            assert ranks[0]["metrics"] == pytest.approx(ranks[1]["metrics"], rel=1e-6), ranks
        results[name], grads[name] = ranks[0], torch.load(path)
    assert results["one rank"]["teacher_forwards"] == 4  # 1 + 1 + 2 pieces (+ none for the last micro-batch)

    one = results["one rank"]["metrics"]
    assert one["ssopd/distill_loss"] > 0 and one["ssopd/kl_unclipped"] > 0 and one["actor/pg_loss"] != 0
    for share in ("ssopd/teacher_argmax_differs", "ssopd/clipped_teacher_mass", "ssopd/teacher_argmax_reversed",
                  "ssopd/reversed_teacher_mass"):  # fmt: skip
        assert 0 <= one[share] <= 1, share
    largest = max(g.abs().max() for g in grads["one rank"].values())
    assert largest > 0
    for name in ("data parallel 2", "sequence parallel 2"):
        got = results[name]["metrics"]
        assert got.keys() == one.keys(), name
        for key, value in one.items():
            if key == "ssopd/micro_batch_tokens_max":  # what one micro-batch holds: depends on the layout by design
                continue
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        assert grads[name].keys() == grads["one rank"].keys()
        for param, expected in grads["one rank"].items():
            torch.testing.assert_close(grads[name][param], expected, rtol=1e-5, atol=1e-5 * largest, msg=param)

    # the distillation term from plain transformers forwards: sum over targets of w * L_g / G (G = 8 / 4 prompts)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    expected = 0.0
    with torch.no_grad():
        for row in batch:
            if row["weight"] <= 0:
                continue
            p, t, r = len(row["prompt"]), row["teacher_prompt_len"], len(row["response"])
            student = model(input_ids=torch.tensor([row["prompt"] + row["response"]])).logits[0, p - 1 : p - 1 + r]
            teacher = model(input_ids=torch.tensor([row["teacher_ids"]])).logits[0, t - 1 : t - 1 + r]
            expected += row["weight"] * clipped_forward_kl(student, teacher, temperature=TEMPERATURE).mean().item()
    expected /= 8 / N
    # fp32: the loss scales by 1/temperature after the projection and sums 151k-entry rows in chunks, the reference
    # divides the logits first; the KL is a difference of nearly equal terms, so its relative error is ~1e-4. A
    # wrong data-parallel scale would be off by a factor of 2.
    assert one["ssopd/distill_loss"] == pytest.approx(expected, rel=1e-3)


# argv: the rank's student row lengths, its teacher lengths (JSON), the budget. verl's real dynamic batching.
BUDGET_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from tensordict import TensorDict
    from ssopd_verl.cpu.platform import init_gloo_process_group
    from ssopd_verl.glue.teacher_forward import student_token_budget
    from verl.utils.seqlen_balancing import rearrange_micro_batches

    student, teacher, budget = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    init_gloo_process_group()
    limit = student_token_budget(budget, student, teacher)
    ids = torch.nested.as_nested_tensor([torch.zeros(n, dtype=torch.long) for n in student], layout=torch.jagged)
    batch = TensorDict({"input_ids": ids, "teacher": torch.tensor(teacher)}, batch_size=[len(student)])
    micro, _ = rearrange_micro_batches(batch, max_token_len=limit, dp_group=torch.distributed.group.WORLD)
    tokens = [int(mb["input_ids"].offsets().diff().sum() + mb["teacher"].sum()) for mb in micro]
    print("RESULT", json.dumps({"limit": limit, "micro_batch_tokens": tokens}))
    """
)


def test_ranks_agree_on_the_student_token_budget():
    """The 8B launch script's budget (17,408 tokens per GPU). Rank 0 holds rows of 5,300 / 16,900 / 800 tokens, the
    first a target with a 9,496-token teacher sequence; rank 1's longest row is 17,300. A budget derived from rank
    0's rows alone, max(17408 // 2.79, 16900) = 16,900, is below rank 1's longest row: verl's
    rearrange_micro_batches (which checks every rank's rows against the longest row of all ranks) raised "A forced
    group exceeds max_token_len" on rank 0 while rank 1 waited in the next collective. Agreed over the ranks, the
    budget is 17,300 on both, and every micro-batch's student + teacher tokens stay within the 17,408 budget."""
    ranks = [([5300, 16900, 800], [9496, 0, 0]), ([17300, 1200, 900], [0, 0, 0])]
    results = run_ranks(BUDGET_SCRIPT, [[json.dumps(s), json.dumps(t), "17408"] for s, t in ranks])
    assert [r["limit"] for r in results] == [17300, 17300]
    assert len(results[0]["micro_batch_tokens"]) == len(results[1]["micro_batch_tokens"])  # verl's same count
    assert all(tokens <= 17408 for rank in results for tokens in rank["micro_batch_tokens"])

