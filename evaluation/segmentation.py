"""Point-level segmentation metrics: confusion matrix, per-class precision / recall / IoU, mIoU and
precision-recall curves over softmax score thresholds.

A point's prediction is the argmax over all the model's logits; its score for class ``c`` is the
softmax probability of ``c``. The confusion matrix, per-class numbers and mIoU come from
``pipeline.metrics`` - the same implementation as the trainer's validation mIoU, so the numbers are
comparable; its docstring states the conventions (``ignore`` left out, 0/0 is ``None``, mIoU over the
classes with ground-truth points).

Everything accumulates frame by frame (``SegmentationAccumulator``), so a split never has to fit in
memory at once, and per-log accumulators give the per-scene numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.metrics import SCORED_CLASSES, class_metrics, confusion_matrix, mean_iou, ratio
from pipeline.taxonomy import CLASSES, IGNORE, NUM_CLASSES


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[N, K]`` logits, stable for large values."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def pr_thresholds(count: int) -> np.ndarray:
    """``count`` score thresholds evenly spaced on [0, 1): 0, 1/count, ..., (count-1)/count."""
    if count < 1:
        raise ValueError(f"evaluate.pr_thresholds must be at least 1, got {count}")
    return np.arange(count, dtype=np.float64) / count


@dataclass
class PRAccumulator:
    """Precision-recall curves over score thresholds, one per class, from histograms of scores.

    For threshold ``t`` a point counts as predicted ``c`` when its softmax score of ``c`` is ``>= t``.
    Scores are binned once with the thresholds as bin edges, so the counts at every threshold are exact
    (not interpolated) and the memory is ``classes x thresholds`` whatever the split's size.
    """

    thresholds: np.ndarray
    positives: np.ndarray = field(init=False)  # [K, T]: points of class c with score in bin t
    negatives: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (NUM_CLASSES, len(self.thresholds))
        self.positives = np.zeros(shape, np.int64)
        self.negatives = np.zeros(shape, np.int64)

    def update(self, labels: np.ndarray, scores: np.ndarray) -> None:
        """Add one frame: ``labels [N]`` taxonomy ids, ``scores [N, K]`` softmax probabilities."""
        scored = np.asarray(labels) != IGNORE
        labels, scores = np.asarray(labels)[scored], np.asarray(scores)[scored]
        bins = np.searchsorted(self.thresholds, scores, side="right") - 1  # bin t holds [t_k, t_k+1)
        bins = np.clip(bins, 0, len(self.thresholds) - 1)
        for c in SCORED_CLASSES:
            is_c = labels == c
            self.positives[c] += np.bincount(bins[is_c, c], minlength=len(self.thresholds))
            self.negatives[c] += np.bincount(bins[~is_c, c], minlength=len(self.thresholds))

    def curves(self) -> dict[str, dict[str, Any]]:
        """Per class: thresholds, precision and recall at each (None where undefined) and the average
        precision (area under the step curve, recall decreasing with the threshold)."""
        out = {}
        for c in SCORED_CLASSES:
            # points with score >= threshold k: the bins k.. summed from the top
            tp = np.cumsum(self.positives[c][::-1])[::-1]
            fp = np.cumsum(self.negatives[c][::-1])[::-1]
            total = int(self.positives[c].sum())
            precision = [ratio(t, t + f) for t, f in zip(tp, fp)]
            recall = [ratio(t, total) for t in tp]
            out[CLASSES[c]] = {"thresholds": self.thresholds.tolist(), "precision": precision, "recall": recall,
                               "average_precision": average_precision(precision, recall), "points": total}
        return out


def average_precision(precision: Sequence[float | None], recall: Sequence[float | None]) -> float | None:
    """Area under a precision-recall curve given at increasing thresholds (recall non-increasing):
    sum over thresholds of (recall_k - recall_k+1) * precision_k, the last step down to recall 0."""
    if not recall or recall[0] is None:
        return None
    area = 0.0
    for k in range(len(recall)):
        following = recall[k + 1] if k + 1 < len(recall) else 0.0
        step = (recall[k] or 0.0) - (following or 0.0)
        if step > 0 and precision[k] is not None:
            area += step * precision[k]
    return float(area)


@dataclass
class SegmentationAccumulator:
    """Confusion counts summed over frames; ``summary()`` turns them into the reported metrics."""

    confusion: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))
    frames: int = 0

    def update(self, labels: np.ndarray, predicted: np.ndarray) -> None:
        self.confusion += confusion_matrix(labels, predicted)
        self.frames += 1

    def summary(self) -> dict[str, Any]:
        per_class = class_metrics(self.confusion)
        scored = int(self.confusion.sum())
        return {"miou": mean_iou(per_class), "classes": per_class, "frames": self.frames, "points": scored,
                "accuracy": ratio(int(np.trace(self.confusion)), scored),
                "confusion": self.confusion.tolist()}
