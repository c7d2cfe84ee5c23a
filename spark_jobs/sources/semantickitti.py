"""SemanticKITTI importer (``sequences/NN/{velodyne/NNNNNN.bin, labels/NNNNNN.label}``).

One log per labelled sequence (``semantickitti-NN``), one frame per scan (frame index = scan number), 10 Hz. Labels are
uint32 per point: the lower 16 bits are the raw semantic id, mapped straight to the pipeline taxonomy by
``LABEL_MAP`` (the official ``learning_map`` composed with our classes, see docs/label-maps.md); the upper
16 bits (instance ids) are not used, so frames carry no boxes. A log handle is the sequence folder.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Iterator

import numpy as np

from pipeline.errors import UserError
from pipeline.frames import Frame, LogMeta
from pipeline.taxonomy import CLASS_ID
from spark_jobs.sources.registry import register_importer

SOURCE = "semantickitti"
# raw SemanticKITTI id -> taxonomy class; comment: raw name -> learning_map class (19-class benchmark).
LABEL_MAP: dict[int, str] = {
    0: "ignore",       # unlabeled -> unlabeled
    1: "ignore",       # outlier -> unlabeled
    10: "vehicle",     # car -> car
    11: "ignore",      # bicycle -> bicycle (a bicycle without a rider is not a cyclist)
    13: "vehicle",     # bus -> other-vehicle
    15: "vehicle",     # motorcycle -> motorcycle
    16: "vehicle",     # on-rails -> other-vehicle
    18: "vehicle",     # truck -> truck
    20: "vehicle",     # other-vehicle -> other-vehicle
    30: "pedestrian",  # person -> person
    31: "cyclist",     # bicyclist -> bicyclist
    32: "vehicle",     # motorcyclist -> motorcyclist (rides with the motorcycle, a vehicle)
    40: "ground",      # road -> road
    44: "ground",      # parking -> parking
    48: "ground",      # sidewalk -> sidewalk
    49: "ground",      # other-ground -> other-ground
    50: "building",    # building -> building
    51: "building",    # fence -> fence
    52: "ignore",      # other-structure -> unlabeled
    60: "ground",      # lane-marking -> road
    70: "vegetation",  # vegetation -> vegetation
    71: "vegetation",  # trunk -> trunk
    72: "ground",      # terrain -> terrain
    80: "pole",        # pole -> pole
    81: "pole",        # traffic-sign -> traffic-sign
    99: "ignore",      # other-object -> unlabeled
    252: "vehicle",    # moving-car -> car
    253: "cyclist",    # moving-bicyclist -> bicyclist
    254: "pedestrian",  # moving-person -> person
    255: "vehicle",    # moving-motorcyclist -> motorcyclist
    256: "vehicle",    # moving-on-rails -> other-vehicle
    257: "vehicle",    # moving-bus -> other-vehicle
    258: "vehicle",    # moving-truck -> truck
    259: "vehicle",    # moving-other-vehicle -> other-vehicle
}
SEMANTIC_MASK = 0xFFFF
SCAN_PERIOD_NS = 100_000_000  # HDL-64E at 10 Hz
CITY = "karlsruhe"
VEHICLE_ID = "kitti"
SOFTWARE_VERSION = "semantickitti"
# Recording day of each labelled sequence (KITTI odometry devkit: sequence -> raw drive); midnight UTC,
# since the time of day is not published. Other sequences get the first KITTI day, 2011-09-26.
SEQUENCE_DAYS = {"00": "2011-10-03", "01": "2011-10-03", "02": "2011-10-03", "03": "2011-09-26",
                 "04": "2011-09-30", "05": "2011-09-30", "06": "2011-09-30", "07": "2011-09-30",
                 "08": "2011-09-30", "09": "2011-09-30", "10": "2011-09-30"}
DEFAULT_DAY = "2011-09-26"

# Lookup table over all 16-bit semantic ids: unknown ids map to ignore.
_TAXONOMY_OF_RAW = np.full(SEMANTIC_MASK + 1, CLASS_ID["ignore"], np.uint8)
for _raw, _name in LABEL_MAP.items():
    _TAXONOMY_OF_RAW[_raw] = CLASS_ID[_name]


def map_labels(raw_labels: np.ndarray) -> np.ndarray:
    """uint32 SemanticKITTI labels -> uint8 taxonomy ids (instance bits dropped, unknown ids -> ignore)."""
    return _TAXONOMY_OF_RAW[np.asarray(raw_labels, np.uint32) & SEMANTIC_MASK]


# ----------------------------------------------------------------------------------------- listing
def _is_sequence(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "velodyne")) and os.path.isdir(os.path.join(path, "labels"))


def list_logs(root: str) -> list[str]:
    """Labelled sequence folders under ``root`` (a sequence, ``sequences/``, or a folder holding
    ``sequences/`` or ``dataset/sequences/``). Sequences without ``labels/`` (the test split) are skipped."""
    found = set()
    for base in (root, os.path.join(root, "sequences"), os.path.join(root, "dataset", "sequences")):
        if _is_sequence(base):
            found.add(os.path.normpath(base))
        elif os.path.isdir(base):
            found.update(os.path.normpath(os.path.join(base, name)) for name in os.listdir(base)
                         if _is_sequence(os.path.join(base, name)))
    if not found:
        raise UserError(f"no labelled SemanticKITTI sequence at {root}: expected sequences/NN/velodyne "
                        f"and sequences/NN/labels")
    return sorted(found)


def _scans(handle: str) -> list[tuple[int, str, str]]:
    """(scan number, velodyne path, label path) of every scan of a sequence, in scan order."""
    velodyne = os.path.join(handle, "velodyne")
    if not os.path.isdir(velodyne):
        raise FileNotFoundError(f"SemanticKITTI sequence {handle}: missing folder {velodyne}")
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(velodyne) if n.endswith(".bin"))
    for name in names:
        if not name.isdigit():
            raise ValueError(f"SemanticKITTI scan {os.path.join(velodyne, name)}.bin: name is not a scan number")
    return [(int(n), os.path.join(velodyne, f"{n}.bin"), os.path.join(handle, "labels", f"{n}.label"))
            for n in names]


def unmatched_inputs(root: str) -> dict[str, list[str]]:
    """``.label`` files without their velodyne ``.bin`` scan, in every labelled sequence under ``root``."""
    orphans = []
    for handle in list_logs(root):
        scans = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(handle, "velodyne")) if n.endswith(".bin")}
        labels = os.path.join(handle, "labels")
        orphans += sorted(os.path.join(labels, n) for n in os.listdir(labels)
                          if n.endswith(".label") and os.path.splitext(n)[0] not in scans)
    return {"labels_without_points": orphans} if orphans else {}


def source_files(handle: str) -> list[str]:
    """The files a log is made of (the ingest job checksums them)."""
    return [p for _, *paths in _scans(handle) for p in paths if os.path.isfile(p)]


# ----------------------------------------------------------------------------------------- reading
def read_metadata(handle: str) -> LogMeta:
    sequence = os.path.basename(os.path.normpath(handle))
    for _, velodyne_path, label_path in _scans(handle):
        if not os.path.isfile(label_path):
            raise FileNotFoundError(f"SemanticKITTI scan {velodyne_path}: missing label file {label_path}")
    day = dt.datetime.strptime(SEQUENCE_DAYS.get(sequence, DEFAULT_DAY), "%Y-%m-%d")
    start_ns = int(day.replace(tzinfo=dt.timezone.utc).timestamp()) * 10**9
    return LogMeta(log_id=f"semantickitti-{sequence}", vehicle_id=VEHICLE_ID, city=CITY,
                   start_time_ns=start_ns, software_version=SOFTWARE_VERSION, source=SOURCE)


def read_log(handle: str) -> tuple[LogMeta, Iterator[Frame]]:
    meta = read_metadata(handle)
    return meta, _frames(meta, handle)


def _frames(meta: LogMeta, handle: str) -> Iterator[Frame]:
    # The scan number is the frame index: a missing scan leaves a gap instead of shifting the clock.
    for scan, velodyne_path, label_path in _scans(handle):
        points = read_scan(velodyne_path)
        raw_labels = read_raw_labels(label_path)
        if len(raw_labels) != len(points):
            raise ValueError(f"SemanticKITTI label file {label_path}: {len(raw_labels)} labels for "
                             f"{len(points)} points in {velodyne_path}")
        yield Frame(log_id=meta.log_id, frame_index=scan, timestamp_ns=meta.start_time_ns + scan * SCAN_PERIOD_NS,
                    points=points, labels=map_labels(raw_labels))


def read_scan(path: str) -> np.ndarray:
    """(N, 4) float32 x, y, z, remission clipped to [0, 1]; NaNs are kept for the quality checks."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 4:
        raise ValueError(f"SemanticKITTI scan {path}: {raw.size * 4} bytes is not a whole number of "
                         f"16-byte points (truncated?)")
    points = raw.reshape(-1, 4)
    points[:, 3] = np.clip(points[:, 3], 0.0, 1.0)
    return points


def read_raw_labels(path: str) -> np.ndarray:
    """(N,) uint32 raw labels of one scan."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SemanticKITTI label file missing: {path}")
    if os.path.getsize(path) % 4:
        raise ValueError(f"SemanticKITTI label file {path}: size is not a whole number of uint32 labels")
    return np.fromfile(path, dtype=np.uint32)


register_importer(sys.modules[__name__])
