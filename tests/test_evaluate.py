"""Evaluation: the metrics (pure) and the driver on a tiny random Qwen3 on CPU (files, structure, resume, regrade).

A random model scores ~0, so the driver tests check what is written and what is (not) recomputed, not accuracy.
"""

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import forked
import pytest

from ssopd_verl.evaluation import runner
from ssopd_verl.evaluation.generate import SamplingSettings, TransformersBackend
from ssopd_verl.evaluation.metrics import bootstrap_ci, majority_correct, pass_at_k, per_problem_metrics, summarize

REPO = Path(__file__).resolve().parents[1]
EVALUATE = REPO / "scripts" / "evaluate.py"
BENCHES = ["aime24", "hmmt25_feb"]


# ---------------------------------------------------------------------------------------------------- metrics


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(12, 2, 2) == pytest.approx(1 - comb(10, 2) / comb(12, 2))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote():
    assert majority_correct(["1", "1", "2"], [0, 0, 1]) == 0.0
    assert majority_correct(["1", "2", "2"], [0, 1, 1]) == 1.0
    assert majority_correct(["1", "2"], [1, 0]) == 0.5  # a tie: the expected value of a random tie-break
    assert majority_correct([None, None, "7"], [0, 0, 1]) == 1.0  # no answer, no vote
    assert majority_correct([None, None], [0, 0]) == 0.0
    assert majority_correct([r"\dfrac{1}{2}", r"\frac{1}{2}", "3"], [1, 1, 0]) == 1.0  # same answer, two spellings


def test_per_problem_metrics_and_summary():
    scores = {
        "a": {
            "scores": [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]],
            "answers": [["5", "4", "4", "3"], ["2"] * 4, ["1"] * 4],
        },
        "b": {"scores": [[1, 1, 0, 0], [0, 0, 0, 0]], "answers": [["9", "9", "8", "8"], [None] * 4]},
    }
    m = per_problem_metrics(scores["a"]["scores"], scores["a"]["answers"])
    assert m["k"] == 4
    np.testing.assert_allclose(m["avg"], [0.25, 1.0, 0.0])
    np.testing.assert_allclose(m["pass"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(m["maj"], [0.0, 1.0, 0.0])

    s = summarize(scores, n_boot=500)
    a, b = s["benchmarks"]["a"], s["benchmarks"]["b"]
    assert a["avg@4"]["value"] == pytest.approx(100 * 1.25 / 3)
    assert b["avg@4"]["value"] == pytest.approx(25.0)
    assert b["maj@4"]["value"] == pytest.approx(25.0)  # problem 0: a 2-2 tie of right and wrong -> 0.5
    assert s["macro"]["avg@4"]["value"] == pytest.approx((100 * 1.25 / 3 + 25.0) / 2)
    for entry in (a["avg@4"], a["pass@4"], s["macro"]["avg@4"]):
        lo, hi = entry["ci"]
        assert lo <= entry["value"] <= hi and lo < hi


def test_bootstrap_ci():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    lo, hi = bootstrap_ci([0, 1] * 50, n_boot=4000, seed=1)
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # ~ mean +- 1.96 * 0.05
    assert bootstrap_ci([0, 1, 1], seed=3) == bootstrap_ci([0, 1, 1], seed=3)


# ---------------------------------------------------------------------------------------------------- driver


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ssopd_verl.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "model")


def _cli(out, model, *extra):
    cmd = forked.command(str(EVALUATE), "--model", str(model), "--out", str(out), "--backend", "transformers")
    cmd += ["--benchmarks", ",".join(BENCHES), "--limit", "2", "--n", "2", "--max-new-tokens", "8", *extra]
    proc = subprocess.run(cmd, env=forked.environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    log = _cli(out, tiny_model)
    return out, log


def test_cli_writes_per_sample_jsonl_and_a_summary(first_run):
    out, log = first_run
    assert "4 to draw" in log
    for name in BENCHES:
        rows = runner.read_jsonl(out / f"{name}.jsonl")
        assert sorted((r["problem_idx"], r["sample_idx"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for r in rows:
            assert r["benchmark"] == name
            assert r["prompt"].endswith("<|im_start|>assistant\n")  # thinking on: no empty <think></think> block
            assert "Please reason step by step" in r["prompt"]
            assert r["finish_reason"] in ("stop", "length") and 0 < r["num_tokens"] <= 8
            assert r["score"] in (0.0, 1.0) and "completion" in r and "extracted" in r and "answer" in r
        assert len({r["seed"] for r in rows}) == 4  # every sample has its own seed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["benchmarks"]) == set(BENCHES)
    for name in BENCHES:
        entry = summary["benchmarks"][name]
        assert entry["num_problems"] == 2 and entry["n"] == 2
        assert {"avg@2", "pass@2", "maj@2"} <= set(entry)
        assert len(entry["avg@2"]["ci"]) == 2
    assert {"avg@2", "pass@2", "maj@2"} <= set(summary["macro"])
    assert summary["run"]["max_new_tokens"] == 8 and summary["run"]["temperature"] == 1.0
    assert summary["run"]["enable_thinking"] is True
    md = (out / "summary.md").read_text()
    assert "| aime24 | 2 |" in md and "**macro**" in md


def test_cli_rerun_resumes_without_recomputing(first_run, tiny_model):
    out, _ = first_run
    before = {name: (out / f"{name}.jsonl").read_bytes() for name in BENCHES}
    log = _cli(out, tiny_model)
    assert "nothing to generate" in log
    assert {name: (out / f"{name}.jsonl").read_bytes() for name in BENCHES} == before


class CountingBackend:
    def __init__(self, inner):
        self.inner, self.tokenizer, self.calls = inner, inner.tokenizer, []

    def generate(self, requests, sampling):
        self.calls.append(len(requests))
        return self.inner.generate(requests, sampling)


def test_interrupted_run_and_larger_n_draw_only_the_missing_samples(first_run, tiny_model, tmp_path):
    src, _ = first_run
    out = tmp_path / "copy"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    # simulate a crash: the last sample of aime24 lost and half a line written
    path = out / "aime24.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])
    kept = [json.loads(l) for l in lines[:-1]]

    backend = CountingBackend(TransformersBackend(str(tiny_model)))
    cfg = runner.EvalConfig(
        model=str(tiny_model), out=str(out), benchmarks=BENCHES, n=3, limit=2,
        sampling=SamplingSettings(max_new_tokens=8), chunk_size=2,
    )
    summary = runner.run(cfg, lambda _path: backend, log=lambda *_: None)
    # aime24: 1 lost + 2 new (sample 2 of each problem); hmmt25_feb: 2 new; in chunks of 2 across benchmarks
    assert backend.calls == [2, 2, 1]
    rows = runner.read_jsonl(path)
    assert rows[: len(kept)] == kept  # finished samples untouched
    assert sorted((r["problem_idx"], r["sample_idx"]) for r in rows) == [(p, s) for p in range(2) for s in range(3)]
    assert summary["benchmarks"]["aime24"]["n"] == 3 and "avg@3" in summary["macro"]


def _edit_copy(src, out):
    """A copy of the first run's output folder, and its aime24 rows to edit and write back."""
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out, runner.read_jsonl(out / "aime24.jsonl")


def test_regrade_recomputes_scores_from_saved_completions(first_run, tmp_path):
    out, rows = _edit_copy(first_run[0], tmp_path / "regrade")
    path = out / "aime24.jsonl"
    rows[0]["completion"] = "<think>\nok\n</think>\n\nThe answer is \\boxed{" + rows[0]["answer"] + "}."
    rows[1]["score"] = 1.0  # a stale score the grader disagrees with
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert runner.regrade(out, log=lambda *_: None) == 2
    regraded = runner.read_jsonl(path)
    assert regraded[0]["score"] == 1.0 and regraded[0]["extracted"] == rows[0]["answer"]
    assert regraded[1]["score"] == 0.0
    summary = runner.write_summary(out, BENCHES, n=2, limit=2)
    assert summary["benchmarks"]["aime24"]["avg@2"]["value"] == pytest.approx(25.0)


def test_summary_reports_degeneration_per_benchmark(first_run, tmp_path):
    """The table's degeneration columns (issue: degeneration in evaluate.py's table): length-limit hits as the
    engine reported them, terminal repetition loops on the decoded text (ssopd_verl.degeneration's text rule),
    empty completions left out of the loop share; a 100k-character looping answer costs the window, not its length."""
    out, rows = _edit_copy(first_run[0], tmp_path / "degeneration")
    path = out / "aime24.jsonl"
    loop = "<think>\nLet me add them. " + "Wait, let me check the carry again. " * 3000  # ~100k characters
    rows[0].update(completion=loop[:100_000], finish_reason="length")  # cut inside the loop
    rows[1].update(completion="", finish_reason="stop")  # a failed request: counted as empty, not in the shares
    rows[2].update(completion="The answer is \\boxed{7}.", finish_reason="stop")
    rows[3].update(completion="1111111111 is not a loop", finish_reason="length")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = runner.write_summary(out, BENCHES, n=2, limit=2)["benchmarks"]["aime24"]
    assert entry["repetition_loop_frac"] == pytest.approx(1 / 3) and entry["empty_completions"] == 1
    assert entry["truncated_frac"] == pytest.approx(2 / 4)
    md = (out / "summary.md").read_text()
    assert "| truncated | loop | mean tokens |" in md
    assert "| 50.0% | 33.3% |" in md.split("| aime24 |")[1].splitlines()[0]


def test_resume_refuses_other_sampling_settings(first_run, tiny_model):
    out, _ = first_run
    cfg = runner.EvalConfig(model=str(tiny_model), out=str(out), benchmarks=BENCHES, n=2, limit=2,
                            sampling=SamplingSettings(temperature=0.6, max_new_tokens=8))
    with pytest.raises(SystemExit, match="temperature"):
        runner.run(cfg, lambda _path: None, log=lambda *_: None)


def test_cli_help():
    proc = subprocess.run([sys.executable, str(EVALUATE), "--help"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0
    for flag in ("--n", "--temperature", "--top-p", "--max-new-tokens", "--backend", "--limit", "--regrade"):
        assert flag in proc.stdout
    assert "38,912" in proc.stdout
