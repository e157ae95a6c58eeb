"""Peak memory and time of the distillation loss: one-pass chunked production path vs the plain reference.

Both compute the per-token clipped forward KL and its gradient w.r.t. the student logits (forward + backward),
from the teacher's final hidden states and the lm_head weight: the reference projects all teacher logits at once
and lets autograd differentiate `clipped_forward_kl` (as the OPSD and TRL reference code do); the production path
`chunked_clipped_forward_kl` projects `--chunk` tokens at a time and computes the gradient in the same pass.

Memory: each (variant, tokens) runs in its own subprocess. Its *extra peak* is the peak resident set size during
forward + backward minus the resident size just before (inputs allocated in place, so no init transient hides in
the peak). The peak is the kernel's VmHWM, reset right before the measurement through /proc/self/clear_refs
(falls back to sampling VmRSS every millisecond where that is not allowed). glibc serves tensors this large with
mmap and returns them on free, so resident memory follows live tensors. `extra_peak_logits` is the chunked extra
peak in units of one [tokens x vocab] float32 tensor; the (tokens, vocab) float32 gradient alone is 1.0 of it.

Also measured (in-process, small): the error of the `topk` approximation against the exact loss, on a peaked
teacher (a few dominant logits over Gaussian noise, like an LLM's next-token distribution) and a student that
disagrees with it.

    .venv/bin/python benchmarks/bench_distill_loss.py --json /tmp/bench_distill_loss.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- resident memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory (MB) of this process over a `with` block, and the resident memory at its start."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
            self._sampler = None
        except OSError:
            self._sampled, self._stop = 0, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self.base_mb = _status_kb("VmRSS") / 1024
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _status_kb("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._sampler is None:
            self.peak_mb = _status_kb("VmHWM") / 1024
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_mb = max(self._sampled, _status_kb("VmRSS")) / 1024
        self.extra_mb = self.peak_mb - self.base_mb


# ---------------------------------------------------------------- one variant (subprocess)


def run_variant(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, clip: str) -> dict:
    import torch

    sys.path.insert(0, _REPO)
    from ssopd_verl.losses import chunked_clipped_forward_kl, clipped_forward_kl

    def step(student, hidden_states, weight, upstream):
        if variant == "reference":
            loss = clipped_forward_kl(student, hidden_states @ weight.T, clip=clip)
        else:
            loss = chunked_clipped_forward_kl(student, hidden_states, weight, clip=clip, chunk_size=chunk).loss
        (loss * upstream).sum().backward()

    torch.manual_seed(0)
    # In place: `torch.randn(...) * 2` would hold two (tokens, vocab) tensors for a moment.
    student = torch.empty(tokens, vocab).normal_().mul_(2).requires_grad_(True)
    hidden_states = torch.empty(tokens, hidden).normal_()
    weight = torch.empty(vocab, hidden).normal_().div_(hidden**0.5)
    upstream = torch.rand(tokens)
    # Warm-up on 4 tokens: one-time costs (kernel selection, thread pools, library pages faulted in, ~80 MB of
    # resident memory) are not the loss's.
    step(student[:4].detach().clone().requires_grad_(True), hidden_states[:4], weight, upstream[:4])
    with PeakRSS() as mem:
        start = time.perf_counter()
        step(student, hidden_states, weight, upstream)
        seconds = time.perf_counter() - start
    # By rows: `student.grad.double()` would be a second, twice as large copy of the gradient (20 GB at 16k).
    checksum = sum(float(g.abs().sum(dtype=torch.float64)) for g in student.grad.split(256))
    return {"variant": variant, "tokens": tokens, "extra_peak_mb": mem.extra_mb, "seconds": seconds,
            "grad_checksum": checksum}


def measure(variant: str, tokens: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--tokens", str(tokens),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--clip", args.clip]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # Killed for memory (or failed): record it and go on with the next size.
        return {"variant": variant, "tokens": tokens, "error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rounds(variants: list[str], tokens: int, args) -> dict[str, dict]:
    """`args.rounds` runs of each variant, alternating which goes first (the machine may be shared: load drifts).
    Keeps the fastest time and the largest extra peak of each variant."""
    runs = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            runs[variant].append(measure(variant, tokens, args))
    out = {}
    for variant, results in runs.items():
        ok = [x for x in results if "error" not in x]
        if not ok:
            out[variant] = results[0]
            continue
        out[variant] = dict(ok[0], seconds=min(x["seconds"] for x in ok), seconds_all=[x["seconds"] for x in ok],
                            extra_peak_mb=max(x["extra_peak_mb"] for x in ok))
    return out


# ---------------------------------------------------------------- top-k approximation error


STUDENT_KINDS = ("reranked", "off_support")


def peaked_logits(tokens: int, vocab: int, seed: int, student_kind: str = "reranked"):
    """A peaked, LLM-like teacher and a student that disagrees with it.

    Teacher: N(0, 1) logits plus 4 boosted entries per row (the first by U(10, 22), the others by U(0, 14)); at
    vocab 151936 its top-1 mass has median ~0.92 (10% of rows below ~0.28), entropy median ~0.8 nats, and the
    mass outside its top 64 has median ~0.03. Student: the teacher plus N(0, 1) noise and 2 boosts of its own
    by U(0, 12), on entries drawn from the teacher's top 16 ("reranked": it orders the teacher's candidates
    differently) or from the whole vocabulary ("off_support": it is confident where the teacher is not)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def boost(logits, idx, ranges):
        for j in range(idx.shape[1]):
            lo, hi = ranges[min(j, len(ranges) - 1)]
            logits.scatter_add_(1, idx[:, j : j + 1], lo + (hi - lo) * torch.rand(tokens, 1, generator=g))
        return logits

    teacher = boost(torch.randn(tokens, vocab, generator=g), torch.randint(0, vocab, (tokens, 4), generator=g),
                    [(10, 22), (0, 14)])
    if student_kind == "reranked":
        head = teacher.topk(min(16, vocab), -1).indices
        idx = head.gather(1, torch.randint(0, head.shape[1], (tokens, 2), generator=g))
    else:
        idx = torch.randint(0, vocab, (tokens, 2), generator=g)
    student = boost(teacher + torch.randn(tokens, vocab, generator=g), idx, [(0, 12)])
    return student, teacher


def topk_errors(ks, tokens: int, vocab: int, clips, seed: int = 0) -> list[dict]:
    """Top-k approximation vs exact loss and gradient on peaked logits, for each kind of student and clip mode."""
    import torch

    sys.path.insert(0, _REPO)
    from ssopd_verl.losses import chunked_clipped_forward_kl

    records = []
    for kind, clip in [(kind, clip) for clip in clips for kind in STUDENT_KINDS]:
        student, teacher = peaked_logits(tokens, vocab, seed, kind)
        # Feed the teacher logits through the hidden-state interface exactly: hidden = I (tokens x tokens) and
        # weight = teacher^T (vocab x tokens), so hidden @ weight.T = teacher (one nonzero product per dot).
        hidden, weight = torch.eye(tokens), teacher.T.contiguous()

        def run(topk):
            s = student.clone().requires_grad_(True)
            terms = chunked_clipped_forward_kl(s, hidden, weight, clip=clip, topk=topk)
            terms.loss.sum().backward()
            return terms.loss.detach(), s.grad

        exact_loss, exact_grad = run(None)
        p_t = torch.softmax(teacher, -1)
        for k in ks:
            loss, grad = run(k)
            records.append({
                "student": kind, "k": k, "tokens": tokens, "vocab": vocab, "clip": clip,
                "teacher_top1_mass_median": float(p_t.max(-1).values.median()),
                "teacher_tail_mass_median": float((1 - p_t.topk(k, -1).values.sum(-1)).median()),
                "loss_exact_mean": float(exact_loss.mean()),
                "loss_topk_mean": float(loss.mean()),
                # Error of the batch-mean loss (what enters training) and the mean per-token absolute error.
                "loss_mean_rel_err": float((loss.mean() - exact_loss.mean()).abs() / exact_loss.mean().abs()),
                "loss_abs_err_mean": float((loss - exact_loss).abs().mean()),
                "grad_rel_err": float((grad - exact_grad).norm() / exact_grad.norm()),
                "grad_cosine": float(torch.nn.functional.cosine_similarity(grad.flatten(), exact_grad.flatten(), 0)),
            })
    return records


# ---------------------------------------------------------------- main


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1024, 2048, 4096],
                        help="sizes measured for both the reference and the chunked path")
    parser.add_argument("--chunked-only-tokens", type=int, nargs="*", default=[16384],
                        help="sizes measured for the chunked path alone (the reference would need ~60 GB at 16k)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=128, help="chunk_size of the chunked path")
    parser.add_argument("--clip", default="pointwise")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each variant, alternated: fastest time and largest memory are reported")
    parser.add_argument("--topk", type=int, nargs="*", default=[16, 64, 256, 1024],
                        help="k values of the top-k approximation error table (none: skip it)")
    parser.add_argument("--topk-tokens", type=int, default=64)
    parser.add_argument("--topk-clips", nargs="*", default=["pointwise", "none"], help="clip modes of the top-k table")
    parser.add_argument("--topk-vocab", type=int, default=None, help="vocabulary of the top-k table (default --vocab)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        (tokens,) = args.tokens
        print(json.dumps(run_variant(args.variant, tokens, args.hidden, args.vocab, args.chunk, args.clip)))
        return

    records = []
    for tokens, with_reference in [(t, True) for t in args.tokens] + [(t, False) for t in args.chunked_only_tokens]:
        runs = measure_rounds(["reference", "chunked"] if with_reference else ["chunked"], tokens, args)
        ref, chunked = runs.get("reference"), runs["chunked"]
        unit_mb = tokens * args.vocab * 4 / 2**20
        rec = {"tokens": tokens, "hidden": args.hidden, "vocab": args.vocab, "chunk": args.chunk, "clip": args.clip,
               "logits_fp32_mb": unit_mb, "reference": ref, "chunked": chunked,
               "time_ratio": None, "memory_ratio": None, "extra_peak_logits": None, "grads_agree": None}
        if "error" not in chunked:
            rec["extra_peak_logits"] = chunked["extra_peak_mb"] / unit_mb
            if ref is not None and "error" not in ref:
                rec["time_ratio"] = chunked["seconds"] / ref["seconds"]
                if ref["extra_peak_mb"] > 0:  # 0 only at toy sizes, below what resident memory resolves
                    rec["memory_ratio"] = chunked["extra_peak_mb"] / ref["extra_peak_mb"]
                rec["grads_agree"] = math.isclose(chunked["grad_checksum"], ref["grad_checksum"], rel_tol=1e-4)
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)

    print(f"clipped forward KL, forward + backward: hidden={args.hidden} vocab={args.vocab} chunk={args.chunk} "
          f"clip={args.clip} (extra peak memory in MB and in [tokens x vocab] fp32 units)")
    print(f"{'tokens':>7} {'ref MB':>9} {'ref x':>6} {'ref s':>7} {'chunk MB':>9} {'chunk x':>8} {'chunk s':>8} "
          f"{'mem ratio':>9} {'time ratio':>10} {'grads agree':>11}")
    for r in records:
        ref, ch, unit = r["reference"] or {}, r["chunked"], r["logits_fp32_mb"]
        ref_mb = ref.get("extra_peak_mb")
        print(f"{r['tokens']:>7} {_fmt(ref_mb, '9.0f')} {_fmt(None if ref_mb is None else ref_mb / unit, '6.2f')} "
              f"{_fmt(ref.get('seconds'), '7.2f')} {_fmt(ch.get('extra_peak_mb'), '9.0f')} "
              f"{_fmt(r['extra_peak_logits'], '8.3f')} {_fmt(ch.get('seconds'), '8.2f')} "
              f"{_fmt(r['memory_ratio'], '9.3f')} {_fmt(r['time_ratio'], '10.2f')} {str(r['grads_agree']):>11}")
        for side in (ref, ch):
            if "error" in side:
                print(f"        {side['variant']} failed: {side['error']}")

    topk = []
    if args.topk:
        vocab = args.topk_vocab or args.vocab
        topk = topk_errors(args.topk, args.topk_tokens, vocab, args.topk_clips)
        print(f"\ntop-k + tail bucket vs exact ({args.topk_tokens} tokens, vocab {vocab}; "
              f"teacher top-1 mass median {topk[0]['teacher_top1_mass_median']:.3f}; tail mass = median teacher "
              f"mass outside its top k; losses are batch means)")
        print(f"{'clip':>9} {'student':>11} {'k':>6} {'tail mass':>10} {'exact loss':>10} {'top-k loss':>10} "
              f"{'mean rel err':>12} {'abs err/tok':>11} {'grad rel err':>12} {'grad cos':>8}")
        for r in topk:
            print(f"{r['clip']:>9} {r['student']:>11} {r['k']:>6} {r['teacher_tail_mass_median']:>10.2e} {r['loss_exact_mean']:>10.4f} "
                  f"{r['loss_topk_mean']:>10.4f} {r['loss_mean_rel_err']:>12.2e} {r['loss_abs_err_mean']:>11.2e} "
                  f"{r['grad_rel_err']:>12.2e} {r['grad_cosine']:>8.4f}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join([os.path.relpath(sys.argv[0], _REPO)] + sys.argv[1:]),
                       "records": records, "topk": topk}, f, indent=1)


if __name__ == "__main__":
    main()
