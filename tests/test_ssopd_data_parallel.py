"""Two data-parallel ranks (two processes, gloo, verl's FSDP2 engine): the distillation term does not depend on
the data-parallel size, and a rank whose rows hold no target still takes part in every collective.

Rank 0 holds both targets, rank 1 none (it runs one-token dummy teacher forwards). verl averages gradients
over ranks, so the mean over ranks of each rank's `ssopd/distill_loss` must equal the single-process value,
computed here from plain transformers forwards. The teacher forward's token budget is set to the longer teacher
sequence, so rank 0 splits its two targets into two forwards and rank 1 must run as many dummies to keep every
collective in step (a mismatch would hang, and the test would time out).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.distill_plan import plan_distillation
from ssopd_verl.losses import clipped_forward_kl

N, TEMPERATURE = 4, 1.0
PROBLEMS = ["What is 2+3?", "What is 7*6?"]
TEXTS = [["I guess \\boxed{6}", "2+3=5 \\boxed{5}", "Let me think. 2 and 3 make 7, surely \\boxed{7}", "\\boxed{1}"],
         ["7*6=42 \\boxed{42}", "Seven sixes: 42. \\boxed{42}", "\\boxed{40}", "Hmm, 7*6 is 48 I think \\boxed{48}"]]
SCORES = [0, 1, 0, 0, 1, 1, 0, 0]
RANK_ROWS = [[2, 7, 0, 1], [3, 4, 5, 6]]  # rows 2 and 7 are the targets (longest wrong of each group)

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoTokenizer
    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine, make_train_tensordict, build_actor_config
    from ssopd_verl.glue.actor_loss import SSOPDActorLoss, mark_for_distillation, ROW_WEIGHT, TEACHER_IDS, TEACHER_PROMPT_LEN
    from ssopd_verl.config import SSOPDConfig
    from verl.workers.utils.losses import ppo_loss
    import functools

    model_path, rows, budget = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    engine = build_cpu_fsdp2_engine(model_path, micro_batch_size_per_gpu=2)
    td = make_train_tensordict(
        [r["prompt"] for r in rows], [r["response"] for r in rows], temperature=1.0, engine=engine,
        global_batch_size=8, compute_loss=True,
        fields={
            "advantages": [torch.zeros(len(r["response"])) for r in rows],
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
    with engine.eval_mode():
        out = engine.infer_batch(td, loss_function=loss)
    values = out["metrics"]["ssopd/distill_loss"]
    values = values if isinstance(values, list) else [values]
    total = sum(float(v.aggregate() if hasattr(v, "aggregate") else v) for v in values)
    print("RESULT", json.dumps({"distill": total, "teacher_forwards": loss.teacher.forwards}))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ssopd_verl.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3_dp"), seed=1)


def test_distill_term_is_invariant_to_data_parallel_size(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    rows, messages = [], []
    for g, problem in enumerate(PROBLEMS):
        chat = [{"role": "user", "content": problem}]
        prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
        for text in TEXTS[g]:
            rows.append({"prompt": prompt, "response": tokenizer.encode(text, add_special_tokens=False) + eos})
            messages.append(chat)
    cfg = SSOPDConfig()
    plan = plan_distillation(
        uids=[f"g{i // N}" for i in range(8)], scores=SCORES, response_ids=[r["response"] for r in rows],
        prompt_messages=messages, tokenizer=tokenizer, cfg=cfg, max_response_length=1000, max_teacher_length=None,
    )
    assert [i for i, w in enumerate(plan.weight) if w > 0] == [2, 7]
    for i, row in enumerate(rows):
        row.update(teacher_ids=plan.teacher_ids[i], teacher_prompt_len=plan.teacher_prompt_len[i], weight=plan.weight[i])

    port = free_port()
    procs = []
    for rank, indices in enumerate(RANK_ROWS):
        env = {**os.environ, "VERL_PLATFORM": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        budget = max(len(plan.teacher_ids[i]) for i in (2, 7))  # both targets do not fit one forward
        args = [sys.executable, "-c", RANK_SCRIPT, model_path, json.dumps([rows[i] for i in indices]), str(budget)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads(out.split("RESULT", 1)[1]) for out, _ in outputs]
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
