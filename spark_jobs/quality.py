"""Checks a drive log must pass to be ingested. A log that fails any of them is quarantined with the
reason (log, frame, what is wrong) in the manifest and the command's output; the rest are ingested."""

from __future__ import annotations

import numpy as np

from pipeline.frames import BOX_COLUMNS, Frame
from pipeline.taxonomy import NUM_CLASSES


def frame_problem(frame: Frame, max_points: int) -> str | None:
    """What is wrong with one frame, or None. Cheap: a few vectorised passes over the arrays."""
    where = f"frame {frame.frame_index}"
    points, labels, boxes = frame.points, frame.labels, frame.boxes
    if points.ndim != 2 or points.shape[1] != 4:
        return f"{where}: points have shape {points.shape}, expected (N, 4)"
    if len(points) == 0:
        return f"{where}: no LiDAR points"
    if len(points) > max_points:
        return f"{where}: {len(points)} points, more than ingest.max_points={max_points}"
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        return f"{where}: {int(bad.sum())} points with NaN or inf coordinates/intensity"
    if labels.shape != (len(points),):
        return f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {len(points)} points"
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        return f"{where}: label id {int(labels.max())} is outside the taxonomy (0..{NUM_CLASSES - 1})"
    if boxes.ndim != 2 or boxes.shape[1] != len(BOX_COLUMNS):
        return f"{where}: boxes have shape {boxes.shape}, expected (M, {len(BOX_COLUMNS)})"
    if len(boxes):
        if not np.isfinite(boxes).all():
            return f"{where}: a box has NaN or inf values"
        sizes = boxes[:, 3:6]
        if (sizes <= 0).any():
            i = int(np.nonzero((sizes <= 0).any(axis=1))[0][0])
            return f"{where}: box {i} has a non-positive size {sizes[i].tolist()}"
        classes = boxes[:, 7]
        if ((classes < 0) | (classes >= NUM_CLASSES) | (classes != np.round(classes))).any():
            return f"{where}: a box class id is outside the taxonomy"
    if not np.isfinite(frame.ego).all():
        return f"{where}: ego state has NaN or inf values"
    return None


def normalise(frame: Frame) -> Frame:
    """Cast arrays to the stored dtypes (sources may give float16/float64 points or int labels)."""
    frame.points = np.ascontiguousarray(frame.points, dtype=np.float32)
    labels = np.asarray(frame.labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        labels = np.where((labels < 0) | (labels > 255), 255, labels)  # out of taxonomy: reported below
    frame.labels = np.ascontiguousarray(labels, dtype=np.uint8)
    frame.boxes = np.ascontiguousarray(np.asarray(frame.boxes, dtype=np.float32).reshape(-1, len(BOX_COLUMNS)))
    frame.ego = np.asarray(frame.ego, dtype=np.float64)
    frame.gps = np.asarray(frame.gps, dtype=np.float64)
    frame.route = np.asarray(frame.route, dtype=np.float64)
    return frame
