"""SSOPD across ranks (separate processes, gloo, verl's FSDP2 engine on CPU).

Data parallelism: the distillation term does not depend on the data-parallel size, and a rank whose rows hold no
target still takes part in every collective. Rank 0 holds both targets, rank 1 none (it runs one-token dummy
teacher forwards). verl averages gradients over ranks, so the mean over ranks of each rank's
`ssopd/distill_loss` must equal the single-process value, computed here from plain transformers forwards. The
teacher forward's token budget is set to the longer teacher sequence, so rank 0 splits its two targets into two
forwards and rank 1 must run as many dummies to keep every collective in step (a mismatch would hang, and the
test would time out).

Ulysses sequence parallelism (size 2, one data-parallel rank): each rank holds half of every packed micro-batch,
student and teacher. The distillation loss and the gradient of every parameter equal a single-rank run's (fp32,
1e-5), on micro-batches built so that in one the second rank's half holds no distilled token, and in another a
target straddles the two halves and two targets need two teacher pieces.
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
RANK_ROWS = [[2, 7, 0, 1], [3, 4, 5, 6]]  # rows 2 and 7 are the targets (longest wrong of each group)

# argv: model path, rows (JSON), teacher token budget, Ulysses SP size, mode ("infer": the loss only; "grad": one
# forward-backward, rank 0 saves every parameter's full gradient to the path in argv[6]; "metrics": one
# forward-backward, then verl's own metric path: all-gather over the data-parallel group, Metric.aggregate_dp,
# then the trainer's finalize_metrics).
RANK_SCRIPT = textwrap.dedent(
    """
    import functools, json, sys
    import torch
    from torch.distributed.tensor import DTensor
    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine, make_train_tensordict, build_actor_config
    from ssopd_verl.glue.actor_loss import SSOPDActorLoss, mark_for_distillation, ROW_WEIGHT, TEACHER_IDS, TEACHER_PROMPT_LEN
    from ssopd_verl.config import SSOPDConfig
    from verl.workers.utils.losses import ppo_loss

    model_path, rows, budget, sp, mode = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    engine = build_cpu_fsdp2_engine(model_path, micro_batch_size_per_gpu=2, ulysses_sequence_parallel_size=sp)
    td = make_train_tensordict(
        [r["prompt"] for r in rows], [r["response"] for r in rows], temperature=1.0, engine=engine,
        global_batch_size=8, compute_loss=True,
        fields={
            # advantages 0: the policy loss has no gradient, so the gradient is the distillation term's alone
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
                          teacher_max_tokens=budget or None)
    if mode == "infer":
        with engine.eval_mode():
            out = engine.infer_batch(td, loss_function=loss)
    elif mode == "metrics":
        from verl.utils.metric import Metric
        from verl.utils.torch_functional import allgather_dict_into_dict
        from ssopd_verl.glue.actor_loss import finalize_metrics
        with engine.train_mode():
            out = engine.forward_backward_batch(td, loss_function=loss, forward_only=False)
        gathered = allgather_dict_into_dict(out["metrics"], group=engine.get_data_parallel_group())
        final = finalize_metrics({k: float(Metric.aggregate_dp(v)) for k, v in gathered.items()
                                  if k.startswith("ssopd/") or k == "actor/pg_loss"})
        final.pop("ssopd/teacher_time_s")
        print("RESULT", json.dumps(final))
        sys.exit(0)
    else:
        with engine.train_mode():
            engine.optimizer_zero_grad()
            out = engine.forward_backward_batch(td, loss_function=loss, forward_only=False)
            grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                     for name, p in engine.module.named_parameters() if p.grad is not None}
        if torch.distributed.get_rank() == 0:
            torch.save(grads, sys.argv[6])
    values = out["metrics"]["ssopd/distill_loss"]
    values = values if isinstance(values, list) else [values]
    total = sum(float(v.aggregate() if hasattr(v, "aggregate") else v) for v in values)
    print("RESULT", json.dumps({"distill": total, "teacher_forwards": loss.teacher.forwards}))
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


def test_distill_term_is_invariant_to_data_parallel_size(model_path, planned):
    from transformers import AutoModelForCausalLM

    rows, plan, _ = planned
    budget = max(len(plan.teacher_ids[i]) for i in (2, 7))  # both targets do not fit one forward
    results = run_ranks(RANK_SCRIPT, [[model_path, json.dumps([rows[i] for i in indices]), str(budget), "1", "infer"]
                                      for indices in RANK_ROWS])  # fmt: skip
    per_rank = [r["distill"] for r in results]
    assert per_rank[1] == 0.0  # the rank without targets contributes nothing (but ran its collectives)
    # rank 0's first micro-batch holds both targets: two pieces; its second none; rank 1 follows with dummies
    assert [r["teacher_forwards"] for r in results] == [2, 2]

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    expected = 0.0
    with torch.no_grad():
        for i in (2, 7):
            p, t, r = len(rows[i]["prompt"]), plan.teacher_prompt_len[i], len(rows[i]["response"])
            student = model(input_ids=torch.tensor([rows[i]["prompt"] + rows[i]["response"]])).logits[0, p - 1 : p - 1 + r]
            teacher = model(input_ids=torch.tensor([plan.teacher_ids[i]])).logits[0, t - 1 : t - 1 + r]
            expected += plan.weight[i] * clipped_forward_kl(student, teacher, temperature=TEMPERATURE).mean().item()
    expected /= 8 / N
    assert expected > 0
    # fp32: the loss scales by 1/temperature after the projection and sums 151k-entry rows in chunks, the reference
    # divides the logits first; the KL (2.5e-3) is a difference of nearly equal terms, so its relative error is ~1e-4.
    # A wrong data-parallel scale would be off by a factor of 2.
    assert sum(per_rank) / len(per_rank) == pytest.approx(expected, rel=1e-3)


def test_ulysses_sequence_parallel_equals_single_rank(model_path, planned, tmp_path):
    rows, plan, tokenizer = planned
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # A long row that is not a target, to put after a short target in one packed micro-batch.
    filler = dict(rows[4], response=tokenizer.encode("Seven sixes. " * 12, add_special_tokens=False) + [eos],
                  teacher_ids=None, teacher_prompt_len=0, weight=0.0)
    # Micro-batches of 2 rows, packed in order and cut in two halves by Ulysses:
    #   [target 2, filler]: the second half holds no distilled token of row 2;
    #   [row 0, target 7]: target 7 straddles the halves;
    #   [target 2, target 7]: two targets, two teacher pieces (the budget below), 7 straddling.
    batch = [rows[2], filler, rows[0], rows[7], rows[2], rows[7]]
    first_len = len(rows[2]["prompt"]) + len(rows[2]["response"])
    packed = first_len + len(filler["prompt"]) + len(filler["response"])
    last_distilled = first_len - 2  # the logit predicting row 2's last response token
    assert last_distilled < (packed + 1) // 2, "row 2 must lie wholly in the first rank's half"
    budget = (max(len(rows[i]["teacher_ids"]) for i in (2, 7)) + 1) // 2  # per rank: sp * budget < both together

    results = {}
    for sp in (1, 2):
        path = tmp_path / f"grads_sp{sp}.pt"
        args = [model_path, json.dumps(batch), str(budget), str(sp), "grad", str(path)]
        results[sp] = (run_ranks(RANK_SCRIPT, [args] * sp), torch.load(path))
    (single, single_grads), (ulysses, ulysses_grads) = results[1], results[2]
    assert single[0]["distill"] > 0
    for rank_result in ulysses:  # both ranks of the SP group hold the whole (gathered) loss
        assert rank_result["distill"] == pytest.approx(single[0]["distill"], rel=1e-5)
        assert rank_result["teacher_forwards"] == single[0]["teacher_forwards"] == 4  # 1 + 1 + 2 pieces
    assert single_grads.keys() == ulysses_grads.keys() and len(single_grads) > 0
    largest = max(g.abs().max() for g in single_grads.values())
    assert largest > 0
    for name, expected in single_grads.items():
        torch.testing.assert_close(ulysses_grads[name], expected, rtol=1e-5, atol=1e-5 * largest, msg=name)


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


def test_metrics_mean_the_same_on_one_rank_two_data_parallel_ranks_and_sequence_parallel(model_path, planned):
    """Every ssopd/* metric (and verl's actor/pg_loss) of one batch, through verl's own metric path (all-gather over
    the data-parallel group, Metric.aggregate_dp): one rank with 4 micro-batches, two data-parallel ranks with 2
    each (the targets on rank 0 only, in one micro-batch), and Ulysses SP 2. Before: DP 2 crashed in
    aggregate_dp ("All Metric instances must have the same number of values") whenever the ranks' micro-batches held
    targets unevenly, and the per-position means depended on the layout. Tolerance: fp32 sums in another order."""
    rows, _, _ = planned
    for i, row in enumerate(rows):
        row["advantage"] = (-1.0) ** i * 0.5  # a policy loss with a gradient, so pg_loss is not 0
    layouts = {
        "one rank": [[rows]],
        "data parallel 2": [[[rows[i] for i in indices]] for indices in RANK_ROWS],
        "sequence parallel 2": [[rows]] * 2,
    }
    results = {}
    for name, per_rank in layouts.items():
        sp = "2" if name == "sequence parallel 2" else "1"
        ranks = run_ranks(RANK_SCRIPT, [[model_path, json.dumps(r[0]), "0", sp, "metrics"] for r in per_rank])
        if sp == "2":  # both ranks of the SP group hold the whole (gathered) micro-batch outputs
            assert ranks[0] == pytest.approx(ranks[1], rel=1e-6), ranks
        results[name] = ranks[0]
    one = results["one rank"]
    assert one["ssopd/distill_loss"] > 0 and one["ssopd/kl_unclipped"] > 0 and one["actor/pg_loss"] != 0
    for share in ("ssopd/teacher_argmax_differs", "ssopd/clipped_teacher_mass"):
        assert 0 <= one[share] <= 1
    for name, got in results.items():
        assert got.keys() == one.keys(), name
        for key, value in one.items():
            if key == "ssopd/micro_batch_tokens_max":  # what one micro-batch holds: depends on the layout by design
                continue
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
