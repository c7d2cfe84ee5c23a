"""evaluation.blessing: the verdict on hand-made metrics - a pass, absolute failures, the paired regression
test against production (a city's regression, a hair's-worth change that warns or blocks, a single-log
slice named as too small), and the first model with no production baseline."""

from __future__ import annotations

import copy

import pytest

from evaluation import blessing, statistics
from pipeline.config import EvaluateConfig
from tests.evaluation.builders import fleet


def metrics(ious, recalls=None, scenes=None, p99=100.0, missed_rate=0.0):
    """Candidate-shaped metrics: per-class IoU (and recall), per-scene mIoU, TorchScript p99."""
    recalls = recalls or {name: 0.9 for name in ious}
    classes = {name: {"iou": iou, "recall": recalls[name], "precision": 0.9, "points": 100 if iou is not None else 0}
               for name, iou in ious.items()}
    present = [v for v in ious.values() if v is not None]
    return {
        "segmentation": {"miou": sum(present) / len(present), "classes": classes},
        "scenes": {log: {"miou": m} for log, m in (scenes or {"log-a": 0.6, "log-b": 0.7}).items()},
        "planner": {"missed_brake_rate": missed_rate},
        "hardware": {"variants": {"eager": {"p99_ms": p99 * 2}, "torchscript": {"p99_ms": p99}}},
    }


GOOD = metrics({"ground": 0.9, "building": 0.7, "vehicle": 0.6, "pedestrian": 0.4, "cyclist": None})


def test_first_model_passes_on_absolute_thresholds_and_says_there_is_no_baseline():
    verdict = blessing.decide(GOOD, EvaluateConfig())
    assert verdict.blessed
    assert any("no production model" in r and "absolute thresholds only" in r for r in verdict.reasons)
    assert {c["check"] for c in verdict.checks} == {"min_miou", "min_class_recall", "latency_p99_budget_ms"}
    assert all(c["passed"] for c in verdict.checks)


def test_absolute_failures_each_give_a_reason():
    settings = EvaluateConfig(min_miou=0.7, min_class_recall=0.5, latency_p99_budget_ms=50.0, max_missed_brake_rate=0.1)
    bad = metrics({"ground": 0.9, "building": 0.7, "vehicle": 0.6, "pedestrian": 0.4, "cyclist": None},
                  recalls={"ground": 0.95, "building": 0.8, "vehicle": 0.7, "pedestrian": 0.3, "cyclist": None},
                  p99=80.0, missed_rate=0.25)
    verdict = blessing.decide(bad, settings)
    assert not verdict.blessed
    failed = [c["check"] for c in verdict.checks if not c["passed"]]
    assert sorted(failed) == ["latency_p99_budget_ms", "max_missed_brake_rate", "min_class_recall", "min_miou"]
    text = " | ".join(verdict.reasons[:4])  # failures come first
    assert "mIoU 0.650 < min_miou 0.700" in text
    assert "pedestrian point recall 0.300 < min_class_recall 0.500" in text
    assert "torchscript latency p99 80.0 ms > budget 50.0 ms" in text
    assert "missed-brake rate 0.250 > max_missed_brake_rate 0.100" in text


def with_tallies(tallied: dict) -> dict:
    """GOOD's absolute metrics with the per-log tallies (and their described statistics) of ``tallied``."""
    out = {**copy.deepcopy(GOOD), **tallied}
    out["statistics"] = statistics.describe(tallied["tallies"], EvaluateConfig())
    return out


def worse_in_boston(_i, city, _parts):
    return {"vehicle": (200, 100)} if city == "boston" else {}


def test_an_identical_model_passes_against_production():
    verdict = blessing.decide(with_tallies(fleet()), EvaluateConfig(), with_tallies(fleet()), "production model:x@v1")
    assert verdict.blessed, verdict.reasons
    regression = [c for c in verdict.checks if c["check"] == "regression"]
    assert len(regression) == 1 and regression[0]["passed"]
    assert "paired bootstrap against production model:x@v1" in regression[0]["text"] and "0 regressions" in regression[0]["text"]
    assert not any("no production model" in r for r in verdict.reasons)
    assert verdict.comparisons and {c["outcome"] for c in verdict.comparisons} <= {"pass", "too_small"}


def test_a_city_regression_fails_and_names_the_slice_even_with_a_good_mean():
    verdict = blessing.decide(with_tallies(fleet(worse_in_boston)), EvaluateConfig(), with_tallies(fleet()),
                              "production model:x@v1")
    assert not verdict.blessed
    failed = [c for c in verdict.checks if not c["passed"]]
    assert failed and {c["check"] for c in failed} == {"regression"}
    assert all(c["text"].startswith(("city=boston: ", "all: ")) for c in failed)
    boston = next(r for r in verdict.reasons if r.startswith("city=boston: vehicle IoU "))
    assert "vs production model:x@v1" in boston and "95% CI" in boston and "regression" in boston
    assert verdict.reasons[0] in {c["text"] for c in failed}  # failures first
    mean = next(c for c in verdict.comparisons if (c["slice"], c["metric"]) == ("all", "miou"))
    assert mean["outcome"] == "pass"


def test_a_hairs_worth_change_warns_but_missed_brakes_block():
    def a_hair_worse(i, _city, parts):
        return {"vehicle": (parts["vehicle"][0], parts["vehicle"][1] - 30 * (i % 2))}

    verdict = blessing.decide(with_tallies(fleet(a_hair_worse)), EvaluateConfig(), with_tallies(fleet()))
    assert verdict.blessed, verdict.reasons
    assert any(r.startswith("warning: all: vehicle IoU") and "not enough evidence" in r for r in verdict.reasons)

    def one_more_miss_every_other_log(i, _city, _parts):
        return {"planner": (20, 10, 2 + i % 2, 1)}

    verdict = blessing.decide(with_tallies(fleet(one_more_miss_every_other_log)), EvaluateConfig(),
                              with_tallies(fleet()))
    assert not verdict.blessed
    blocking = [c for c in verdict.checks if not c["passed"]]
    assert [c["check"] for c in blocking][0] == "not_enough_evidence"
    assert blocking[0]["text"].startswith("all: missed-brake rate 0.247 vs production 0.200")
    assert blessing.decide(with_tallies(fleet(one_more_miss_every_other_log)),
                           EvaluateConfig(undecided_blocks="none"), with_tallies(fleet())).blessed


def test_a_single_log_slice_is_named_too_small_in_the_verdict():
    for baseline in (None, with_tallies(fleet())):
        verdict = blessing.decide(with_tallies(fleet()), EvaluateConfig(), baseline)
        warning = [r for r in verdict.reasons if "min_slice_logs" in r]
        assert len(warning) == 1 and "city=solo (1 log)" in warning[0]


def test_a_baseline_without_tallies_cannot_be_compared():
    with pytest.raises(ValueError, match="tallies of both models"):
        blessing.decide(with_tallies(fleet()), EvaluateConfig(), GOOD)


def test_gated_latency_prefers_torchscript_then_eager():
    assert blessing.gated_latency(GOOD["hardware"]) == ("torchscript", 100.0)
    assert blessing.gated_latency({"variants": {"eager": {"p99_ms": 3.0}}}) == ("eager", 3.0)
    assert blessing.gated_latency(None) is None


@pytest.mark.parametrize("miou", [None])
def test_no_labelled_points_fails_min_miou(miou):
    empty = copy.deepcopy(GOOD)
    empty["segmentation"]["miou"] = miou
    assert not blessing.decide(empty, EvaluateConfig()).blessed


def test_too_little_evidence_does_not_wave_a_worse_safety_metric_through():
    scant = EvaluateConfig(min_slice_count=200)  # 170 needed brakes in the fleet: too few to judge

    def many_more_misses(_i, city, _parts):
        return {"planner": (20, 10, 8, 1), **({"vehicle": (200, 60)} if city == "solo" else {})}

    verdict = blessing.decide(with_tallies(fleet(many_more_misses)), scant, with_tallies(fleet()))
    assert not verdict.blessed
    blocking = [c["text"] for c in verdict.checks if not c["passed"]]
    assert any(t.startswith("all: missed-brake rate 0.800 vs production 0.200") and "too little evidence" in t
               and "(blocks)" in t for t in blocking)
    # a worse IoU in a slice too small to judge is named in a warning, and does not block
    warning = next(r for r in verdict.reasons if r.startswith("warning: too little evidence to judge, but worse"))
    assert "city=solo vehicle IoU -" in warning
    assert not any("vehicle IoU" in t for t in blocking)
    # the same scant evidence with nothing worse blocks nothing
    assert blessing.decide(with_tallies(fleet()), scant, with_tallies(fleet())).blessed
