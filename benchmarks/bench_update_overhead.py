"""Cost of SSOPD's actor update relative to GRPO's, on verl's real FSDP2 engine (CPU, one process).

The same batch (groups of `--n` completions, half of the prompts with a target) goes through the engine's
forward/backward twice per repetition, alternating: once with verl's `ppo_loss` (GRPO) and once with the SSOPD
loss (GRPO + teacher forward + chunked clipped forward KL). Reported: the median time ratio SSOPD / GRPO, and the
extra teacher tokens per student token. The model is a tiny random Qwen3 with the real 151,936-entry
vocabulary, so the vocabulary-sized work (logits, loss) weighs as it does in a real model, while the
transformer itself is small: the ratio is an upper bound for real model sizes, where the layers dominate.

    .venv/bin/python benchmarks/bench_update_overhead.py --prompts 4 --n 4 --response-tokens 64
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

os.environ.setdefault("VERL_PLATFORM", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from ssopd_verl.config import SSOPDConfig
    from ssopd_verl.distill_plan import plan_distillation
    from ssopd_verl.glue.actor_loss import (ROW_WEIGHT, TEACHER_IDS, TEACHER_PROMPT_LEN, SSOPDActorLoss,
                                            mark_for_distillation)
    from ssopd_verl.cpu.engine import build_actor_config, build_cpu_fsdp2_engine, make_train_tensordict
    from ssopd_verl.tiny_model import build_tiny_qwen3
    from verl.workers.utils.losses import ppo_loss

    model_path = build_tiny_qwen3(tempfile.mkdtemp(), seed=0)
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
    times = {name: [] for name in losses}
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

    student_tokens = sum(len(p) + len(r) for p, r in rows)
    teacher_tokens = sum(len(ids) for ids in plan.teacher_ids)
    grpo, ssopd = statistics.median(times["grpo"]), statistics.median(times["ssopd"])
    print(f"rows {len(rows)} ({plan.num_targets} targets), student tokens {student_tokens}, "
          f"teacher tokens {teacher_tokens} ({teacher_tokens / student_tokens:.2f} per student token)")
    print(f"median forward+backward: grpo {grpo:.3f} s, ssopd {ssopd:.3f} s, ratio ssopd/grpo {ssopd / grpo:.2f}")


if __name__ == "__main__":
    main()
