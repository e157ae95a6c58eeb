"""Extra peak memory of SSOPD's distillation term over GRPO's, in a micro-batch of verl's shape, in logits units.

What is measured (one subprocess per variant, CPU, the peak of the bytes torch allocates, from the profiler's
memory records: deterministic, see ``peak_allocated_mb``): one
forward + backward over a micro-batch's student logits, as verl's FSDP engine runs them in an SSOPD update:

* ``grpo``: verl's own log-prob path (``verl.utils.torch_functional.logprobs_from_logits``, the pure-PyTorch path
  that ``VERL_DISABLE_FLASH_ATTN_CE=1`` selects) and a policy-gradient-like sum over the log-probs, backward;
* ``ssopd``: the same, plus SSOPD's logits hook on a view of the same logits, as the engine calls it
  (``chunked_clipped_forward_kl`` on the distilled positions of one target, teacher states and lm_head weight
  given), with the loss's gradient sink when the implementation has one.

Cases (``--cases``): ``mixed``, a micro-batch with one target (``--distilled`` of its ``--tokens`` positions
distilled); ``none``, a micro-batch without a distilled position, where the hook returns a zero loss attached to
the logits (``ssopd_verl.glue.actor_loss._ZeroLoss``; ``before`` is the former ``0.0 * logits.sum(-1)``, whose
backward made a dense logits-sized zero gradient). Policy paths (``--policies``): ``inplace``, verl's GPU path
(flash-attn's cross-entropy, whose backward writes the gradient into the logits' storage; here its CPU stand-in
``benchmarks/inplace_cross_entropy.py`` in verl's dispatch), and ``rowwise``, verl's fallback under
``VERL_DISABLE_FLASH_ATTN_CE=1`` (``logprobs_from_logits_v2``).

The extra peak of ``ssopd`` over ``grpo`` is reported in units of one [tokens x vocabulary] logits tensor of the
logits' dtype (bf16, as on GPU). With ``--losses FILE`` the loss module is loaded from FILE instead of the package,
to measure an earlier implementation in the same run, e.g. the one before the gradient sink:

    git show 38e54f6:ssopd_verl/losses.py > /tmp/losses_before.py
    .venv/bin/python benchmarks/bench_logit_gradient_memory.py --losses-before /tmp/losses_before.py \
        --json benchmarks/results/logit_gradient_memory.json

``--scale S`` divides the tokens, the distilled positions and ``--chunk-size`` by S together, keeping the
proportions (and so the ratio in logits units) while the resident memory shrinks; the 8B shape below at
``--scale 4`` peaks near 4 GiB:

    .venv/bin/python benchmarks/bench_logit_gradient_memory.py --scale 4 \
        --json benchmarks/results/logit_gradient_memory_cases.json

Default shape, the 8B launch script's micro-batch (``PPO_MAX_TOKEN_LEN=17408`` student + teacher tokens per GPU
with ``teacher_in_token_budget``; SETUP=reported distils the first 2,048 tokens of a target): 10,240 student
positions of which 2,048 distilled, hidden 4,096, vocabulary 151,936, bf16 logits. The policy path here is
verl's CPU fallback (a row-wise log_softmax whose backward stacks the row gradients); on GPU flash-attn's
cross-entropy writes its gradient in place, so GRPO's own peak there is lower, but the distillation term's
*extra* is the same: the buffer it holds and what its backward allocates.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_allocated_mb(fn) -> float:
    """Peak of the bytes torch allocates while ``fn`` runs, above what was allocated when it started, from the
    profiler's memory records (``profile_memory=True``): every leaf op's net allocation and every free outside an
    op, in time order. Deterministic (the same ops allocate the same bytes), unlike the resident set size, which
    moves by tenths of a logits tensor from run to run with glibc's reuse of freed pages; a temporary an op both
    allocates and frees inside itself is not seen (only its net)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in records:
        live += change
        peak = max(peak, live)
    return peak / 2**20


def _losses_module(path):
    if path is None:
        sys.path.insert(0, _REPO)
        import ssopd_verl.losses as module

        return module
    spec = importlib.util.spec_from_file_location("losses_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_variant(variant: str, args) -> dict:
    import torch

    if args.policy == "rowwise":
        os.environ["VERL_DISABLE_FLASH_ATTN_CE"] = "1"
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import inplace_cross_entropy

        inplace_cross_entropy.install()
    from verl.utils.torch_functional import logprobs_from_logits

    sys.path.insert(0, _REPO)
    from ssopd_verl.glue.actor_loss import _ZeroLoss

    losses = _losses_module(args.losses)
    sink = "gradient_sink" in inspect.signature(losses.chunked_clipped_forward_kl).parameters
    torch.manual_seed(0)
    m, n, v, h = args.tokens, args.distilled, args.vocab, args.hidden
    weight = torch.empty(v, h, dtype=torch.bfloat16).normal_().div_(h**0.5)

    def inputs(m, n):
        # The logits as the engine holds them: one (M, V) bf16 tensor with a gradient (here a leaf; the hook's
        # argument is a view of it, as in verl, where it is a view of the lm_head's output).
        return dict(logits=torch.empty(m, v, dtype=torch.bfloat16).normal_().requires_grad_(True),
                    labels=torch.randint(0, v, (m,)), advantages=torch.randn(m),
                    rows=torch.arange(m - n, m),  # one target's distilled positions, at the end of the micro-batch
                    states=torch.empty(n, h, dtype=torch.bfloat16).normal_(), temperature=torch.ones(n))  # fmt: skip

    def step(logits, labels, advantages, rows, states, temperature):
        total = (logprobs_from_logits(logits, labels) * advantages).sum()  # the policy loss's path
        if variant == "ssopd" and args.case == "none":
            view = logits.unsqueeze(0).squeeze(0)  # what the engine hands the hook, as the hook squeezes it
            zero = _ZeroLoss.apply(view) if args.connector == "after" else 0.0 * view.sum(-1, dtype=torch.float32)
            total = total + zero.sum()
        elif variant == "ssopd":
            view = logits.unsqueeze(0)  # what the engine hands the hook
            kwargs = {"gradient_sink": logits} if sink else {}
            terms = losses.chunked_clipped_forward_kl(view.squeeze(0), states, weight, temperature=temperature,
                                                      student_prescaled=True, student_rows=rows,
                                                      chunk_size=args.chunk_size, **kwargs)
            total = total + terms.loss.sum()
        total.backward()

    step(**inputs(8, 4))  # warm-up: one-time allocations (kernels, thread pools) are not the loss's
    batch = inputs(m, n)
    logits = batch["logits"]
    extra_mb = peak_allocated_mb(lambda: step(**batch))
    unit_mb = m * v * logits.element_size() / 2**20
    return {"variant": variant, "case": args.case, "policy": args.policy, "connector": args.connector,
            "losses": args.losses or "ssopd_verl.losses", "gradient_sink": sink,
            "extra_peak_mb": extra_mb, "logits_unit_mb": unit_mb,
            "grad_checksum": float(logits.grad.float().abs().sum())}  # fmt: skip


def measure(variant: str, losses, args, case="mixed", policy="rowwise", connector="after") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--tokens", str(args.tokens),
           "--distilled", str(args.distilled), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--chunk-size", str(args.chunk_size), "--case", case, "--policy", policy,
           "--connector", connector]  # fmt: skip
    if losses:
        cmd += ["--losses", losses]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "losses": losses, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=10240, help="student positions in the micro-batch (M)")
    p.add_argument("--distilled", type=int, default=2048, help="distilled positions among them (N)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=128, help="the loss's chunk_size (ssopd.chunk_size)")
    p.add_argument("--scale", type=int, default=1, help="divide tokens, distilled and chunk size by this")
    p.add_argument("--cases", nargs="+", choices=["mixed", "none"], default=["mixed", "none"])
    p.add_argument("--policies", nargs="+", choices=["inplace", "rowwise"], default=["inplace", "rowwise"])
    p.add_argument("--losses", default=None, help=argparse.SUPPRESS)  # internal: the subprocess's module
    p.add_argument("--losses-before", default=None, help="an earlier losses.py to measure beside the current one")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default="mixed", help=argparse.SUPPRESS)
    p.add_argument("--policy", default="rowwise", help=argparse.SUPPRESS)
    p.add_argument("--connector", default="after", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    if args.scale > 1:
        args.tokens, args.distilled = args.tokens // args.scale, args.distilled // args.scale
        args.chunk_size = max(1, args.chunk_size // args.scale)
    keys = ("tokens", "distilled", "vocab", "hidden", "chunk_size", "scale")
    results = {"shape": {k: getattr(args, k) for k in keys}, "runs": []}
    for policy in args.policies:
        grpo = measure("grpo", None, args, policy=policy)
        results["runs"].append(grpo)
        for case in args.cases:
            labels = [("after", None, "after")]
            if case == "mixed" and args.losses_before:
                labels.insert(0, ("before", args.losses_before, "after"))
            if case == "none":
                labels.insert(0, ("before", None, "before"))
            for label, losses, connector in labels:
                run = measure("ssopd", losses, args, case=case, policy=policy, connector=connector)
                run["label"] = label
                if "error" not in run and "error" not in grpo:
                    run["extra_over_grpo_logits_units"] = (
                        (run["extra_peak_mb"] - grpo["extra_peak_mb"]) / run["logits_unit_mb"])
                results["runs"].append(run)
    print(f"{'policy':>8} {'case':>6} {'label':>7} {'extra over GRPO (logits units)':>31}")
    for r in results["runs"]:
        if r.get("variant") == "ssopd":
            print(f"{r.get('policy', '?'):>8} {r.get('case', '?'):>6} {r.get('label', ''):>7} "
                  f"{r.get('extra_over_grpo_logits_units', float('nan')):31.3f}")
    text = json.dumps(results, indent=2)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
