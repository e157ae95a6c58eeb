"""`scripts/evaluate.py --backend vllm` on CPU (vLLM's CPU wheel, installed by scripts/install.sh) on the tiny default.

The same prompts go through the transformers backend: both engines run the model in fp32 and decode greedily, so
they must write the same completions, hence the same grades and the same summary (one metrics code path). The
prompts are the tiny default's first validation problems, which it answers correctly about half the time greedily,
so the grades are not all equal and the comparison is not vacuous. vLLM starts an engine process: the CLI, which
has the `__main__` guard, runs in a subprocess.
"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ssopd_verl.evaluation import runner

REPO = Path(__file__).resolve().parents[1]
EVALUATE = REPO / "scripts" / "evaluate.py"
PROBLEMS = 8
MAX_NEW_TOKENS = 40  # the tiny default's completions take 21-27 tokens


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """The tiny default's first validation problems as a {problem, answer} benchmark file."""
    from ssopd_verl.tiny_default import get_tiny_default

    tiny = get_tiny_default()
    rows = pd.read_parquet(tiny.val_file).head(PROBLEMS)
    path = tmp_path_factory.mktemp("bench") / "tiny_val.jsonl"
    with open(path, "w") as f:
        for _, row in rows.iterrows():
            problem = row["prompt"][0]["content"]
            f.write(json.dumps({"problem": problem, "answer": row["reward_model"]["ground_truth"]}) + "\n")
    return tiny.model_path, path


def evaluate(out: Path, model, bench: Path, backend: str) -> str:
    cmd = [sys.executable, str(EVALUATE), "--model", str(model), "--out", str(out), "--backend", backend,
           "--benchmarks", str(bench), "--n", "1", "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS),
           "--dtype", "float32", "--n-boot", "200"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def both(benchmark, tmp_path_factory):
    model, bench = benchmark
    out = {}
    for backend in ("vllm", "transformers"):
        out[backend] = tmp_path_factory.mktemp(backend)
        log = evaluate(out[backend], model, bench, backend)
        out[backend + "_log"] = log
    return out


def test_vllm_evaluation_runs_on_cpu(both):
    log = both["vllm_log"]
    assert "Initializing a V1 LLM engine" in log and "device_config=cpu" in log  # vLLM's engine, on its CPU platform
    rows = runner.read_jsonl(both["vllm"] / "tiny_val.jsonl")
    assert sorted(r["problem_idx"] for r in rows) == list(range(PROBLEMS))
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["num_tokens"] <= MAX_NEW_TOKENS for r in rows)


def test_vllm_and_transformers_write_the_same_greedy_completions_and_grades(both):
    vllm = sorted(runner.read_jsonl(both["vllm"] / "tiny_val.jsonl"), key=lambda r: r["problem_idx"])
    hf = sorted(runner.read_jsonl(both["transformers"] / "tiny_val.jsonl"), key=lambda r: r["problem_idx"])
    for a, b in zip(vllm, hf):
        assert a["prompt"] == b["prompt"]
        for key in ("completion", "finish_reason", "num_tokens", "extracted", "score"):
            assert a[key] == b[key], (a["problem_idx"], key, a[key], b[key])
    scores = [r["score"] for r in vllm]
    assert 0 < sum(scores) < len(scores), scores  # right and wrong answers: the grades carry information
    summaries = {k: json.loads((both[k] / "summary.json").read_text()) for k in ("vllm", "transformers")}
    assert summaries["vllm"]["benchmarks"] == summaries["transformers"]["benchmarks"]


@pytest.mark.parametrize(
    "args, argument",
    [
        (["--model", "/nonexistent/model"], "--model"),
        (["--model", "checkpoints/run/global_step_5"], "--model"),
        (["--n", "0"], "--n"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-p", "0"], "--top-p"),
        (["--benchmarks", "nope"], "--benchmarks"),
    ],
)
def test_bad_arguments_stop_with_one_line_naming_the_argument(args, argument, tmp_path):
    base = {"--model": str(tmp_path), "--out": str(tmp_path / "out"), "--benchmarks": "aime24"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    cmd = [sys.executable, str(EVALUATE)] + [x for kv in base.items() for x in kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"argument {argument}:" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written or loaded
