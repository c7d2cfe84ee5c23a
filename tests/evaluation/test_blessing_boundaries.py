"""evaluation.blessing at the edges of every threshold: a value exactly at a threshold passes (the rules are
``>=`` / ``<=`` as documented), the next representable step beyond it fails, and each verdict's sentence
says which way it went. Values are binary fractions (0.5, 0.125, ...) so "exactly at" is exact in floats."""

from __future__ import annotations

import pytest

from evaluation import blessing
from pipeline.config import EvaluateConfig
from tests.evaluation.test_blessing import metrics

EPS = 1e-9  # far above float noise at these magnitudes, far below anything the thresholds care about
CLASSES = {"ground": 0.75, "vehicle": 0.5, "pedestrian": 0.25, "cyclist": None}


def candidate(**changes):
    """Metrics whose mIoU is 0.5, lowest present recall 0.5, TorchScript (and eager) p99 100 ms."""
    m = metrics(CLASSES, recalls={"ground": 0.75, "vehicle": 0.5, "pedestrian": 0.625, "cyclist": None},
                scenes={"log-a": 0.5, "log-b": 0.75}, p99=100.0, missed_rate=0.25)
    m["hardware"]["variants"]["eager"]["p99_ms"] = 100.0  # whichever variant is gated, the same number
    for path, value in changes.items():
        target = m
        *parents, last = path.split("__")
        for key in parents:
            target = target[key]
        target[last] = value
    return m


def outcome(verdict, name):
    """(passed, text) of every check called ``name``."""
    return [(c["passed"], c["text"]) for c in verdict.checks if c["check"] == name]


def test_the_candidate_is_what_the_boundaries_below_assume():
    m = candidate()
    assert m["segmentation"]["miou"] == 0.5
    assert min(c["recall"] for c in m["segmentation"]["classes"].values() if c["points"]) == 0.5


@pytest.mark.parametrize("setting, value, blessed, text", [
    ("min_miou", 0.5, True, "mIoU 0.500 >= min_miou 0.500"),
    ("min_miou", 0.5 + EPS, False, "mIoU 0.500 < min_miou 0.500"),
    ("min_miou", 0.5 - EPS, True, "mIoU 0.500 >= min_miou 0.500"),
    ("latency_p99_budget_ms", 100.0, True, "torchscript latency p99 100.0 ms <= budget 100.0 ms"),
    ("latency_p99_budget_ms", 100.0 - EPS, False, "torchscript latency p99 100.0 ms > budget 100.0 ms"),
    ("latency_p99_budget_ms", 100.0 + EPS, True, "torchscript latency p99 100.0 ms <= budget 100.0 ms"),
    ("max_missed_brake_rate", 0.25, True, "missed-brake rate 0.250 <= max_missed_brake_rate 0.250"),
    ("max_missed_brake_rate", 0.25 - EPS, False, "missed-brake rate 0.250 > max_missed_brake_rate 0.250"),
])
def test_absolute_threshold_boundaries(setting, value, blessed, text):
    """mIoU 0.5, p99 100 ms (TorchScript and eager alike) and missed-brake rate 0.25 against each threshold."""
    verdict = blessing.decide(candidate(), EvaluateConfig(**{setting: value}))
    assert verdict.blessed is blessed
    [(passed, said)] = outcome(verdict, setting)
    assert passed is blessed
    assert said.endswith(text.removeprefix("torchscript "))  # whichever variant the budget applies to


def test_min_miou_of_nothing_scored_fails_and_says_n_a():
    verdict = blessing.decide(candidate(segmentation__miou=None), EvaluateConfig(min_miou=0.0))
    assert not verdict.blessed
    assert outcome(verdict, "min_miou") == [(False, "mIoU n/a < min_miou 0.000")]


@pytest.mark.parametrize("threshold, blessed", [(0.5, True), (0.5 + EPS, False)])
def test_min_class_recall_boundary(threshold, blessed):
    verdict = blessing.decide(candidate(), EvaluateConfig(min_class_recall=threshold))
    assert verdict.blessed is blessed
    checks = outcome(verdict, "min_class_recall")
    if blessed:
        assert checks == [(True, f"every class's point recall >= min_class_recall {threshold:.3f} (lowest 0.500)")]
    else:
        assert checks == [(False, f"vehicle point recall 0.500 < min_class_recall {threshold:.3f}")]


def test_every_class_below_the_recall_floor_gets_its_own_failure_and_absent_classes_are_not_judged():
    m = candidate()
    m["segmentation"]["classes"]["cyclist"] = {"iou": None, "recall": 0.0, "precision": None, "points": 0}
    verdict = blessing.decide(m, EvaluateConfig(min_class_recall=0.7))
    failed = [text for passed, text in outcome(verdict, "min_class_recall") if not passed]
    assert failed == ["vehicle point recall 0.500 < min_class_recall 0.700",
                      "pedestrian point recall 0.625 < min_class_recall 0.700"]
    assert verdict.reasons[:2] == failed  # failures lead the reasons


def test_no_timings_means_no_latency_check():
    m = candidate()
    del m["hardware"]
    verdict = blessing.decide(m, EvaluateConfig(latency_p99_budget_ms=0.0))
    assert verdict.blessed and outcome(verdict, "latency_p99_budget_ms") == []


def test_missed_brake_rate_of_one_is_ungated_and_just_below_one_is_gated():
    worst = candidate(planner__missed_brake_rate=1.0)
    assert blessing.decide(worst, EvaluateConfig(max_missed_brake_rate=1.0)).blessed
    assert outcome(blessing.decide(worst, EvaluateConfig(max_missed_brake_rate=1.0)), "max_missed_brake_rate") == []
    assert not blessing.decide(worst, EvaluateConfig(max_missed_brake_rate=1.0 - EPS)).blessed


def test_no_brake_decisions_passes_the_missed_brake_gate():
    verdict = blessing.decide(candidate(planner__missed_brake_rate=None), EvaluateConfig(max_missed_brake_rate=0.0))
    assert outcome(verdict, "max_missed_brake_rate") == [(True, "missed-brake rate n/a <= max_missed_brake_rate 0.000")]


# ---------------------------------------------------------------------------------- reasons and recall
# (the regression against production is the paired bootstrap test: tests/evaluation/test_statistics.py)
def test_reasons_are_failures_then_passes_then_notes():
    verdict = blessing.decide(candidate(), EvaluateConfig(min_miou=0.75, latency_p99_budget_ms=50.0))
    kinds = [next(c["passed"] for c in verdict.checks if c["text"] == r) if any(c["text"] == r for c in verdict.checks)
             else "note" for r in verdict.reasons]
    assert kinds == [False, False, True, "note"]
    assert verdict.reasons[-1] == "no production model to compare with (first model): absolute thresholds only"


def test_a_class_with_a_single_point_is_judged_and_counts_for_the_lowest_recall():
    m = candidate()
    m["segmentation"]["classes"]["cyclist"] = {"iou": 0.0, "recall": 0.0, "precision": None, "points": 1}
    verdict = blessing.decide(m, EvaluateConfig(min_class_recall=0.25))
    assert outcome(verdict, "min_class_recall") == [(False, "cyclist point recall 0.000 < min_class_recall 0.250")]
    m["segmentation"]["classes"]["cyclist"]["recall"] = 0.375
    verdict = blessing.decide(m, EvaluateConfig(min_class_recall=0.25))
    assert outcome(verdict, "min_class_recall")[0][1].endswith("(lowest 0.375)")


def test_no_class_with_points_gives_no_lowest_recall():
    m = candidate()
    for metrics_of_class in m["segmentation"]["classes"].values():
        metrics_of_class["points"] = 0
    verdict = blessing.decide(m, EvaluateConfig())
    assert outcome(verdict, "min_class_recall") == [
        (True, "every class's point recall >= min_class_recall 0.000 (lowest n/a)")]


