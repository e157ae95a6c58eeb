#!/usr/bin/env python
"""Evaluate a model the paper's way: Avg@k, pass@k, maj@k (bootstrap CIs) on AIME24 / AIME25 / HMMT25 Feb.

Defaults are the paper's evaluation settings (as in OPSD): thinking on, n = 12 samples per problem, temperature 1.0,
top-p 1.0 (pass --top-p 0.95 for the reported setup, SSOPD_SPEC.md 1b), up to 38,912 new tokens, the last \\boxed{} graded with math-verify.

  # GPU (vLLM), a Hugging Face model or a verl checkpoint (merged to HF automatically):
  python scripts/evaluate.py --model Qwen/Qwen3-8B --out evals/qwen3_8b_base
  python scripts/evaluate.py --model checkpoints/ssopd/qwen3_8b_ssopd/global_step_300 --out evals/qwen3_8b_ssopd
  python scripts/evaluate.py --model Qwen/Qwen3-8B --label "Qwen3-8B base" --out evals/qwen3_8b_base
  # CPU smoke test (transformers backend):
  python scripts/evaluate.py --model /tmp/tiny --backend transformers --limit 2 --n 2 --max-new-tokens 8 --out /tmp/ev
  # after changing the grader: recompute scores from the saved completions
  python scripts/evaluate.py --model Qwen/Qwen3-8B --out evals/qwen3_8b_base --regrade

Rerunning with the same --out resumes: samples already saved are not drawn again.
"""

import argparse

from ssopd_verl.evaluation.benchmarks import BENCHMARKS, PAPER_BENCHMARKS
from ssopd_verl.evaluation.generate import SamplingSettings, make_backend
from ssopd_verl.evaluation.runner import EvalConfig, run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model path or hub id, or a verl FSDP checkpoint dir")
    p.add_argument("--out", required=True, help="output dir (per-sample JSONL, summary.json, summary.md)")
    p.add_argument(
        "--benchmarks",
        default=",".join(PAPER_BENCHMARKS),
        help=f"comma-separated: {', '.join(BENCHMARKS)}, or paths to {{problem,answer}} .jsonl files",
    )
    p.add_argument("--n", type=int, default=12, help="samples per problem (paper: 12)")
    p.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = no truncation; the reported setup (SSOPD_SPEC.md 1b) uses 0.95")
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    p.add_argument("--max-new-tokens", type=int, default=38912, help="paper: 38,912")
    p.add_argument("--no-thinking", action="store_true", help="chat template with enable_thinking=False")
    p.add_argument("--backend", choices=("vllm", "transformers"), default="vllm")
    p.add_argument("--limit", type=int, default=None, help="first N problems per benchmark (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds")
    p.add_argument("--label", default=None, help="row name in reports (default: the model dir name)")
    p.add_argument("--regrade", action="store_true", help="recompute scores from saved completions, no sampling")
    p.add_argument("--chunk-size", type=int, default=1024, help="samples between two JSONL flushes")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs")
    g = p.add_argument_group("backend")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm")
    g.add_argument("--max-model-len", type=int, default=None, help="vllm (default: the model's)")
    g.add_argument("--dtype", default=None, help="bfloat16 (vllm) / float32 (transformers) by default")
    g.add_argument("--batch-size", type=int, default=8, help="transformers")
    g.add_argument("--device", default="cpu", help="transformers")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = EvalConfig(
        model=args.model,
        out=args.out,
        benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()],
        n=args.n,
        sampling=SamplingSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens),
        enable_thinking=not args.no_thinking,
        limit=args.limit,
        seed=args.seed,
        label=args.label,
        chunk_size=args.chunk_size,
        n_boot=args.n_boot,
    )

    def backend(model_path):
        return make_backend(
            args.backend,
            model_path,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            dtype=args.dtype,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
        )

    run(cfg, backend, regrade_only=args.regrade)


if __name__ == "__main__":  # also required by math-verify's spawn pool
    main()
