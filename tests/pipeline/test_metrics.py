"""pipeline.metrics, the one mIoU implementation (trainer validation and evaluate stage): against
scikit-learn's confusion matrix and Jaccard scores on the same arrays, and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from pipeline import metrics
from pipeline.taxonomy import CLASSES, IGNORE, NUM_CLASSES


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_iou_and_miou_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    # Class 7 is absent from the ground truth but predicted sometimes: IoU 0 for sklearn, left out of
    # the mean (and reported None by class_iou) because the split has no such points.
    labels = rng.choice(NUM_CLASSES - 1, size=3000)
    predicted = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, NUM_CLASSES, 3000))
    scored = labels != IGNORE
    confusion = metrics.confusion_matrix(labels, predicted)
    expected = sk_confusion(labels[scored], predicted[scored], labels=list(range(NUM_CLASSES)))
    assert np.array_equal(confusion, expected)

    present = sorted(set(labels[scored].tolist()))
    jaccard = jaccard_score(labels[scored], predicted[scored], labels=present, average=None)
    ious, miou = metrics.class_iou(confusion)
    assert list(ious) == list(CLASSES)
    assert ious[CLASSES[IGNORE]] is None and ious[CLASSES[NUM_CLASSES - 1]] is None
    for k, c in enumerate(present):
        assert ious[CLASSES[c]] == pytest.approx(jaccard[k])
    assert miou == pytest.approx(float(np.mean(jaccard)))
    assert metrics.mean_iou(metrics.class_metrics(confusion)) == miou
    assert metrics.class_metrics(confusion)[CLASSES[NUM_CLASSES - 1]]["iou"] == 0.0  # predicted, never true


def test_hand_made_confusion():
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    confusion[1, 1], confusion[1, 2] = 3, 1  # ground: 3 right, 1 called building
    confusion[2, 2] = 2                      # building: 2 right (and 1 false positive from ground)
    confusion[IGNORE, 1] = 50                # never counted, whatever it holds
    ious, miou = metrics.class_iou(confusion)
    assert ious["ground"] == pytest.approx(3 / 4) and ious["building"] == pytest.approx(2 / 3)
    assert miou == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert metrics.class_iou(np.zeros((NUM_CLASSES, NUM_CLASSES)))[1] is None
