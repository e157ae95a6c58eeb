"""The benchmark scripts run end to end at toy sizes on CPU and write the JSON fields the docs quote."""

import json
import math
import os
import subprocess
import sys

import forked

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run(script, *args, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(forked.command(os.path.join(BENCH, script), *args, "--json", str(out)),
                          env=forked.environment(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_distill_loss_tiny(tmp_path):
    result, stdout = run("bench_distill_loss.py", "--tokens", "256", "--chunked-only-tokens", "384",
                         "--vocab", "4096", "--hidden", "32", "--chunk", "32", "--topk", "4", "512",
                         "--topk-tokens", "8", "--topk-vocab", "512", tmp_path=tmp_path)
    both, chunked_only = result["records"]
    assert (both["tokens"], chunked_only["tokens"]) == (256, 384)
    for key in ("time_ratio", "memory_ratio", "extra_peak_logits"):
        assert finite(both[key]), (key, both)
    assert both["grads_agree"] is True
    assert finite(chunked_only["extra_peak_logits"]) and chunked_only["reference"] is None
    assert chunked_only["time_ratio"] is None and chunked_only["memory_ratio"] is None
    assert finite(chunked_only["chunked"]["seconds"])
    # Top-k table: every clip mode and student kind, finite errors; k = V is the exact loss.
    assert {(r["clip"], r["student"]) for r in result["topk"]} == {
        (c, s) for c in ("pointwise", "none") for s in ("reranked", "off_support")}
    for r in result["topk"]:
        for key in ("loss_mean_rel_err", "loss_abs_err_mean", "grad_rel_err", "grad_cosine"):
            assert finite(r[key]), (key, r)
        if r["k"] == r["vocab"]:
            assert r["loss_abs_err_mean"] < 1e-5 and r["grad_rel_err"] < 1e-4
    assert "time ratio" in stdout


def test_gpu_bench_tiny_on_cpu(tmp_path):
    result, stdout = run("gpu_bench.py", "--tiny", "--device", "cpu", "--dtype", "float32", "--lengths", "16", "32",
                         "--warmup-length", "8", tmp_path=tmp_path)
    records = result["records"]
    assert [(r["length"], r["variant"]) for r in records] == [
        (n, v) for n in (16, 32) for v in ("base", "chunked", "full")]
    for r in records:
        assert r["status"] == "ok", r
        assert finite(r["seconds"]) and finite(r["peak_gib"])
        if r["variant"] != "base":
            assert finite(r["extra_peak_gib_over_base"]) and finite(r["time_ratio_over_base"])
    assert "chunked" in stdout


def test_bench_update_overhead_tiny(tmp_path):
    result, stdout = run("bench_update_overhead.py", "--prompts", "2", "--n", "4", "--response-tokens", "8",
                         "--repeats", "1", tmp_path=tmp_path)
    assert result["proportions"] == "tiny" and result["rows"] == 8 and result["targets"] == 1  # one mixed group
    for key in ("time_ratio", "teacher_tokens_per_token", "grpo_s", "ssopd_s", "layer_to_vocab_compute"):
        assert finite(result[key]) and result[key] > 0, (key, result)
    assert "ratio ssopd/grpo" in stdout


def test_qwen3_1_7b_proportions_match_the_real_model():
    sys.path.insert(0, BENCH)
    try:
        import bench_update_overhead as bench
    finally:
        sys.path.remove(BENCH)
    real = bench.layer_to_vocab_flops(2048, 28, 16, 8, 128, 6144)  # Qwen3-1.7B's config
    shape = bench.PROPORTIONS["qwen3-1.7b"]
    small = bench.layer_to_vocab_flops(shape["hidden_size"], shape["num_layers"], shape["num_heads"],
                                       shape["num_kv_heads"], shape["hidden_size"] // shape["num_heads"],
                                       shape["intermediate_size"])  # fmt: skip
    assert math.isclose(small, real, rel_tol=0.02) and 4.4 < real < 4.7


def test_bench_loss_time_tiny(tmp_path):
    result, stdout = run("bench_loss_time.py", "--rows", "4", "--hidden", "8", "--repeats", "1", tmp_path=tmp_path)
    assert result["vocab"] == 151936 and result["rows"] == 4
    for clip in ("pointwise", "token", "none"):
        assert finite(result[f"{clip}_s"]) and result[f"{clip}_s"] > 0
        assert f"{clip}: loss forward + backward over 4 rows" in stdout
