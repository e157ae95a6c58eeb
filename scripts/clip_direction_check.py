#!/usr/bin/env python
"""Which way does each clip mode move the student, through the real update? A controlled check on fixed pairs.

    .venv/bin/python scripts/clip_direction_check.py --json docs/evidence/clip_direction.json

On the embedded tiny default (CPU): sample ``--n`` completions for each of ``--prompts`` training problems (seeded),
grade them, pair the mixed groups as SSOPD does (shortest correct witness, longest wrong target, frontier weight),
and fix the teacher: the start checkpoint (``ssopd.teacher=initial``, the paper's reported setup, which needs a
LoRA actor). Then, for each clip mode, start from the same checkpoint and run ``--updates`` actor updates on
verl's real FSDP2 engine with the SSOPD loss alone (every advantage 0, so the GRPO term has no gradient;
lambda 1), and measure, at every distilled position of every target, the student's log-probability of the
teacher's choice (the token the frozen teacher ranks first). Reported per clip mode:

* ``delta_logp_teacher_choice``: mean change of that log-probability over the updates (> 0: toward the teacher);
* ``share_down``: share of positions where it went down;
* ``teacher_argmax_reversed`` / ``reversed_teacher_mass``: the loss's own per-position diagnostics at the first
  update (``ssopd_verl.losses``, "Which way": where a gradient step of the loss on that position's logits lowers
  the teacher's top token's log-probability to first order while the exact forward KL's would raise it), for
  comparison with what the updates did;
* ``clipped_teacher_mass``: the teacher mass in clipped entries at the first update.

Everything is deterministic for a fixed ``--seed`` (sampling seeded, fp32 on CPU, one process).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="training problems sampled")
    p.add_argument("--n", type=int, default=8, help="completions per problem (the group)")
    p.add_argument("--updates", type=int, default=5, help="distillation-only actor updates per clip mode")
    p.add_argument("--lr", type=float, default=2e-3, help="actor learning rate (LoRA adapters)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--clips", default="pointwise,token,none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for name in ("prompts", "n", "updates", "lora_rank"):
        if getattr(args, name) < 1 or (name == "n" and args.n < 2):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'n' else 1}")
    if not args.tau > 0 or not args.lr > 0:
        p.error("--tau and --lr must be > 0")
    args.clips = [c.strip() for c in args.clips.split(",") if c.strip()]
    from ssopd_verl.losses import CLIP_MODES

    if not args.clips or any(c not in CLIP_MODES for c in args.clips):
        p.error(f"--clips must name modes of {CLIP_MODES}")
    return args


def fixed_pairs(args):
    """The tiny default's sampled groups, graded and paired: rows (prompt, response), the plan, the messages."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssopd_verl.config import SSOPDConfig
    from ssopd_verl.distill_plan import plan_distillation
    from ssopd_verl.tiny_default import get_tiny_default, is_correct, sample_completions

    tiny = get_tiny_default()
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny.model_path, dtype=torch.float32)
    frame = pd.read_parquet(tiny.train_file).head(args.prompts)
    rows, uids, scores, messages = [], [], [], []
    for i, record in enumerate(frame.itertuples()):
        chat = [dict(m) for m in record.prompt]
        prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
        samples = sample_completions(model, tokenizer, [prompt] * args.n, max_new_tokens=48, seed=args.seed * 1000 + i)
        for response, finished in samples:
            text = tokenizer.decode(response, skip_special_tokens=True)
            rows.append({"prompt": prompt, "response": list(response)})
            uids.append(f"p{i}")
            scores.append(float(finished and is_correct(text, record.reward_model["ground_truth"])))
            messages.append(chat)
    plan = plan_distillation(uids=uids, scores=scores, response_ids=[r["response"] for r in rows],
                             prompt_messages=messages, tokenizer=tokenizer, cfg=SSOPDConfig(teacher="initial"),
                             max_response_length=48, max_teacher_length=None)  # fmt: skip
    return tiny, tokenizer, model, rows, plan


def teacher_choices(model, rows, plan):
    """Per target row: the student positions of its distilled tokens and the frozen teacher's first choice there."""
    choices = {}
    with torch.no_grad():
        for i, w in enumerate(plan.weight):
            if w <= 0:
                continue
            t, r = plan.teacher_prompt_len[i], len(plan.teacher_ids[i]) - plan.teacher_prompt_len[i]
            logits = model(input_ids=torch.tensor([plan.teacher_ids[i]])).logits[0, t - 1 : t - 1 + r]
            choices[i] = logits.argmax(-1)
    return choices


def student_logp(forward, rows, choices) -> torch.Tensor:
    """log p_student(teacher's choice) at every distilled position, concatenated over targets."""
    out = []
    with torch.no_grad():
        for i, chosen in choices.items():
            p = len(rows[i]["prompt"])
            logits = forward(torch.tensor([rows[i]["prompt"] + rows[i]["response"]]))[0, p - 1 : p - 1 + len(chosen)]
            out.append(torch.log_softmax(logits.float(), -1).gather(-1, chosen[:, None]).squeeze(-1))
    return torch.cat(out)


def run_clip(clip, args, tiny, rows, plan, choices, before):
    from verl.workers.utils.losses import ppo_loss

    from ssopd_verl.config import SSOPDConfig
    from ssopd_verl.cpu.engine import build_actor_config, build_cpu_fsdp2_engine, make_train_tensordict
    from ssopd_verl.glue.actor_loss import (ROW_WEIGHT, TEACHER_IDS, TEACHER_PROMPT_LEN, SSOPDActorLoss,
                                            finalize_metrics, mark_for_distillation)  # fmt: skip

    engine = build_cpu_fsdp2_engine(tiny.model_path, lr=args.lr, seed=args.seed, lora_rank=args.lora_rank,
                                    lora_alpha=2 * args.lora_rank, micro_batch_size_per_gpu=len(rows))  # fmt: skip
    cfg = SSOPDConfig(teacher="initial", clip=clip, tau=args.tau, lam=1.0)
    responses = [r["response"] for r in rows]
    td = make_train_tensordict(
        [r["prompt"] for r in rows], responses, engine=engine, global_batch_size=len(rows), fields={
            "advantages": [torch.zeros(len(r)) for r in responses],  # the GRPO term has no gradient
            "old_log_probs": [torch.zeros(len(r)) for r in responses],
            TEACHER_IDS: [torch.tensor(ids or [0]) for ids in plan.teacher_ids],
            TEACHER_PROMPT_LEN: torch.tensor(plan.teacher_prompt_len),
            ROW_WEIGHT: torch.tensor(plan.weight, dtype=torch.float32),
        })  # fmt: skip
    mark_for_distillation(td, cfg)
    loss = SSOPDActorLoss(functools.partial(ppo_loss, config=build_actor_config()), cfg, rollout_n=args.n,
                          engine=engine)  # fmt: skip
    first = None
    for _ in range(args.updates):
        with engine.train_mode():
            output = engine.train_batch(td.clone(), loss_function=loss)
        if first is None:
            first = finalize_metrics({k: float(sum(m.aggregate() for m in (v if isinstance(v, list) else [v])))
                                      for k, v in output["metrics"].items() if k.startswith("ssopd/")})  # fmt: skip

    def forward(ids):
        with engine.eval_mode():
            return engine.module(input_ids=ids, use_cache=False).logits

    after = student_logp(forward, rows, choices)
    delta = after - before
    return {"clip": clip, "delta_logp_teacher_choice": float(delta.mean()), "share_down": float((delta < 0).float().mean()),
            "positions": int(delta.numel()), "teacher_argmax_reversed": first.get("ssopd/teacher_argmax_reversed"),
            "reversed_teacher_mass": first.get("ssopd/reversed_teacher_mass"),
            "clipped_teacher_mass": first.get("ssopd/clipped_teacher_mass"), "distill_loss": first["ssopd/distill_loss"]}  # fmt: skip


def table(results: list[dict]) -> str:
    lines = ["| clip | mean change of log p(teacher's choice) | share of positions down | teacher argmax reversed "
             "(update 1) | reversed teacher mass (update 1) | clipped teacher mass (update 1) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['clip']} | {r['delta_logp_teacher_choice']:+.4f} | {r['share_down']:.3f} | "
                     f"{r['teacher_argmax_reversed']:.3f} | {r['reversed_teacher_mass']:.3f} | "
                     f"{r['clipped_teacher_mass']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    torch.manual_seed(args.seed)
    tiny, _, model, rows, plan = fixed_pairs(args)
    choices = teacher_choices(model, rows, plan)
    if not choices:
        raise SystemExit("no mixed group among the sampled problems: raise --prompts")
    before = student_logp(lambda ids: model(input_ids=ids).logits, rows, choices)
    results = [run_clip(clip, args, tiny, rows, plan, choices, before) for clip in args.clips]
    report = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "targets": len(choices),
              "results": results}  # fmt: skip
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
