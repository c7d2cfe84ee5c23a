"""evaluation.segmentation details the scikit-learn comparison does not pin: the threshold grid, softmax
values, score binning at the top of the range and for ignore points, average precision as a sum of recall
steps (with undefined precision skipped), and the summary's counts. Expected values are worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import segmentation as seg
from pipeline.taxonomy import CLASSES, IGNORE, NUM_CLASSES


def test_threshold_grid():
    assert seg.pr_thresholds(1).tolist() == [0.0]
    assert seg.pr_thresholds(4).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert seg.pr_thresholds(4).dtype == np.float64
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"evaluate.pr_thresholds must be at least 1, got {bad}"):
            seg.pr_thresholds(bad)


def test_softmax_values_and_shape():
    probs = seg.softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0], [-1000.0, 0.0]], np.float32))
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5], [0.0, 1.0]], atol=1e-12)
    batch = seg.softmax(np.zeros((2, 3, 4)))
    assert batch.shape == (2, 3, 4) and np.allclose(batch, 0.25)


def scores_for(values: dict[int, list[float]], n: int) -> np.ndarray:
    scores = np.zeros((n, NUM_CLASSES))
    for c, column in values.items():
        scores[:, c] = column
    return scores


def test_a_score_of_one_lands_in_the_top_bin_and_ignore_points_count_nowhere():
    labels = np.array([1, 2, IGNORE, 1])
    scores = scores_for({1: [1.0, 0.9, 1.0, 0.1]}, 4)
    acc = seg.PRAccumulator(seg.pr_thresholds(2))  # thresholds 0, 0.5
    acc.update(labels, scores)
    assert acc.positives.dtype == acc.negatives.dtype == np.int64  # exact counts, however many points
    assert acc.positives[1].tolist() == [1, 1]  # ground points: 0.1 -> bin 0, 1.0 -> bin 1 (the last)
    assert acc.negatives[1].tolist() == [0, 1]  # the building point at 0.9; the ignore point is left out
    assert acc.positives[IGNORE].sum() == 0 and acc.negatives[IGNORE].sum() == 0
    assert acc.negatives[2].tolist() == [2, 0]  # building's column is 0 for both ground points
    curves = acc.curves()
    assert set(curves) == {CLASSES[c] for c in range(NUM_CLASSES) if c != IGNORE}
    ground = curves["ground"]
    assert ground["thresholds"] == [0.0, 0.5] and ground["points"] == 2
    assert ground["recall"] == [1.0, 0.5] and ground["precision"] == [2 / 3, 0.5]
    # AP: recall steps 1.0 -> 0.5 at precision 2/3, then 0.5 -> 0 at precision 0.5
    assert ground["average_precision"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.5)


def test_updates_add_up():
    acc = seg.PRAccumulator(seg.pr_thresholds(2))
    for _ in range(3):
        acc.update(np.array([1]), scores_for({1: [0.7]}, 1))
    assert acc.positives[1].tolist() == [0, 3] and acc.curves()["ground"]["points"] == 3


def test_a_class_without_points_has_no_recall_and_no_average_precision():
    acc = seg.PRAccumulator(seg.pr_thresholds(3))
    acc.update(np.array([1, 1]), scores_for({1: [0.9, 0.9], 5: [0.4, 0.8]}, 2))
    vehicle = acc.curves()["vehicle"]
    assert vehicle["recall"] == [None, None, None] and vehicle["points"] == 0
    assert vehicle["precision"] == [0.0, 0.0, 0.0] and vehicle["average_precision"] is None
    assert acc.curves()["ground"]["precision"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("precision, recall, expected", [
    ([], [], None),
    ([None], [None], None),
    ([0.5], [1.0], 0.5),                                  # one step from 1 down to 0
    ([0.5, 1.0], [1.0, 0.25], 0.75 * 0.5 + 0.25 * 1.0),   # two steps
    ([0.5, None, 1.0], [1.0, 0.5, 0.5], 0.5 * 0.5 + 0.5 * 1.0),  # undefined precision on a step of 0
    ([None, 1.0], [1.0, 0.5], 0.5 * 1.0),                 # undefined precision skips its step
    ([0.25, 0.5], [0.5, 0.5], 0.5 * 0.5),                 # a flat step adds nothing
    ([0.4, 0.8], [0.6, None], 0.6 * 0.4),                 # a missing recall counts as 0
    ([0.2, 0.5, 1.0], [1.0, 0.5, 0.25], 0.5 * 0.2 + 0.25 * 0.5 + 0.25 * 1.0),  # each step to the next recall
])
def test_average_precision_is_the_sum_of_recall_steps_times_precision(precision, recall, expected):
    got = seg.average_precision(precision, recall)
    assert got == (None if expected is None else pytest.approx(expected))
    assert got is None or type(got) is float


def test_summary_counts_frames_points_and_accuracy():
    acc = seg.SegmentationAccumulator()
    assert acc.summary()["frames"] == 0 and acc.summary()["accuracy"] is None and acc.summary()["points"] == 0
    acc.update(np.array([1, 1, 2, IGNORE]), np.array([1, 2, 2, 1]))
    acc.update(np.array([5]), np.array([5]))
    summary = acc.summary()
    assert summary["frames"] == 2 and summary["points"] == 4
    assert summary["accuracy"] == 0.75
    assert summary["confusion"][1][2] == 1 and summary["confusion"][1][1] == 1 and summary["confusion"][5][5] == 1
    assert isinstance(summary["confusion"], list)
    assert summary["classes"]["ground"]["recall"] == 0.5 and summary["classes"]["building"]["precision"] == 0.5
    assert summary["miou"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
