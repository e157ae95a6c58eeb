"""The tiny default's warm start: supervised training that puts the model where SSOPD has something to do.

Supervised training (AdamW, loss on the completion tokens and the closing ``<|im_end|>`` only) on a mixture of the
task's warm-start problems; every step has

a. ``batch_size`` = 32 **student rows**: the RL prompt, and as target the worked solution with probability
   ``student_correct_frac`` = 0.45, otherwise the same solution with one plausible *slip* carried through to a
   wrong boxed answer (the task's ``slipped_solution``; for addition the carry dropped on problems whose units
   carry, else one column sum off by one). The student learns the arithmetic *and* a per-problem chance of
   slipping at a known token, so its sampled accuracy settles near ``student_correct_frac``, inside the frontier,
   with mixed groups on nearly every prompt (and greedy decoding, which drops a carry, also stays below 1);
b. ``teacher_batch_size`` = 8 **teacher rows**: the SSOPD teacher prompt exactly as the trainer builds it
   (:func:`~ssopd_verl.tiny_default.tokenizer.teacher_prompt_ids`: ``teacher_context.build_teacher_context`` with
   ``ssopd.template``'s default, the student's chat-template kwargs and no target; the witness is a correct
   completion as the model emits it, response ids through ``witness_from_response(..., "keep")``) and as target
   the correct solution, the one the reference solution holds; its loss weighs ``teacher_loss_weight`` = 2. So
   the policy learns to read the reference: with it, it answers correctly; without it, it slips as often as the
   student rows taught it to.

Schedule: linear warmup over ``warmup_steps``, constant ``lr``, linear decay to ``final_lr_frac`` over the last
``decay_frac`` of ``train_steps``. Then a check on the held-out check problems (128 x 2 samples each way,
temperature 1.0, no top-k / top-p, a truncated completion counts as wrong): the student's sampled accuracy in
``band`` (0.3-0.7) and the teacher prompt's at least ``teacher_min`` (0.85); if not, training goes on at the final
rate, checked every ``check_every`` steps, up to ``max_steps`` (missing them is an error). The batches and the
slipped targets are pure functions of (seed, step): the same spec trains the same model.

Measured: the targets are met at step 500 (check: student 0.40, teacher prompt 0.91). Cost: 500 steps of 32
student rows (~58 tokens) and 8 teacher rows (~147 tokens, the template is long); ~410 s of CPU on a heavily
shared 2-core machine (load 4-9), an estimated ~2-2.5 min on an idle one (the former student-only warm start: 300
steps in ~45 s). Fewer steps (400-450) or a heavier teacher weight (3) missed the targets at the end of the
schedule.

Imports: the standard library at module level; torch inside the functions; verl never.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Optional, Sequence

from ssopd_verl.tiny_default.model import sampled_accuracy
from ssopd_verl.tiny_default.spec import TinyDefaultSpec
from ssopd_verl.tiny_default.tokenizer import completion_ids, prompt_ids, teacher_prompt_ids

__all__ = ["warm_start"]


def _pad_rows(rows: Sequence[tuple], pad: int):
    """``[(prompt_ids, target_ids)]`` -> right-padded (input_ids, labels, attention_mask); labels = -100 on the
    prompt and the padding (the loss is on the target tokens only)."""
    import torch

    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        seq = torch.tensor(list(a) + list(b), dtype=torch.long)
        ids[i, : len(seq)] = seq
        labels[i, len(a) : len(seq)] = seq[len(a) :]
        mask[i, : len(seq)] = 1
    return ids, labels, mask


_PERMUTATIONS: dict = {}


def _batch_indices(seed: int, step: int, n: int, batch: int, stream: str = "sft") -> list:
    """The rows of warm-start step ``step`` (0-based) in ``stream``: epochs of seeded permutations of ``range(n)``,
    a pure function of (seed, stream, step)."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    key = (seed, stream, epoch, n)
    perm = _PERMUTATIONS.get(key)
    if perm is None:
        perm = list(range(n))
        random.Random(f"{seed}/{stream}/{epoch}").shuffle(perm)
        _PERMUTATIONS.clear()  # one epoch at a time per stream is all a build needs
        _PERMUTATIONS[key] = perm
    return perm[k * batch : (k + 1) * batch]


def _lr_factor(spec: TinyDefaultSpec, step: int) -> float:
    """Linear warmup, constant, then linear decay to ``final_lr_frac`` over the last ``decay_frac`` of
    ``train_steps``; ``final_lr_frac`` after that."""
    factor = min(1.0, (step + 1) / max(1, spec.warmup_steps))
    start = spec.train_steps * (1.0 - spec.decay_frac)
    if spec.decay_frac > 0 and step >= start:
        done = min(1.0, (step - start) / max(1e-9, spec.train_steps - start))
        factor *= 1.0 - (1.0 - spec.final_lr_frac) * done
    return factor


def warm_start(model, tokenizer, spec: TinyDefaultSpec, splits: dict, progress: Optional[Callable[[str], None]]):
    """Supervised warm start on a mixture of student and teacher-prompt rows (module docstring).

    Runs the ``train_steps`` schedule, then checks; if the student is below the band or the teacher below
    ``teacher_min``, goes on at the final learning rate, checking every ``check_every`` steps, up to ``max_steps``.
    Returns (student accuracy, teacher accuracy, steps, history)."""
    import torch

    lo, hi = spec.band
    sft, check = splits["sft"], splits["check"]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    student_prompts: dict = {}  # problem index -> prompt ids, built on first use
    teacher_prompts: dict = {}
    completions: dict = {}  # completion text -> response ids

    def completion(text: str) -> list:
        if text not in completions:
            completions[text] = completion_ids(tokenizer, text)
        return completions[text]

    def student_row(i: int, rng: random.Random) -> tuple:
        if i not in student_prompts:
            student_prompts[i] = prompt_ids(tokenizer, sft[i])
        p = sft[i]
        text = p.solution if rng.random() < spec.student_correct_frac else p.slipped_solution(rng)
        return student_prompts[i], completion(text)

    def teacher_row(i: int) -> tuple:
        if i not in teacher_prompts:
            teacher_prompts[i] = teacher_prompt_ids(tokenizer, sft[i], completion(sft[i].solution))
        return teacher_prompts[i], completion(sft[i].solution)

    def loss_of(rows: list):
        ids, labels, mask = _pad_rows(rows, pad)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(spec, s))
    history: list = []
    t0 = time.perf_counter()
    acc = teacher_acc = float("nan")
    step, sums = 0, [0.0, 0.0, 0]
    model.train()
    while step < spec.max_steps:
        rng = random.Random(f"{spec.seed}/student-targets/{step}")
        rows = [student_row(i, rng) for i in _batch_indices(spec.seed, step, len(sft), spec.batch_size, "sft")]
        loss_student = loss_of(rows)
        loss = loss_student
        loss_teacher = None
        if spec.teacher_batch_size > 0:
            picks = _batch_indices(spec.seed, step, len(sft), spec.teacher_batch_size, "teacher")
            loss_teacher = loss_of([teacher_row(i) for i in picks])
            loss = loss + spec.teacher_loss_weight * loss_teacher
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        sums = [sums[0] + loss_student.item(), sums[1] + (loss_teacher.item() if loss_teacher is not None else 0.0),
                sums[2] + 1]
        at_check = step >= spec.train_steps and (step - spec.train_steps) % spec.check_every == 0
        if not at_check and step % spec.check_every and step < spec.max_steps:
            continue
        entry = {
            "step": step,
            "loss": round(sums[0] / sums[2], 6),
            "teacher_loss": round(sums[1] / sums[2], 6),
            "accuracy": None,
            "teacher_accuracy": None,
        }
        sums = [0.0, 0.0, 0]
        history.append(entry)
        line = (
            f"warm start: step {step}/{spec.train_steps} (max {spec.max_steps})  loss {entry['loss']:.4f}  "
            f"teacher loss {entry['teacher_loss']:.4f}"
        )
        if not at_check and step < spec.max_steps:
            if progress:
                progress(f"{line}  {time.perf_counter() - t0:.1f}s")
            continue
        seed = spec.seed * 1_000_003 + step
        kwargs = dict(samples=spec.check_samples, seed=seed, max_new_tokens=spec.max_new_tokens)
        acc, _ = sampled_accuracy(model, tokenizer, check, **kwargs)
        teacher_acc, _ = sampled_accuracy(model, tokenizer, check, prompt="teacher", **kwargs)
        model.train()
        entry.update(accuracy=acc, teacher_accuracy=teacher_acc)
        if progress:
            progress(
                f"{line}  sampled accuracy: student {acc:.3f} (target {lo}-{hi}), teacher prompt {teacher_acc:.3f} "
                f"(target >= {spec.teacher_min})  {time.perf_counter() - t0:.1f}s"
            )
        if lo <= acc <= hi and teacher_acc >= spec.teacher_min:
            model.eval()
            return acc, teacher_acc, step, history
        if acc > hi:
            break  # more training only raises it: the spec (student_correct_frac, train_steps) needs changing
    raise RuntimeError(
        f"warm start did not reach its targets (student sampled accuracy in [{lo}, {hi}], teacher-prompt accuracy "
        f">= {spec.teacher_min}; max_steps {spec.max_steps}): last student {acc:.3f}, teacher {teacher_acc:.3f} at "
        f"step {step}; history: {history[-5:]}"
    )
