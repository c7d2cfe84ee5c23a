"""evaluation.blessing: the verdict on hand-made metrics - a pass, absolute failures, a regression against
production (class and scene), and the first model with no production baseline."""

from __future__ import annotations

import copy

import pytest

from evaluation import blessing
from pipeline.config import EvaluateConfig


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


def test_an_equal_or_better_model_passes_against_production():
    better = copy.deepcopy(GOOD)
    better["segmentation"]["classes"]["vehicle"]["iou"] = 0.62
    verdict = blessing.decide(better, EvaluateConfig(), GOOD, "production model:x@v1")
    assert verdict.blessed
    checks = {c["check"] for c in verdict.checks}
    assert {"class_regression", "scene_regression", "planner_regression"} <= checks
    assert not any("no production model" in r for r in verdict.reasons)


def test_a_class_regression_beyond_the_allowance_fails_even_with_a_better_mean():
    candidate = metrics({"ground": 0.95, "building": 0.9, "vehicle": 0.8, "pedestrian": 0.33, "cyclist": None})
    assert candidate["segmentation"]["miou"] > GOOD["segmentation"]["miou"]
    verdict = blessing.decide(candidate, EvaluateConfig(max_regression=0.05), GOOD, "production model:x@v1")
    assert not verdict.blessed
    assert verdict.reasons[0] == ("class pedestrian IoU 0.330 vs production model:x@v1 0.400 "
                                  "(-0.070, more than the allowed 0.050)")
    # within the allowance it passes
    assert blessing.decide(candidate, EvaluateConfig(max_regression=0.08), GOOD).blessed


def test_a_scene_regression_fails_and_names_the_scene():
    candidate = copy.deepcopy(GOOD)
    candidate["scenes"] = {"log-a": {"miou": 0.61}, "log-b": {"miou": 0.55}}
    verdict = blessing.decide(candidate, EvaluateConfig(), GOOD)
    assert not verdict.blessed
    failed = [c for c in verdict.checks if not c["passed"]]
    assert [c["check"] for c in failed] == ["scene_regression"] and "log-b" in failed[0]["text"]


def test_more_missed_brakes_than_production_fails():
    candidate = copy.deepcopy(GOOD)
    candidate["planner"]["missed_brake_rate"] = 0.2
    verdict = blessing.decide(candidate, EvaluateConfig(max_regression=0.05), GOOD)
    assert not verdict.blessed
    assert [c["check"] for c in verdict.checks if not c["passed"]] == ["planner_regression"]


def test_gated_latency_prefers_torchscript_then_eager():
    assert blessing.gated_latency(GOOD["hardware"]) == ("torchscript", 100.0)
    assert blessing.gated_latency({"variants": {"eager": {"p99_ms": 3.0}}}) == ("eager", 3.0)
    assert blessing.gated_latency(None) is None


@pytest.mark.parametrize("miou", [None])
def test_no_labelled_points_fails_min_miou(miou):
    empty = copy.deepcopy(GOOD)
    empty["segmentation"]["miou"] = miou
    assert not blessing.decide(empty, EvaluateConfig()).blessed
