"""KITTI 3D object benchmark importer (``<split>/{velodyne,label_2,calib}/NNNNNN.*``).

KITTI object samples are independent snapshots, so every sample is its own one-frame log (``kitti-NNNNNN``).
Boxes come from ``label_2`` (camera-rect frame) moved into the LiDAR frame with the sample's calibration.
KITTI object has no per-point ground truth: points inside a box take the box's class and every other point
is ``ignore`` (see docs/label-maps.md). A log handle is the path of the sample's velodyne ``.bin`` file.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Iterator

import numpy as np

from pipeline.errors import UserError
from pipeline.frames import BOX_COLUMNS, Frame, LogMeta
from pipeline.geometry import points_in_boxes
from pipeline.taxonomy import CLASS_ID, IGNORE, OBJECT_CLASSES
from spark_jobs.sources.registry import register_importer

SOURCE = "kitti"
LABEL_MAP: dict[str, str] = {
    "Car": "vehicle",
    "Van": "vehicle",
    "Truck": "vehicle",
    "Tram": "vehicle",
    "Pedestrian": "pedestrian",
    "Person_sitting": "pedestrian",
    "Cyclist": "cyclist",
    "Misc": "ignore",      # trailers, segways, ...: a grab-bag, no box
    "DontCare": "ignore",  # unlabelled regions (2D only, no 3D extent): no box
}
CITY = "karlsruhe"
VEHICLE_ID = "kitti"
SOFTWARE_VERSION = "kitti-object"
# Object samples carry no timestamp: every sample is dated 2011-09-26 UTC (the first KITTI raw recording
# day) plus its index in seconds, so the whole benchmark (< 86,400 samples) falls on that one day.
EPOCH_NS = int(dt.datetime(2011, 9, 26, tzinfo=dt.timezone.utc).timestamp()) * 10**9
POINT_FIELDS = 4  # float32 x, y, z, reflectance


# ----------------------------------------------------------------------------------------- listing
def _split_dir(root: str) -> str:
    """The split folder (holding velodyne/ and label_2/) ``root`` is or holds as ``training/``."""
    split_dirs = [d for d in (root, os.path.join(root, "training"))
                  if os.path.isdir(os.path.join(d, "velodyne")) and os.path.isdir(os.path.join(d, "label_2"))]
    if not split_dirs:
        raise UserError(f"no KITTI object data at {root}: expected velodyne/ and label_2/ there or in "
                        f"{os.path.join(root, 'training')}")
    return split_dirs[0]


def list_logs(root: str) -> list[str]:
    """Velodyne files of every sample under ``root`` (a split folder, or a folder holding ``training/``);
    unlabelled splits (``testing/``) are not listed. A velodyne file without its label or calib file is
    listed and quarantined by ingest, naming the missing file."""
    velodyne = os.path.join(_split_dir(root), "velodyne")
    return sorted(os.path.join(velodyne, name) for name in os.listdir(velodyne) if name.endswith(".bin"))


def unmatched_inputs(root: str) -> dict[str, list[str]]:
    """Label files without their velodyne point cloud (not samples: there is nothing to label)."""
    split_dir = _split_dir(root)
    clouds = {_sample_name(name) for name in os.listdir(os.path.join(split_dir, "velodyne")) if name.endswith(".bin")}
    labels = os.path.join(split_dir, "label_2")
    orphans = sorted(os.path.join(labels, name) for name in os.listdir(labels)
                     if name.endswith(".txt") and _sample_name(name) not in clouds)
    return {"labels_without_points": orphans} if orphans else {}


def sample_paths(handle: str) -> tuple[str, str, str]:
    """(velodyne, label_2, calib) paths of the sample ``handle`` names."""
    split_dir = os.path.dirname(os.path.dirname(os.path.abspath(handle)))
    sample = _sample_name(handle)
    return (handle, os.path.join(split_dir, "label_2", f"{sample}.txt"),
            os.path.join(split_dir, "calib", f"{sample}.txt"))


def source_files(handle: str) -> list[str]:
    """The files a log is made of (the ingest job checksums them)."""
    return [p for p in sample_paths(handle) if os.path.isfile(p)]


def _sample_name(handle: str) -> str:
    return os.path.splitext(os.path.basename(handle))[0]


# ----------------------------------------------------------------------------------------- reading
def read_metadata(handle: str) -> LogMeta:
    for path in sample_paths(handle):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"KITTI sample {_sample_name(handle)}: missing file {path}")
    sample = _sample_name(handle)
    if not sample.isdigit():
        raise ValueError(f"KITTI sample file {handle}: name is not a sample number like 000123.bin")
    return LogMeta(log_id=f"kitti-{sample}", vehicle_id=VEHICLE_ID, city=CITY,
                   start_time_ns=EPOCH_NS + int(sample) * 10**9, software_version=SOFTWARE_VERSION,
                   source=SOURCE)


def read_log(handle: str) -> tuple[LogMeta, Iterator[Frame]]:
    meta = read_metadata(handle)
    return meta, _frames(meta, handle)


def _frames(meta: LogMeta, handle: str) -> Iterator[Frame]:
    velodyne_path, label_path, calib_path = sample_paths(handle)
    points = read_velodyne(velodyne_path)
    boxes = boxes_in_lidar(read_label_file(label_path), read_rect_to_velo(calib_path))
    owner = points_in_boxes(points[:, :3], boxes)
    labels = np.full(len(points), IGNORE, np.uint8)  # no per-point ground truth outside the boxes
    labels[owner >= 0] = boxes[owner[owner >= 0], 7].astype(np.uint8)
    yield Frame(log_id=meta.log_id, frame_index=0, timestamp_ns=meta.start_time_ns, points=points,
                labels=labels, boxes=boxes)


def read_velodyne(path: str) -> np.ndarray:
    """(N, 4) float32 x, y, z, reflectance clipped to [0, 1]; NaNs are kept for the quality checks."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % POINT_FIELDS:
        raise ValueError(f"KITTI velodyne file {path}: {raw.size * 4} bytes is not a whole number of "
                         f"16-byte points (truncated?)")
    points = raw.reshape(-1, POINT_FIELDS)
    points[:, 3] = np.clip(points[:, 3], 0.0, 1.0)
    return points


def read_rect_to_velo(path: str) -> np.ndarray:
    """4x4 transform from KITTI's rectified camera frame to the velodyne frame, from a calib file."""
    values: dict[str, np.ndarray] = {}
    with open(path) as fh:
        for line in fh:
            key, sep, rest = line.partition(":")
            if sep:
                values[key.strip()] = np.array(rest.split(), dtype=np.float64)
    for key, size in (("R0_rect", 9), ("Tr_velo_to_cam", 12)):
        if key not in values or values[key].size != size:
            raise ValueError(f"KITTI calib file {path}: no {key} with {size} numbers")
    rect_from_cam = np.eye(4)
    rect_from_cam[:3, :3] = values["R0_rect"].reshape(3, 3)
    cam_from_velo = np.eye(4)
    cam_from_velo[:3, :] = values["Tr_velo_to_cam"].reshape(3, 4)
    return np.linalg.inv(rect_from_cam @ cam_from_velo)


def read_label_file(path: str) -> list[tuple[str, np.ndarray]]:
    """(type, [h, w, l, x, y, z, ry]) per object line of a label_2 file, in file order."""
    objects = []
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (15, 16):  # 16: detection results carry a score
                raise ValueError(f"KITTI label file {path}, line {number}: {len(fields)} fields, expected 15")
            try:
                objects.append((fields[0], np.array(fields[8:15], dtype=np.float64)))
            except ValueError:
                raise ValueError(f"KITTI label file {path}, line {number}: not a number in {line.strip()!r}") from None
    return objects


def boxes_in_lidar(objects: list[tuple[str, np.ndarray]], rect_to_velo: np.ndarray) -> np.ndarray:
    """Boxes (columns ``BOX_COLUMNS``) of the objects whose type maps to an object class.

    The convention of mmdetection3d and OpenPCDet (``boxes3d_kitti_camera_to_lidar`` in OpenPCDet's
    ``pcdet/utils/box_utils.py``, ``CameraInstance3DBoxes.convert_to(Box3DMode.LIDAR)`` in mmdetection3d):
    the label's bottom centre (camera-rect frame) goes through the calibration into the LiDAR frame and
    is then raised by h/2 along LiDAR z; yaw = -ry - pi/2 and the size is (l, w, h). Raising the centre
    in the camera frame instead would move it along the camera's vertical, which is tilted against LiDAR z,
    and shift the box by about a centimetre. track_id is the box's index (one-frame logs: no tracks).
    """
    kept = [(CLASS_ID[LABEL_MAP.get(kind, "ignore")], values) for kind, values in objects
            if LABEL_MAP.get(kind, "ignore") in OBJECT_CLASSES]
    if not kept:
        return np.zeros((0, len(BOX_COLUMNS)), np.float32)
    class_ids = np.array([c for c, _ in kept], np.float64)
    h, w, l, x, y, z, ry = np.array([v for _, v in kept]).T
    bottoms = (rect_to_velo @ np.stack([x, y, z, np.ones_like(x)]))[:3].T
    centres = bottoms + np.column_stack([np.zeros_like(h), np.zeros_like(h), h / 2])
    boxes = np.column_stack([centres, l, w, h, -ry - np.pi / 2, class_ids, np.arange(len(kept), dtype=np.float64)])
    return boxes.astype(np.float32)


register_importer(sys.modules[__name__])
