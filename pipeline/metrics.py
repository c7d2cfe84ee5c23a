"""Point segmentation scores from a confusion matrix: the one implementation of per-class precision,
recall, IoU and mIoU, shared by the trainer's validation and the evaluate stage (so their numbers are
the same numbers).

Conventions:

* The confusion matrix has ground truth in rows and predictions in columns, over all taxonomy ids.
  Points labelled ``ignore`` are left out of it; a labelled point predicted ``ignore`` is a miss (false
  negative) of its true class and a false positive of no class.
* Per-class numbers are reported for every class but ``ignore``. A number that is 0/0 is ``None``:
  precision of a class never predicted, recall of a class absent from the ground truth, IoU of a class
  neither present nor predicted.
* mIoU averages the IoU of the classes that have ground-truth points (a class the split lacks cannot
  lower or raise it); ``None`` when no class has any.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.taxonomy import CLASSES, IGNORE, NUM_CLASSES

SCORED_CLASSES = tuple(c for c in range(NUM_CLASSES) if c != IGNORE)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``[num_classes, num_classes]`` int64 counts: rows ground truth, columns prediction; ``ignore``
    points (ground truth) are dropped."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    predicted = np.asarray(predicted).astype(np.int64).ravel()
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    scored = labels != IGNORE
    index = labels[scored] * num_classes + predicted[scored]
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when the denominator is 0 (the metric is undefined)."""
    return float(numerator / denominator) if denominator > 0 else None


def class_metrics(confusion: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per class (by name, ``ignore`` left out): precision, recall, IoU and the counts behind them."""
    confusion = np.array(confusion, dtype=np.int64)
    confusion[IGNORE, :] = 0  # points labelled ignore count nowhere (``confusion_matrix`` never has any)
    true_positive = np.diag(confusion)
    ground_truth = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    out = {}
    for c in SCORED_CLASSES:
        tp, gt, pred = int(true_positive[c]), int(ground_truth[c]), int(predicted[c])
        out[CLASSES[c]] = {
            "precision": ratio(tp, pred), "recall": ratio(tp, gt), "iou": ratio(tp, gt + pred - tp),
            "true_positive": tp, "false_positive": pred - tp, "false_negative": gt - tp, "points": gt,
        }
    return out


def mean_iou(per_class: dict[str, dict[str, Any]]) -> float | None:
    """Mean IoU over the classes with ground-truth points; None when there are none."""
    values = [m["iou"] for m in per_class.values() if m["points"] > 0]
    return float(np.mean(values)) if values else None


def class_iou(confusion: np.ndarray) -> tuple[dict[str, float | None], float | None]:
    """IoU by class name for every class (None for ``ignore`` and for classes absent from the ground
    truth) and the mIoU: the compact form the trainer logs each epoch."""
    per_class = class_metrics(confusion)
    ious = {name: None for name in CLASSES}
    ious.update({name: m["iou"] for name, m in per_class.items() if m["points"] > 0})
    return ious, mean_iou(per_class)
