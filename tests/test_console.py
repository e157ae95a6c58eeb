"""The compact per-step console line (ssopd_verl.console)."""

from ssopd_verl.console import step_line, validation_accuracy, validation_line

METRICS = {
    "critic/score/mean": 0.41,
    "val-core/tiny_addition/acc/mean@1": 0.375,
    "val-core/other/acc/mean@1": 0.125,
    "val-aux/tiny_addition/reward/mean@1": 0.9,
    "ssopd/pairs": 5.0,
    "ssopd/distill_loss": 0.0123,
    "ssopd/kl_unclipped": 1.92,
    "ssopd/teacher_logp_sampled": -1.1,
    "ssopd/student_logp_sampled": -1.9,
    "ssopd/teacher_argmax_differs": 0.31,
    "ssopd/targets_skipped": 0.0,
    "degeneration/repetition_loop_frac": 0.0625,
    "degeneration/length_limit_frac": 0.125,
    "timing_s/step": 6.14,
    "ssopd/teacher_time_share": 0.18,
}


def test_step_line_holds_the_numbers_that_matter():
    line = step_line(METRICS, 4, 8)
    assert line.startswith("ssopd  [#####-----]  4/8")
    for part in ("reward 0.410", "val 0.250", "pairs 5", "distill 0.0123", "kl 1.920", "teacher-student +0.800 nats",
                 "argmax!= 0.31", "skipped 0", "loop 0.06", "cut 0.12", "step 6.1 s (teacher 18%)"):
        assert part in line, part
    assert "\n" not in line and len(line) < 250


def test_absent_metrics_are_left_out():
    line = step_line({"critic/score/mean": 0.5}, 1, 10)
    assert line == "ssopd  [#---------]   1/10  reward 0.500"


def test_validation_accuracy_averages_the_data_sources_only():
    assert validation_accuracy(METRICS) == 0.25
    assert validation_accuracy({"val-aux/x/reward/mean@1": 1.0}) is None
    assert validation_line(METRICS, 0) == "ssopd validation at step 0: accuracy 0.250"


def test_grading_counts_from_reward_extra_info():
    from ssopd_verl.glue.trainer import grading_counts

    extra = [{"reward_extra_info": {"grading_timeout": True, "grading_skipped": False, "grading_error": 0}},
             {"reward_extra_info": {"grading_timeout": False, "grading_skipped": True, "grading_error": 0}},
             {"reward_extra_info": {"grading_timeout": True}}, None, {"other": 1}]  # fmt: skip
    assert grading_counts(extra) == {"reward/grading_timeout": 2.0, "reward/grading_skipped": 1.0,
                                     "reward/grading_error": 0.0}  # fmt: skip
    assert grading_counts([{"reward_extra_info": {"acc": 1.0}}]) == {}  # another reward function: nothing
