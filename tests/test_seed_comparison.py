"""Methods over seeds (ssopd_verl.seed_comparison) from verl file-logger JSONL, and the experiment script's
command line and markdown on made-up tracker files (the real runs are `scripts/experiment_cpu.py`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssopd_verl.seed_comparison import comparison_table, plot_seed_bands, seed_bands, validation_accuracy

ROOT = Path(__file__).resolve().parents[1]


def write_tracker(path: Path, accuracy: dict[int, float], extra: dict | None = None) -> Path:
    """verl's file logger: validation and training metrics arrive in separate log calls of the same step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, acc in accuracy.items():
        lines.append({"step": step, "data": {"val-core/lighteval/MATH/acc/mean@1": acc, "val-aux/x": 3.0}})
        if step > 0:
            lines.append({"step": step, "data": {"critic/score/mean": 0.5, **(extra or {})}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_validation_accuracy_is_the_mean_over_data_sources(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(
        '{"step": 0, "data": {"val-core/a/acc/mean@1": 0.2, "val-core/b/acc/mean@4": 0.6, "val-core/a/reward/mean@1": 9}}\n'
        '{"step": 2, "data": {"val-core/a/acc/mean@1": 0.5, "val-core/b/acc/mean@4": 0.7, "critic/score/mean": 1}}\n'
        '{"step": 3, "data": {"critic/score/mean": 1}}\n'
    )
    assert validation_accuracy(path) == [(0, pytest.approx(0.4)), (2, pytest.approx(0.6))]


def test_seed_bands_keep_only_steps_every_seed_has_and_compute_spread():
    curves = [[(0, 0.3), (5, 0.5), (10, 0.6)], [(0, 0.3), (5, 0.7), (10, 0.8)], [(0, 0.3), (5, 0.6)]]
    bands = seed_bands(curves)
    assert [b.step for b in bands] == [0, 5]  # the third seed stopped before step 10: step 10 is not averaged
    five = bands[1]
    assert (five.mean, five.low, five.high, five.seeds) == (pytest.approx(0.6), 0.5, 0.7, 3)
    assert five.std == pytest.approx(0.1)
    assert seed_bands([[(0, 0.3)]])[0].std == 0.0
    with pytest.raises(ValueError, match="no runs"):
        seed_bands([])
    with pytest.raises(ValueError, match="non-finite"):
        seed_bands([[(0, float("nan"))]])


def test_comparison_table_reports_steps_best_and_threshold():
    methods = {
        "grpo": seed_bands([[(0, 0.3), (5, 0.35), (10, 0.4)], [(0, 0.3), (5, 0.35), (10, 0.4)]]),
        "ssopd": seed_bands([[(0, 0.3), (5, 0.45), (10, 0.42)], [(0, 0.3), (5, 0.43), (10, 0.44)]]),
    }
    table = comparison_table(methods, [0, 10], threshold=0.4)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["grpo"] == "| grpo | 2 | 0.300 ± 0.000 | 0.400 ± 0.000 | 0.400 (10) | 10 |"
    assert rows["ssopd"] == "| ssopd | 2 | 0.300 ± 0.000 | 0.430 ± 0.014 | 0.440 (5) | 5 |"
    never = comparison_table({"grpo": methods["grpo"]}, [0, 7], threshold=0.9).splitlines()[2]
    assert never == "| grpo | 2 | 0.300 ± 0.000 | – | 0.400 (10) | – |"


def test_plot_seed_bands_writes_a_png(tmp_path):
    bands = {"grpo": seed_bands([[(0, 0.3), (5, 0.4)], [(0, 0.3), (5, 0.5)]])}
    plot_seed_bands(bands, tmp_path / "f.png", "title")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _experiment(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "experiment_cpu.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_experiment_commands_differ_only_by_method_and_seed(tmp_path):
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--seeds", "2", "--steps", "3", "--lora-rank", "4")
    assert proc.returncode == 0, proc.stderr
    commands = [line.split() for line in proc.stdout.splitlines()]
    assert len(commands) == 8  # 4 methods x 2 seeds
    for cmd in commands:
        assert cmd[1:6] == ["-m", "verl.trainer.main_ppo", "+recipe=ssopd", "+platform=cpu", "+tiny=default"]
        assert "trainer.total_training_steps=3" in cmd and "actor_rollout_ref.model.lora_rank=4" in cmd
    grpo0, grpo1 = set(commands[0]), set(commands[4])  # seed-major: grpo, ssopd, ssopd-initial, opsd per seed
    assert grpo0 ^ grpo1 == {f"{k}={s}" for k in ("data.seed", "actor_rollout_ref.rollout.seed", "ssopd.seed")
                             for s in (0, 1)} | {"trainer.experiment_name=grpo-s0", "trainer.experiment_name=grpo-s1",
                                                 f"trainer.default_local_dir={tmp_path.resolve()}/runs/grpo-s0/checkpoints",
                                                 f"trainer.default_local_dir={tmp_path.resolve()}/runs/grpo-s1/checkpoints"}  # fmt: skip
    assert "ssopd.lambda=0" in commands[0] and "ssopd.teacher=initial" in commands[2]
    assert "ssopd.witness_source=reference_solution" in commands[3]


def test_experiment_on_the_harder_task_changes_only_the_overlay(tmp_path):
    base = _experiment("--out", str(tmp_path), "--dry-run", "--methods", "grpo,ssopd")
    hard = _experiment("--out", str(tmp_path), "--dry-run", "--methods", "grpo,ssopd", "--tiny", "addition3")
    assert base.returncode == hard.returncode == 0, base.stderr + hard.stderr
    assert hard.stdout == base.stdout.replace("+tiny=default", "+tiny=addition3") != base.stdout


def test_experiment_refuses_initial_teacher_without_lora_and_unknown_methods(tmp_path):
    proc = _experiment("--out", str(tmp_path), "--dry-run")
    assert proc.returncode == 2 and "--lora-rank" in proc.stderr
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--methods", "grpo,dpo")
    assert proc.returncode == 2 and "dpo" in proc.stderr


def test_experiment_summarises_finished_runs_into_the_doc_section(tmp_path):
    out = tmp_path / "exp"
    for method, gain in (("grpo", 0.0), ("ssopd", 0.1)):
        for seed in (0, 1):
            run = out / "runs" / f"{method}-s{seed}"
            write_tracker(run / "experiment" / f"{method}-s{seed}.jsonl", {0: 0.4, 2: 0.4 + gain + 0.01 * seed},
                          {"ssopd/pairs": 3.0, "ssopd/teacher_logp_sampled": -0.5, "ssopd/student_logp_sampled": -1.5})  # fmt: skip
            (run / "done.json").write_text(json.dumps({"seconds": 60.0}))  # finished: not run again
    doc = tmp_path / "evidence.md"
    doc.write_text("# Evidence\n\nprose before\n\n<!-- experiment:begin -->\nold\n<!-- experiment:end -->\n\nprose after\n")
    proc = _experiment("--out", str(out), "--methods", "grpo,ssopd", "--seeds", "2", "--steps", "2",
                       "--test-freq", "2", "--doc", str(doc))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    assert text.startswith("# Evidence\n\nprose before\n\n<!-- experiment:begin -->") and "old" not in text
    assert text.endswith("<!-- experiment:end -->\n\nprose after\n")
    assert "| ssopd | 2 | 0.400 ± 0.000 | 0.505 ± 0.007 | 0.505 (2) | 2 |" in text  # threshold: start 0.4 + 0.1
    assert "| grpo | 2 | 0.400 ± 0.000 | 0.405 ± 0.007 | 0.405 (2) | – |" in text
    assert "| ssopd | 3 | – | -0.5 | -1.5 | – | 0.5 | +1.000 |" in text  # diagnostics
    assert "![validation accuracy vs step](exp/evidence.png)" in text
    assert (out / "evidence.png").exists()
