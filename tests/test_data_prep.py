"""scripts/prepare_data.py, offline: small local fixtures in the hub datasets' formats, and a clear no-network error."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from ssopd_verl.evaluation.benchmarks import BENCHMARKS, INSTRUCTION

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_data.py"
FIXTURES = REPO / "tests" / "fixtures"


def prepare(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Run every subcommand once on the local fixtures (DAPO from a directory of parquet files, as a git clone)."""
    out = tmp_path_factory.mktemp("data")
    dapo_dir = out / "dapo_clone" / "data"
    dapo_dir.mkdir(parents=True)
    pd.read_json(FIXTURES / "dapo_math_17k_sample.jsonl", lines=True).to_parquet(dapo_dir / "dapo-math-17k.parquet")
    prepare("dapo", "--source", str(out / "dapo_clone"), "--out-dir", str(out))
    prepare("openthoughts", "--source", str(FIXTURES / "openthoughts_math_sample.jsonl"), "--out-dir", str(out))
    prepare("math", "--source", str(FIXTURES / "openthoughts_math_sample.jsonl"), "--out-dir", str(out),
            "--max-samples", "1")
    prepare("eval", "--out-dir", str(out))
    return out


def test_help():
    proc = prepare("--help")
    for command in ("openthoughts", "dapo", "math", "eval", "all"):
        assert command in proc.stdout
    assert "--source" in prepare("dapo", "--help").stdout


def test_clear_error_without_network(tmp_path):
    proc = prepare("dapo", "--out-dir", str(tmp_path), check=False,
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "could not load 'BytedTsinghua-SIA/DAPO-Math-17k'" in proc.stderr
    assert "--source" in proc.stderr and "huggingface.co" in proc.stderr
    assert not (tmp_path / "dapo_math_17k").exists()


def test_dapo_rows(prepared):
    df = pd.read_parquet(prepared / "dapo_math_17k" / "train.parquet")
    assert len(df) == 3  # the repeated problem is kept once
    row = df.iloc[0]
    content = row["prompt"][0]["content"]
    assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
    assert content == f"Find the remainder when $2^{{10}}$ is divided by $7$.\n{INSTRUCTION}"
    assert "Answer:" not in content  # DAPO's own answer format is replaced by the boxed instruction
    assert row["data_source"] == "dapo_math_17k" and row["ability"] == "math"
    assert dict(row["reward_model"]) == {"style": "rule", "ground_truth": "2"}
    assert row["extra_info"]["split"] == "train" and list(df["extra_info"].map(lambda e: e["index"])) == [0, 1, 2]
    assert "solution" not in row["extra_info"]


def test_reference_solution_rows(prepared):
    df = pd.read_parquet(prepared / "openthoughts_math" / "train.parquet")
    # dropped: a proof without a boxed answer, an over-long answer, a repeated problem
    assert [r["ground_truth"] for r in df["reward_model"]] == ["2", r"\frac{5}{6}"]
    info = df.iloc[1]["extra_info"]
    assert info["solution"].endswith(r"= \boxed{\frac{5}{6}}$.") and info["source"] == "synthetic_math"
    assert len(pd.read_parquet(prepared / "math" / "train.parquet")) == 1  # --max-samples


def test_eval_sets_offline(prepared):
    sizes = {"aime24": 30, "aime25": 30, "hmmt25_feb": 30, "amc23": 40, "math500": 500}
    for name in BENCHMARKS:
        df = pd.read_parquet(prepared / "eval" / f"{name}.parquet")
        assert len(df) == sizes[name] and set(df["data_source"]) == {name}
        assert df.iloc[0]["prompt"][0]["content"].endswith(INSTRUCTION)


def test_verl_reads_the_rows_and_grades_them(prepared, qwen_tokenizer):
    """verl's RLHFDataset loads the file (chat prompt, solution for OPSD) and the launch scripts' reward grades it."""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create({"max_prompt_length": 1024, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(prepared / "cache")})
    ds = RLHFDataset(str(prepared / "openthoughts_math" / "train.parquet"), qwen_tokenizer, config)
    assert len(ds) == 2
    row = ds[1]
    assert row["raw_prompt"][0]["content"].endswith(INSTRUCTION)
    assert "\\boxed{\\frac{5}{6}}" in row["extra_info"]["solution"]
    reward = get_custom_reward_fn(OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://ssopd_verl.evaluation.grading", "name": "compute_score"}}}))
    gt = row["reward_model"]["ground_truth"]
    good = reward(data_source=row["data_source"], solution_str="... so $\\boxed{5/6}$", ground_truth=gt,
                  extra_info=row["extra_info"])
    bad = reward(data_source=row["data_source"], solution_str="\\boxed{6/5}", ground_truth=gt)
    assert good["score"] == 1.0 and bad["score"] == 0.0
