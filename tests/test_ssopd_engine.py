"""SSOPD on verl's real FSDP2 engine, on CPU, in one process (gloo, tiny random Qwen3 with the real vocabulary).

What is checked against plain transformers fp32 forwards and `ssopd_verl.losses.clipped_forward_kl`:
* the teacher forward run by the engine inside the loss gives the teacher's log-probs (1e-5);
* the logits hook's per-position loss and its gradient w.r.t. the student logits equal the reference, and the
  teacher side (the module's parameters) receives no gradient from it;
* one actor update with SSOPD pairs in the batch reports the distillation term the reference predicts, and
  it is invariant to the micro-batch size;
* with lambda = 0 the update equals plain GRPO (verl's `ppo_loss`) bit for bit; with lambda > 0 it does not.
"""

import functools

import pytest
import torch

from ssopd_verl.config import SSOPDConfig
from ssopd_verl.distill_plan import plan_distillation
from ssopd_verl.losses import clipped_forward_kl

N = 4  # completions per prompt
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ssopd_verl.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), seed=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()


def new_engine(model_path, **kw):
    from ssopd_verl.cpu.engine import build_cpu_fsdp2_engine

    return build_cpu_fsdp2_engine(model_path, lr=1e-2, seed=0, **kw)


@pytest.fixture(scope="module")
def engine(model_path):
    return new_engine(model_path)


@pytest.fixture(scope="module")
def groups(tokenizer):
    """Two prompts x 4 completions: group a has 1/4 correct, group b 2/4 (both frontier groups)."""
    problems = ["What is 2+3?", "What is 7*6?"]
    texts = [
        ["I guess \\boxed{6}", "2+3=5 \\boxed{5}", "Let me think. 2 and 3 make 7, surely \\boxed{7}", "\\boxed{1}"],
        ["7*6=42 \\boxed{42}", "Seven sixes: 42. \\boxed{42}", "\\boxed{40}", "Hmm, 7*6 is 48 I think \\boxed{48}"],
    ]
    scores = [[0, 1, 0, 0], [1, 1, 0, 0]]
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    rows = []
    for g, problem in enumerate(problems):
        messages = [{"role": "user", "content": problem}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
        for text, score in zip(texts[g], scores[g]):
            rows.append(dict(uid=f"g{g}", prompt=prompt, messages=messages, score=score,
                             response=tokenizer.encode(text, add_special_tokens=False) + eos))
    return rows


def plan_for(groups, tokenizer, cfg):
    return plan_distillation(
        uids=[r["uid"] for r in groups],
        scores=[r["score"] for r in groups],
        response_ids=[r["response"] for r in groups],
        prompt_messages=[r["messages"] for r in groups],
        tokenizer=tokenizer,
        cfg=cfg,
        max_response_length=1000,
        max_teacher_length=None,
    )


def make_batch(groups, plan, engine, old_log_probs=None, **non_tensor):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    from ssopd_verl.cpu.engine import make_train_tensordict
    from ssopd_verl.glue.actor_loss import ROW_WEIGHT, TEACHER_IDS, TEACHER_PROMPT_LEN

    responses = [r["response"] for r in groups]
    width = max(map(len, responses))
    rewards = torch.zeros(len(groups), width)
    mask = torch.zeros(len(groups), width)
    for i, r in enumerate(responses):
        rewards[i, len(r) - 1] = groups[i]["score"]
        mask[i, : len(r)] = 1
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, index=[r["uid"] for r in groups])
    fields = {
        "advantages": [adv[i, : len(r)] for i, r in enumerate(responses)],
        "old_log_probs": old_log_probs or [torch.zeros(len(r)) for r in responses],
        TEACHER_IDS: [torch.tensor(ids or [0]) for ids in plan.teacher_ids],
        TEACHER_PROMPT_LEN: torch.tensor(plan.teacher_prompt_len),
        ROW_WEIGHT: torch.tensor(plan.weight, dtype=torch.float32),
    }
    return make_train_tensordict(
        [r["prompt"] for r in groups], responses, temperature=TEMPERATURE, fields=fields, engine=engine,
        global_batch_size=len(groups), **non_tensor,
    )


def actor_loss(cfg, engine):
    from verl.workers.utils.losses import ppo_loss

    from ssopd_verl.cpu.engine import build_actor_config
    from ssopd_verl.glue.actor_loss import SSOPDActorLoss

    base = functools.partial(ppo_loss, config=build_actor_config())
    return SSOPDActorLoss(base_loss=base, ssopd=cfg, rollout_n=N, engine=engine)


def reference_terms(hf_model, groups, plan, cfg):
    """Per-target (student logits, reference per-token loss) from plain transformers forwards."""
    out = {}
    with torch.no_grad():
        for row in [i for i, w in enumerate(plan.weight) if w > 0]:
            g = groups[row]
            student = hf_model(input_ids=torch.tensor([g["prompt"] + g["response"]])).logits[0]
            teacher = hf_model(input_ids=torch.tensor([plan.teacher_ids[row]])).logits[0]
            p, t, r = len(g["prompt"]), plan.teacher_prompt_len[row], len(g["response"])
            out[row] = (student[p - 1 : p - 1 + r], teacher[t - 1 : t - 1 + r])
    return out


@pytest.mark.parametrize("use_remove_padding", [True, False])
def test_teacher_forward_matches_transformers(engine, hf_model, groups, tokenizer, use_remove_padding):
    from ssopd_verl.glue.teacher_forward import TeacherForward, lm_head_weight

    plan = plan_for(groups, tokenizer, SSOPDConfig())
    td = make_batch(groups, plan, engine, use_remove_padding=use_remove_padding)
    sequences = [torch.tensor(plan.teacher_ids[i]) for i, w in enumerate(plan.weight) if w > 0]
    assert len(sequences) == 2
    with engine.eval_mode():
        states, starts = TeacherForward(engine).hidden_states(sequences, td)
        weight = lm_head_weight(engine.module)
    for seq, start in zip(sequences, starts.tolist()):
        got = torch.log_softmax(states[start : start + len(seq)] @ weight.T, dim=-1)
        with torch.no_grad():
            want = torch.log_softmax(hf_model(input_ids=seq[None]).logits[0], dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("clip", ["pointwise", "token", "none"])
def test_logits_hook_equals_reference_and_teacher_gets_no_gradient(engine, hf_model, groups, tokenizer, clip):
    cfg = SSOPDConfig(clip=clip, tau=0.05 if clip == "pointwise" else 1.0, chunk_size=3)
    plan = plan_for(groups, tokenizer, cfg)
    td = make_batch(groups, plan, engine)
    loss_fn = actor_loss(cfg, engine)

    with torch.no_grad():
        packed = torch.cat([hf_model(input_ids=torch.tensor([g["prompt"] + g["response"]])).logits[0] for g in groups])
    student = (packed / TEMPERATURE).requires_grad_(True)
    engine.optimizer_zero_grad()
    with engine.eval_mode():
        out = loss_fn(student_logits=student[None], data=td)
    from ssopd_verl.glue.actor_loss import DIAGNOSTICS, OUT_ARGMAX, OUT_LOSS, OUT_NONFINITE

    assert set(out) == {OUT_LOSS, OUT_NONFINITE, OUT_ARGMAX, *DIAGNOSTICS}
    assert all(v.shape == (1, packed.shape[0]) for v in out.values())
    upstream = torch.rand(packed.shape[0])
    # As in verl's engine, the policy loss reads the same logits (log-probabilities of the sampled tokens): the
    # distillation gradient is added into its gradient (gradient_sink), so the total is what both give.
    labels = torch.randint(0, packed.shape[1], (packed.shape[0],), generator=torch.Generator().manual_seed(0))
    policy = lambda logits: torch.log_softmax(logits, -1).gather(-1, labels[:, None]).sum()  # noqa: E731
    ((out["ssopd_loss"][0] * upstream).sum() + policy(student)).backward()
    assert all(p.grad is None or not p.grad.any() for p in engine.module.parameters()), "teacher got a gradient"

    # reference: same student logits (a fresh leaf), teacher logits from a plain forward
    ref_student = (packed / TEMPERATURE).requires_grad_(True)
    ref = torch.zeros(packed.shape[0])
    starts = torch.cumsum(torch.tensor([len(g["prompt"]) + len(g["response"]) for g in groups]), 0).tolist()
    starts = [0] + starts[:-1]
    for row, (_, teacher) in reference_terms(hf_model, groups, plan, cfg).items():
        g = groups[row]
        pos = torch.arange(len(g["response"])) + starts[row] + len(g["prompt"]) - 1
        ref = ref.index_put((pos,), clipped_forward_kl(
            ref_student[pos] * TEMPERATURE, teacher, tau=cfg.tau, clip=clip, temperature=TEMPERATURE
        ))
        # the teacher's argmax, for the token view (fp32 logits from two code paths: allow a near-tie to differ)
        assert (out[OUT_ARGMAX][0][pos].long() == teacher.argmax(-1)).float().mean() > 0.95
    ((ref * upstream).sum() + policy(ref_student)).backward()
    torch.testing.assert_close(out["ssopd_loss"][0].detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student.grad, ref_student.grad, atol=1e-6, rtol=1e-5)
    assert ref.abs().sum() > 0


def gradients(engine, td, loss_fn):
    """Parameter gradients of one forward/backward over the batch (every micro-batch), as full tensors."""
    with engine.train_mode():
        engine.optimizer_zero_grad()
        engine.forward_backward_batch(td, loss_function=loss_fn)
        grads = {n: p.grad.full_tensor().clone() for n, p in engine.module.named_parameters() if p.grad is not None}
        engine.optimizer_zero_grad()
    return grads


def test_lambda_zero_is_grpo_bit_for_bit(engine, groups, tokenizer):
    from verl.workers.utils.losses import ppo_loss

    from ssopd_verl.cpu.engine import build_actor_config
    from ssopd_verl.glue.actor_loss import mark_for_distillation

    def grads_for(cfg, loss_fn):
        td = make_batch(groups, plan_for(groups, tokenizer, cfg), engine)
        mark_for_distillation(td, cfg)  # the worker's update_actor does exactly this
        return gradients(engine, td, loss_fn)

    zero = SSOPDConfig(lam=0.0)
    grpo = grads_for(zero, functools.partial(ppo_loss, config=build_actor_config()))
    ssopd_zero = grads_for(zero, actor_loss(zero, engine))
    ssopd_one = grads_for(SSOPDConfig(), actor_loss(SSOPDConfig(), engine))
    assert grpo and set(grpo) == set(ssopd_zero) == set(ssopd_one)
    assert all(torch.equal(grpo[k], ssopd_zero[k]) for k in grpo)
    assert any(not torch.equal(grpo[k], ssopd_one[k]) for k in grpo), "lambda > 0 changed nothing"


def _metric_sum(output, key):
    values = output["metrics"][key]
    values = values if isinstance(values, list) else [values]
    return sum(float(getattr(v, "value", v) if not hasattr(v, "aggregate") else v.aggregate()) for v in values)


@pytest.mark.parametrize("micro_batch_size", [1, 2, 8])
def test_distill_term_matches_reference_at_any_micro_batch_size(engine, hf_model, groups, tokenizer, micro_batch_size):
    cfg = SSOPDConfig()
    plan = plan_for(groups, tokenizer, cfg)
    td = make_batch(groups, plan, engine, micro_batch_size_per_gpu=micro_batch_size, compute_loss=True)
    from ssopd_verl.glue.actor_loss import mark_for_distillation

    mark_for_distillation(td, cfg)
    with engine.eval_mode():
        output = engine.infer_batch(td, loss_function=actor_loss(cfg, engine))
    expected = 0.0
    for row, (student, teacher) in reference_terms(hf_model, groups, plan, cfg).items():
        per_token = clipped_forward_kl(student, teacher, tau=cfg.tau, temperature=TEMPERATURE)
        expected += plan.weight[row] * per_token.mean().item()
    expected /= len(groups) / N  # G = global_batch_size / n prompts
    assert expected > 0
    assert _metric_sum(output, "ssopd/distill_loss") == pytest.approx(expected, rel=5e-5)  # fp32 over 151k entries


def test_one_actor_update_with_pairs(engine, groups, tokenizer):
    # Last in the file: it moves the shared engine's weights away from the checkpoint the other tests compare to.
    from ssopd_verl.glue.actor_loss import mark_for_distillation

    cfg = SSOPDConfig()
    td = make_batch(groups, plan_for(groups, tokenizer, cfg), engine)
    mark_for_distillation(td, cfg)
    before = {k: v.clone() for k, v in engine.get_per_tensor_param()[0]}
    with engine.train_mode():
        output = engine.train_batch(td, loss_function=actor_loss(cfg, engine))
    after = dict(engine.get_per_tensor_param()[0])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from ssopd_verl.glue.actor_loss import finalize_metrics

    # the trainer's view: per-position means from the summed values and counts (finalize_metrics)
    metrics = finalize_metrics({key: _metric_sum(output, key) for key in output["metrics"] if key.startswith("ssopd/")})
    for key in ("ssopd/distill_loss", "ssopd/kl_unclipped", "ssopd/clipped_teacher_mass", "ssopd/teacher_logp_sampled"):
        value = metrics[key]
        assert value == value and abs(value) < float("inf"), key
    assert metrics["ssopd/distill_loss"] > 0 and 0 <= metrics["ssopd/teacher_argmax_differs"] <= 1


# ---------------------------------------------------------------- LoRA actor: live and initial teacher


@pytest.fixture(scope="module")
def lora_engine(model_path):
    """A LoRA actor (rank 4, all linear layers but lm_head) whose adapters are random, not verl's zero init:
    with lora_B = 0 the merged and base models would coincide and the test could not tell them apart."""
    engine = new_engine(model_path, lora_rank=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if "lora_" in name:
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(torch.randn(local.shape, generator=gen) * 0.1)
    return engine


def _lora_reference(model_path, engine, merged: bool):
    """A plain transformers model: the base checkpoint, or it with the engine's adapters merged (peft)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    if not merged:
        return model
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    adapters = {n: p.full_tensor() for n, p in engine.module.named_parameters() if "lora_" in n}
    missing = set(adapters) - set(dict(peft.named_parameters()))
    assert not missing, missing
    peft.load_state_dict(adapters, strict=False)
    return peft.merge_and_unload().eval()


@pytest.mark.parametrize("teacher", ["live", "initial"])
def test_lora_teacher_states_equal_merged_or_base_model(lora_engine, model_path, groups, tokenizer, teacher):
    from ssopd_verl.glue.teacher_forward import TeacherForward, lm_head_weight

    plan = plan_for(groups, tokenizer, SSOPDConfig(teacher=teacher))
    td = make_batch(groups, plan, lora_engine)
    sequences = [torch.tensor(plan.teacher_ids[i]) for i, w in enumerate(plan.weight) if w > 0]
    with lora_engine.eval_mode():
        states, starts = TeacherForward(lora_engine, adapters=teacher == "live").hidden_states(sequences, td)
        weight = lm_head_weight(lora_engine.module)
    reference = _lora_reference(model_path, lora_engine, merged=teacher == "live")
    other = _lora_reference(model_path, lora_engine, merged=teacher != "live")
    for seq, start in zip(sequences, starts.tolist()):
        got = torch.log_softmax(states[start : start + len(seq)] @ weight.T, dim=-1)
        with torch.no_grad():
            want = torch.log_softmax(reference(input_ids=seq[None]).logits[0], dim=-1)
            wrong = torch.log_softmax(other(input_ids=seq[None]).logits[0], dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (got - wrong).abs().max() > 1e-2  # the adapters matter: the test can tell the two apart


def test_initial_teacher_refuses_a_full_fine_tuning_actor(engine):
    from ssopd_verl.glue.teacher_forward import TeacherForward

    with pytest.raises(ValueError, match="lora_rank"):
        TeacherForward(engine, adapters=False)


@pytest.mark.parametrize("teacher", ["live", "initial"])
def test_lora_update_changes_only_adapters(model_path, groups, tokenizer, teacher):
    from ssopd_verl.glue.actor_loss import mark_for_distillation

    engine = new_engine(model_path, lora_rank=4, lora_alpha=8)
    cfg = SSOPDConfig(teacher=teacher)
    td = make_batch(groups, plan_for(groups, tokenizer, cfg), engine)
    mark_for_distillation(td, cfg)
    before = {n: p.full_tensor().clone() for n, p in engine.module.named_parameters()}
    with engine.train_mode():
        output = engine.train_batch(td, loss_function=actor_loss(cfg, engine))
    after = {n: p.full_tensor() for n, p in engine.module.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert _metric_sum(output, "ssopd/distill_loss") > 0


def test_teacher_sequences_are_packed_in_order_within_the_token_budget():
    from ssopd_verl.glue.teacher_forward import pack_in_order

    assert pack_in_order([3, 4, 5], 7) == [[0, 1], [2]]
    assert pack_in_order([9, 1, 1], 5) == [[0], [1, 2]]  # a sequence longer than the budget gets its own forward
    assert pack_in_order([3, 4, 5], None) == [[0, 1, 2]]
    assert pack_in_order([], 7) == [] and pack_in_order([], None) == []


def test_student_token_budget_leaves_room_for_the_teacher():
    from ssopd_verl.glue.teacher_forward import student_token_budget

    # rows of 10 and 20 student tokens; the first is a target with a 30-token teacher sequence: ratio 4
    assert student_token_budget(100, [10, 20], [30, 0]) == 25
    assert student_token_budget(100, [10, 20], [0, 0]) == 100  # no target: verl's budget unchanged
    assert student_token_budget(40, [10, 20], [30, 0]) == 20  # never below the longest row (verl needs it to fit)
    assert student_token_budget(40, [10, 20], [30, 0], sp=2) == 10  # ... its share per rank under Ulysses SP
    with pytest.raises(ValueError):
        student_token_budget(100, [], [])


def test_dynamic_batches_count_teacher_tokens_and_keep_the_loss(engine, groups, tokenizer):
    """verl's dynamic batching with the student budget of `student_token_budget`: every micro-batch's student +
    teacher tokens fit the budget (verl's own split, counting student tokens only, overshoots it), and the
    distillation term equals the one of a single micro-batch."""
    from ssopd_verl.glue.actor_loss import TEACHER_IDS, mark_for_distillation
    from ssopd_verl.glue.teacher_forward import student_token_budget

    cfg = SSOPDConfig()
    plan = plan_for(groups, tokenizer, cfg)
    student = [len(r["prompt"]) + len(r["response"]) for r in groups]
    teacher = [len(ids) if w > 0 else 0 for ids, w in zip(plan.teacher_ids, plan.weight)]
    budget = max(s + t for s, t in zip(student, teacher))  # the largest row, teacher included, just fits
    results = {}
    for name, limit in [("whole", None), ("student_only", budget),
                        ("with_teacher", student_token_budget(budget, student, teacher))]:  # fmt: skip
        kw = ({"micro_batch_size_per_gpu": len(groups)} if limit is None
              else {"use_dynamic_bsz": True, "max_token_len_per_gpu": limit})  # fmt: skip
        td = make_batch(groups, plan, engine, compute_loss=True, **kw)
        mark_for_distillation(td, cfg)
        with engine.eval_mode():
            output = engine.infer_batch(td, loss_function=actor_loss(cfg, engine))
        metric = output["metrics"]["ssopd/micro_batch_tokens_max"]
        largest = max(float(m.aggregate()) for m in (metric if isinstance(metric, list) else [metric]))
        results[name] = (_metric_sum(output, "ssopd/distill_loss"), largest)
    assert results["student_only"][1] > budget >= results["with_teacher"][1]
    assert results["with_teacher"][0] == pytest.approx(results["whole"][0], rel=1e-5)
    assert results["student_only"][0] == pytest.approx(results["whole"][0], rel=1e-5)


def test_positions_with_a_nonfinite_teacher_are_left_out_of_the_target_mean():
    """L_g is the mean over the distilled positions that have a teacher distribution: a position whose teacher
    logits were NaN/inf reads 0 and is flagged, and must not count in the denominator (before: it diluted L_g).
    The loss pass alone, on per-position outputs as the logits hook returns them, with verl's real ppo_loss."""
    from verl.workers.utils.losses import ppo_loss

    from ssopd_verl.cpu.engine import build_actor_config, make_train_tensordict
    from ssopd_verl.glue.actor_loss import (COUNT, DIAGNOSTICS, OUT_ARGMAX, OUT_LOSS, OUT_NONFINITE, ROW_WEIGHT,
                                            TEACHER_IDS, TEACHER_PROMPT_LEN, SSOPDActorLoss, finalize_metrics)  # fmt: skip

    prompts, responses = [[1, 2, 3], [1, 2]], [[5, 6, 7, 8], [9, 9]]
    td = make_train_tensordict(prompts, responses, global_batch_size=4, dp_size=1, batch_num_tokens=6, fields={
        "advantages": [torch.zeros(4), torch.zeros(2)], "old_log_probs": [torch.zeros(4), torch.zeros(2)],
        TEACHER_IDS: [torch.arange(10), torch.tensor([0])], TEACHER_PROMPT_LEN: torch.tensor([6, 0]),
        ROW_WEIGHT: torch.tensor([0.5, 0.0]),
    })  # fmt: skip
    # row 0: prompt 3 + response 4; its response is predicted from positions 2..5; position 4 has no teacher
    loss = torch.tensor([0, 0, 0.2, 0.4, 0.0, 0.6, 0] + [0] * 4)
    nonfinite = torch.tensor([0, 0, 0, 0, 1.0, 0, 0] + [0] * 4)
    kl = torch.tensor([0, 0, 0.3, 0.5, 0.0, 0.7, 0] + [0] * 4)
    offsets = td["input_ids"].offsets()
    nested = lambda flat: torch.nested.nested_tensor_from_jagged(flat, offsets)  # noqa: E731
    zeros = torch.zeros(11)
    model_output = {"log_probs": nested(zeros), OUT_LOSS: nested(loss), OUT_NONFINITE: nested(nonfinite),
                    OUT_ARGMAX: nested(zeros), **{key: nested(kl if key == "ssopd_kl" else zeros) for key in DIAGNOSTICS}}  # fmt: skip
    loss_fn = SSOPDActorLoss(functools.partial(ppo_loss, config=build_actor_config()), SSOPDConfig(), rollout_n=2)
    total, metrics = loss_fn(model_output=model_output, data=td)
    # G = 4 / 2 = 2 prompts; L = mean(0.2, 0.4, 0.6) = 0.4 over the 3 finite positions (not 1.2 / 4 = 0.3)
    assert float(metrics["ssopd/distill_loss"].aggregate()) == pytest.approx(0.5 * 0.4 / 2)
    final = finalize_metrics({key: float(m.aggregate()) for key, m in metrics.items() if key.startswith("ssopd/")})
    assert final["ssopd/kl_unclipped"] == pytest.approx(0.5) and final["ssopd/teacher_nonfinite"] == 1
    assert COUNT not in final
