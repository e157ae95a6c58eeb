"""Reporting: training curves from a recorded verl file-logger log, and the paper-style table from eval summaries."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssopd_verl.evaluation.metrics import summarize
from ssopd_verl.reporting import PANELS, csv_table, load_tracker, markdown_table, plot_training_curves, table_rows

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SSOPD_LOG = FIXTURES / "verl_tracker_qwen3_1.7b_ssopd.jsonl"
GRPO_LOG = FIXTURES / "verl_tracker_qwen3_1.7b_grpo.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_fixture_is_in_the_format_verls_file_logger_writes(tmp_path, monkeypatch):
    """Write the fixture's first records again with verl's own FileLogger and compare byte for byte."""
    import numpy as np
    from verl.utils.tracking import FileLogger

    records = [json.loads(line) for line in SSOPD_LOG.read_text().splitlines()[:3]]
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "again.jsonl"))
    logger = FileLogger("ssopd", "again")
    for record in records:
        logger.log({k: np.float64(v) if isinstance(v, float) else v for k, v in record["data"].items()}, record["step"])
    logger.finish()
    assert (tmp_path / "again.jsonl").read_text().splitlines() == SSOPD_LOG.read_text().splitlines()[:3]


def test_load_tracker():
    series = load_tracker(SSOPD_LOG)
    assert [s for s, _ in series["critic/score/mean"]] == list(range(1, 13))
    assert [s for s, _ in series["val-core/aime24/acc/mean@4"]] == [0, 5, 10, 12]
    for key in ("ssopd/frontier_frac", "ssopd/pairs", "ssopd/distill_loss", "ssopd/kl_unclipped", "ssopd/clipped_teacher_mass"):
        assert len(series[key]) == 12, key
    assert series["response_length/mean"][0][1] == pytest.approx(9638.08, abs=0.01)


def test_load_tracker_tolerates_a_torn_line_and_repeated_steps(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"step":1,"data":{"critic/score/mean":0.5,"note":"text"}}\n'
        '{"step":1,"data":{"critic/score/mean":0.7}}\n'
        '{"step":2,"data":{"critic/score/me'
    )
    assert load_tracker(path) == {"critic/score/mean": [(1, 0.7)]}


def test_curves_cover_reward_accuracy_length_and_ssopd_metrics(tmp_path):
    out = tmp_path / "curves.png"
    drawn = plot_training_curves([("SSOPD", SSOPD_LOG), ("GRPO", GRPO_LOG)], out)
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 20_000
    assert set(drawn) == {title for title, _ in PANELS}
    assert drawn["reward (critic/score/mean)"] == ["SSOPD:critic/score/mean", "GRPO:critic/score/mean"]
    assert len(drawn["validation accuracy"]) == 6  # 3 validation sets x 2 runs
    assert drawn["response length (mean)"] == ["SSOPD:response_length/mean", "GRPO:response_length/mean"]
    for name in ("frontier_frac", "pairs", "distill_loss", "kl_unclipped", "clipped_teacher_mass"):
        assert f"SSOPD:ssopd/{name}" in drawn[f"ssopd/{name}"]
    assert drawn["ssopd/distill_loss"] == ["SSOPD:ssopd/distill_loss"]  # GRPO (lambda = 0) logs no distill loss


def _summary(label, scores_by_bench):
    data = {b: {"scores": s, "answers": [["x"] * len(row) for row in s]} for b, s in scores_by_bench.items()}
    summary = summarize(data, n_boot=200)
    summary["run"] = {"label": label}
    return summary


@pytest.fixture
def eval_dirs(tmp_path):
    runs = {
        "grpo": _summary("Qwen3-1.7B GRPO", {"aime24": [[1, 0], [0, 0]], "aime25": [[1, 1], [0, 0]],
                                              "hmmt25_feb": [[0, 0], [0, 0]]}),
        "ssopd": _summary("Qwen3-1.7B SSOPD", {"aime24": [[1, 1], [1, 0]], "aime25": [[1, 1], [0, 1]],
                                                "hmmt25_feb": [[1, 0], [0, 0]], "math500": [[1, 1]]}),
    }
    dirs = {}
    for name, summary in runs.items():
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(summary))
        dirs[name] = d
    return dirs


def test_table_values(eval_dirs):
    summaries = [(None, json.loads((d / "summary.json").read_text())) for d in eval_dirs.values()]
    rows = table_rows(summaries)
    assert [r["run"] for r in rows] == ["Qwen3-1.7B GRPO", "Qwen3-1.7B SSOPD"]
    assert rows[0]["aime24"][0] == pytest.approx(25.0) and rows[0]["aime25"][0] == pytest.approx(50.0)
    assert rows[0]["macro"][0] == pytest.approx(25.0)
    # SSOPD was also evaluated on MATH500: the macro stays over the paper's three sets
    assert rows[1]["macro"][0] == pytest.approx((75.0 + 75.0 + 25.0) / 3)
    md = markdown_table(rows, paper=True)
    assert "| Model / method | AIME24 | AIME25 | HMMT25 | Avg. |" in md
    assert "| Qwen3-1.7B GRPO | 25.0 [" in md and "Avg@2" in md
    assert "| Qwen3-8B SSOPD (paper) | – | – | – | 65.6 |" in md
    table = list(csv.DictReader(io.StringIO(csv_table(rows))))
    assert float(table[1]["macro"]) == pytest.approx(175 / 3, abs=1e-3)
    assert float(table[0]["aime24_ci_lo"]) <= 25.0 <= float(table[0]["aime24_ci_hi"])


def test_report_cli_writes_png_markdown_and_csv(eval_dirs, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), "--out", str(out),
         "--eval", f"GRPO={eval_dirs['grpo']}", str(eval_dirs["ssopd"]),
         "--tracker", f"SSOPD={SSOPD_LOG}", f"GRPO={GRPO_LOG}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    assert "| GRPO | 25.0 [" in md and "| Qwen3-1.7B SSOPD |" in md  # LABEL=PATH overrides the stored label
    assert (out / "results.csv").read_text().startswith("run,k,aime24,")
    assert (out / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
