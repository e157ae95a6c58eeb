"""What the SSOPD term costs on top of a real-size student update: peak memory and time, on one GPU.

Models are randomly initialised from the real Qwen3 configurations (no weights, no network), in bf16, with
gradient checkpointing on and SDPA attention. For each model and student sequence length L, one training step of
each variant runs on one sequence of L tokens, on verl's production path:

    base     the student forward + backward of GRPO as verl's FSDP engine runs it: the (L, V) logits in the
             compute dtype (bf16, never upcast), divided by the temperature in that dtype, and verl's
             `logprobs_from_logits` (flash-attn's in-place cross-entropy where flash-attn is installed, as on a GPU
             install; its row-wise fallback otherwise), then mean(-advantage * log p(sampled token)).
    chunked  base + SSOPD as the logits hook runs it: a teacher forward under no_grad over prompt + witness + K
             target tokens (--prompt-tokens, --witness-tokens, --distill-tokens), its final states at the K target
             positions, and `chunked_clipped_forward_kl` on the K distilled student positions (`student_rows`) with
             the gradient sink on the logits (production path).
    full     base + SSOPD with the K teacher rows' logits materialised at once and the reference
             `clipped_forward_kl` on float32 copies of the student rows (what OPSD / TRL reference code do).

Reported per (model, L, variant): peak memory (torch.cuda.max_memory_allocated over the step; weights and
their gradients included), the step time (one warm-up step per model and variant at a short length first), and
for chunked / full the extra memory and time over base, the extra memory also in logits units (one (L, V)
tensor of the compute dtype). A configuration that runs out of memory is recorded as
"OOM" and the run goes on; longer sequences of a variant that ran out of memory are not tried. Configurations
not started within --budget-s seconds are recorded as "SKIPPED".

Default command, sized for one H100 (80 GB): estimated at about 5 minutes, and --budget-s keeps it from
starting new configurations after 7 (needs the gpu install: torch, transformers, verl, flash-attn; not yet run on
a GPU):

    python benchmarks/gpu_bench.py --json gpu_bench.json

CPU smoke run (tiny model, seconds):

    python benchmarks/gpu_bench.py --tiny --device cpu --json /tmp/gpu_bench_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The real sizes (Qwen3 model cards / config.json); vocabulary 151936, head_dim 128, rope theta 1e6.
MODELS = {
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=6144, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=12288, tie_word_embeddings=False),
    # CPU smoke tests only.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True, head_dim=16, vocab_size=4096),
}
VARIANTS = ("base", "chunked", "full")
GIB = 2**30


def build_model(name: str, device, dtype):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sizes = dict(vocab_size=151936, head_dim=128)
    sizes.update(MODELS[name])
    config = Qwen3Config(**sizes, max_position_embeddings=40960, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         use_cache=False, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build (and randomly initialise) directly in bf16 on the device
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


# ---------------------------------------------------------------- memory and time


class Meter:
    """Peak memory (GiB) and wall time of a block: CUDA allocator stats on GPU, the process's peak resident
    memory (VmHWM, reset first) on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def __enter__(self):
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start
        if self.cuda:
            self.peak_gib = self.torch.cuda.max_memory_allocated() / GIB
        else:
            self.peak_gib = _vm_kb("VmHWM") / 2**20 if os.path.exists("/proc/self/status") else float("nan")


def _vm_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return float("nan")


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---------------------------------------------------------------- one training step


def train_step(model, variant: str, length: int, args, losses) -> None:
    """One student forward + backward over ``length`` tokens, as verl's FSDP engine runs it (module docstring)."""
    import torch

    from verl.utils.torch_functional import logprobs_from_logits  # flash-attn's cross-entropy where installed

    device = model.lm_head.weight.device
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(length)
    student_ids = torch.randint(0, vocab, (1, length), generator=g).to(device)
    labels = torch.randint(0, vocab, (length,), generator=g).to(device)
    advantages = torch.randn(length, generator=g).to(device)
    temperature = torch.tensor(args.temperature, dtype=model.lm_head.weight.dtype, device=device)

    hidden = model.model(input_ids=student_ids).last_hidden_state[0]
    logits = model.lm_head(hidden)  # (L, V) in the compute dtype, not upcast: what verl's engine holds
    if args.temperature != 1.0:
        logits = logits / temperature  # verl's _scale_logits_by_temperature: in the logits' dtype
    # The engine calls the SSOPD logits hook on a view of the logits first, then the policy loss's log-probs.
    distill = None
    if variant != "base":
        k = min(args.distill_tokens, length)  # the target's distilled tokens: the last k of the student sequence
        teacher_len = args.prompt_tokens + args.witness_tokens + k
        teacher_ids = torch.randint(0, vocab, (1, teacher_len), generator=g).to(device)
        rows = torch.arange(length - k, length, device=device)
        with torch.no_grad():
            teacher_hidden = model.model(input_ids=teacher_ids).last_hidden_state[0, -k:]
        if variant == "chunked":
            distill = losses.chunked_clipped_forward_kl(
                logits.unsqueeze(0).squeeze(0), teacher_hidden, model.lm_head.weight.detach(), tau=args.tau,
                temperature=args.temperature, student_prescaled=True, chunk_size=args.chunk_size, student_rows=rows,
                gradient_sink=logits,
            ).loss
        else:
            with torch.no_grad():
                teacher_logits = model.lm_head(teacher_hidden).float() / args.temperature
            distill = losses.clipped_forward_kl(logits[rows].float(), teacher_logits, tau=args.tau)
    log_probs = logprobs_from_logits(logits, labels)
    loss = -(advantages * log_probs).mean()
    if distill is not None:
        loss = loss + args.lam * distill.mean()
    loss.backward()


def run_config(model, variant, length, args, losses) -> dict:
    import torch

    model.zero_grad(set_to_none=True)
    meter = Meter(args.device)
    with meter:
        train_step(model, variant, length, args, losses)
    model.zero_grad(set_to_none=True)
    return {"status": "ok", "seconds": meter.seconds, "peak_gib": meter.peak_gib}


def cleanup(model):
    import torch

    if model is not None:
        model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- main


def load_losses():
    sys.path.insert(0, _REPO)
    from ssopd_verl import losses  # pure torch; the package's __init__ imports nothing

    return losses


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help="default: 1.7b 8b (tiny with --tiny)")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="response tokens per sequence; default 8192 16384 32768 (64 128 with --tiny)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="tiny random Qwen3 (CPU smoke runs)")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--distill-tokens", type=int, default=2048, help="K: target tokens distilled")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="the teacher's problem prompt")
    parser.add_argument("--witness-tokens", type=int, default=4096, help="the witness (ssopd.max_witness_tokens)")
    parser.add_argument("--warmup-length", type=int, default=None, help="default: 1024 (32 with --tiny)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="configurations not started within this many seconds are SKIPPED")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    models = args.models or (["tiny"] if args.tiny else ["1.7b", "8b"])
    lengths = sorted(args.lengths or ([64, 128] if args.tiny else [8192, 16384, 32768]))
    warmup = args.warmup_length or (32 if args.tiny else 1024)
    if args.tiny:  # a teacher of tiny size too, unless asked
        args.distill_tokens, args.prompt_tokens, args.witness_tokens = (
            min(args.distill_tokens, 16), min(args.prompt_tokens, 8), min(args.witness_tokens, 16))
    dtype = getattr(torch, args.dtype)
    losses = load_losses()
    start = time.perf_counter()

    records = []
    for name in models:
        model = None
        oom_at = {}  # variant -> shortest length that ran out of memory
        try:
            model = build_model(name, args.device, dtype)
            for variant in args.variants:  # kernels, cuBLAS handles, allocator pools
                train_step(model, variant, warmup, args, losses)
            cleanup(model)
            weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
        except Exception as exc:  # noqa: BLE001 -- record and go on with the next model
            status = "OOM" if is_oom(exc) else f"ERROR: {type(exc).__name__}: {str(exc)[:300]}"
            records += [{"model": name, "length": n, "variant": v, "status": status} for n in lengths
                        for v in args.variants]
            del model
            cleanup(None)
            continue
        for length in lengths:
            for variant in args.variants:
                rec = {"model": name, "length": length, "variant": variant, "weights_gib": weights_gib,
                       "vocab": model.config.vocab_size}
                if time.perf_counter() - start > args.budget_s:
                    rec["status"] = "SKIPPED (budget)"
                elif variant in oom_at:
                    rec["status"] = f"OOM (not tried: OOM at {oom_at[variant]} tokens)"
                else:
                    try:
                        rec.update(run_config(model, variant, length, args, losses))
                    except Exception as exc:  # noqa: BLE001
                        if not is_oom(exc):
                            rec["status"] = f"ERROR: {type(exc).__name__}: {str(exc)[:300]}"
                        else:
                            rec["status"] = "OOM"
                            oom_at[variant] = length
                    cleanup(model)
                records.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
        del model
        cleanup(None)

    # Cost over base, per (model, length).
    base = {(r["model"], r["length"]): r for r in records if r["variant"] == "base" and r["status"] == "ok"}
    for r in records:
        b = base.get((r["model"], r["length"]))
        if r["variant"] != "base" and r["status"] == "ok" and b is not None:
            r["extra_peak_gib_over_base"] = r["peak_gib"] - b["peak_gib"]
            r["time_ratio_over_base"] = r["seconds"] / b["seconds"]
            unit = r["length"] * r["vocab"] * torch.finfo(dtype).bits / 8 / GIB
            r["extra_logits_units"] = r["extra_peak_gib_over_base"] / unit

    device_name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else \
        platform.processor() or "cpu"
    print(f"SSOPD step cost: {device_name}, {args.dtype}, gradient checkpointing, chunk_size {args.chunk_size}; "
          f"peak = max memory allocated over the step ({'GPU' if 'cuda' in args.device else 'process RSS'})")
    print(f"{'model':>6} {'tokens':>7} {'variant':>8} {'status':>8} {'peak GiB':>9} {'+GiB vs base':>12} "
          f"{'time s':>8} {'x base':>7} {'+logits units':>13}")
    for r in records:
        ok = r["status"] == "ok"
        print(f"{r['model']:>6} {r['length']:>7} {r['variant']:>8} {r['status'][:8]:>8} "
              f"{_fmt(r.get('peak_gib'), '9.2f')} {_fmt(r.get('extra_peak_gib_over_base'), '12.2f')} "
              f"{_fmt(r.get('seconds'), '8.2f')} {_fmt(r.get('time_ratio_over_base'), '7.2f')} "
              f"{_fmt(r.get('extra_logits_units'), '13.3f')}"
              + ("" if ok else f"  {r['status']}"))
    if args.json:
        import transformers

        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["benchmarks/gpu_bench.py"] + (argv if argv is not None else sys.argv[1:])),
                       "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
                       "dtype": args.dtype, "chunk_size": args.chunk_size, "records": records}, f, indent=1)


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


if __name__ == "__main__":
    main()
