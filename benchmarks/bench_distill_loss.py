"""Peak memory and time of the distillation loss: chunked production path vs the plain reference.

Both compute the per-token clipped forward KL and its gradient w.r.t. the student logits, from the teacher's
final hidden states and the lm_head weight (the reference projects all teacher logits at once, as the OPSD and
TRL reference code do; the production path projects `chunk_size` tokens at a time, in forward and backward).

Each variant runs in its own subprocess; its *extra* peak resident memory is its peak RSS minus the RSS after
the inputs (student logits, hidden states, weight) were allocated. Results are reported as ratios within one
run, since absolute numbers on a shared machine are noisy.

    .venv/bin/python benchmarks/bench_distill_loss.py --tokens 1024 --hidden 512 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, clip: str) -> dict:
    import torch

    from ssopd_verl.losses import chunked_clipped_forward_kl, clipped_forward_kl

    torch.manual_seed(0)
    student = (torch.randn(tokens, vocab) * 2).requires_grad_(True)
    hidden_states = torch.randn(tokens, hidden)
    weight = torch.randn(vocab, hidden) / hidden**0.5
    upstream = torch.rand(tokens)
    base = rss_mb()
    start = time.perf_counter()
    if variant == "reference":
        loss = clipped_forward_kl(student, hidden_states @ weight.T, clip=clip)
    else:
        loss = chunked_clipped_forward_kl(student, hidden_states, weight, clip=clip, chunk_size=chunk).loss
    (loss * upstream).sum().backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "extra_peak_mb": peak_mb() - base, "seconds": seconds,
            "grad_checksum": float(student.grad.double().abs().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--clip", default="pointwise")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.vocab, args.chunk, args.clip)))
        return
    results = {}
    for variant in ("reference", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ref, chunked = results["reference"], results["chunked"]
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} chunk={args.chunk} clip={args.clip}")
    print(f"one [tokens x vocab] fp32 tensor: {logits_mb:.0f} MB")
    for r in (ref, chunked):
        print(f"{r['variant']:>9}: extra peak {r['extra_peak_mb']:.0f} MB "
              f"({r['extra_peak_mb'] / logits_mb:.2f} x logits), {r['seconds']:.2f} s")
    print(f"chunked / reference: memory {chunked['extra_peak_mb'] / ref['extra_peak_mb']:.2f}, "
          f"time {chunked['seconds'] / ref['seconds']:.2f}")
    agree = abs(chunked["grad_checksum"] - ref["grad_checksum"]) <= 1e-4 * ref["grad_checksum"]
    print(f"gradients agree: {agree}")


if __name__ == "__main__":
    main()
