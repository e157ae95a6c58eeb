"""Every ``ssopd/*`` metric means the same at any mini-batch split: through verl's own reduction path.

verl's engine worker reduces each micro-batch's metrics over the data-parallel ranks (``Metric.aggregate_dp``),
appends one value per mini-batch (``append_to_dict``), and the trainer reduces the list by the key's *name*
(``reduce_metrics``: np.max for a name containing "max", so "...argmax..." was a max). The worker's
``step_values`` turns each ``ssopd/*`` list into the step's value first. Here the same micro-batch values are split
into 1, 2 and 4 mini-batches and sent through exactly those verl functions.
"""

import numpy as np
import pytest

from verl.utils.metric import AggregationType, Metric, reduce_metrics
from verl.utils.py_functional import append_to_dict

from ssopd_verl.glue.actor_loss import COUNT, DIAGNOSTICS, SUM_PREFIX, finalize_metrics
from ssopd_verl.glue.worker import step_values

RNG = np.random.default_rng(0)
MICRO_BATCHES = 8
DP = 2


def micro_batch_metrics(i: int) -> list[dict]:
    """What each of DP ranks' loss reports for micro-batch i (as SSOPDActorLoss.loss builds them)."""
    out = []
    for _ in range(DP):
        count = float(RNG.integers(0, 20))
        m = {COUNT: Metric(AggregationType.SUM, count * DP)}
        for name in DIAGNOSTICS.values():  # a per-position sum: at most `count` for a share
            m[SUM_PREFIX + name] = Metric(AggregationType.SUM, float(RNG.uniform(0, 1)) * count * DP)
        m["ssopd/teacher_nonfinite"] = Metric(AggregationType.SUM, float(RNG.integers(0, 3)) * DP)
        m["ssopd/teacher_time_s"] = Metric(AggregationType.SUM, float(RNG.uniform(0.1, 1)))
        m["ssopd/micro_batch_tokens_max"] = Metric(AggregationType.MAX, float(RNG.integers(100, 900)))
        m["ssopd/distill_loss"] = Metric(AggregationType.SUM, float(RNG.uniform(0, 0.1)))
        m["actor/pg_loss"] = Metric(AggregationType.SUM, float(RNG.uniform(-1, 1)))
        out.append(m)
    return out


MICRO = [micro_batch_metrics(i) for i in range(MICRO_BATCHES)]


def through_verl(mini_batches: int) -> dict:
    """The micro-batches split into `mini_batches` mini-batches, reduced as verl 0.9.1 does, then finalised."""
    per_mini = MICRO_BATCHES // mini_batches
    metrics: dict = {}
    for b in range(mini_batches):
        output = {}
        for key in MICRO[0][0]:
            # the engine's metric lists: per micro-batch, per rank -> aggregate_dp (engine_workers.train_mini_batch)
            per_rank = []
            for r in range(DP):
                metric = MICRO[0][r][key].init_list()
                for j in range(per_mini):
                    metric.extend(MICRO[b * per_mini + j][r][key])
                per_rank.append(metric)
            output[key] = Metric.aggregate_dp(per_rank)
        append_to_dict(metrics, output)
    metrics = step_values(metrics)
    reduced = reduce_metrics({f"actor/{k}": v for k, v in metrics.items()})  # the trainer's _update_actor
    reduced = {k[len("actor/"):] if k.startswith("actor/ssopd/") else k: v for k, v in reduced.items()}
    return finalize_metrics(reduced)


def test_every_ssopd_metric_is_the_same_with_1_2_and_4_mini_batches():
    one = through_verl(1)
    for n in (2, 4):
        other = through_verl(n)
        for key, value in one.items():
            if key.startswith("ssopd/") and key != "ssopd/distill_loss":
                assert other[key] == pytest.approx(value, rel=1e-12), (key, n)
    # the shares stay shares, whatever the split
    for name in ("teacher_argmax_differs", "teacher_argmax_reversed", "clipped_teacher_mass"):
        assert 0 <= one[f"ssopd/{name}"] <= 1
    # totals are step totals: the teacher time of every micro-batch (rank-averaged), the largest micro-batch
    time = sum(np.mean([MICRO[i][r]["ssopd/teacher_time_s"].values for r in range(DP)]) for i in range(MICRO_BATCHES))
    assert one["ssopd/teacher_time_s"] == pytest.approx(time)
    assert one["ssopd/micro_batch_tokens_max"] == max(
        MICRO[i][r]["ssopd/micro_batch_tokens_max"].values[0] for i in range(MICRO_BATCHES) for r in range(DP))


def test_without_step_values_verls_name_rule_takes_the_max_of_the_argmax_sums():
    """The bug this guards: verl's reduce_metrics takes np.max of a key with "max" in its name."""
    metrics: dict = {}
    for b in range(4):
        append_to_dict(metrics, {COUNT: 10.0, SUM_PREFIX + "teacher_argmax_differs": float(b)})
    naive = finalize_metrics(reduce_metrics({k: list(v) for k, v in metrics.items()}))
    fixed = finalize_metrics(reduce_metrics(step_values(metrics)))
    assert naive["ssopd/teacher_argmax_differs"] == pytest.approx(3 / 10)  # max of sums over mean of counts
    assert fixed["ssopd/teacher_argmax_differs"] == pytest.approx(6 / 40)


def test_an_ssopd_key_without_a_rule_is_an_error():
    with pytest.raises(KeyError, match="ssopd/new_metric"):
        step_values({"ssopd/new_metric": [1.0, 2.0]})
