"""Argoverse 2 sensor dataset importer (``<split>/<log_id>/{sensors/lidar/*.feather, annotations.feather,
city_SE3_egovehicle.feather, map/}``).

One log per AV2 log (``av2-<log_id>``), one frame per LiDAR sweep in time order, with the dataset's own
timestamps. Points and cuboids are in AV2's ego-vehicle frame (x forward, y left, z up; origin at the rear
axle on the ground, not at the sensor). Per-point labels come from the annotated cuboids of the sweep by
one of two rules (``ingest.av2_box_rule``, see ``BOX_RULES``); points outside every cuboid are ``ignore``.
Only cuboids of object classes become boxes (the same under both rules). A sweep without any annotation is left out of the log (never
an all-ignore frame) and listed by ``unmatched_inputs``, as are annotations whose sweep is missing. A log
handle is the log folder.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Iterator

import numpy as np
import pyarrow.feather as feather

from pipeline.errors import UserError
from pipeline.frames import BOX_COLUMNS, EGO_COLUMNS, Frame, LogMeta
from pipeline.geometry import points_in_boxes
from pipeline.taxonomy import CLASS_ID, IGNORE, OBJECT_CLASS_IDS
from spark_jobs.sources.registry import register_importer

SOURCE = "av2"
# AV2 annotation category (all 30 of ``av2.datasets.sensor.constants.AnnotationCategories``) -> taxonomy.
LABEL_MAP: dict[str, str] = {
    "REGULAR_VEHICLE": "vehicle",
    "LARGE_VEHICLE": "vehicle",
    "BUS": "vehicle",
    "ARTICULATED_BUS": "vehicle",
    "SCHOOL_BUS": "vehicle",
    "BOX_TRUCK": "vehicle",
    "TRUCK": "vehicle",
    "TRUCK_CAB": "vehicle",
    "VEHICULAR_TRAILER": "vehicle",
    "MESSAGE_BOARD_TRAILER": "vehicle",   # a trailer (AV2 files it under vehicles too)
    "TRAFFIC_LIGHT_TRAILER": "vehicle",   # a trailer (AV2 files it under vehicles too)
    "RAILED_VEHICLE": "vehicle",
    "MOTORCYCLE": "vehicle",
    "MOTORCYCLIST": "vehicle",            # rides with the motorcycle, a vehicle
    "PEDESTRIAN": "pedestrian",
    "OFFICIAL_SIGNALER": "pedestrian",    # a person on foot directing traffic
    "BICYCLIST": "cyclist",
    "SIGN": "pole",
    "STOP_SIGN": "pole",
    "MOBILE_PEDESTRIAN_CROSSING_SIGN": "pole",
    "BOLLARD": "pole",                    # a short post
    "BICYCLE": "ignore",                  # no rider: not a cyclist
    "WHEELED_DEVICE": "ignore",
    "WHEELED_RIDER": "ignore",            # skateboard / scooter riders: neither cyclist nor on foot
    "WHEELCHAIR": "ignore",
    "STROLLER": "ignore",
    "CONSTRUCTION_CONE": "ignore",
    "CONSTRUCTION_BARREL": "ignore",
    "DOG": "ignore",
    "ANIMAL": "ignore",
}
CITY_NAMES = {"ATX": "austin", "DTW": "detroit", "MIA": "miami", "PAO": "palo-alto", "PIT": "pittsburgh",
              "WDC": "washington-dc"}
VEHICLE_ID = "av2"
SOFTWARE_VERSION = "av2-sensor"
INTENSITY_SCALE = 255.0  # uint8 intensity -> [0, 1]
SPEED_WINDOW_NS = 100_000_000  # ego speed/acceleration from poses 0.1 s either side of the sweep
ANNOTATIONS = "annotations.feather"
POSES = "city_SE3_egovehicle.feather"
CUBOID_COLUMNS = ["timestamp_ns", "track_uuid", "category", "tx_m", "ty_m", "tz_m", "length_m", "width_m",
                  "height_m", "qw", "qx", "qy", "qz", "num_interior_pts"]
# How a sweep's cuboids label its points:
#   exact  the cuboid interiors, faces included: exactly the points AV2's ``num_interior_pts`` counts.
#          Where cuboids overlap, an object cuboid wins over a pole/ignore one, then the first in file order.
#   flow   AV2's own scene-flow labels (av2-api ``av2.torch.structures.flow.Flow.from_sweep_pair``): only
#          cuboids with num_interior_pts >= 1 (the av2 data loader's filter), length and width grown by
#          ``FLOW_GROWTH_M`` (height unchanged), and where cuboids overlap the later one in file order wins,
#          whatever its class (a later cone over a car makes the point ignore, as AV2's category does).
BOX_RULES = ("exact", "flow")
FLOW_GROWTH_M = 0.2
# read_log keyword -> the IngestConfig field that sets it (ingest passes it to the Spark workers).
OPTIONS = {"box_rule": "av2_box_rule"}


def class_of(category: str) -> int:
    """Taxonomy id of an AV2 category; unknown categories are ignore."""
    return CLASS_ID[LABEL_MAP.get(category, "ignore")]


def yaw_of(qw, qx, qy, qz):
    """Rotation about +z of a (w, x, y, z) quaternion (AV2 cuboids and poses are z-up)."""
    return np.arctan2(2.0 * (qw * qz + qx * qy), 1.0 - 2.0 * (qy * qy + qz * qz))


# ----------------------------------------------------------------------------------------- listing
def _is_log(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "sensors", "lidar")) and os.path.isfile(os.path.join(path, ANNOTATIONS))


def list_logs(root: str) -> list[str]:
    """Annotated log folders under ``root`` (a log, a split, ``sensor/`` or the dataset root); logs without
    ``annotations.feather`` (the test split) are skipped."""
    # Fixed depths instead of a walk: a full AV2 tree holds millions of camera images.
    patterns = (root, os.path.join(root, "*"), os.path.join(root, "*", "*"), os.path.join(root, "*", "*", "*"))
    found = sorted({os.path.normpath(p) for pattern in patterns for p in glob.glob(pattern) if _is_log(p)})
    if not found:
        raise UserError(f"no annotated Argoverse 2 log at {root}: expected <log_id>/sensors/lidar and "
                        f"<log_id>/{ANNOTATIONS} up to three folders down")
    return found


def _sweeps(handle: str) -> list[tuple[int, str]]:
    """(timestamp_ns, path) of every LiDAR sweep of a log, in time order."""
    lidar = os.path.join(handle, "sensors", "lidar")
    if not os.path.isdir(lidar):
        raise FileNotFoundError(f"Argoverse 2 log {handle}: missing folder {lidar}")
    sweeps = []
    for name in os.listdir(lidar):
        stem, ext = os.path.splitext(name)
        if ext == ".feather":
            if not stem.isdigit():
                raise ValueError(f"Argoverse 2 sweep {os.path.join(lidar, name)}: name is not a timestamp")
            sweeps.append((int(stem), os.path.join(lidar, name)))
    return sorted(sweeps)


def _map_file(handle: str) -> str:
    maps = sorted(glob.glob(os.path.join(handle, "map", "log_map_archive_*.json")))
    if not maps:
        raise FileNotFoundError(f"Argoverse 2 log {handle}: missing map file "
                                f"{os.path.join(handle, 'map', 'log_map_archive_*.json')} (it names the city)")
    return maps[0]


def unmatched_inputs(root: str) -> dict[str, list[str]]:
    """Per annotated log under ``root``: sweeps without annotations (left out of the log) and annotation
    timestamps without a sweep file. A log whose annotations cannot be read is reported by ``read_log``."""
    problems: dict[str, list[str]] = {"sweeps_without_annotations": [], "annotations_without_sweep": []}
    for handle in list_logs(root):
        path = os.path.join(handle, ANNOTATIONS)
        try:
            annotated = set(read_feather(path, ["timestamp_ns"]).column(0).to_pylist())
            sweeps = dict(_sweeps(handle))
        except (OSError, ValueError):  # quarantined with the reason when the log is read
            continue
        problems["sweeps_without_annotations"] += [sweeps[t] for t in sorted(set(sweeps) - annotated)]
        problems["annotations_without_sweep"] += [f"{path}: {t}" for t in sorted(annotated - set(sweeps))]
    return {name: items for name, items in problems.items() if items}


def source_files(handle: str) -> list[str]:
    """The files a log is made of (the ingest job checksums them)."""
    files = [path for _, path in _sweeps(handle)]
    files += [os.path.join(handle, name) for name in (ANNOTATIONS, POSES)]
    files += sorted(glob.glob(os.path.join(handle, "map", "*")))
    return [f for f in files if os.path.isfile(f)]


# ----------------------------------------------------------------------------------------- reading
def read_metadata(handle: str) -> LogMeta:
    for name in (ANNOTATIONS, POSES):
        if not os.path.isfile(os.path.join(handle, name)):
            raise FileNotFoundError(f"Argoverse 2 log {handle}: missing file {os.path.join(handle, name)}")
    sweeps = _sweeps(handle)
    if not sweeps:
        raise FileNotFoundError(f"Argoverse 2 log {handle}: no sweeps in {os.path.join(handle, 'sensors', 'lidar')}")
    map_file = _map_file(handle)
    code = re.search(r"____([A-Z]{3})_city_", os.path.basename(map_file))
    if code is None or code.group(1) not in CITY_NAMES:
        raise ValueError(f"Argoverse 2 map file {map_file}: no known city code ({', '.join(CITY_NAMES)}) in its name")
    log_name = os.path.basename(os.path.normpath(handle))
    # AV2 timestamps are the dataset's own (they fall near the GPS epoch, 1980-01-06): kept as they are.
    return LogMeta(log_id=f"av2-{log_name}", vehicle_id=VEHICLE_ID, city=CITY_NAMES[code.group(1)],
                   start_time_ns=sweeps[0][0], software_version=SOFTWARE_VERSION, source=SOURCE)


def read_log(handle: str, box_rule: str = "exact") -> tuple[LogMeta, Iterator[Frame]]:
    if box_rule not in BOX_RULES:
        raise ValueError(f"Argoverse 2 box rule {box_rule!r} is not one of {', '.join(BOX_RULES)}")
    meta = read_metadata(handle)
    return meta, _frames(meta, handle, box_rule)


def _frames(meta: LogMeta, handle: str, box_rule: str) -> Iterator[Frame]:
    cuboids = read_feather(os.path.join(handle, ANNOTATIONS), CUBOID_COLUMNS).to_pandas()
    poses = read_poses(os.path.join(handle, POSES))
    # Track ids: index of the track uuid among the log's sorted uuids, so they are stable across frames.
    track_ids = {uuid: i for i, uuid in enumerate(sorted(cuboids["track_uuid"].unique()))}
    by_time = {t: group for t, group in cuboids.groupby("timestamp_ns", sort=False)}
    for index, (timestamp_ns, path) in enumerate(_sweeps(handle)):
        if timestamp_ns not in by_time:  # not annotated: left out (unmatched_inputs reports it), index kept
            continue
        points = read_sweep(path)
        boxes, box_classes = cuboid_boxes(by_time[timestamp_ns], track_ids)
        if box_rule == "flow":
            labels = flow_labels(points[:, :3], by_time[timestamp_ns])
        else:
            owner = points_in_boxes(points[:, :3], boxes)
            labels = np.full(len(points), IGNORE, np.uint8)
            labels[owner >= 0] = box_classes[owner[owner >= 0]]
        objects = np.isin(box_classes, OBJECT_CLASS_IDS)
        yield Frame(log_id=meta.log_id, frame_index=index, timestamp_ns=timestamp_ns, points=points, labels=labels,
                    boxes=boxes[objects], ego=ego_state(poses, timestamp_ns))


def read_sweep(path: str) -> np.ndarray:
    """(N, 4) float32 x, y, z (ego frame), intensity / 255; NaNs are kept for the quality checks."""
    table = read_feather(path, ["x", "y", "z", "intensity"])
    points = np.empty((table.num_rows, 4), np.float32)
    for i, name in enumerate(("x", "y", "z")):
        points[:, i] = table.column(name).to_numpy()  # float16 -> float32 is exact
    points[:, 3] = table.column("intensity").to_numpy() / INTENSITY_SCALE
    return points


def read_feather(path: str, columns: list[str]):
    """The ``columns`` of an AV2 Feather file as a pyarrow table; an error naming the file otherwise
    (pyarrow's own says "Not an Arrow file" without the path)."""
    try:
        return feather.read_table(path, columns=columns)
    except (OSError, ValueError, KeyError) as exc:  # ArrowInvalid is a ValueError
        raise ValueError(f"Argoverse 2 file {path}: not a readable Feather (Arrow IPC) file with columns "
                         f"{', '.join(columns)}: truncated or corrupt? ({type(exc).__name__}: {exc})") from None


def cuboid_boxes(cuboids, track_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(boxes with columns ``BOX_COLUMNS``, taxonomy id per box) of one sweep's cuboids, object classes
    first so that a point in both an object and, say, a sign cuboid is labelled with the object."""
    classes = np.array([class_of(c) for c in cuboids["category"]], np.uint8)
    order = np.argsort(~np.isin(classes, OBJECT_CLASS_IDS), kind="stable")
    cuboids, classes = cuboids.iloc[order], classes[order]
    yaw = yaw_of(*(cuboids[q].to_numpy(np.float64) for q in ("qw", "qx", "qy", "qz")))
    tracks = np.array([track_ids[u] for u in cuboids["track_uuid"]], np.float64)
    boxes = np.column_stack([cuboids[["tx_m", "ty_m", "tz_m", "length_m", "width_m", "height_m"]].to_numpy(np.float64),
                             yaw, classes.astype(np.float64), tracks]).reshape(-1, len(BOX_COLUMNS))
    return boxes.astype(np.float32), classes


def flow_labels(xyz: np.ndarray, cuboids) -> np.ndarray:
    """Per-point taxonomy ids by AV2's scene-flow rule (``BOX_RULES``: flow) from one sweep's cuboids, in
    the annotation file's order."""
    labels = np.full(len(xyz), IGNORE, np.uint8)
    seen = cuboids[cuboids["num_interior_pts"].to_numpy() >= 1]
    yaw = yaw_of(*(seen[q].to_numpy(np.float64) for q in ("qw", "qx", "qy", "qz")))
    sizes = seen[["length_m", "width_m", "height_m"]].to_numpy(np.float64) + [FLOW_GROWTH_M, FLOW_GROWTH_M, 0.0]
    boxes = np.column_stack([seen[["tx_m", "ty_m", "tz_m"]].to_numpy(np.float64), sizes, yaw])
    for box, category in zip(boxes, seen["category"]):
        labels[points_in_boxes(xyz, box[None]) == 0] = class_of(category)  # later cuboids overwrite
    return labels


def read_poses(path: str) -> dict[str, np.ndarray]:
    """Ego poses in the city frame, sorted by time: ``t`` (ns), ``xyz`` (m), ``heading`` (rad)."""
    table = read_feather(path, ["timestamp_ns", "qw", "qx", "qy", "qz", "tx_m", "ty_m", "tz_m"])
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    order = np.argsort(columns["timestamp_ns"], kind="stable")
    return {"t": columns["timestamp_ns"][order],
            "xyz": np.column_stack([columns[c][order] for c in ("tx_m", "ty_m", "tz_m")]).astype(np.float64),
            "heading": yaw_of(*(columns[q][order].astype(np.float64) for q in ("qw", "qx", "qy", "qz")))}


def _nearest(times: np.ndarray, t: int) -> int:
    i = int(np.searchsorted(times, t))
    if i == len(times) or (i > 0 and t - times[i - 1] <= times[i] - t):
        return i - 1
    return i


def ego_state(poses: dict[str, np.ndarray], timestamp_ns: int) -> np.ndarray:
    """x, y, z, heading of the pose nearest the sweep; speed and acceleration from the poses nearest
    ``SPEED_WINDOW_NS`` before and after it (AV2 poses come at ~100+ Hz with jitter, some a few ns apart,
    so neighbouring poses would give noise, not speed)."""
    ego = np.zeros(len(EGO_COLUMNS), np.float64)
    if len(poses["t"]) == 0:
        raise ValueError("Argoverse 2 log has no ego poses")
    times, xyz = poses["t"], poses["xyz"]
    now = _nearest(times, timestamp_ns)
    before = _nearest(times, timestamp_ns - SPEED_WINDOW_NS)
    after = _nearest(times, timestamp_ns + SPEED_WINDOW_NS)
    ego[:3] = xyz[now]
    ego[3] = poses["heading"][now]

    def speed(i: int, j: int) -> float:
        return float(np.linalg.norm(xyz[j] - xyz[i]) / ((times[j] - times[i]) * 1e-9)) if times[j] > times[i] else 0.0

    ego[4] = speed(before, after)
    if times[before] < times[now] < times[after]:
        # Difference of the two half-window speeds over the time between their midpoints.
        dt_s = ((times[after] - times[before]) * 1e-9) / 2
        ego[5] = (speed(now, after) - speed(before, now)) / dt_s
    return ego


register_importer(sys.modules[__name__])
