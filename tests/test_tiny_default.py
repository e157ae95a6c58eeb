"""The embedded tiny default (ssopd_verl.tiny_default): a compact-vocabulary Qwen3 warm-started into the frontier.

One real build (the default spec, ~45-60 s on 2 cores) is shared by the module; determinism and cache behaviour use
cheap builds (same tokenizer and data, 10 training steps)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssopd_verl import tiny_default as td
from ssopd_verl.tiny_tokenizer import QWEN3_SPECIAL_TOKENS

# Same tokenizer and data as the default (only the warm start differs): 10 steps, then stop (band [0, 1]).
CHEAP = td.TinyDefaultSpec(band=(0.0, 1.0), check_every=10, check_below_loss=100.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here (as the build uses): on a shared 2-core machine two threads are several times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny") / "default"
    t0 = time.perf_counter()
    result = td.build_tiny_default(cache)
    seconds = time.perf_counter() - t0
    print(f"tiny default: {seconds:.1f}s, {result.steps} steps, accuracy {result.accuracy:.3f}")
    return result, seconds


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built[0].model_path)


@pytest.fixture(scope="module")
def model(built):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(built[0].model_path).eval()


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template


def test_tokenizer_special_tokens(tokenizer):
    n = len(tokenizer)
    assert n <= 1024
    ids = [tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN3_SPECIAL_TOKENS]
    assert ids == list(range(n - len(QWEN3_SPECIAL_TOKENS), n))  # Qwen3's order, at the end of the vocabulary
    for t, _ in QWEN3_SPECIAL_TOKENS:
        assert tokenizer(t, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(t)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    # byte-level: any text round-trips (the teacher template has an em dash), digits are single tokens
    for text in ["What is 37 + 48?", "\\boxed{85}", "héllo — wörld ∑ 😀\n\n\\frac{1}{2}", "<think>\n7+8=15\n</think>"]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"]) == list("12345")


def test_chat_template_renders_like_qwen3(tokenizer, qwen_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is 37 + 48?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "What is 1 + 2?"},
            {"role": "assistant", "content": "<think>\n1+2=3\n</think>\n\n\\boxed{3}"},
            {"role": "user", "content": "And 2 + 2?"},
        ],
    ]
    for messages in conversations:
        for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
            real = qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
            assert ours == real
    rendered = tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nWhat is 37 + 48?<|im_end|>\n<|im_start|>assistant\n"
    no_think = tokenizer.apply_chat_template(
        conversations[0], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert no_think == rendered + "<think>\n\n</think>\n\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == rendered


# ---------------------------------------------------------------------------------------------------------------
# The build


def test_build_result_and_manifest(built):
    result, seconds = built
    spec = td.TinyDefaultSpec()
    lo, hi = spec.band
    assert lo <= result.accuracy <= hi
    assert 0 < result.steps <= spec.max_steps
    assert result.data_source == td.DATA_SOURCE and result.chat_template_kwargs == {}
    m = json.loads((Path(result.cache_dir) / "manifest.json").read_text())
    assert m["accuracy"] == result.accuracy and m["steps"] == result.steps
    assert m["spec"] == spec.to_dict() and m["seed"] == spec.seed
    assert m["history"][-1] == {"step": result.steps, "loss": m["history"][-1]["loss"], "accuracy": result.accuracy}
    assert {"torch", "transformers", "tokenizers", "verl"} <= set(m["versions"])
    assert set(m["files"]) >= {
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "train.parquet",
        "val.parquet",
    }
    assert m["parameters"] < 2_000_000 and m["vocab_size"] <= 1024
    config = json.loads((Path(result.model_path) / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["attn_implementation"] == "sdpa"
    assert config["vocab_size"] == m["vocab_size"] and config["tie_word_embeddings"] is True
    assert not list(Path(result.cache_dir).parent.glob("*.partial-*"))


def test_sampled_groups_are_mixed(built, tokenizer, model):
    """Re-measured independently (transformers' generate, pure sampling at temperature 1) on RL train problems,
    which the warm start never saw: 16 prompts x 8 samples must give mixed groups (0 < p < 1)."""
    import pandas as pd

    df = pd.read_parquet(built[0].train_file).sample(16, random_state=1234)
    prompts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in df["prompt"]]
    enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1234)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=48,
            num_return_sequences=8,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    truths = [rm["ground_truth"] for rm in df["reward_model"] for _ in range(8)]

    from verl.utils.reward_score import default_compute_score

    scores = [default_compute_score(td.DATA_SOURCE, t, g) for t, g in zip(texts, truths)]
    assert scores == [float(td.is_correct(t, g)) for t, g in zip(texts, truths)]  # the warm start's check agrees
    p = [sum(scores[8 * i : 8 * i + 8]) / 8 for i in range(16)]
    mixed = sum(0 < x < 1 for x in p)
    print(f"fresh sampled accuracy {sum(scores) / len(scores):.3f}, mixed groups {mixed}/16: {p}")
    assert 0.1 <= sum(scores) / len(scores) <= 0.9
    assert mixed >= 6
    assert sum(t.startswith("<think>\n") and "</think>" in t for t in texts) >= 0.9 * len(texts)


def test_own_sampler_matches_band(built, tokenizer, model):
    """The module's sampler on the validation problems (a different seed and set than the build's check)."""
    import pandas as pd

    df = pd.read_parquet(built[0].val_file)
    problems = []
    for prompt, rm in zip(df["prompt"], df["reward_model"]):
        a, b = (int(x) for x in prompt[0]["content"].split("?")[0].removeprefix("What is ").split(" + "))
        assert str(a + b) == rm["ground_truth"]
        problems.append(td.Problem(a, b))
    acc, counts = td.sampled_accuracy(model, tokenizer, problems, samples=4, seed=99, max_new_tokens=48)
    assert 0.1 <= acc <= 0.9, acc
    assert sum(0 < c < 4 for c in counts) >= 8


# ---------------------------------------------------------------------------------------------------------------
# Data files and reward


def test_parquet_schema(built):
    import pandas as pd

    result = built[0]
    train, val = pd.read_parquet(result.train_file), pd.read_parquet(result.val_file)
    spec = td.TinyDefaultSpec()
    assert (len(train), len(val)) == (spec.n_train, spec.n_val)
    for df, split in ((train, "train"), (val, "val")):
        assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        assert set(df["data_source"]) == {td.DATA_SOURCE} and set(df["ability"]) == {"math"}
        for i, row in enumerate(df.itertuples()):
            assert len(row.prompt) == 1 and row.prompt[0]["role"] == "user"
            assert row.prompt[0]["content"].endswith(td.INSTRUCTION)
            assert row.reward_model["style"] == "rule"
            info = row.extra_info
            assert (info["split"], info["index"]) == (split, i)
            assert td.is_correct(info["solution"], row.reward_model["ground_truth"])
            assert info["solution"].startswith("<think>\n")
    splits = td.make_splits(spec)
    sft = {p.prompt for p in splits["sft"]} | {p.prompt for p in splits["check"]}
    train_q = {p[0]["content"] for p in train["prompt"]}
    val_q = {p[0]["content"] for p in val["prompt"]}
    assert len(train_q) == len(train) and len(val_q) == len(val)
    assert not (train_q & val_q) and not (train_q & sft) and not (val_q & sft)


def test_default_compute_score_on_val(built):
    import pandas as pd
    from verl.utils.reward_score import default_compute_score

    val = pd.read_parquet(built[0].val_file)
    for ds, rm, info in zip(val["data_source"], val["reward_model"], val["extra_info"]):
        gt = rm["ground_truth"]
        assert default_compute_score(ds, f"\\boxed{{{gt}}}", gt, extra_info=info) == 1.0
        assert default_compute_score(ds, info["solution"], gt, extra_info=info) == 1.0
        assert default_compute_score(ds, f"\\boxed{{{int(gt) + 1}}}", gt, extra_info=info) == 0.0
        assert default_compute_score(ds, "no answer", gt, extra_info=info) == 0.0


def test_math_verify_custom_reward(built):
    """The evaluation's math-verify grader as verl's custom reward function, on the tiny task's data."""
    import pandas as pd
    from verl.utils.import_utils import load_extern_object

    fn = load_extern_object("pkg://ssopd_verl.evaluation.grading", "compute_score")  # how verl loads it
    val = pd.read_parquet(built[0].val_file).head(4)
    for ds, rm, info in zip(val["data_source"], val["reward_model"], val["extra_info"]):
        gt = rm["ground_truth"]
        assert fn(ds, info["solution"], gt, extra_info=info)["score"] == 1.0
        assert fn(ds, f"so \\boxed{{{int(gt) - 1}}}", gt, extra_info=info)["score"] == 0.0


def test_verl_renders_the_trained_prompt(built, tokenizer):
    """verl's dataset + rollout tokenisation (data.apply_chat_template_kwargs = CHAT_TEMPLATE_KWARGS = {}) gives
    exactly the prompt ids the warm start trained on."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    config = OmegaConf.create(
        {
            "max_prompt_length": 128,
            "cache_dir": str(Path(built[0].cache_dir).parent / "verl-cache"),
            "apply_chat_template_kwargs": dict(td.CHAT_TEMPLATE_KWARGS),
        }
    )
    ds = RLHFDataset(built[0].val_file, tokenizer, config)
    builder = create_continuous_token_builder(
        tokenizer, hf_model_type="qwen3", chat_template_kwargs=dict(td.CHAT_TEMPLATE_KWARGS)
    )
    for i in range(3):
        row = ds[i]
        messages = list(row["raw_prompt"])
        ids = builder.build_initial_tokens(messages)
        problem = td.Problem(*(int(x) for x in messages[0]["content"].split("?")[0][8:].split(" + ")))
        assert ids == td._prompt_ids(tokenizer, problem)
        assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------------------
# Cache, determinism, CLI


def test_second_call_uses_cache(built):
    result = built[0]
    root = Path(result.cache_dir)
    before = _files(root)
    t0 = time.perf_counter()
    again = td.build_tiny_default(root)
    assert time.perf_counter() - t0 < 5.0
    assert again == result
    assert _files(root) == before


def test_cheap_builds_are_deterministic_and_share_tokenizer_and_data(built, tmp_path):
    a = td.build_tiny_default(tmp_path / "a", spec=CHEAP)
    b = td.build_tiny_default(tmp_path / "b", spec=CHEAP)
    assert a.steps == b.steps == 10 and a.accuracy == b.accuracy
    ma, mb = a.manifest, b.manifest
    assert ma["files"] == mb["files"]  # every file byte-identical, model weights included
    mdef = built[0].manifest
    for name in ("model/tokenizer.json", "model/tokenizer_config.json", "train.parquet", "val.parquet"):
        assert ma["files"][name] == mdef["files"][name]
    assert ma["files"]["model/model.safetensors"] != mdef["files"]["model/model.safetensors"]


def test_interrupted_or_corrupted_build_is_rebuilt(tmp_path):
    root = tmp_path / "c"
    first = td.build_tiny_default(root, spec=CHEAP)
    (root / "manifest.json").unlink()  # as if the build died before its last write
    again = td.build_tiny_default(root, spec=CHEAP)
    assert again.manifest["files"] == first.manifest["files"]
    with open(root / "val.parquet", "ab") as f:  # corrupted file: hash mismatch
        f.write(b"x")
    fixed = td.build_tiny_default(root, spec=CHEAP)
    assert fixed.manifest["files"] == first.manifest["files"]
    # another spec in the same directory is not mistaken for this one
    other = td.TinyDefaultSpec(band=(0.0, 1.0), check_every=5, check_below_loss=100.0)
    assert td.build_tiny_default(root, spec=other).steps == 5
    assert not list(tmp_path.glob("*.partial-*"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SSOPD_CACHE", str(tmp_path))
    assert td.default_cache_dir() == tmp_path / "tiny-default-v1"
    other = td.default_cache_dir(CHEAP)
    assert other.parent == tmp_path and other.name.startswith("tiny-default-v1-")
    monkeypatch.delenv("SSOPD_CACHE")
    assert td.default_cache_dir() == Path.home() / ".cache" / "ssopd_verl" / "tiny-default-v1"


def test_cli_reports_cached_build(built):
    result = built[0]
    proc = subprocess.run(
        [sys.executable, "-m", "ssopd_verl.tiny_default", "--cache-dir", result.cache_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"model_path: {result.model_path}" in proc.stdout
    assert f"train_file: {result.train_file}" in proc.stdout
    assert f"val_file:   {result.val_file}" in proc.stdout
    assert f"sampled accuracy {result.accuracy:.3f}" in proc.stdout


def test_task_text():
    p = td.Problem(37, 48)
    assert p.prompt == "What is 37 + 48? " + td.INSTRUCTION
    assert p.solution == "<think>\n7+8=15\n3+4+1=8\n</think>\n\n\\boxed{85}"
    assert td.Problem(97, 48).solution.endswith("9+4+1=14\n</think>\n\n\\boxed{145}")
    assert td.is_correct("a \\boxed{1} b \\boxed{85}", "85") and not td.is_correct("\\boxed{85", "85")
    assert not td.is_correct("<think>\n</think>", "3")
