#!/usr/bin/env python
"""Time of the chunked distillation loss alone (forward + backward), per clip mode, at one update's shape.

The part of SSOPD's update that is neither the teacher forward nor verl's: `bench_update_overhead.py` reports the
update's extra time over GRPO against the teacher forward alone; this times the loss over the same number of teacher
tokens, so that the rest (the glue: the gradient sink's add, the batch fields) follows by difference. The work is
elementwise over [teacher tokens x vocabulary] plus one projection; on a CPU the elementwise passes weigh far more
against the matmuls than on a GPU (and, at a proportions model's hidden size of 256, ~8x more than at Qwen3-1.7B's
2,048), so read it as an upper bound of the loss's share.

    .venv/bin/python benchmarks/bench_loss_time.py --rows 177 --hidden 256 --repeats 3
"""

import argparse
import json
import statistics
import time

import torch

from ssopd_verl.losses import chunked_clipped_forward_kl

VOCAB = 151936  # Qwen3's


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=177, help="distilled teacher tokens (bench_update_overhead's 1.7B: 177)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=64, help="ssopd.chunk_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(args.rows, VOCAB, generator=generator) * 3
    hidden = torch.randn(args.rows, args.hidden, generator=generator)
    weight = torch.randn(VOCAB, args.hidden, generator=generator) * 0.05
    result = {"rows": args.rows, "hidden": args.hidden, "vocab": VOCAB, "chunk_size": args.chunk_size}
    for clip in ("pointwise", "token", "none"):
        times = []
        for _ in range(args.repeats):
            logits = student.clone().requires_grad_()
            started = time.perf_counter()
            terms = chunked_clipped_forward_kl(logits, hidden, weight, clip=clip, tau=0.05, chunk_size=args.chunk_size)
            terms.loss.sum().backward()
            times.append(time.perf_counter() - started)
        result[f"{clip}_s"] = statistics.median(times)
        print(f"{clip}: loss forward + backward over {args.rows} rows, median {result[f'{clip}_s']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
