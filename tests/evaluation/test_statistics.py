"""evaluation.statistics: intervals, slices and the paired regression test on constructed tallies with known
answers, interval coverage over seeded repetitions, determinism, clear errors for bad slice specs. (The
tallies of a real scoring pass are checked against the point metrics in test_report.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import statistics
from pipeline.config import EvaluateConfig
from tests.evaluation.builders import fleet, log_tally, tallies

SETTINGS = EvaluateConfig(bootstrap_resamples=1000, min_slice_logs=3, min_slice_count=10, max_regression=0.05)


def by_key(comparisons):
    return {(c["slice"], c["metric"]): c for c in comparisons}


def test_an_identical_candidate_never_regresses():
    production = fleet()
    comparisons = statistics.compare(production, production, SETTINGS)
    assert comparisons and {c["outcome"] for c in comparisons} <= {"pass", "too_small"}
    assert all(c["change"] == 0 and c["low"] == 0 and c["high"] == 0 for c in comparisons)


def test_a_large_regression_in_one_city_fails_that_slice_only():
    production = fleet()

    def worse_in_boston(_i, city, parts):
        return {"vehicle": (200, 100)} if city == "boston" else {}

    candidate = fleet(worse_in_boston)
    comparisons = by_key(statistics.compare(candidate, production, SETTINGS))
    boston = comparisons[("city=boston", "iou/vehicle")]
    assert boston["outcome"] == "fail" and boston["blocks"] and boston["high"] < -0.05
    for city in ("atlanta", "chicago", "dallas"):
        assert all(c["outcome"] == "pass" for (s, _m), c in comparisons.items() if s == f"city={city}")
    failed = {s for (s, _m), c in comparisons.items() if c["outcome"] == "fail"}
    assert failed <= {"city=boston", "all"}
    assert comparisons[("all", "miou")]["outcome"] == "pass"  # the average hides it; the slice does not
    assert comparisons[("city=solo", "iou/vehicle")]["outcome"] == "too_small"


def test_a_hairs_worth_regression_is_not_enough_evidence_and_named():
    production = fleet()

    # every other log loses 30 of its vehicle points, the rest nothing: on average about max_regression
    def a_hair_worse(i, _city, parts):
        points, correct = parts["vehicle"]
        return {"vehicle": (points, correct - 30 * (i % 2))}

    candidate = fleet(a_hair_worse)
    comparisons = by_key(statistics.compare(candidate, production, SETTINGS))
    overall = comparisons[("all", "iou/vehicle")]
    assert overall["change"] == pytest.approx(-0.05, abs=0.02)
    assert overall["low"] < -0.05 < overall["high"]
    assert overall["outcome"] == "undecided" and not overall["blocks"]  # not a safety metric: a warning
    text = statistics.describe_comparison(overall, "production model:x@v1", SETTINGS)
    assert text.startswith("all: vehicle IoU ") and "vs production model:x@v1" in text
    assert "not enough evidence" in text and "(warning)" in text
    assert f"{overall['low']:+.3f} to {overall['high']:+.3f}" in text
    assert not any(c["outcome"] == "fail" for c in comparisons.values())


def test_not_enough_evidence_on_missed_brakes_blocks_by_default():
    production = fleet()

    def one_more_miss_every_other_log(i, _city, _parts):
        return {"planner": (20, 10, 2 + i % 2, 1)}

    comparisons = by_key(statistics.compare(fleet(one_more_miss_every_other_log), production, SETTINGS))
    missed = comparisons[("all", "missed_brake_rate")]
    assert missed["change"] == pytest.approx(0.05, abs=0.01) and missed["low"] < 0.05 < missed["high"]
    assert missed["outcome"] == "undecided" and missed["blocks"]
    relaxed = EvaluateConfig(**{**SETTINGS.__dict__, "undecided_blocks": "none"})
    assert not by_key(statistics.compare(fleet(one_more_miss_every_other_log), production, relaxed))[
        ("all", "missed_brake_rate")]["blocks"]


def test_a_single_log_slice_is_reported_as_too_small():
    described = statistics.describe(fleet()["tallies"], SETTINGS)
    solo = described["slices"]["city=solo"]
    assert solo["logs"] == 1 and solo["too_small"] == "1 test log (< min_slice_logs 3)"
    assert all(m["too_small"] for m in solo["metrics"].values())
    boston = described["slices"]["city=boston"]
    assert boston["logs"] == 4 and boston["too_small"] is None and not boston["metrics"]["miou"]["too_small"]
    warning = statistics.evidence_warning(described)
    assert "city=solo (1 log)" in warning and "city=boston" not in warning


def test_a_slice_without_any_scored_point_is_described_with_no_metric():
    """A real import's test split can hold one frame whose points no scored class claims (KITTI labels only
    objects): every metric of that slice is undefined, so none is reported, and nothing is bootstrapped."""
    empty = log_tally(ground=(0, 0), vehicle=(0, 0), pedestrian=(0, 0), planner=(0, 0, 0, 0))
    described = statistics.describe(tallies([("log-00", "karlsruhe", empty)]), SETTINGS)
    for name in ("all", "city=karlsruhe"):
        assert described["slices"][name]["metrics"] == {} and described["slices"][name]["points"] == 0


def test_point_values_are_the_ratios_of_the_summed_counts():
    production = fleet()
    described = statistics.describe(production["tallies"], SETTINGS)["slices"]["all"]
    counts = np.asarray(production["tallies"]["dimensions"]["all"]["counts"])[:, 0].sum(axis=0)
    layout = statistics.Layout(10)
    confusion = counts[layout.confusion].reshape(8, 8)
    ious = [confusion[c, c] / (confusion[c].sum() + confusion[:, c].sum() - confusion[c, c]) for c in (1, 5, 6)]
    assert described["metrics"]["miou"]["value"] == pytest.approx(np.mean(ious))
    assert described["metrics"]["recall/vehicle"]["value"] == pytest.approx(confusion[5, 5] / confusion[5].sum())
    accuracy = np.trace(confusion) / confusion.sum()
    assert described["metrics"]["ece"]["value"] == pytest.approx(abs(accuracy - 0.75))
    assert described["metrics"]["missed_brake_rate"]["value"] == pytest.approx(2 / 10)
    assert described["metrics"]["false_brake_rate"]["value"] == pytest.approx(1 / 10)
    for m in described["metrics"].values():
        assert m["low"] <= m["value"] <= m["high"]
    assert (described["logs"], described["frames"], described["points"]) == (17, 17 * 20, int(confusion.sum()))


def test_interval_coverage_over_seeded_repetitions():
    """Logs of varying size and varying recall around a known population value (the ratio of expected
    sums, 0.7): the 95% interval covers it in roughly 95% of 200 seeded repetitions."""
    settings = EvaluateConfig(bootstrap_resamples=400, min_slice_logs=1)
    covered = 0
    for rep in range(200):
        rng = np.random.default_rng(1000 + rep)
        logs = []
        for i in range(30):
            points = int(rng.integers(200, 2000))
            correct = int(rng.binomial(points, rng.beta(7, 3)))  # a log's recall varies: mean 0.7
            logs.append((f"log-{i}", "town", log_tally(ground=(0, 0), vehicle=(points, correct))))
        m = statistics.describe(tallies(logs), settings)["slices"]["all"]["metrics"]["recall/vehicle"]
        covered += m["low"] <= 0.7 <= m["high"]
    assert 0.85 * 200 <= covered <= 0.99 * 200, covered


def test_same_inputs_same_bytes_and_the_seed_matters():
    production, candidate = fleet(), fleet(seed=1)
    first = json.dumps([statistics.describe(candidate["tallies"], SETTINGS),
                        statistics.compare(candidate, production, SETTINGS)])
    again = json.dumps([statistics.describe(candidate["tallies"], SETTINGS),
                        statistics.compare(candidate, production, SETTINGS)])
    assert first == again
    reseeded = EvaluateConfig(**{**SETTINGS.__dict__, "bootstrap_seed": 1})
    assert json.dumps(statistics.describe(candidate["tallies"], reseeded)) != json.dumps(
        statistics.describe(candidate["tallies"], SETTINGS))


def test_no_resamples_gives_point_estimates_and_a_point_gate():
    settings = EvaluateConfig(**{**SETTINGS.__dict__, "bootstrap_resamples": 0})
    metric = statistics.describe(fleet()["tallies"], settings)["slices"]["all"]["metrics"]["miou"]
    assert metric["low"] == metric["value"] == metric["high"]

    def worse_in_boston(_i, city, _parts):
        return {"vehicle": (200, 100)} if city == "boston" else {}

    comparisons = by_key(statistics.compare(fleet(worse_in_boston), fleet(), settings))
    assert comparisons[("city=boston", "iou/vehicle")]["outcome"] == "fail"
    assert {c["outcome"] for c in comparisons.values()} <= {"pass", "fail", "too_small"}


def test_models_scored_on_other_logs_cannot_be_paired():
    production = fleet()
    other = {"tallies": {**production["tallies"], "logs": [f"x-{i}" for i in range(17)]}}
    with pytest.raises(ValueError, match="same test logs"):
        statistics.compare(other, production, SETTINGS)


@pytest.mark.parametrize("text, message", [
    ("city;weather", "unknown slice 'weather'"),
    ("speed_mps", "needs band edges"),
    ("city:3", "city takes no edges"),
    ("hour_utc:12,6", "must be positive and increasing"),
    ("city;city", "given twice"),
])
def test_bad_slice_specs_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        statistics.parse_slices(text, (20.0, 40.0))


def test_slice_specs_parse():
    specs = statistics.parse_slices("city; distance; speed_mps:3,10; hour_utc:6,12,18", (20.0, 40.0))
    assert [(s.dimension, s.edges) for s in specs] == [("city", ()), ("distance", (20.0, 40.0)),
                                                       ("speed_mps", (3.0, 10.0)), ("hour_utc", (6.0, 12.0, 18.0))]
    assert specs[2].groups == ["0-3", "3-10", "10+"]
