"""The embedded tiny default (ssopd_verl.tiny_default): a compact-vocabulary Qwen3 warm-started into the frontier,
whose teacher prompt (a correct solution in its context) answers far better than its student prompt.

The model tests use the copy shipped in the package (the same files on every machine; the thresholds are measured
on it). A build of the default spec is another model on another CPU (its kernels round differently), so the build
(~2-2.5 min on 2 idle cores, into the default cache, started in the background by conftest.py) is tested for what
it promises (the band, the teacher gap), not for equality with the shipped copy; determinism and cache behaviour
use cheap builds in temporary directories (same tokenizer and data, 10 training steps, no held-out measurement).

Across instruction sets, measured on the shipped model (Sapphire Rapids; ATEN_CPU_CAPABILITY=avx512 (default) /
avx2 / default with MKL_ENABLE_INSTRUCTIONS=AVX2 / SSE4_2): its logits differ by up to 3.6e-5, and every sampled
and greedy count below was identical under the three settings (held out 196/512, 459/512, 70/128; the sampled
witness test 60/70). A rounding difference can only flip single samples, so the tolerances allow a few flips."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssopd_verl import tiny_default as td
from ssopd_verl.tiny_default.tasks import addition3 as a3
from ssopd_verl.tiny_default.tasks.addition import Addition
from ssopd_verl.tiny_tokenizer import QWEN3_SPECIAL_TOKENS

# Same tokenizer and data as the default (only the warm start differs): 10 steps, then stop (no targets); the
# check samples 8 tokens (an untrained model never stops on its own), no held-out measurement.
CHEAP = td.TinyDefaultSpec(
    train_steps=10,
    check_every=10,
    band=(0.0, 1.0),
    teacher_min=0.0,
    check_samples=1,
    heldout_samples=0,
    max_new_tokens=8,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here (as the build uses): on a shared 2-core machine two threads are several times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def shipped():
    """The tiny default shipped with the package (what +tiny=default uses), checked against its manifest."""
    return td.shipped_tiny_default()


@pytest.fixture(scope="module")
def built():
    """A build of the default spec on this machine, in the default cache ($SSOPD_CACHE or ~/.cache/ssopd_verl):
    started in the background by conftest.py, built once and reused while its manifest and file hashes hold."""
    t0 = time.perf_counter()
    result = td.build_tiny_default()
    seconds = time.perf_counter() - t0
    print(
        f"tiny default: {seconds:.1f}s, {result.steps} steps, accuracy {result.accuracy:.3f}, teacher prompt "
        f"{result.teacher_accuracy:.3f}; held out {result.heldout}"
    )
    return result, seconds


@pytest.fixture(scope="module")
def tokenizer(shipped):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped.model_path)


@pytest.fixture(scope="module")
def model(shipped):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(shipped.model_path).eval()


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
# The shipped copy (and what every build promises)


def _check_build(result):
    """What every build of the default spec promises, on any machine: the spec's targets when the warm start
    stopped, the held-out frontier (band, teacher prompt far above the student), the manifest's fields and files."""
    spec = td.TinyDefaultSpec()
    lo, hi = spec.band
    assert lo <= result.accuracy <= hi
    assert result.teacher_accuracy >= spec.teacher_min
    assert spec.train_steps <= result.steps <= spec.max_steps
    assert result.data_source == td.DATA_SOURCE and result.chat_template_kwargs == {}
    m = json.loads((Path(result.cache_dir) / "manifest.json").read_text())
    assert m == result.manifest and m["version"] == td.CACHE_VERSION == 2
    assert m["accuracy"] == result.accuracy and m["steps"] == result.steps
    assert m["teacher_accuracy"] == result.teacher_accuracy
    assert m["spec"] == spec.to_dict() and m["seed"] == spec.seed
    last = m["history"][-1]
    assert (last["step"], last["accuracy"], last["teacher_accuracy"]) == (
        result.steps,
        result.accuracy,
        result.teacher_accuracy,
    )
    # the held-out measurement: every validation problem, sampled at temperature 1 with a fixed seed
    h = m["heldout"]
    assert h == result.heldout
    assert (h["split"], h["problems"], h["samples"], h["seed"], h["temperature"]) == (
        "val",
        spec.n_val,
        spec.heldout_samples,
        spec.heldout_seed,
        1.0,
    )
    assert lo <= h["student_accuracy"] <= hi
    assert h["teacher_accuracy"] >= 0.8
    assert h["teacher_accuracy"] - h["student_accuracy"] >= 0.3
    assert 0.0 < h["student_greedy_accuracy"] < 1.0
    assert h["mixed_problems"] >= spec.n_val // 2
    assert m["teacher_prompt"]["builder"] == "ssopd_verl.teacher_context.build_teacher_context"
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


def test_shipped_files_match_their_manifest(shipped):
    """The package's copy: exactly the manifest's files, each with its sha256 (recomputed here), a few MB; the
    build it is: stopped at step 500, held out student 0.383, teacher prompt 0.896, greedy 0.547 (README)."""
    import hashlib

    root = Path(shipped.cache_dir)
    assert root == td.SHIPPED_DIR == Path(td.__file__).resolve().parent / "shipped"
    assert shipped.model_path == str(root / "model") and shipped.val_file == str(root / "val.parquet")
    _check_build(shipped)
    files = shipped.manifest["files"]
    on_disk = {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()}
    assert on_disk == set(files) | {"manifest.json"}
    for rel, digest in files.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel
    assert sum((root / rel).stat().st_size for rel in on_disk) < 3_000_000
    h = shipped.heldout
    assert shipped.steps == 500
    measured = (h["student_accuracy"], h["teacher_accuracy"], h["student_greedy_accuracy"])
    assert measured == (196 / 512, 459 / 512, 70 / 128)


def test_shipped_copy_is_checked_never_rebuilt(shipped, tmp_path, monkeypatch):
    """A missing, changed or stale file of the shipped copy is a clear error; +tiny=default's resolver returns
    the shipped paths without building (a rebuild on another CPU would be another model)."""
    import shutil

    from ssopd_verl.tiny_default import build

    def must_not_build(*args, **kwargs):
        raise AssertionError("the shipped tiny default was rebuilt")

    monkeypatch.setattr(build, "build_tiny_default", must_not_build)
    assert td.get_tiny_default() == shipped
    for name in ("model_path", "train_file", "val_file"):
        assert td.resolve_path(name) == getattr(shipped, name)

    copy = tmp_path / "shipped"
    shutil.copytree(shipped.cache_dir, copy)
    assert td.shipped_tiny_default(copy).manifest == shipped.manifest
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"model/model.safetensors does not match its sha256.*--ship"):
        td.shipped_tiny_default(copy)
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (copy / "val.parquet").unlink()
    with pytest.raises(RuntimeError, match="val.parquet is missing"):
        td.shipped_tiny_default(copy)
    manifest = dict(shipped.manifest, spec=dataclasses.replace(td.TinyDefaultSpec(), seed=1).to_dict())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="built for another spec"):
        td.shipped_tiny_default(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(RuntimeError, match="no readable manifest.json"):
        td.shipped_tiny_default(copy)


def test_resolver_uses_the_shipped_copy_without_torch(shipped):
    """In a fresh interpreter: +tiny=default's paths come from the shipped copy, torch is never imported."""
    code = (
        "import sys; from ssopd_verl import tiny_default as td; print(td.resolve_path('model_path')); "
        "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == [shipped.model_path, "[]"]


def test_ship_replaces_the_copy(shipped, tmp_path):
    """``--ship``'s copy: the manifest and its files, checked; only a build of the default spec is shipped."""
    dest = tmp_path / "pkg" / "shipped"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from an older copy")
    copied = td.ship_tiny_default(shipped, dest)
    assert copied.manifest == shipped.manifest and copied.cache_dir == str(dest.resolve())
    assert not (dest / "stale.txt").exists() and not list(dest.parent.glob(".*partial*"))
    other = dataclasses.replace(shipped, manifest=dict(shipped.manifest, spec=CHEAP.to_dict()))
    with pytest.raises(ValueError, match="only a build of the default spec"):
        td.ship_tiny_default(other, dest)
    assert td.shipped_tiny_default(dest).manifest == shipped.manifest  # left as it was


def test_instruction_set_setting_is_in_effect():
    """scripts/install_and_test.sh reruns the numerics tests with ATEN_CPU_CAPABILITY=avx2: torch must use it."""
    import os

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch CPU capability: {capability}, MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS')}")
    wanted = os.environ.get("ATEN_CPU_CAPABILITY")
    if wanted:
        assert capability.lower() == wanted.lower()
    else:
        assert capability in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256", "SVE128"}


def test_shipped_heldout_measurement_is_reproduced(shipped, tokenizer, model):
    """The manifest's held-out numbers, measured again on the shipped model with the manifest's seed. On other
    CPUs the logits round differently (1.7e-5 between AVX-512 and AVX2 kernels here), which can flip a sample
    whose draw falls that close to a token boundary: each flip moves one completion. None flipped under AVX-512,
    AVX2 or SSE kernels here; the tolerance allows 8 of 512 sampled and 2 of 128 greedy completions."""
    h = shipped.heldout
    val = td.make_splits(td.TinyDefaultSpec())["val"]
    again = td.measure(model, tokenizer, val, samples=h["samples"], seed=h["seed"], max_new_tokens=48)
    print(f"held out again: {again}; manifest: {h}")
    n = h["problems"] * h["samples"]
    assert abs(again["student_accuracy"] - h["student_accuracy"]) <= 8 / n
    assert abs(again["teacher_accuracy"] - h["teacher_accuracy"]) <= 8 / n
    assert abs(again["student_greedy_accuracy"] - h["student_greedy_accuracy"]) <= 2 / h["problems"]
    assert abs(again["mixed_problems"] - h["mixed_problems"]) <= 8


def test_sampled_groups_are_mixed(shipped, tokenizer, model):
    """Re-measured independently (transformers' generate, pure sampling at temperature 1) on RL train problems,
    which the warm start never saw: 16 prompts x 8 samples must give mixed groups (0 < p < 1)."""
    import pandas as pd

    df = pd.read_parquet(shipped.train_file).sample(16, random_state=1234)
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


def test_own_sampler_matches_band(shipped, tokenizer, model):
    """The module's sampler on the validation problems (a different seed and set than the build's check)."""
    import pandas as pd

    df = pd.read_parquet(shipped.val_file)
    problems = []
    for prompt, rm in zip(df["prompt"], df["reward_model"]):
        a, b = (int(x) for x in prompt[0]["content"].split("?")[0].removeprefix("What is ").split(" + "))
        assert str(a + b) == rm["ground_truth"]
        problems.append(td.Problem(a, b))
    acc, counts = td.sampled_accuracy(model, tokenizer, problems, samples=4, seed=99, max_new_tokens=48)
    assert 0.1 <= acc <= 0.9, acc
    assert sum(0 < c < 4 for c in counts) >= 8


def _train_problems(tiny, n):
    import pandas as pd

    df = pd.read_parquet(tiny.train_file).head(n)
    return [td.Problem(*(int(x) for x in p[0]["content"].split("?")[0][8:].split(" + "))) for p in df["prompt"]]


def test_teacher_prompt_beats_student_prompt(shipped, tokenizer, model):
    """The SSOPD premise on the tiny default, re-measured on RL train problems (never in the warm start) with a
    seed of its own: sampled at temperature 1, the teacher prompt (a correct solution in context) answers far
    better than the student prompt, and the student sits in the frontier band."""
    problems = _train_problems(shipped, 64)
    lo, hi = td.TinyDefaultSpec().band
    kwargs = dict(samples=4, seed=4321, max_new_tokens=48)
    student, counts = td.sampled_accuracy(model, tokenizer, problems, **kwargs)
    teacher, _ = td.sampled_accuracy(model, tokenizer, problems, prompt="teacher", **kwargs)
    print(f"student {student:.3f}, teacher prompt {teacher:.3f}")
    assert lo <= student <= hi
    assert teacher >= 0.8
    assert teacher - student >= 0.3
    assert sum(0 < c < 4 for c in counts) >= 16  # mixed groups


def test_teacher_prompt_is_the_trainers_with_a_sampled_witness(shipped, tokenizer, model):
    """What the trainer does: the witness is a correct completion the model sampled itself (its response ids,
    <|im_end|> included), passed through witness_from_response and build_teacher_context with the default
    template and the student's chat-template kwargs. The teacher prompt built from it reads the witness and
    answers correctly; for a sampled witness equal to the worked solution the ids equal teacher_prompt_ids'.
    Measured on the shipped model: 35 witnesses, 60/70 = 0.857 correct, the same under AVX-512, AVX2 and SSE
    kernels (a model built on another CPU read 62/88 = 0.70: hence the shipped model)."""
    from ssopd_verl.teacher_context import DEFAULT_TEMPLATE, build_teacher_context, witness_from_response

    problems = _train_problems(shipped, 48)
    samples = td.sample_completions(
        model, tokenizer, [td.prompt_ids(tokenizer, p) for p in problems for _ in range(4)], max_new_tokens=48, seed=7
    )
    witnesses = {}
    for k, (resp, finished) in enumerate(samples):
        p = problems[k // 4]
        text = tokenizer.decode(resp, skip_special_tokens=True)
        if finished and p not in witnesses and td.is_correct(text, p.answer):
            witnesses[p] = resp
    assert len(witnesses) >= 24
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts, chosen = [], []
    for p, resp in witnesses.items():
        assert resp[-1] == eos
        ids = build_teacher_context(
            tokenizer,
            p.messages,
            witness_from_response(tokenizer, resp, "keep"),
            [],
            template=DEFAULT_TEMPLATE,
            chat_template_kwargs=td.CHAT_TEMPLATE_KWARGS,
        ).input_ids
        assert ids == td.teacher_prompt_ids(tokenizer, p, resp)
        if resp == td.completion_ids(tokenizer, p.solution):
            assert ids == td.teacher_prompt_ids(tokenizer, p)
        text = tokenizer.decode(ids)
        assert text.startswith("<|im_start|>user\n" + p.prompt) and text.endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(resp[:-1]) in text
        prompts.append(ids)
        chosen.append(p)
    results = td.sample_completions(model, tokenizer, prompts * 2, max_new_tokens=48, seed=11)
    correct = [
        finished and td.is_correct(tokenizer.decode(resp, skip_special_tokens=True), chosen[k % len(chosen)].answer)
        for k, (resp, finished) in enumerate(results)
    ]
    assert sum(correct) / len(correct) >= 0.8


def test_tiny_overlay_validates_a_fixed_set():
    """The +tiny=default overlay: validation on the whole (fixed) validation file, greedy, and a seeded data
    config, so the same checkpoint scores the same in every run (an unseeded random subset did not)."""
    from omegaconf import OmegaConf

    overlay = OmegaConf.load(Path(td.__file__).parents[1] / "conf" / "tiny" / "default.yaml")
    data = overlay.data
    assert data.val_max_samples in (-1, None) or data.val_max_samples >= td.TinyDefaultSpec().n_val
    assert data.seed is not None
    val = overlay.actor_rollout_ref.rollout.val_kwargs
    assert val.temperature == 0 and val.do_sample is False and val.n == 1


# ---------------------------------------------------------------------------------------------------------------
# Data files and reward


def test_parquet_schema(shipped):
    import pandas as pd

    train, val = pd.read_parquet(shipped.train_file), pd.read_parquet(shipped.val_file)
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


def test_default_compute_score_on_val(shipped):
    import pandas as pd
    from verl.utils.reward_score import default_compute_score

    val = pd.read_parquet(shipped.val_file)
    for ds, rm, info in zip(val["data_source"], val["reward_model"], val["extra_info"]):
        gt = rm["ground_truth"]
        assert default_compute_score(ds, f"\\boxed{{{gt}}}", gt, extra_info=info) == 1.0
        assert default_compute_score(ds, info["solution"], gt, extra_info=info) == 1.0
        assert default_compute_score(ds, f"\\boxed{{{int(gt) + 1}}}", gt, extra_info=info) == 0.0
        assert default_compute_score(ds, "no answer", gt, extra_info=info) == 0.0


def test_math_verify_custom_reward(shipped):
    """The evaluation's math-verify grader as verl's custom reward function, on the tiny task's data."""
    import pandas as pd
    from verl.utils.import_utils import load_extern_object

    fn = load_extern_object("pkg://ssopd_verl.evaluation.grading", "compute_score")  # how verl loads it
    val = pd.read_parquet(shipped.val_file).head(4)
    for ds, rm, info in zip(val["data_source"], val["reward_model"], val["extra_info"]):
        gt = rm["ground_truth"]
        assert fn(ds, info["solution"], gt, extra_info=info)["score"] == 1.0
        assert fn(ds, f"so \\boxed{{{int(gt) - 1}}}", gt, extra_info=info)["score"] == 0.0


def test_verl_renders_the_trained_prompt(shipped, tokenizer, tmp_path):
    """verl's dataset + rollout tokenisation (data.apply_chat_template_kwargs = CHAT_TEMPLATE_KWARGS = {}) gives
    exactly the prompt ids the warm start trained on."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    config = OmegaConf.create(
        {
            "max_prompt_length": 128,
            "cache_dir": str(tmp_path / "verl-cache"),
            "apply_chat_template_kwargs": dict(td.CHAT_TEMPLATE_KWARGS),
        }
    )
    ds = RLHFDataset(shipped.val_file, tokenizer, config)
    builder = create_continuous_token_builder(
        tokenizer, hf_model_type="qwen3", chat_template_kwargs=dict(td.CHAT_TEMPLATE_KWARGS)
    )
    for i in range(3):
        row = ds[i]
        messages = list(row["raw_prompt"])
        ids = builder.build_initial_tokens(messages)
        problem = td.Problem(*(int(x) for x in messages[0]["content"].split("?")[0][8:].split(" + ")))
        assert ids == td.prompt_ids(tokenizer, problem)
        assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------------------
# Cache, determinism, CLI


def test_second_call_uses_cache(tmp_path, monkeypatch):
    """A finished build is returned as it is: nothing is built, trained or locked again, no file is touched."""
    from ssopd_verl.tiny_default import build

    result = td.build_tiny_default(tmp_path / "c", spec=CHEAP)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the second call rebuilt the cached tiny default")

    for name in ("_build_into", "warm_start", "_file_lock"):
        monkeypatch.setattr(build, name, must_not_run)
    root = Path(result.cache_dir)
    before = _files(root)
    again = td.build_tiny_default(root, spec=CHEAP)
    assert again == result
    assert _files(root) == before


def test_cheap_builds_are_deterministic_and_share_tokenizer_and_data(shipped, tmp_path):
    a = td.build_tiny_default(tmp_path / "a", spec=CHEAP)
    b = td.build_tiny_default(tmp_path / "b", spec=CHEAP)
    assert a.steps == b.steps == 10 and a.accuracy == b.accuracy and a.teacher_accuracy == b.teacher_accuracy
    ma, mb = a.manifest, b.manifest
    assert ma["files"] == mb["files"]  # every file byte-identical, model weights included
    _same_tokenizer_and_data(a, shipped)  # integer work: the same on every machine
    assert ma["files"]["model/model.safetensors"] != shipped.manifest["files"]["model/model.safetensors"]


def _same_tokenizer_and_data(a, b):
    """Same tokenizer and parquet rows (compared by content, not bytes: a parquet file records its writer)."""
    import pandas as pd

    for name in ("tokenizer.json", "tokenizer_config.json"):
        first, second = (json.loads((Path(x.model_path) / name).read_text()) for x in (a, b))
        assert first == second, name
    for name in ("train_file", "val_file"):
        pd.testing.assert_frame_equal(pd.read_parquet(getattr(a, name)), pd.read_parquet(getattr(b, name)))


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
    other = dataclasses.replace(CHEAP, train_steps=5, check_every=5)
    assert td.build_tiny_default(root, spec=other).steps == 5
    assert not list(tmp_path.glob("*.partial-*"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SSOPD_CACHE", str(tmp_path))
    assert td.CACHE_NAME == f"tiny-default-v{td.CACHE_VERSION}"
    assert td.default_cache_dir() == tmp_path / td.CACHE_NAME
    other = td.default_cache_dir(CHEAP)
    assert other.parent == tmp_path and other.name.startswith(td.CACHE_NAME + "-")
    monkeypatch.delenv("SSOPD_CACHE")
    assert td.default_cache_dir() == Path.home() / ".cache" / "ssopd_verl" / td.CACHE_NAME


def test_task_text():
    p = td.Problem(37, 48)
    assert p.prompt == "What is 37 + 48? " + td.INSTRUCTION
    assert p.solution == "<think>\n7+8=15\n3+4+1=8\n</think>\n\n\\boxed{85}"
    assert td.Problem(97, 48).solution.endswith("9+4+1=14\n</think>\n\n\\boxed{145}")
    assert td.is_correct("a \\boxed{1} b \\boxed{85}", "85") and not td.is_correct("\\boxed{85", "85")
    assert not td.is_correct("<think>\n</think>", "3")


def test_slipped_solutions():
    import random

    rng = random.Random(0)
    # a carry problem: the carry is dropped, and the answer follows from it
    assert td.Problem(37, 48).slipped_solution(rng) == "<think>\n7+8=15\n3+4=7\n</think>\n\n\\boxed{75}"
    assert td.Problem(97, 48).slipped_solution(rng) == "<think>\n7+8=15\n9+4=13\n</think>\n\n\\boxed{135}"
    seen = set()
    for a in range(10, 100):
        for b in range(10, 100):
            p = td.Problem(a, b)
            slipped = p.slipped_solution(rng)
            assert td.is_correct(p.solution, p.answer) and not td.is_correct(slipped, p.answer)
            assert slipped.startswith("<think>\n") and slipped.count("\n") == p.solution.count("\n")
            if not p.has_carry:  # one column sum off by one, the rest consistent with it
                good, bad = p.solution.split("\n")[1:3], slipped.split("\n")[1:3]
                assert sum(g != s for g, s in zip(good, bad)) >= 1
                seen.add(next(i for i, (g, s) in enumerate(zip(good, bad)) if g != s))
    assert seen == {0, 1}


# ---------------------------------------------------------------------------------------------------------------
# Tasks: a second task is a new class in the registry, not an edit of the build


def test_default_task_keeps_the_cache_key():
    spec = td.TinyDefaultSpec()
    assert spec.task == td.DEFAULT_TASK == "addition" and isinstance(td.get_task(spec.task), Addition)
    # builds from before tasks existed recorded no task: the default's manifest spec and cache directory are those
    assert "task" not in spec.to_dict() and td.TinyDefaultSpec.from_dict(spec.to_dict()) == spec
    assert td.default_cache_dir(dataclasses.replace(spec, task="addition")) == td.default_cache_dir()
    other = dataclasses.replace(spec, task="subtraction")
    assert other.to_dict()["task"] == "subtraction" and td.TinyDefaultSpec.from_dict(other.to_dict()) == other
    assert other.digest() != spec.digest() and td.default_cache_dir(other) != td.default_cache_dir()
    with pytest.raises(ValueError, match="unknown tiny-default task"):
        td.make_splits(other)


@dataclasses.dataclass(frozen=True)
class _Difference:
    a: int
    b: int

    @property
    def prompt(self):
        return f"What is {self.a} - {self.b}? {td.INSTRUCTION}"

    @property
    def messages(self):
        return [{"role": "user", "content": self.prompt}]

    @property
    def answer(self):
        return str(self.a - self.b)

    def _worked(self, result):
        return f"<think>\n{self.a}-{self.b}={result}\n</think>\n\n\\boxed{{{result}}}"

    @property
    def solution(self):
        return self._worked(self.a - self.b)

    def slipped_solution(self, rng):
        return self._worked(self.a - self.b + rng.choice((-1, 1)))


class _Subtraction:
    name = "subtraction"
    data_source = "subtraction"
    ability = "arithmetic"

    def problems(self, spec):
        return [_Difference(a, b) for a in range(spec.min_operand, spec.max_operand + 1) for b in range(10, a + 1)]


def test_a_second_task_is_a_registry_entry(monkeypatch, tmp_path):
    """A task defined here, registered, built through the unchanged tokenizer, warm start and build."""
    import pandas as pd

    monkeypatch.setitem(td.TASKS, "subtraction", _Subtraction())
    spec = dataclasses.replace(CHEAP, task="subtraction")
    result = td.build_tiny_default(tmp_path / "sub", spec=spec)
    assert result.data_source == "subtraction" and result.manifest["spec"]["task"] == "subtraction"
    splits = td.make_splits(spec)
    val = pd.read_parquet(result.val_file)
    assert list(val["prompt"].map(lambda m: m[0]["content"])) == [p.prompt for p in splits["val"]]
    assert set(val["data_source"]) == {"subtraction"} and set(val["ability"]) == {"arithmetic"}
    assert [r["ground_truth"] for r in val["reward_model"]] == [p.answer for p in splits["val"]]
    tokenizer = td.build_tokenizer(spec)
    assert tokenizer.decode(td.prompt_ids(tokenizer, splits["val"][0])).startswith("<|im_start|>user\nWhat is ")
    assert td.build_tiny_default(tmp_path / "sub", spec=spec) == result  # cached under its own spec


# ---------------------------------------------------------------------------------------------------------------
# The harder task, addition3 (three-digit addition): its problems, solutions, slips, preset, rows and overlay. No
# full build here (it takes ~10 min); a CHEAP-sized build of its preset goes through the unchanged pipeline.


def test_addition3_text_and_answers():
    p = a3.Problem3(347, 586)
    assert p.prompt == "What is 347 + 586? " + td.INSTRUCTION and p.messages == [{"role": "user", "content": p.prompt}]
    assert p.answer == "933"
    assert p.solution == "<think>\n7+6=13\n4+8+1=13\n3+5+1=9\n</think>\n\n\\boxed{933}"
    assert a3.Problem3(999, 999).solution == "<think>\n9+9=18\n9+9+1=19\n9+9+1=19\n</think>\n\n\\boxed{1998}"
    assert a3.Problem3(120, 305).solution == "<think>\n0+5=5\n2+0=2\n1+3=4\n</think>\n\n\\boxed{425}"
    assert (p.carry_columns, a3.Problem3(510, 620).carry_columns, a3.Problem3(105, 105).carry_columns) == (
        (1, 2),
        (),  # 5+6=11 carries out of the hundreds only: no column receives it
        (1,),
    )
    for a, b in [(100, 100), (999, 999), (555, 445), (909, 191), (123, 877)]:
        q = a3.Problem3(a, b)
        assert td.is_correct(q.solution, q.answer) and int(q.answer) == a + b


def test_addition3_slipped_solutions():
    import random

    rng = random.Random(0)
    # 347 + 586 carries into the tens and the hundreds: either carry can be the one dropped
    drops = {a3.Problem3(347, 586).slipped_solution(rng) for _ in range(40)}
    assert drops == {
        "<think>\n7+6=13\n4+8=12\n3+5+1=9\n</think>\n\n\\boxed{923}",
        "<think>\n7+6=13\n4+8+1=13\n3+5=8\n</think>\n\n\\boxed{833}",
    }
    columns_off = set()
    problems = a3.Addition3().problems(td.TinyDefaultSpec.for_task("addition3"))[:3000]
    for p in problems:
        slipped = p.slipped_solution(rng)
        assert not td.is_correct(slipped, p.answer) and slipped.startswith("<think>\n")
        assert slipped.count("\n") == p.solution.count("\n")
        got = int(slipped.rsplit("{", 1)[1].rstrip("}"))
        good, bad = p.solution.split("\n")[1:4], slipped.split("\n")[1:4]
        first = next(i for i, (g, s) in enumerate(zip(good, bad)) if g != s)  # the slipped column
        if p.carry_columns:  # one carry dropped: that column loses its +1, the answer 10^column short
            assert first in p.carry_columns
            assert good[first].replace("+1=", "=", 1).split("=")[0] == bad[first].split("=")[0]
            assert got == int(p.answer) - 10**first
        else:  # one column sum off by one: the answer 10^column off
            assert abs(got - int(p.answer)) == 10**first and good[first].split("=")[0] == bad[first].split("=")[0]
            columns_off.add(first)
    assert columns_off == {0, 1, 2}


def test_addition3_problems_and_preset():
    spec = td.TinyDefaultSpec.for_task("addition3")
    assert spec.task == "addition3" and isinstance(td.get_task("addition3"), a3.Addition3)
    assert (spec.min_operand, spec.max_operand) == (100, 999)
    assert spec.band == a3.SPEC_DEFAULTS["band"]
    assert spec.student_correct_frac == a3.SPEC_DEFAULTS["student_correct_frac"]
    problems = a3.Addition3().problems(spec)
    assert len(problems) == len(set(problems)) == a3.N_PROBLEMS
    assert all(100 <= p.a <= 999 and 100 <= p.b <= 999 for p in problems)
    assert problems == a3.Addition3().problems(dataclasses.replace(spec, seed=5))  # the seed only splits them
    assert sum(bool(p.carry_columns) for p in problems) > a3.N_PROBLEMS // 2
    splits = td.make_splits(spec)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"val": 128, "train": 512, "check": 128, "sft": a3.N_PROBLEMS - 768}
    seen = [set(v) for v in splits.values()]
    assert sum(map(len, seen)) == len(set().union(*seen))  # disjoint
    assert splits == td.make_splits(spec) and splits["val"] != td.make_splits(dataclasses.replace(spec, seed=1))["val"]
    # a smaller operand range: every pair when there are fewer than N_PROBLEMS
    small = a3.Addition3().problems(dataclasses.replace(spec, min_operand=100, max_operand=119))
    assert sorted((p.a, p.b) for p in small) == [(a, b) for a in range(100, 120) for b in range(100, 120)]
    # presets: the default task's is the default spec (cache key unchanged); this one is its own build
    assert td.TinyDefaultSpec.for_task() == td.TinyDefaultSpec.for_task("addition") == td.TinyDefaultSpec()
    assert td.TinyDefaultSpec.for_task().digest() == td.TinyDefaultSpec().digest()
    assert td.default_cache_dir(spec) != td.default_cache_dir() and spec.to_dict()["task"] == "addition3"
    assert td.TinyDefaultSpec.from_dict(spec.to_dict()) == spec
    assert td.TinyDefaultSpec.for_task("addition3", train_steps=7).train_steps == 7
    with pytest.raises(ValueError, match="unknown tiny-default task"):
        td.TinyDefaultSpec.for_task("nope")


def test_addition3_parquet_rows():
    from ssopd_verl.tiny_default.tasks import parquet_rows

    spec = td.TinyDefaultSpec.for_task("addition3")
    val = td.make_splits(spec)["val"]
    rows = parquet_rows(td.get_task("addition3"), val, "val")
    assert len(rows) == spec.n_val
    for i, (row, p) in enumerate(zip(rows, val)):
        assert row["data_source"] == td.DATA_SOURCE and row["ability"] == "math"
        assert row["prompt"] == [{"role": "user", "content": f"What is {p.a} + {p.b}? {td.INSTRUCTION}"}]
        assert row["reward_model"] == {"style": "rule", "ground_truth": str(p.a + p.b)}
        assert row["extra_info"] == {"split": "val", "index": i, "solution": p.solution}
        assert td.is_correct(row["extra_info"]["solution"], row["reward_model"]["ground_truth"])


def test_addition3_cheap_build(tmp_path):
    """The preset with a CHEAP-sized warm start through the unchanged pipeline: its own data, the completions fit
    the preset's max_new_tokens with the trained tokenizer, deterministic rows."""
    import random

    import pandas as pd

    cheap = {k: getattr(CHEAP, k) for k in ("train_steps", "check_every", "band", "teacher_min", "check_samples",
                                            "heldout_samples", "max_new_tokens")}  # fmt: skip
    spec = td.TinyDefaultSpec.for_task("addition3", **cheap)
    result = td.build_tiny_default(tmp_path / "a3", spec=spec)
    assert result.steps == 10 and result.manifest["spec"] == spec.to_dict()
    assert result.manifest["spec"]["task"] == "addition3" and result.data_source == td.DATA_SOURCE
    splits = td.make_splits(spec)
    train, val = pd.read_parquet(result.train_file), pd.read_parquet(result.val_file)
    assert list(val["prompt"].map(lambda m: m[0]["content"])) == [p.prompt for p in splits["val"]]
    assert list(train["reward_model"].map(lambda r: r["ground_truth"])) == [p.answer for p in splits["train"]]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.model_path)
    preset = td.TinyDefaultSpec.for_task("addition3")
    rng = random.Random(0)
    texts = [p.solution for p in splits["val"]] + [p.slipped_solution(rng) for p in splits["val"]]
    lengths = [len(td.completion_ids(tokenizer, text)) for text in texts]
    assert max(lengths) <= min(preset.max_new_tokens, 48) - 8  # room to spare under the overlay's 48 tokens
    assert td.build_tiny_default(tmp_path / "a3", spec=spec) == result


def test_resolver_picks_the_tasks_preset(monkeypatch):
    """`${ssopd_tiny:model_path}` is the shipped default; `${ssopd_tiny:model_path,addition3}` builds the task's
    preset (what `python -m ssopd_verl.tiny_default --task addition3` builds)."""
    from ssopd_verl.tiny_default import build

    specs = []

    def fake_build(cache_dir=None, *, force=False, spec=None, progress=None):
        specs.append(spec)
        return td.TinyDefault(model_path=f"m-{spec.task}", train_file="t", val_file="v", accuracy=0.0, steps=0)

    monkeypatch.setattr(build, "build_tiny_default", fake_build)
    assert td.resolve_path("model_path") == td.shipped_tiny_default().model_path  # shipped: no build
    assert td.resolve_path("model_path", "addition3") == "m-addition3"
    assert td.resolve_path("val_file", "addition3") == "v"
    preset = td.TinyDefaultSpec.for_task("addition3")
    assert specs == [preset, preset]
    with pytest.raises(ValueError, match="expected one of"):
        td.resolve_path("solution", "addition3")
    with pytest.raises(ValueError, match="unknown tiny-default task"):
        td.resolve_path("model_path", "nope")


def test_addition3_overlay_is_the_default_but_for_the_build():
    """`+tiny=addition3` composed by verl's config (in process, interpolations unresolved): the `+tiny=default`
    config except the model and data paths (the task's build) and the experiment name."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        base = ["+recipe=ssopd", "+platform=cpu"]
        default = flat(OmegaConf.to_container(compose("ppo_trainer", overrides=[*base, "+tiny=default"])))
        hard = flat(OmegaConf.to_container(compose("ppo_trainer", overrides=[*base, "+tiny=addition3"])))
    assert set(default) == set(hard)
    differ = {k: (default[k], hard[k]) for k in default if default[k] != hard[k]}
    assert differ == {
        "actor_rollout_ref.model.path": ("${ssopd_tiny:model_path}", "${ssopd_tiny:model_path,addition3}"),
        "data.train_files": ("${ssopd_tiny:train_file}", "${ssopd_tiny:train_file,addition3}"),
        "data.val_files": ("${ssopd_tiny:val_file}", "${ssopd_tiny:val_file,addition3}"),
        "trainer.experiment_name": ("tiny-ssopd", "tiny-addition3-ssopd"),
    }


# ---------------------------------------------------------------------------------------------------------------
# A build of the default spec on this machine (conftest.py starts it in the background; last in this module, so
# that the tests above run while it builds): what it promises, not equality with the shipped copy.


def test_build_keeps_its_promises(built, shipped):
    result, seconds = built
    _check_build(result)
    assert Path(result.cache_dir) == td.default_cache_dir()
    assert not list(Path(result.cache_dir).parent.glob("*.partial-*"))
    _same_tokenizer_and_data(result, shipped)
    same = result.manifest["files"] == shipped.manifest["files"]
    print(f"this machine's build {'equals' if same else 'differs from'} the shipped copy: {result.heldout}")


def test_cli_reports_cached_build(built):
    result = built[0]
    proc = subprocess.run(
        [sys.executable, "-m", "ssopd_verl.tiny_default", "--cache-dir", result.cache_dir],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only: a cached build is reported in about a second
    )
    assert proc.returncode == 0, proc.stderr
    assert f"model_path: {result.model_path}" in proc.stdout
    assert f"train_file: {result.train_file}" in proc.stdout
    assert f"val_file:   {result.val_file}" in proc.stdout
    assert f"sampled accuracy {result.accuracy:.3f}" in proc.stdout
    same = result.manifest["files"] == td.shipped_tiny_default().manifest["files"]
    line = f"shipped copy ({td.SHIPPED_DIR}, what +tiny=default uses): "
    assert line + ("identical files" if same else "differs (") in proc.stdout
