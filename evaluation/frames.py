"""The test frames of a dataset artifact, read from its Petastorm split into plain numpy records.

Every point of every frame is kept (no subsampling: metrics are on what the sensor saw) with what the
metrics need beside the points and labels: the boxes (object matching), the ego speed (planner), the
city (feedback, slices) and the timestamp (time-of-day slices). Frames come back ordered by (log id, frame index), whatever the row-group layout.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.contracts import Manifest
from pipeline.frames import EGO_COLUMNS
from training.data import split_url

FIELDS = ("log_id", "frame_index", "timestamp_ns", "city", "points", "labels", "boxes", "ego")
SPEED = EGO_COLUMNS.index("speed")


@dataclass
class LoggedFrame:
    """One logged frame with its ground truth."""

    log_id: str
    frame_index: int
    city: str
    points: np.ndarray  # (N, 4) float32 x, y, z, intensity in the LiDAR frame
    labels: np.ndarray  # (N,) uint8 taxonomy ids
    boxes: np.ndarray  # (M, 9) float32 cx, cy, cz, length, width, height, yaw, class_id, track_id
    speed: float  # ego speed, m/s
    timestamp_ns: int = 0  # UTC nanoseconds since the epoch


def read_split(location: str, manifest: Manifest, split: str = "test") -> list[LoggedFrame]:
    """All frames of ``split`` of the dataset at ``location`` (empty when the split has none)."""
    from petastorm import make_reader

    info = manifest.splits.get(split)
    if not info or not info.row_groups:
        return []
    frames = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyarrow's legacy-API FutureWarnings from Petastorm
        reader = make_reader(split_url(location, manifest, split), schema_fields=list(FIELDS),
                             reader_pool_type="dummy", shuffle_row_groups=False, num_epochs=1)
        with reader:
            for row in reader:
                frames.append(LoggedFrame(
                    log_id=str(row.log_id), frame_index=int(row.frame_index), city=str(row.city),
                    points=np.asarray(row.points, np.float32), labels=np.asarray(row.labels, np.uint8),
                    boxes=np.asarray(row.boxes, np.float32).reshape(-1, 9), speed=float(row.ego[SPEED]),
                    timestamp_ns=int(row.timestamp_ns)))
    frames.sort(key=lambda f: (f.log_id, f.frame_index))
    return frames
