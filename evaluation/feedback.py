"""Feedback to ingest: up-weight the scenes the model does worst on, and the training logs most like them.

Ingest reads ``<home>/feedback/sample_weights.json`` (``{log_id: weight}``, 1.0 for a log not in it) and
stores each log's weight on its rows; the trainer multiplies every frame's loss by it. Evaluation writes:

* the worst test scenes themselves (by mIoU). Splits are sticky per log, so a test log stays in test
  and its weight does not change training today - it is recorded so the decision is visible, and it
  applies if the log ever lands in a training split (another dataset name, another split mode);
* for each of them, the ``similar`` training logs of the same city whose class mix (share of points per
  class) is closest to the scene's (L1 distance); with no training log in that city, the closest of any
  city. This is the part that changes the next training run: more weight on scenes like the hard ones,
  as Uber ATG describes.

The file is merged, never overwritten: logs written earlier by anyone keep their weight, a log named
again keeps the larger of its old and new weights (so repeated runs do not compound), and the write is
atomic (temporary file + rename) under an exclusive lock, so two evaluations cannot lose each other's
entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Any, Iterator

import numpy as np

from pipeline.contracts import Manifest
from pipeline.files import atomic_file
from pipeline.taxonomy import IGNORE, NUM_CLASSES

FEEDBACK_DIR = "feedback"
WEIGHTS_FILE = "sample_weights.json"


def class_mix(log_info: dict[str, Any]) -> np.ndarray:
    """Share of a log's labelled points per class, from the manifest's ``class_points``."""
    counts = np.zeros(NUM_CLASSES)
    for key, value in (log_info.get("class_points") or {}).items():
        if 0 <= int(key) < NUM_CLASSES and int(key) != IGNORE:
            counts[int(key)] += float(value)
    total = counts.sum()
    return counts / total if total > 0 else counts


def similar_train_logs(scene: str, manifest: Manifest, count: int) -> list[str]:
    """The ``count`` train logs closest to ``scene`` in class mix, from its city when it has any."""
    logs = manifest.logs
    train = [log for log in manifest.splits["train"].logs if log in logs] if "train" in manifest.splits else []
    if count <= 0 or not train or scene not in logs:
        return []
    city = logs[scene].get("city")
    pool = [log for log in train if logs[log].get("city") == city] or train
    target = class_mix(logs[scene])
    ranked = sorted(pool, key=lambda log: (float(np.abs(class_mix(logs[log]) - target).sum()), log))
    return ranked[:count]


def hard_scene_weights(worst: list[str], manifest: Manifest, weight: float, similar: int) -> dict[str, float]:
    """``{log_id: weight}`` for the worst scenes and their most similar train logs."""
    out: dict[str, float] = {}
    for scene in worst:
        out[scene] = weight
        for log in similar_train_logs(scene, manifest, similar):
            out[log] = weight
    return out


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_sample_weights(folder: str, weights: dict[str, float]) -> tuple[str, dict[str, float]]:
    """Merge ``weights`` into ``<folder>/sample_weights.json`` (see the module docstring); returns the
    path and the merged content."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHTS_FILE)
    with _locked(path):
        current: dict[str, float] = {}
        if os.path.exists(path):
            with open(path) as fh:
                current = {str(k): float(v) for k, v in json.load(fh).items()}
        for log, weight in weights.items():
            current[log] = max(float(weight), current.get(log, float(weight)))
        with atomic_file(path, "w") as fh:
            json.dump(dict(sorted(current.items())), fh, indent=2)
    return path, current
