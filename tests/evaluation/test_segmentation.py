"""evaluation.segmentation: the point metrics against scikit-learn on the same arrays, and hand-made
cases whose answers are known (perfect, empty, all wrong, the ignore class)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score, precision_recall_fscore_support

from evaluation import segmentation as seg
from pipeline.taxonomy import CLASSES, IGNORE, NUM_CLASSES

SCORED = list(seg.SCORED_CLASSES)


def summary_of(labels, predicted):
    acc = seg.SegmentationAccumulator()
    acc.update(np.asarray(labels), np.asarray(predicted))
    return acc.summary()


def random_case(seed, n=4000):
    """Labels with some ignore points, predictions that are right 60% of the time and may say ignore."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(NUM_CLASSES, size=n, p=[0.05, 0.4, 0.15, 0.1, 0.03, 0.17, 0.06, 0.04])
    predicted = np.where(rng.random(n) < 0.6, labels, rng.integers(0, NUM_CLASSES, n))
    return labels, predicted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_metrics_equal_scikit_learn(seed):
    labels, predicted = random_case(seed)
    scored = labels != IGNORE
    precision, recall, _f1, support = precision_recall_fscore_support(
        labels[scored], predicted[scored], labels=SCORED, zero_division=0)
    jaccard = jaccard_score(labels[scored], predicted[scored], labels=SCORED, average=None, zero_division=0)
    # Frame by frame accumulation must give the same as one go.
    acc = seg.SegmentationAccumulator()
    for chunk in np.array_split(np.arange(len(labels)), 7):
        acc.update(labels[chunk], predicted[chunk])
    summary = acc.summary()
    for k, c in enumerate(SCORED):
        m = summary["classes"][CLASSES[c]]
        assert m["precision"] == pytest.approx(precision[k])
        assert m["recall"] == pytest.approx(recall[k])
        assert m["iou"] == pytest.approx(jaccard[k])
        assert m["points"] == support[k]
    assert summary["miou"] == pytest.approx(float(np.mean(jaccard)))
    expected = sk_confusion(labels[scored], predicted[scored], labels=list(range(NUM_CLASSES)))
    assert np.array_equal(np.asarray(summary["confusion"]), expected)
    assert summary["points"] == scored.sum()


def test_perfect_prediction():
    labels = np.array([1, 1, 2, 5, 5, 6, 0, 0])
    summary = summary_of(labels, labels)
    assert summary["miou"] == 1.0 and summary["accuracy"] == 1.0
    for name in ("ground", "building", "vehicle", "pedestrian"):
        m = summary["classes"][name]
        assert (m["precision"], m["recall"], m["iou"]) == (1.0, 1.0, 1.0)
    # absent and never predicted: undefined, and left out of the mean
    assert summary["classes"]["cyclist"] == {"precision": None, "recall": None, "iou": None, "true_positive": 0,
                                             "false_positive": 0, "false_negative": 0, "points": 0}


def test_all_wrong():
    labels = np.array([1, 1, 2, 2, 5])
    predicted = np.array([2, 2, 1, 1, 1])
    summary = summary_of(labels, predicted)
    assert summary["miou"] == 0.0 and summary["accuracy"] == 0.0
    assert summary["classes"]["vehicle"]["recall"] == 0.0
    assert summary["classes"]["vehicle"]["precision"] is None  # never predicted
    assert summary["classes"]["ground"]["precision"] == 0.0


def test_empty_frame_and_only_ignore():
    for labels in (np.zeros(0, np.uint8), np.zeros(10, np.uint8)):
        summary = summary_of(labels, np.full(len(labels), 3))
        assert summary["miou"] is None and summary["accuracy"] is None and summary["points"] == 0
        assert all(m["iou"] is None for m in summary["classes"].values())


def test_ignore_points_count_nowhere_and_ignore_predictions_are_misses():
    labels = np.array([0, 0, 0, 5, 5, 1])
    predicted = np.array([5, 5, 1, 5, 0, 1])
    summary = summary_of(labels, predicted)
    vehicle = summary["classes"]["vehicle"]
    # the three ignore points predicted vehicle / ground are not false positives
    assert vehicle == {"precision": 1.0, "recall": 0.5, "iou": 0.5, "true_positive": 1, "false_positive": 0,
                       "false_negative": 1, "points": 2}
    assert summary["classes"]["ground"]["iou"] == 1.0
    assert "ignore" not in summary["classes"]
    assert summary["miou"] == pytest.approx(0.75)


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    probs = seg.softmax(np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]]))
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs[0, 0] == pytest.approx(1.0) and probs[1, 0] == pytest.approx(1 / 3)


def test_pr_curves_equal_direct_counting_at_every_threshold():
    rng = np.random.default_rng(3)
    labels, _ = random_case(4, n=3000)
    logits = rng.normal(size=(len(labels), NUM_CLASSES))
    logits[np.arange(len(labels)), labels] += 1.5  # informative scores
    scores = seg.softmax(logits)
    acc = seg.PRAccumulator(seg.pr_thresholds(20))
    for chunk in np.array_split(np.arange(len(labels)), 3):
        acc.update(labels[chunk], scores[chunk])
    curves = acc.curves()
    scored = labels != IGNORE
    for c in SCORED:
        curve = curves[CLASSES[c]]
        for t, precision, recall in zip(curve["thresholds"], curve["precision"], curve["recall"]):
            chosen = scores[scored, c] >= t
            truth = labels[scored] == c
            tp = int((chosen & truth).sum())
            assert recall == pytest.approx(tp / truth.sum())
            assert precision == (pytest.approx(tp / chosen.sum()) if chosen.sum() else None)
        assert curve["recall"][0] == 1.0  # threshold 0 takes every point
        assert 0.0 < curve["average_precision"] <= 1.0


def test_average_precision_of_a_perfect_ranking_is_one():
    labels = np.array([1, 1, 2, 2])
    scores = np.zeros((4, NUM_CLASSES))
    scores[[0, 1], 1] = 0.95
    scores[[2, 3], 1] = 0.05
    scores[[2, 3], 2] = 0.95
    scores[[0, 1], 2] = 0.05
    acc = seg.PRAccumulator(seg.pr_thresholds(10))
    acc.update(labels, scores)
    assert acc.curves()["ground"]["average_precision"] == pytest.approx(1.0)
    assert acc.curves()["vehicle"]["average_precision"] is None  # no vehicle points


def test_a_score_equal_to_a_threshold_counts_as_chosen():
    labels = np.array([1, 1, 2])
    scores = np.zeros((3, NUM_CLASSES))
    scores[:, 1] = [0.5, 0.25, 0.75]  # exactly on the thresholds 0, 0.25, 0.5, 0.75
    acc = seg.PRAccumulator(seg.pr_thresholds(4))
    acc.update(labels, scores)
    ground = acc.curves()["ground"]
    assert ground["recall"] == [1.0, 1.0, 0.5, 0.0]
    assert ground["precision"] == [2 / 3, 2 / 3, 0.5, 0.0]
