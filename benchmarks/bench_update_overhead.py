"""Cost of SSOPD's actor update relative to GRPO's, on verl's real FSDP2 engine (CPU, one process).

The same batch (groups of `--n` completions, half of the prompts mixed with one target each, the others all
wrong) goes through the engine's forward/backward twice per repetition, alternating: once with verl's `ppo_loss`
(GRPO) and once with the SSOPD loss (GRPO + teacher forward + chunked clipped forward KL). Reported: the median
time ratio SSOPD / GRPO (`time_ratio`) and the teacher tokens per student token (`teacher_tokens_per_token`);
`--json PATH` writes them with the setup.

What SSOPD cannot avoid is one forward without gradient over the teacher tokens. The same run times that forward
alone (`TeacherForward.hidden_states` on the batch's target teacher sequences, in the engine's train mode, as the
loss runs it), interleaved with the two updates, and reports `extra_over_teacher_forward` = (SSOPD - GRPO) / that
forward: 1.0 would mean the loss, the pairing's fields and the glue cost nothing beyond the forward itself.

`--proportions` picks the random Qwen3 (always the real 151,936-entry vocabulary):

* `tiny`: hidden 64, 2 layers. Vocabulary-dominated: the loss weighs far more than in a real model.
* `qwen3-1.7b`: narrower and far fewer FLOPs per layer than Qwen3-1.7B, but the same ratio of layer compute
  (matmul FLOPs per token, 28 x 50.3M) to vocabulary compute (2,048 x 151,936) as the real model, 4.53: hidden
  256, 2 query heads and 1 key-value head of 128, MLP 768, 224 layers. What it cannot copy: attention's
  sequence-length term (small at these lengths) and a GPU's kernels.
* `qwen3-8b`: the same for Qwen3-8B (layer/vocabulary compute 11.16): hidden 256, MLP 3,072, 170 layers.

    .venv/bin/python benchmarks/bench_update_overhead.py --prompts 4 --n 4 --response-tokens 64
    .venv/bin/python benchmarks/bench_update_overhead.py --proportions qwen3-1.7b --prompts 2 --n 8 \
        --response-tokens 48 --repeats 3 --json /tmp/bench/update_overhead_1.7b.json
    .venv/bin/python benchmarks/bench_update_overhead.py --proportions qwen3-8b --prompts 2 --n 8 \
        --response-tokens 48 --repeats 3 --json /tmp/bench/update_overhead_8b.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("VERL_PLATFORM", "cpu")

# build_tiny_qwen3 keyword arguments per --proportions (see the module docstring for the 1.7B ratio)
PROPORTIONS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    "qwen3-1.7b": dict(hidden_size=256, num_layers=224, num_heads=2, num_kv_heads=1, intermediate_size=768),
    "qwen3-8b": dict(hidden_size=256, num_layers=170, num_heads=2, num_kv_heads=1, intermediate_size=3072),
}


def layer_to_vocab_flops(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, mlp: int,
                         vocab: int = 151_936) -> float:
    """Per-token matmul FLOPs of the decoder layers over the output projection's (both x2, which cancels)."""
    per_layer = hidden * (heads * head_dim * 2 + kv_heads * head_dim * 2) + 3 * hidden * mlp  # q, o, k, v, MLP
    return layers * per_layer / (hidden * vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--proportions", choices=sorted(PROPORTIONS), default="tiny")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from ssopd_verl.config import SSOPDConfig
    from ssopd_verl.distill_plan import plan_distillation
    from ssopd_verl.glue.actor_loss import (ROW_WEIGHT, TEACHER_IDS, TEACHER_PROMPT_LEN, SSOPDActorLoss,
                                            mark_for_distillation)
    from ssopd_verl.cpu.engine import build_actor_config, build_cpu_fsdp2_engine, make_train_tensordict
    from ssopd_verl.glue.teacher_forward import TeacherForward
    from ssopd_verl.tiny_model import build_tiny_qwen3
    from verl.workers.utils.losses import ppo_loss

    shape = PROPORTIONS[args.proportions]
    model_path = build_tiny_qwen3(tempfile.mkdtemp(), seed=0, **shape)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = build_cpu_fsdp2_engine(model_path, micro_batch_size_per_gpu=args.prompts * args.n)
    g = torch.Generator().manual_seed(0)

    rows, uids, scores, messages = [], [], [], []
    for p in range(args.prompts):
        chat = [{"role": "user", "content": f"Problem {p}: what is {p} + {p}?"}]
        prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
        for i in range(args.n):
            length = args.response_tokens - i  # distinct lengths: a unique longest wrong / shortest correct
            rows.append((prompt, torch.randint(0, 150000, (length,), generator=g).tolist()))
            uids.append(f"p{p}")
            scores.append(float(p % 2 == 0 and i % 2 == 0))  # even prompts are mixed groups, odd ones all wrong
            messages.append(chat)
    cfg = SSOPDConfig()
    plan = plan_distillation(uids=uids, scores=scores, response_ids=[r for _, r in rows], prompt_messages=messages,
                             tokenizer=tokenizer, cfg=cfg, max_response_length=10**6, max_teacher_length=None)

    def batch(distill: bool):
        td = make_train_tensordict(
            [p for p, _ in rows], [r for _, r in rows], engine=engine, global_batch_size=len(rows),
            fields={
                "advantages": [torch.randn(len(r), generator=g) for _, r in rows],
                "old_log_probs": [torch.zeros(len(r)) for _, r in rows],
                TEACHER_IDS: [torch.tensor(ids or [0]) for ids in plan.teacher_ids],
                TEACHER_PROMPT_LEN: torch.tensor(plan.teacher_prompt_len),
                ROW_WEIGHT: torch.tensor(plan.weight, dtype=torch.float32),
            },
        )
        if distill:
            mark_for_distillation(td, cfg)
        return td

    base = functools.partial(ppo_loss, config=build_actor_config())
    losses = {"grpo": (base, False), "ssopd": (SSOPDActorLoss(base, cfg, rollout_n=args.n, engine=engine), True)}
    times = {name: [] for name in (*losses, "teacher_forward")}
    teacher = TeacherForward(engine)
    sequences = [torch.tensor(ids) for ids, w in zip(plan.teacher_ids, plan.weight) if w > 0]
    for repeat in range(args.repeats + 1):  # the first repetition warms up and is dropped
        for name, (loss_fn, distill) in losses.items():
            td = batch(distill)
            with engine.train_mode():
                start = time.perf_counter()
                engine.forward_backward_batch(td, loss_function=loss_fn)
                elapsed = time.perf_counter() - start
                engine.optimizer_zero_grad()
            if repeat:
                times[name].append(elapsed)
        td = batch(False)
        with engine.train_mode():  # the unavoidable part alone: the teacher forward over the same sequences
            start = time.perf_counter()
            teacher.hidden_states(sequences, td)
            teacher.take_head()
            elapsed = time.perf_counter() - start
        if repeat:
            times["teacher_forward"].append(elapsed)

    student_tokens = sum(len(p) + len(r) for p, r in rows)
    teacher_tokens = sum(len(ids) for ids in plan.teacher_ids)
    grpo, ssopd = statistics.median(times["grpo"]), statistics.median(times["ssopd"])
    forward = statistics.median(times["teacher_forward"])
    print(f"rows {len(rows)} ({plan.num_targets} targets), student tokens {student_tokens}, "
          f"teacher tokens {teacher_tokens} ({teacher_tokens / student_tokens:.2f} per student token)")
    ratio = layer_to_vocab_flops(shape["hidden_size"], shape["num_layers"], shape["num_heads"], shape["num_kv_heads"],
                                 shape["hidden_size"] // shape["num_heads"], shape["intermediate_size"])
    print(f"model {args.proportions}: layer/vocabulary compute {ratio:.2f} (Qwen3-1.7B: "
          f"{layer_to_vocab_flops(2048, 28, 16, 8, 128, 6144):.2f})")
    print(f"median forward+backward: grpo {grpo:.3f} s, ssopd {ssopd:.3f} s, ratio ssopd/grpo {ssopd / grpo:.2f}")
    print(f"teacher forward alone {forward:.3f} s: ssopd's extra time over grpo is {(ssopd - grpo) / forward:.2f}x it")
    if args.json:
        figures = {
            "proportions": args.proportions, "layer_to_vocab_compute": ratio, "rows": len(rows),
            "targets": plan.num_targets, "student_tokens": student_tokens, "teacher_tokens": teacher_tokens,
            "teacher_tokens_per_token": teacher_tokens / student_tokens, "grpo_s": grpo, "ssopd_s": ssopd,
            "time_ratio": ssopd / grpo, "repeats": args.repeats, "teacher_forward_s": forward,
            "extra_over_teacher_forward": (ssopd - grpo) / forward,
        }  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
