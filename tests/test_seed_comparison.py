"""Arms over seeds (ssopd_verl.seed_comparison) from verl file-logger JSONL, and the experiment script's command
lines, run folder and report on made-up tracker files (the real runs are `scripts/experiment_cpu.py`)."""

import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest

from ssopd_verl import seed_comparison as sc

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_tracker(path: Path, accuracy: dict[int, float], extra: dict | None = None, val_extra: dict | None = None):
    """verl's file logger: validation and training metrics arrive in separate log calls of the same step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, acc in accuracy.items():
        lines.append({"step": step, "data": {"val-core/lighteval/MATH/acc/mean@1": acc, **(val_extra or {})}})
        if step > 0:
            lines.append({"step": step, "data": {"critic/score/mean": 0.5, "perf/throughput": 9.0, **(extra or {})}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_validation_accuracy_is_the_mean_over_data_sources(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(
        '{"step": 0, "data": {"val-core/a/acc/mean@1": 0.2, "val-core/b/acc/mean@4": 0.6, "val-core/a/reward/mean@1": 9}}\n'
        '{"step": 2, "data": {"val-core/a/acc/mean@1": 0.5, "val-core/b/acc/mean@4": 0.7, "critic/score/mean": 1}}\n'
        '{"step": 3, "data": {"critic/score/mean": 1}}\n'
    )
    assert sc.validation_accuracy(path) == [(0, pytest.approx(0.4)), (2, pytest.approx(0.6))]


def test_seed_bands_keep_only_steps_every_seed_has_and_compute_spread():
    curves = [[(0, 0.3), (5, 0.5), (10, 0.6)], [(0, 0.3), (5, 0.7), (10, 0.8)], [(0, 0.3), (5, 0.6)]]
    bands = sc.seed_bands(curves)
    assert [b.step for b in bands] == [0, 5]  # the third seed stopped before step 10: step 10 is not averaged
    five = bands[1]
    assert (five.mean, five.low, five.high, five.seeds) == (pytest.approx(0.6), 0.5, 0.7, 3)
    assert five.std == pytest.approx(0.1)
    assert sc.seed_bands([[(0, 0.3)]])[0].std == 0.0
    with pytest.raises(ValueError, match="no runs"):
        sc.seed_bands([])
    with pytest.raises(ValueError, match="non-finite"):
        sc.seed_bands([[(0, float("nan"))]])


def test_area_under_curve_is_the_trapezoid_mean_over_the_step_range():
    # uneven spacing: (2 * (0.2 + 0.4) / 2 + 4 * (0.4 + 0.4) / 2) / 6
    assert sc.area_under_curve([(0, 0.2), (2, 0.4), (6, 0.4)]) == pytest.approx(2.2 / 6)
    assert sc.area_under_curve([(3, 0.7), (9, 0.7)]) == pytest.approx(0.7)  # flat: its value
    assert sc.area_under_curve([(4, 0.25)]) == 0.25
    summary = sc.run_summary([(0, 0.5), (4, 0.9), (8, 0.7)])
    assert summary == {"final": 0.7, "best": 0.9, "auc": pytest.approx((4 * 0.7 + 4 * 0.8) / 8)}
    with pytest.raises(ValueError, match="non-finite"):
        sc.run_summary([(0, 0.5), (4, float("inf"))])
    with pytest.raises(ValueError):
        sc.run_summary([])


def test_bootstrap_ci_is_the_percentile_interval_and_reproducible():
    # two values: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4 -> the 95% interval is [0, 1]
    assert sc.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert sc.bootstrap_ci([0.3] * 5) == (pytest.approx(0.3), pytest.approx(0.3))
    values = [0.1, -0.05, 0.2, 0.0, 0.07]
    low, high = sc.bootstrap_ci(values)
    assert (low, high) == sc.bootstrap_ci(values)  # fixed bootstrap seed
    assert low < np.mean(values) < high and low >= min(values) and high <= max(values)
    assert sc.bootstrap_ci(values, seed=1) != (low, high)
    means = np.random.default_rng(0).choice(values, size=(10_000, 5)).mean(axis=1)
    assert (low, high) == (pytest.approx(np.percentile(means, 2.5)), pytest.approx(np.percentile(means, 97.5)))


def _t_sf_reference(t: float, df: int) -> mpmath.mpf:
    """P(T > t) for t >= 0 from the regularized incomplete beta function, in 40-digit arithmetic (independent of
    the closed form under test): P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    with mpmath.workdps(40):
        return mpmath.betainc(mpmath.mpf(df) / 2, mpmath.mpf(1) / 2, 0, df / (df + mpmath.mpf(t) ** 2),
                              regularized=True) / 2  # fmt: skip


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9, 17, 30])
def test_t_cdf_matches_the_incomplete_beta_function(df):
    for t in (0.0, 0.1, 0.7, 1.5, 2.776, 4.0, 12.0, 60.0):
        upper = float(_t_sf_reference(t, df))
        assert 1 - sc.t_cdf(t, df) == pytest.approx(upper, rel=1e-10, abs=1e-15)
        assert sc.t_cdf(-t, df) == pytest.approx(upper, rel=1e-10, abs=1e-15)  # symmetric
    assert sc.t_cdf(math.inf, df) == 1.0 and sc.t_cdf(-math.inf, df) == 0.0


def test_t_quantile_gives_the_table_values_and_inverts_the_cdf():
    # two-sided 95% critical values of Student's t (any table; 12.706 is the Cauchy's tan(0.475 pi))
    assert sc.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    for df, value in ((2, 4.302652729749464), (4, 2.7764451051977987), (9, 2.262157162798205), (30, 2.042272456301238)):
        assert sc.t_quantile(0.975, df) == pytest.approx(value, rel=1e-12)
        assert sc.t_quantile(0.025, df) == pytest.approx(-value, rel=1e-12)
    for df in (1, 4, 7):
        for q in (0.6, 0.9, 0.995, 0.9999):
            assert sc.t_cdf(sc.t_quantile(q, df), df) == pytest.approx(q, rel=1e-12)
    for bad in ((0.975, 0), (0.975, 2.5), (1.0, 4), (0.0, 4)):
        with pytest.raises(ValueError):
            sc.t_quantile(*bad)


def test_paired_t_interval_and_p_value_by_hand():
    d = [0.0078125, 0.0234375, 0.046875, 0.0234375, 0.1484375]
    mean, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(5)
    assert sc.paired_t_ci(d) == (pytest.approx(mean - 2.7764451051977987 * se, rel=1e-12),
                                 pytest.approx(mean + 2.7764451051977987 * se, rel=1e-12))  # fmt: skip
    assert sc.paired_t_ci(d, level=0.9)[1] == pytest.approx(mean + 2.1318467863266495 * se, rel=1e-12)
    assert sc.paired_t_p(d) == pytest.approx(2 * float(_t_sf_reference(mean / se, 4)), rel=1e-10)
    assert sc.paired_t_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 * float(_t_sf_reference(3 / math.sqrt(0.5), 4)))
    assert sc.paired_t_p([0.2, 0.2]) == 0.0 and sc.paired_t_p([0.0, 0.0, 0.0]) == 1.0  # no spread
    assert sc.paired_t_ci([0.2, 0.2]) == (0.2, 0.2)
    for bad in ([], [0.1]):
        with pytest.raises(ValueError, match="at least 2"):
            sc.paired_t_ci(bad)
        with pytest.raises(ValueError, match="at least 2"):
            sc.paired_t_p(bad)


def _sign_flip_brute_force(values):
    """Every sign pattern with itertools, on the values as exact decimal fractions (0.0123 is 123/10000, not its
    binary float): ties between patterns are exact ties, as the rounded sums of floats should count them."""
    from fractions import Fraction

    x = [Fraction(str(v)) for v in values]
    observed = abs(sum(x))
    patterns = itertools.product((1, -1), repeat=len(x))
    hits = sum(abs(sum(s * v for s, v in zip(signs, x))) >= observed for signs in patterns)
    return hits / 2 ** len(x)


def test_sign_flip_p_is_the_exact_permutation_p_value():
    # by hand: +-1 +-2 +-3 has |sum| 6, 0, 2, 4, 4, 2, 0, 6; |1 - 2 + 3| = 2 is reached by 6 of the 8
    assert sc.sign_flip_p([1, -2, 3]) == 0.75
    assert sc.sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5]) == 2 / 32  # all one sign: the smallest p with 5 seeds
    assert sc.sign_flip_p([0.0, 0.0]) == 1.0 and sc.sign_flip_p([0.3]) == 1.0
    rng = np.random.default_rng(3)
    for n in (2, 5, 8, 11):
        for _ in range(5):
            values = list(np.round(rng.normal(0.02, 0.05, n), 4))  # rounded: ties between patterns happen
            assert sc.sign_flip_p(values) == pytest.approx(_sign_flip_brute_force(values), abs=1e-15)
    # in units of 1/128 (one validation problem): 1, 3, 6, 3, -1 sum to 12; |sum| >= 12 when the flipped entries of
    # the all-plus 14 add up to at most 1: none, the 1 or the -1, and the mirror images: 6 of 32, ties included
    d = [0.0078125, 0.0234375, 0.046875, 0.0234375, -0.0078125]
    assert sc.sign_flip_p(d) == _sign_flip_brute_force(d) == 6 / 32
    with pytest.raises(ValueError, match="1 to 16"):
        sc.sign_flip_p([0.1] * 17)
    with pytest.raises(ValueError, match="1 to 16"):
        sc.sign_flip_p([])


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4 * 0.01, 3 * 0.03, max(0.09, 2 * 0.04), 1 * 0.5; back in the input order
    assert sc.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert sc.holm([0.3, 0.6]) == [0.6, 0.6] and sc.holm([0.9, 0.9, 0.9]) == [1.0, 1.0, 1.0] and sc.holm([]) == []


def test_paired_differences_use_the_seeds_both_arms_ran():
    summaries = {
        "grpo": {0: {"final": 0.5, "best": 0.6, "auc": 0.5}, 1: {"final": 0.6, "best": 0.6, "auc": 0.55}},
        "a": {0: {"final": 0.7, "best": 0.7, "auc": 0.6}, 1: {"final": 0.6, "best": 0.8, "auc": 0.55},
              2: {"final": 0.9, "best": 0.9, "auc": 0.9}},  # seed 2: no grpo run to pair with
        "b": {5: {"final": 0.1, "best": 0.1, "auc": 0.1}},  # no common seed: left out
        "c": {0: {"final": 0.2, "best": 0.6, "auc": 0.5}},  # one common seed: no t statistics
    }  # fmt: skip
    pairs = {(p.arm, p.metric): p for p in sc.paired_differences(summaries)}
    assert set(pairs) == {(arm, m) for arm in "ac" for m in sc.SUMMARIES}
    final = pairs[("a", "final")]
    assert final.seeds == (0, 1) and final.differences == (pytest.approx(0.2), pytest.approx(0.0))
    assert final.mean == pytest.approx(0.1)
    assert (final.boot_low, final.boot_high) == (pytest.approx(0.0), pytest.approx(0.2))
    # t interval: 0.1 -+ t(0.975, 1) * stdev(0.2, 0) / sqrt(2) = 0.1 -+ 12.7062 * 0.1
    assert (final.t_low, final.t_high) == (pytest.approx(0.1 - 1.2706204736174707), pytest.approx(1.3706204736174707))
    assert final.p_t == pytest.approx(0.5)  # t = 1 with 1 df: the Cauchy's P(|T| > 1) = 1/2
    assert final.p_flip == 1.0  # +-0.2 +-0: every sign pattern is as far from 0 as the observed
    assert final.family == 6
    lone = pairs[("c", "final")]
    assert lone.t_low is lone.t_high is lone.p_t is lone.p_t_holm is None and lone.p_flip == 1.0
    # Holm over the family: the t-test p-values of the 3 comparisons that have one, the sign-flip ones of all 6
    tested = [pairs[("a", m)].p_t for m in sc.SUMMARIES]
    assert [pairs[("a", m)].p_t_holm for m in sc.SUMMARIES] == pytest.approx(sc.holm(tested))
    flips = [pairs[(arm, m)].p_flip for arm in "ac" for m in sc.SUMMARIES]
    assert [pairs[(arm, m)].p_flip_holm for arm in "ac" for m in sc.SUMMARIES] == pytest.approx(sc.holm(flips))
    table = sc.paired_table(list(pairs.values()))
    row = "| a | final | 2 | +0.100 | 1/2 | [-1.171, +1.371] | [+0.000, +0.200] | 0.500 | 1.000 | 1.000 | 1.000 |"
    assert row in table
    assert "| c | final | 1 | -0.300 | 0/1 | – | [-0.300, -0.300] | – | – | 1.000 | 1.000 |" in table
    with pytest.raises(ValueError, match="baseline"):
        sc.paired_differences({"a": summaries["a"]})


def test_the_committed_study_gives_the_t_intervals_the_review_computed():
    """Issue 24 computed paired t 95% intervals of final - GRPO from docs/evidence/runs; the report must agree."""
    runs = sc.load_runs(ROOT / "docs" / "evidence" / "runs")
    summaries = {arm: {s: sc.run_summary(sc.validation_accuracy(p)) for s, p in seeds.items()}
                 for arm, seeds in runs.items()}  # fmt: skip
    pairs = {(p.arm, p.metric): p for p in sc.paired_differences(summaries)}
    for arm, (low, high) in {"ssopd-token-l0.5": (-0.020, 0.120), "ssopd-token-l1": (-0.009, 0.103),
                             "ssopd-none-l0.5": (-0.029, 0.097)}.items():  # fmt: skip
        p = pairs[(arm, "final")]
        assert (round(p.t_low, 3), round(p.t_high, 3)) == (low, high)
        assert p.boot_high - p.boot_low < p.t_high - p.t_low  # the bootstrap is the narrower one here
    # one validation problem is 1/128: the token cap's final gains are 1, 3, 6, 3 and 19 problems
    assert pairs[("ssopd-token-l0.5", "final")].differences == pytest.approx([k / 128 for k in (1, 3, 6, 3, 19)])
    assert len(pairs) == pairs[("ssopd-token-l0.5", "auc")].family == 18
    grpo = sc.last_quarter([sc.validation_accuracy(p) for p in runs["grpo"].values()])
    assert (grpo.start_step, grpo.end_step, grpo.flat, grpo.final_is_best) == (16, 20, False, 5)  # not at a plateau


def test_last_quarter_says_whether_an_arm_is_flat_at_the_end():
    rising = [[(0, 0.5), (4, 0.6), (8, 0.7), (12, 0.75), (16, 0.8)],
              [(0, 0.5), (4, 0.6), (8, 0.7), (12, 0.79), (16, 0.8)]]
    q = sc.last_quarter(rising)  # the last quarter of 0..16 is steps >= 12
    assert (q.start_step, q.end_step, q.change, q.flat) == (12, 16, pytest.approx(0.03), False)
    assert (q.final_is_best, q.seeds) == (2, 2)
    flat = [[(0, 0.5), (8, 0.8), (12, 0.81), (16, 0.805)], [(0, 0.5), (8, 0.8), (12, 0.8), (16, 0.8)]]
    q = sc.last_quarter(flat)
    assert q.change == pytest.approx(-0.0025) and q.flat and q.final_is_best == 1  # seed 0 peaked at step 12
    assert not sc.last_quarter(flat, tolerance=0.001).flat
    assert sc.last_quarter([[(0, 0.5), (10, 0.6)]]) is None  # one validation in the last quarter: cannot tell
    table = sc.plateau_table({"grpo": sc.last_quarter(rising), "x": None}, 0.01)
    assert "| grpo | step 12 → 16 | +0.030 | no | 2/2 |" in table
    assert "| x | fewer than 2 validations | – | cannot tell | – |" in table


def test_summary_and_curve_tables():
    summaries = {"grpo": {0: {"final": 0.4, "best": 0.5, "auc": 0.45}, 1: {"final": 0.6, "best": 0.7, "auc": 0.55}}}
    assert sc.summary_table(summaries, {"grpo": 0.3}).splitlines()[2] == (
        "| grpo | 2 | 0.300 | 0.500 ± 0.141 | 0.600 ± 0.141 | 0.500 ± 0.071 |"
    )
    bands = {"grpo": sc.seed_bands([[(0, 0.3), (4, 0.5)], [(0, 0.3), (4, 0.7)]])}
    assert sc.curve_table(bands, [0, 4, 8]).splitlines()[2] == "| grpo | 0.300 | 0.600 | – |"


def test_degeneration_keys_are_whatever_the_trackers_have():
    trackers = [
        {"degeneration/length_limit_frac": [], "critic/score/mean": [], "val-aux/x/degeneration/loop_frac@1": []},
        {"degeneration/repetition_loop_frac": [], "val-core/x/acc/mean@1": [], "ssopd/degeneration_like": [],
         "val-aux/x/repetition_loop/mean@1": [], "val-aux/x/repetition_loop/std@4": [], "val-aux/x/reward/mean@1": []},
    ]
    assert sc.degeneration_keys(trackers) == [
        "degeneration/length_limit_frac", "degeneration/repetition_loop_frac", "val-aux/x/degeneration/loop_frac@1",
        "val-aux/x/repetition_loop/mean@1"
    ]  # fmt: skip
    assert sc.degeneration_keys([{"critic/score/mean": []}]) == []
    assert sc.seed_curves([{"k": [(1, 0.5)]}, {}], "k") is None  # a seed without it: no band
    assert sc.figure_name("val-aux/x/degeneration/loop_frac@1") == "val-aux_x_degeneration_loop_frac_1.png"


def test_slim_tracker_and_load_runs(tmp_path):
    src = write_tracker(tmp_path / "full.jsonl", {0: 0.4, 2: 0.5}, {"ssopd/pairs": 3.0})
    slim = sc.slim_tracker(src, tmp_path / "runs" / "grpo-s3.jsonl")
    records = [json.loads(line) for line in slim.read_text().splitlines()]
    assert {k for r in records for k in r["data"]} == {"val-core/lighteval/MATH/acc/mean@1", "critic/score/mean",
                                                       "ssopd/pairs"}  # fmt: skip
    assert sc.validation_accuracy(slim) == sc.validation_accuracy(src)
    (tmp_path / "runs" / "manifest.json").write_text("{}")
    (tmp_path / "runs" / "notes.jsonl").write_text("")
    sc.slim_tracker(src, tmp_path / "runs" / "ssopd-pw-l0.5-s10.jsonl")
    other = slim.with_name("ssopd-pw-l0.5-s10.jsonl")
    assert sc.load_runs(tmp_path / "runs") == {"grpo": {3: slim}, "ssopd-pw-l0.5": {10: other}}


def test_figures_are_pngs(tmp_path):
    bands = {"grpo": sc.seed_bands([[(0, 0.3), (5, 0.4)], [(0, 0.3), (5, 0.5)]])}
    sc.plot_seed_bands(bands, tmp_path / "f.png", "title", ylabel="y")
    summaries = {"grpo": {0: dict(final=0.1, best=0.2, auc=0.1)}, "a": {0: dict(final=0.2, best=0.2, auc=0.3)}}
    pairs = sc.paired_differences(summaries)
    sc.plot_paired(pairs, tmp_path / "p.png", "title")
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG and (tmp_path / "p.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------------- the script


def _experiment(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "experiment_cpu.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_study_arms_and_commands_differ_only_by_arm_and_seed(tmp_path):
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--seeds", "2", "--steps", "3", "--lora-rank", "4")
    assert proc.returncode == 0, proc.stderr
    commands = [line.split() for line in proc.stdout.splitlines()]
    assert len(commands) == 14  # the 7 study arms x 2 seeds
    for cmd in commands:
        assert cmd[1:6] == ["-m", "verl.trainer.main_ppo", "+recipe=ssopd", "+platform=cpu", "+tiny=default"]
        assert "trainer.total_training_steps=3" in cmd and "actor_rollout_ref.model.lora_rank=4" in cmd
    names = [next(a for a in cmd if a.startswith("trainer.experiment_name=")).split("=")[1] for cmd in commands[:7]]
    assert names == ["grpo-s0", "ssopd-pw-l0.5-s0", "ssopd-pw-l1-s0", "ssopd-token-l0.5-s0", "ssopd-token-l1-s0",
                     "ssopd-none-l0.5-s0", "ssopd-none-l1-s0"]  # fmt: skip
    grpo0, grpo1 = set(commands[0]), set(commands[7])  # seed-major
    seeded = ("data.seed", "actor_rollout_ref.rollout.seed", "ssopd.seed", "actor_rollout_ref.actor.fsdp_config.seed")
    assert grpo0 ^ grpo1 == {f"{k}={s}" for k in seeded for s in (0, 1)} | {
        "trainer.experiment_name=grpo-s0", "trainer.experiment_name=grpo-s1",
        f"trainer.default_local_dir={tmp_path.resolve()}/runs/grpo-s0/checkpoints",
        f"trainer.default_local_dir={tmp_path.resolve()}/runs/grpo-s1/checkpoints"}  # fmt: skip
    assert "ssopd.lambda=0" in commands[0]
    assert {"ssopd.lambda=0.5", "ssopd.clip=pointwise", "ssopd.tau=0.05"} <= set(commands[1])
    assert {"ssopd.lambda=1", "ssopd.clip=token"} <= set(commands[4]) and "ssopd.clip=none" in commands[6]
    assert not any("teacher=initial" in a for cmd in commands for a in cmd)
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--seeds", "1", "--lora-rank", "4",
                       "--arms", "grpo,study-initial,opsd")  # fmt: skip
    commands = [line.split() for line in proc.stdout.splitlines()]
    assert len(commands) == 8 and all("ssopd.teacher=initial" in cmd for cmd in commands[1:7])
    assert "ssopd.witness_source=reference_solution" in commands[7]
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--seeds", "1", "--lora-rank", "4", "--arms", "main")
    commands = [set(line.split()) for line in proc.stdout.splitlines()]
    names = [next(a for a in cmd if a.startswith("trainer.experiment_name=")).split("=")[1] for cmd in commands]
    assert names == ["grpo-s0", "ssopd-pw-l0.5-initial-k16-s0", "ssopd-token-l0.5-initial-k16-s0",
                     "ssopd-none-l0.5-initial-k16-s0", "ssopd-token-l0.5-k16-s0"]  # fmt: skip
    paper = {"ssopd.lambda=0.5", "ssopd.max_distill_tokens=16", "actor_rollout_ref.model.lora_rank=4"}
    assert all(paper | {"ssopd.teacher=initial"} <= cmd for cmd in commands[1:4])
    assert paper <= commands[4] and not any("teacher=initial" in a for a in commands[4])  # the live-teacher variant
    live = "ssopd-token-l0.5-k16-s0"
    assert commands[4] - commands[2] == {f"trainer.experiment_name={live}",
                                         f"trainer.default_local_dir={tmp_path.resolve()}/runs/{live}/checkpoints"}
    assert {"ssopd.clip=pointwise", "ssopd.tau=0.05"} <= commands[1] and "ssopd.clip=none" in commands[3]
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--arms", "main")
    assert proc.returncode == 2 and "--lora-rank" in proc.stderr  # the initial teacher needs LoRA


def test_experiment_on_the_harder_task_changes_only_the_overlay(tmp_path):
    base = _experiment("--out", str(tmp_path), "--dry-run", "--methods", "grpo,ssopd")
    hard = _experiment("--out", str(tmp_path), "--dry-run", "--methods", "grpo,ssopd", "--tiny", "addition3")
    assert base.returncode == hard.returncode == 0, base.stderr + hard.stderr
    assert hard.stdout == base.stdout.replace("+tiny=default", "+tiny=addition3") != base.stdout


def test_experiment_refuses_initial_teacher_without_lora_and_unknown_arms(tmp_path):
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--arms", "ssopd-initial")
    assert proc.returncode == 2 and "--lora-rank" in proc.stderr
    proc = _experiment("--out", str(tmp_path), "--dry-run", "--methods", "grpo,dpo")
    assert proc.returncode == 2 and "dpo" in proc.stderr
    proc = _experiment("--report-only")
    assert proc.returncode == 2 and "--runs" in proc.stderr


def test_finished_runs_become_a_run_folder_and_the_report_is_regenerated_from_it_alone(tmp_path):
    out = tmp_path / "exp"
    for arm, gain in (("grpo", 0.0), ("ssopd-pw-l1", 0.1)):
        for seed in (0, 1):
            name = f"{arm}-s{seed}"
            write_tracker(out / "trackers" / "experiment" / f"{name}.jsonl", {0: 0.4, 2: 0.4 + gain + 0.01 * seed},
                          {"ssopd/pairs": 3.0, "ssopd/teacher_logp_sampled": -0.5, "ssopd/student_logp_sampled": -1.5,
                           "degeneration/length_limit_frac": 0.1 * seed})  # fmt: skip
            (out / "runs" / name).mkdir(parents=True)
            (out / "runs" / name / "done.json").write_text(json.dumps({"seconds": 60.0}))  # finished: not run again
    doc = tmp_path / "evidence.md"
    doc.write_text("# Evidence\n\nprose before\n\n<!-- experiment:begin -->\nold\n<!-- experiment:end -->\n\nprose after\n")
    runs = tmp_path / "evidence" / "runs"
    proc = _experiment("--out", str(out), "--arms", "grpo,ssopd-pw-l1", "--seeds", "2", "--steps", "2",
                       "--test-freq", "2", "--runs", str(runs), "--doc", str(doc))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["grpo-s0.jsonl", "grpo-s1.jsonl", "manifest.json",
                                                      "ssopd-pw-l1-s0.jsonl", "ssopd-pw-l1-s1.jsonl"]  # fmt: skip
    assert "perf/throughput" not in (runs / "grpo-s0.jsonl").read_text()  # slimmed
    text = doc.read_text()
    assert text.startswith("# Evidence\n\nprose before\n\n<!-- experiment:begin -->") and "old" not in text
    assert text.endswith("<!-- experiment:end -->\n\nprose after\n")
    assert "| grpo | 2 | 0.400 | 0.405 ± 0.007 | 0.405 ± 0.007 | 0.403 ± 0.004 |" in text
    row = "| ssopd-pw-l1 | final | 2 | +0.100 | 2/2 | [+0.100, +0.100] | [+0.100, +0.100] | <0.001 | <0.001 | 0.500 |"
    assert row in text
    assert "| ssopd-pw-l1 | auc | 2 | +0.050 | 2/2 | [+0.050, +0.050] | [+0.050, +0.050] |" in text
    assert "3 comparisons (1 arms x 3 summaries" in text and "(2 seeds: 0.5)" in text
    # validations at steps 0 and 2: the last quarter (steps >= 1.5) holds one, too few to say whether it is flat
    assert "| grpo | fewer than 2 validations | – | cannot tell | – |" in text
    assert "Stopping rule (grpo flat over the last quarter of the steps): cannot tell (too few validations)." in text
    assert "`degeneration/length_limit_frac`" in text and "| ssopd-pw-l1 | – | 0.050 |" in text
    assert "| ssopd-pw-l1 | 3 | – | – | – | -0.5 | -1.5 | – | 0.5 | +1.000 |" in text  # diagnostics
    assert "![validation accuracy vs step](evidence/figures/val_acc.png)" in text
    figures = tmp_path / "evidence" / "figures"
    assert {p.name for p in figures.iterdir()} == {"val_acc.png", "paired_vs_grpo.png",
                                                   "degeneration_length_limit_frac.png"}  # fmt: skip

    # any machine: the run folder alone (no --out, no full trackers) gives the same section and figures
    shutil_copy = tmp_path / "elsewhere"
    shutil_copy.mkdir()
    for p in runs.iterdir():
        (shutil_copy / p.name).write_bytes(p.read_bytes())
    doc2 = tmp_path / "evidence2.md"
    doc2.write_text(doc.read_text())
    proc = _experiment("--report-only", "--runs", str(shutil_copy), "--figures", str(figures), "--doc", str(doc2))
    assert proc.returncode == 0, proc.stderr
    strip = lambda t: "\n".join(line for line in t.splitlines() if "--report-only" not in line)  # noqa: E731
    assert strip(doc2.read_text()) == strip(text)
    without = tmp_path / "bare"
    without.mkdir()
    (without / "grpo-s0.jsonl").write_bytes((runs / "grpo-s0.jsonl").read_bytes().replace(b"degeneration", b"other"))
    proc = _experiment("--report-only", "--runs", str(without))
    assert proc.returncode == 0, proc.stderr
    assert "No degeneration metrics" in (tmp_path / "report.md").read_text()


def test_compare_trackers_finds_the_first_step_that_differs_and_ignores_timings(tmp_path):
    for run, late in (("a", 0.7), ("b", 0.7), ("c", 0.71)):
        path = write_tracker(tmp_path / run / "grpo-s0.jsonl", {0: 0.5, 2: 0.6, 4: late})
        path.write_text(path.read_text().replace('"perf/throughput": 9.0', f'"perf/throughput": {ord(run)}'))
    compare = [sys.executable, str(ROOT / "scripts" / "compare_trackers.py")]
    same = subprocess.run([*compare, str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout == "grpo-s0.jsonl: equal (3 steps)\n"  # throughputs differ
    other = subprocess.run([*compare, str(tmp_path / "a" / "grpo-s0.jsonl"), str(tmp_path / "c" / "grpo-s0.jsonl")],
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode == 1
    assert other.stdout == "grpo-s0.jsonl: differs from step 4 (1 values there: val-core/lighteval/MATH/acc/mean@1)\n"
