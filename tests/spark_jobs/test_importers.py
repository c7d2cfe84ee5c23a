"""The KITTI, SemanticKITTI and Argoverse 2 importers against the real samples in ../shared/real-data.

Each figure is checked against a computation written independently of the importer (the other way round
where there is one: points into the camera frame for KITTI, the official 19-class learning map for
SemanticKITTI, full rotation matrices and the dataset's own ``num_interior_pts`` for AV2), plus the exact
numbers, so that importer and test cannot be wrong the same way unnoticed. The data is read in place.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pytest

from pipeline.errors import UserError
from pipeline.frames import BOX_COLUMNS
from pipeline.geometry import points_in_boxes
from pipeline.taxonomy import CLASS_ID, CLASSES, NUM_CLASSES
from spark_jobs.quality import frame_problem, normalise
from spark_jobs.sources import av2, kitti, semantickitti
from tests.conftest import REAL_DATA
from tests.prerequisites import requires

needs_real_data = requires(REAL_DATA.is_dir(), f"real dataset samples not found at {REAL_DATA}")

KITTI_ROOT = REAL_DATA / "kitti"
KITTI_SAMPLES = [f"{i:06d}" for i in range(6)]
SEMANTICKITTI_ROOT = REAL_DATA / "semantickitti"
AV2_ROOT = REAL_DATA / "av2"
AV2_LOG = "adcf7d18-0510-35b0-a2fa-b4cea13a6d76"
AV2_SWEEP_NS = 315973157959879000


def histogram(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return {CLASSES[i]: int(n) for i, n in enumerate(counts) if n}


def only_frame(module, handle: str):
    meta, frames = module.read_log(handle)
    frames = list(frames)
    assert len(frames) == 1
    return meta, frames[0]


# ------------------------------------------------------------------------------------------ contract
@needs_real_data
@pytest.mark.parametrize("module, root, count", [(kitti, KITTI_ROOT, 6), (semantickitti, SEMANTICKITTI_ROOT, 1),
                                                 (av2, AV2_ROOT, 1)])
def test_every_importer_follows_the_contract_and_passes_the_ingest_checks(module, root, count):
    assert module.SOURCE in ("kitti", "semantickitti", "av2")
    assert set(module.LABEL_MAP.values()) <= set(CLASSES)
    handles = module.list_logs(str(root))
    assert len(handles) == count and handles == sorted(handles)
    assert all(type(h) is str for h in handles)  # shipped to Spark workers
    for handle in handles:
        meta, frames = module.read_log(handle)
        assert meta.source == module.SOURCE
        for frame in frames:
            assert frame.log_id == meta.log_id
            assert frame.points.dtype == np.float32 and frame.labels.dtype == np.uint8
            assert frame.boxes.shape[1] == len(BOX_COLUMNS)
            assert frame_problem(normalise(frame), max_points=1_000_000) is None


@pytest.mark.parametrize("module", [kitti, semantickitti, av2])
def test_list_logs_names_the_folder_without_data(module, tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        module.list_logs(str(tmp_path))


# ------------------------------------------------------------------------------------------ KITTI
def kitti_calib(sample: str) -> np.ndarray:
    """4x4 velodyne -> camera-rect transform (the forward direction; the importer inverts it)."""
    rows = {}
    for line in (KITTI_ROOT / "training" / "calib" / f"{sample}.txt").read_text().splitlines():
        if ":" in line:
            key, values = line.split(":", 1)
            rows[key] = [float(v) for v in values.split()]
    r0 = np.eye(4)
    r0[:3, :3] = np.reshape(rows["R0_rect"], (3, 3))
    tr = np.vstack([np.reshape(rows["Tr_velo_to_cam"], (3, 4)), [0, 0, 0, 1]])
    return r0 @ tr


def kitti_objects(sample: str) -> list[dict]:
    objects = []
    for line in (KITTI_ROOT / "training" / "label_2" / f"{sample}.txt").read_text().splitlines():
        f = line.split()
        objects.append({"type": f[0], **dict(zip("h w l x y z ry".split(), map(float, f[8:15])))})
    return objects


# Boxes and their points after the LiDAR-frame conversion (pinned: regressions show up here first).
KITTI_BOXES = {"000000": 1, "000001": 3, "000002": 1, "000003": 1, "000004": 2, "000005": 1}
KITTI_HISTOGRAMS = {
    "000000": {"ignore": 115007, "pedestrian": 377},
    "000001": {"ignore": 120170, "vehicle": 80, "cyclist": 18},
    "000002": {"ignore": 126824, "vehicle": 67},
    "000003": {"ignore": 112436, "vehicle": 674},
    "000004": {"ignore": 115872, "vehicle": 104},
    "000005": {"ignore": 125016, "pedestrian": 70},
}
# Points whose LiDAR-frame and camera-frame box memberships differ (see the test below): observed 0-6.
KITTI_MAX_DISAGREEING_POINTS = 10


@needs_real_data
def test_kitti_one_log_per_sample_with_documented_metadata():
    handles = kitti.list_logs(str(KITTI_ROOT))
    assert handles == kitti.list_logs(str(KITTI_ROOT / "training"))
    assert [Path(h).name for h in handles] == [f"{s}.bin" for s in KITTI_SAMPLES]
    day = dt.datetime(2011, 9, 26, tzinfo=dt.timezone.utc)
    for i, handle in enumerate(handles):
        meta, frame = only_frame(kitti, handle)
        assert meta.log_id == f"kitti-{i:06d}" and meta.city == "karlsruhe" and meta.vehicle_id == "kitti"
        assert meta.start_time_ns == frame.timestamp_ns == int((day + dt.timedelta(seconds=i)).timestamp()) * 10**9
        assert frame.frame_index == 0
        assert frame.ego.tolist() == [0.0] * 6 and np.isnan(frame.gps).all()
        assert len(kitti.source_files(handle)) == 3  # velodyne, label_2 and calib are all checksummed


@needs_real_data
@pytest.mark.parametrize("sample", KITTI_SAMPLES)
def test_kitti_points_are_the_whole_file(sample):
    path = KITTI_ROOT / "training" / "velodyne" / f"{sample}.bin"
    _, frame = only_frame(kitti, str(path))
    assert len(frame.points) == path.stat().st_size // 16
    raw = np.frombuffer(path.read_bytes(), dtype="<f4").reshape(-1, 4)
    np.testing.assert_array_equal(frame.points[:, :3], raw[:, :3])
    np.testing.assert_array_equal(frame.points[:, 3], np.minimum(np.maximum(raw[:, 3], 0), 1))


def reference_kitti_boxes(sample: str) -> list[dict]:
    """The mmdetection3d / OpenPCDet convention, written from their description rather than the importer:
    bottom centre rect -> LiDAR (solving velo_to_rect x = b), then + h/2 along LiDAR z; yaw = -ry - pi/2."""
    velo_to_rect = kitti_calib(sample)
    boxes = []
    for obj in kitti_objects(sample):
        if obj["type"] in ("DontCare", "Misc"):
            continue
        bottom = np.linalg.solve(velo_to_rect, [obj["x"], obj["y"], obj["z"], 1.0])[:3]
        boxes.append({"type": obj["type"], "centre": bottom + [0.0, 0.0, obj["h"] / 2],
                      "size": (obj["l"], obj["w"], obj["h"]), "yaw": -obj["ry"] - math.pi / 2})
    return boxes


def reference_inside(xyz: np.ndarray, box: dict) -> np.ndarray:
    """Points in a box the way OpenPCDet's ``check_pt_in_box3d`` tests them: |dz| <= h/2, then x, y rotated
    by -yaw into the box frame (float64 here; faces count as inside)."""
    d = xyz.astype(np.float64) - box["centre"]
    cos, sin = math.cos(-box["yaw"]), math.sin(-box["yaw"])
    local_x, local_y = d[:, 0] * cos - d[:, 1] * sin, d[:, 0] * sin + d[:, 1] * cos
    length, width, height = box["size"]
    return (np.abs(d[:, 2]) <= height / 2) & (np.abs(local_x) <= length / 2) & (np.abs(local_y) <= width / 2)


@needs_real_data
@pytest.mark.parametrize("sample", KITTI_SAMPLES)
def test_kitti_boxes_and_labels_follow_the_mmdetection3d_openpcdet_convention(sample):
    """Every box and the points in it equal the reference convention computed independently above."""
    _, frame = only_frame(kitti, str(KITTI_ROOT / "training" / "velodyne" / f"{sample}.bin"))
    reference = reference_kitti_boxes(sample)
    assert len(frame.boxes) == len(reference) == KITTI_BOXES[sample]
    expected_class = {"Car": "vehicle", "Van": "vehicle", "Truck": "vehicle", "Pedestrian": "pedestrian",
                      "Cyclist": "cyclist"}
    expected_labels = np.full(len(frame.points), CLASS_ID["ignore"])
    for i, (box, ref) in enumerate(zip(frame.boxes.astype(np.float64), reference)):
        np.testing.assert_allclose(box[:3], ref["centre"], atol=1e-5)
        np.testing.assert_allclose(box[3:6], ref["size"], rtol=1e-6)
        assert box[6] == pytest.approx(ref["yaw"], abs=1e-6)
        assert CLASSES[int(box[7])] == expected_class[ref["type"]] and box[8] == i
        inside = reference_inside(frame.points[:, :3], ref)
        assert inside.sum() == reference_inside(frame.points[:, :3], {**ref, "centre": box[:3], "yaw": box[6]}).sum()
        assert (frame.labels[inside] == CLASS_ID[expected_class[ref["type"]]]).all(), f"box {i}: a point left out"
        expected_labels[inside & (expected_labels == CLASS_ID["ignore"])] = CLASS_ID[expected_class[ref["type"]]]
    np.testing.assert_array_equal(frame.labels, expected_labels)
    assert histogram(frame.labels) == histogram(expected_labels) == KITTI_HISTOGRAMS[sample]


@needs_real_data
@pytest.mark.parametrize("sample", KITTI_SAMPLES)
def test_kitti_point_labels_agree_with_the_boxes_tested_in_the_camera_frame(sample):
    """Points go into the camera-rect frame and are tested against the label's own box there.

    A yaw-only LiDAR box cannot follow the tilt between the velodyne's z axis and the rect frame's
    vertical (0.8 degrees in these calibrations), so the two memberships may differ, but only within
    tilt x half-diagonal of a face: every point further inside must be labelled, every labelled point
    must be no further outside, and the points that differ must be few.
    """
    _, frame = only_frame(kitti, str(KITTI_ROOT / "training" / "velodyne" / f"{sample}.bin"))
    assert histogram(frame.labels) == KITTI_HISTOGRAMS[sample]
    velo_to_rect = kitti_calib(sample)
    tilt = math.acos(-velo_to_rect[1, 2] / np.linalg.norm(velo_to_rect[:3, 2]))  # velo z vs rect -y
    assert 0.01 < tilt < 0.02
    rect = (velo_to_rect @ np.c_[frame.points[:, :3], np.ones(len(frame.points))].T)[:3].T
    no = np.zeros(len(rect), bool)
    exact, surely, possibly = {}, {}, {}  # per class: inside a box / by the tolerance / within it
    for obj in kitti_objects(sample):
        if obj["type"] == "DontCare":
            continue
        d = rect - [obj["x"], obj["y"] - obj["h"] / 2, obj["z"]]  # from the box centre (y points down)
        c, s = math.cos(obj["ry"]), math.sin(obj["ry"])
        along, across = c * d[:, 0] - s * d[:, 2], s * d[:, 0] + c * d[:, 2]
        outside_by = np.max([abs(along) - obj["l"] / 2, abs(across) - obj["w"] / 2, abs(d[:, 1]) - obj["h"] / 2],
                            axis=0)
        tolerance = 1.1 * tilt * math.hypot(obj["l"], obj["w"], obj["h"]) / 2 + 1e-3
        name = {"Car": "vehicle", "Truck": "vehicle", "Pedestrian": "pedestrian", "Cyclist": "cyclist"}.get(obj["type"])
        if name is None:  # Misc: its points stay ignore
            assert obj["type"] == "Misc" and (outside_by < 0).sum() > 1000
            assert (frame.labels[outside_by < -tolerance] == CLASS_ID["ignore"]).all()
            continue
        exact[name] = exact.get(name, no) | (outside_by <= 0)
        surely[name] = surely.get(name, no) | (outside_by < -tolerance)
        possibly[name] = possibly.get(name, no) | (outside_by <= tolerance)
    for name in ("vehicle", "pedestrian", "cyclist"):
        labelled = frame.labels == CLASS_ID[name]
        assert not (surely.get(name, no) & ~labelled).any(), f"{name} points inside the box left unlabelled"
        assert not (labelled & ~possibly.get(name, no)).any(), f"{name} labels outside the box"
        assert (labelled != exact.get(name, no)).sum() <= KITTI_MAX_DISAGREEING_POINTS


def test_kitti_conventions_on_a_made_up_sample(tmp_path):
    """Nominal calibration (velo x = rect z, velo y = -rect x, velo z = -rect y): a car 10 m ahead."""
    split = tmp_path / "training"
    for folder in ("velodyne", "label_2", "calib"):
        (split / folder).mkdir(parents=True)
    # ry = 0 heads along rect x, i.e. velo -y: the car's length runs along velo y, its width along x.
    points = np.array([[10.0, 0.0, -0.25, 1.5],     # car centre, reflectance above 1
                       [10.7, 1.9, 0.4, 0.2],       # inside: 0.7 < w/2 across, 1.9 < l/2 along, 0.65 < h/2 up
                       [10.9, 0.0, 0.0, 0.2],       # outside: 0.9 > w/2 across
                       [np.nan, 0.0, 0.0, 0.3],     # kept for the quality checks, not dropped
                       [30.0, 5.0, 0.0, -0.1]], np.float32)
    points.tofile(split / "velodyne" / "000042.bin")
    (split / "label_2" / "000042.txt").write_text(
        "Car 0.00 0 0.0 0 0 10 10 1.50 1.60 4.00 0.00 1.00 10.00 0.00\n"
        "Alien 0.00 0 0.0 0 0 10 10 1.0 1.0 1.0 0.00 1.00 30.00 0.00\n"
        "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10\n")
    identity = " ".join(map(str, np.eye(3).ravel()))
    (split / "calib" / "000042.txt").write_text(f"R0_rect: {identity}\nTr_velo_to_cam: 0 -1 0 0 0 0 -1 0 1 0 0 0\n")
    [handle] = kitti.list_logs(str(tmp_path))
    meta, frame = only_frame(kitti, handle)
    assert meta.log_id == "kitti-000042"
    car = [10, 0, -0.25, 4, 1.6, 1.5, -math.pi / 2, CLASS_ID["vehicle"], 0]
    np.testing.assert_allclose(frame.boxes, [car], atol=1e-6)
    assert frame.labels.tolist() == [CLASS_ID["vehicle"]] * 2 + [CLASS_ID["ignore"]] * 3  # unknown type: no box
    assert len(frame.points) == 5 and np.isnan(frame.points[3, 0])
    assert frame.points[:, 3].tolist() == pytest.approx([1.0, 0.2, 0.2, 0.3, 0.0])
    (split / "calib" / "000042.txt").unlink()
    with pytest.raises(FileNotFoundError, match="calib/000042.txt"):
        kitti.read_log(handle)


@needs_real_data
def test_kitti_label_map_covers_every_type_in_the_data():
    types = {o["type"] for s in KITTI_SAMPLES for o in kitti_objects(s)}
    assert types == {"Pedestrian", "Truck", "Car", "Cyclist", "DontCare", "Misc"}
    assert types <= set(kitti.LABEL_MAP)


# ------------------------------------------------------------------------------------------ SemanticKITTI
# The official semantic-kitti.yaml learning_map (raw id -> 19 benchmark classes, 0 unlabelled) and our
# reading of the 19 classes; the importer's LABEL_MAP must be exactly their composition.
LEARNING_MAP = {0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10,
                48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0,
                252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5}
BENCHMARK_TO_TAXONOMY = ["ignore",  # unlabelled
                         "vehicle", "ignore", "vehicle", "vehicle", "vehicle",  # car bicycle motorcycle truck other-v.
                         "pedestrian", "cyclist", "vehicle",  # person bicyclist motorcyclist
                         "ground", "ground", "ground", "ground",  # road parking sidewalk other-ground
                         "building", "building",  # building fence
                         "vegetation", "vegetation", "ground",  # vegetation trunk terrain
                         "pole", "pole"]  # pole traffic-sign
SEMANTICKITTI_HISTOGRAM = {"ignore": 6944, "ground": 82076, "building": 2657, "vegetation": 28492, "pole": 1525,
                           "vehicle": 1534, "pedestrian": 161}


def test_semantickitti_label_map_is_the_official_learning_map_composed():
    composed = {raw: BENCHMARK_TO_TAXONOMY[benchmark] for raw, benchmark in LEARNING_MAP.items()}
    assert semantickitti.LABEL_MAP == composed


def test_semantickitti_unknown_ids_map_to_ignore_and_instance_bits_are_dropped():
    raw = np.array([(7 << 16) | 10, (3 << 16) | 252, 2, 300, 65535, (1 << 16) | 48], np.uint32)
    names = [CLASSES[i] for i in semantickitti.map_labels(raw)]
    assert names == ["vehicle", "vehicle", "ignore", "ignore", "ignore", "ground"]


@needs_real_data
def test_semantickitti_scan_points_and_class_histogram():
    [handle] = semantickitti.list_logs(str(SEMANTICKITTI_ROOT))
    meta, frame = only_frame(semantickitti, handle)
    assert meta.log_id == "semantickitti-00" and meta.city == "karlsruhe"
    assert dt.datetime.fromtimestamp(meta.start_time_ns / 1e9, dt.timezone.utc).date() == dt.date(2011, 10, 3)
    assert frame.frame_index == 0 and frame.timestamp_ns == meta.start_time_ns
    scan = SEMANTICKITTI_ROOT / "sequences" / "00"
    raw_points = np.frombuffer((scan / "velodyne" / "000000.bin").read_bytes(), "<f4").reshape(-1, 4)
    assert len(frame.points) == len(raw_points) == 123_389
    np.testing.assert_array_equal(frame.points[:, :3], raw_points[:, :3])
    assert frame.boxes.shape == (0, len(BOX_COLUMNS))
    # Independent count: unique raw semantic ids, each mapped through learning_map and our reading of it.
    raw_labels = np.frombuffer((scan / "labels" / "000000.label").read_bytes(), "<u4")
    ids, counts = np.unique(raw_labels % 65536, return_counts=True)
    expected = Counter()
    for raw_id, n in zip(ids.tolist(), counts.tolist()):
        assert raw_id in semantickitti.LABEL_MAP  # the map covers every label present
        expected[BENCHMARK_TO_TAXONOMY[LEARNING_MAP[raw_id]]] += n
    assert histogram(frame.labels) == dict(expected) == SEMANTICKITTI_HISTOGRAM
    # Per point too, not only in total.
    per_point = [CLASS_ID[BENCHMARK_TO_TAXONOMY[LEARNING_MAP[i]]] for i in (raw_labels % 65536).tolist()]
    np.testing.assert_array_equal(frame.labels, per_point)


def test_semantickitti_missing_label_file_is_named(tmp_path):
    sequence = tmp_path / "sequences" / "04"
    (sequence / "velodyne").mkdir(parents=True)
    (sequence / "labels").mkdir()
    np.zeros((3, 4), np.float32).tofile(sequence / "velodyne" / "000000.bin")
    np.zeros((2, 4), np.float32).tofile(sequence / "velodyne" / "000001.bin")
    np.array([40, 40, 10], np.uint32).tofile(sequence / "labels" / "000000.label")
    [handle] = semantickitti.list_logs(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="labels/000001.label"):
        semantickitti.read_log(handle)
    np.array([40], np.uint32).tofile(sequence / "labels" / "000001.label")  # one label for two points
    meta, frames = semantickitti.read_log(handle)
    first = next(frames)
    assert first.labels.tolist() == [CLASS_ID["ground"]] * 2 + [CLASS_ID["vehicle"]]
    with pytest.raises(ValueError, match="1 labels for 2 points"):
        next(frames)
    assert meta.start_time_ns == int(dt.datetime(2011, 9, 30, tzinfo=dt.timezone.utc).timestamp()) * 10**9


# ------------------------------------------------------------------------------------------ Argoverse 2
AV2_CATEGORIES = {"ANIMAL", "ARTICULATED_BUS", "BICYCLE", "BICYCLIST", "BOLLARD", "BOX_TRUCK", "BUS",
                  "CONSTRUCTION_BARREL", "CONSTRUCTION_CONE", "DOG", "LARGE_VEHICLE", "MESSAGE_BOARD_TRAILER",
                  "MOBILE_PEDESTRIAN_CROSSING_SIGN", "MOTORCYCLE", "MOTORCYCLIST", "OFFICIAL_SIGNALER", "PEDESTRIAN",
                  "RAILED_VEHICLE", "REGULAR_VEHICLE", "SCHOOL_BUS", "SIGN", "STOP_SIGN", "STROLLER",
                  "TRAFFIC_LIGHT_TRAILER", "TRUCK", "TRUCK_CAB", "VEHICULAR_TRAILER", "WHEELCHAIR", "WHEELED_DEVICE",
                  "WHEELED_RIDER"}
AV2_HISTOGRAM = {"ignore": 82688, "pole": 38, "vehicle": 17579, "pedestrian": 355}


def rotation(qw, qx, qy, qz) -> np.ndarray:
    """Full 3x3 rotation matrix of a unit quaternion (the importer only takes the yaw)."""
    return np.array([[1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qz * qw), 2 * (qx * qz + qy * qw)],
                     [2 * (qx * qy + qz * qw), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qx * qw)],
                     [2 * (qx * qz - qy * qw), 2 * (qy * qz + qx * qw), 1 - 2 * (qx * qx + qy * qy)]])


def av2_log_dir() -> Path:
    return AV2_ROOT / "sensor" / "val" / AV2_LOG


@needs_real_data
def test_av2_sweep_metadata_and_ego_pose():
    [handle] = av2.list_logs(str(AV2_ROOT))
    assert Path(handle) == av2_log_dir()
    meta, frame = only_frame(av2, handle)
    assert meta.log_id == f"av2-{AV2_LOG}" and meta.city == "pittsburgh"
    assert meta.start_time_ns == frame.timestamp_ns == AV2_SWEEP_NS and frame.frame_index == 0
    assert np.isnan(frame.gps).all()
    poses = feather.read_feather(av2_log_dir() / "city_SE3_egovehicle.feather").sort_values("timestamp_ns")
    [now] = poses[poses.timestamp_ns == AV2_SWEEP_NS].itertuples()  # AV2 has a pose at each sweep
    np.testing.assert_allclose(frame.ego[:3], [now.tx_m, now.ty_m, now.tz_m])
    heading_vector = rotation(now.qw, now.qx, now.qy, now.qz) @ [1, 0, 0]
    assert frame.ego[3] == pytest.approx(math.atan2(heading_vector[1], heading_vector[0]), abs=1e-9)
    # Speed: displacement between the poses nearest 0.1 s before and after, found with pandas.
    targets = pd.DataFrame({"timestamp_ns": [AV2_SWEEP_NS - 10**8, AV2_SWEEP_NS + 10**8]})
    nearest = pd.merge_asof(targets, poses.rename(columns={"timestamp_ns": "pose_ns"}),
                            left_on="timestamp_ns", right_on="pose_ns", direction="nearest")
    moved = np.hypot(np.hypot(*np.diff(nearest[["tx_m", "ty_m"]].to_numpy(), axis=0)[0]), np.diff(nearest.tz_m)[0])
    assert frame.ego[4] == pytest.approx(moved / (np.diff(nearest.pose_ns)[0] / 1e9), rel=1e-9)
    assert frame.ego[4] < 0.05  # the car waits at this point of the log
    assert np.isfinite(frame.ego[5])


@needs_real_data
def test_av2_points_and_labels_reproduce_num_interior_pts_of_every_cuboid():
    sweep = feather.read_feather(av2_log_dir() / "sensors" / "lidar" / f"{AV2_SWEEP_NS}.feather")
    _, frame = only_frame(av2, str(av2_log_dir()))
    assert len(frame.points) == len(sweep) == 100_660
    np.testing.assert_array_equal(frame.points[:, :3], sweep[["x", "y", "z"]].to_numpy(np.float32))
    np.testing.assert_allclose(frame.points[:, 3], sweep["intensity"].to_numpy() / 255.0, rtol=1e-6)

    annotations = feather.read_feather(av2_log_dir() / "annotations.feather")
    cuboids = annotations[annotations.timestamp_ns == AV2_SWEEP_NS]
    assert len(cuboids) == 47
    xyz = sweep[["x", "y", "z"]].to_numpy(np.float64)
    expected = np.full(len(xyz), CLASS_ID["ignore"])
    covered = np.zeros(len(xyz), int)
    for c in cuboids.itertuples():
        local = (xyz - [c.tx_m, c.ty_m, c.tz_m]) @ rotation(c.qw, c.qx, c.qy, c.qz)  # rows: R^T (p - t)
        inside = (np.abs(local) <= np.array([c.length_m, c.width_m, c.height_m]) / 2).all(axis=1)
        assert inside.sum() == c.num_interior_pts, f"{c.category} {c.track_uuid}"
        covered += inside
        expected[inside] = CLASS_ID[av2.LABEL_MAP[c.category]]
    assert covered.max() == 1  # no point in two cuboids here, so the labels are unambiguous
    np.testing.assert_array_equal(frame.labels, expected)
    assert histogram(frame.labels) == AV2_HISTOGRAM
    assert sum(n for name, n in AV2_HISTOGRAM.items() if name != "ignore") == cuboids.num_interior_pts.sum()


@needs_real_data
def test_av2_boxes_are_the_object_cuboids_with_stable_track_ids():
    _, frame = only_frame(av2, str(av2_log_dir()))
    annotations = feather.read_feather(av2_log_dir() / "annotations.feather")
    uuids = sorted(set(annotations.track_uuid))
    assert len(uuids) == 146
    cuboids = annotations[annotations.timestamp_ns == AV2_SWEEP_NS].set_index("track_uuid")
    objects = cuboids[[av2.LABEL_MAP[c] in ("vehicle", "pedestrian", "cyclist") for c in cuboids.category]]
    assert len(frame.boxes) == len(objects) == 41
    for box in frame.boxes:
        cuboid = objects.loc[uuids[int(box[8])]]
        np.testing.assert_allclose(box[:6], cuboid[["tx_m", "ty_m", "tz_m", "length_m", "width_m", "height_m"]]
                                   .to_numpy(float), rtol=1e-6)
        assert CLASSES[int(box[7])] == av2.LABEL_MAP[cuboid.category]
        # The yaw-only box holds exactly the cuboid's points (AV2 cuboids have no roll or pitch).
        assert (points_in_boxes(frame.points[:, :3], box[None]) == 0).sum() == cuboid.num_interior_pts


@needs_real_data
def test_av2_label_map_covers_every_category():
    assert set(av2.LABEL_MAP) == AV2_CATEGORIES
    present = set(feather.read_feather(av2_log_dir() / "annotations.feather", columns=["category"]).category)
    assert present <= set(av2.LABEL_MAP)
    assert av2.class_of("FLYING_SAUCER") == CLASS_ID["ignore"]


def test_av2_missing_annotations_are_named(tmp_path):
    log = tmp_path / "val" / "0000-log"
    (log / "sensors" / "lidar").mkdir(parents=True)
    with pytest.raises(UserError):
        av2.list_logs(str(tmp_path))  # not annotated: not listed
    with pytest.raises(FileNotFoundError, match="annotations.feather"):
        av2.read_log(str(log))


# ------------------------------------------------------------------------------------------ bad inputs
def copy_av2_log(tmp_path: Path) -> Path:
    import shutil

    log = tmp_path / "val" / AV2_LOG
    shutil.copytree(av2_log_dir(), log)
    return log


@needs_real_data
@pytest.mark.parametrize("damage", ["not arrow", "truncated"])
def test_av2_unreadable_sweep_is_an_error_naming_the_file(tmp_path, damage):
    from spark_jobs.extract import LogTask, extract_log

    log = copy_av2_log(tmp_path)
    sweep = log / "sensors" / "lidar" / f"{AV2_SWEEP_NS}.feather"
    sweep.write_bytes(b"not a feather file\n" * 4 if damage == "not arrow" else sweep.read_bytes()[:5000])
    _meta, frames = av2.read_log(str(log))
    with pytest.raises(ValueError, match=f"Argoverse 2 file {sweep}: not a readable Feather"):
        next(frames)
    # ... and that is the reason ingest quarantines the log with.
    summary, rows = extract_log(LogTask(av2.__name__, str(log), f"av2-{AV2_LOG}", "pittsburgh", "test", 1.0, ""),
                                max_points=1_000_000)
    assert rows == [] and str(sweep) in summary["reason"]


@needs_real_data
def test_av2_sweeps_and_annotations_that_do_not_pair_up_are_listed(tmp_path):
    log = copy_av2_log(tmp_path)
    timestamps = set(feather.read_feather(log / "annotations.feather", columns=["timestamp_ns"]).timestamp_ns)
    assert len(timestamps) == 156  # the sample ships one of the 156 annotated sweeps
    problems = av2.unmatched_inputs(str(tmp_path))
    assert problems == {"annotations_without_sweep": [f"{log / 'annotations.feather'}: {t}"
                                                      for t in sorted(timestamps - {AV2_SWEEP_NS})]}
    # A sweep nobody annotated: listed, and left out of the log rather than becoming an all-ignore frame.
    unannotated = log / "sensors" / "lidar" / f"{AV2_SWEEP_NS - 50_000_000}.feather"
    unannotated.write_bytes((log / "sensors" / "lidar" / f"{AV2_SWEEP_NS}.feather").read_bytes())
    assert av2.unmatched_inputs(str(tmp_path))["sweeps_without_annotations"] == [str(unannotated)]
    _meta, frames = av2.read_log(str(log))
    [frame] = list(frames)
    assert frame.timestamp_ns == AV2_SWEEP_NS and frame.frame_index == 1  # its index among the sweeps


@needs_real_data
def test_kitti_label_without_its_point_cloud_is_listed(tmp_path):
    import shutil

    shutil.copytree(KITTI_ROOT / "training", tmp_path / "training")
    assert kitti.unmatched_inputs(str(tmp_path)) == {}
    (tmp_path / "training" / "velodyne" / "000003.bin").unlink()
    assert len(kitti.list_logs(str(tmp_path))) == 5
    assert kitti.unmatched_inputs(str(tmp_path)) == {
        "labels_without_points": [str(tmp_path / "training" / "label_2" / "000003.txt")]}


def test_semantickitti_label_without_its_scan_is_listed(tmp_path):
    sequence = tmp_path / "sequences" / "00"
    (sequence / "velodyne").mkdir(parents=True)
    (sequence / "labels").mkdir()
    np.zeros((2, 4), np.float32).tofile(sequence / "velodyne" / "000000.bin")
    for scan in ("000000", "000001"):
        np.array([40, 40], np.uint32).tofile(sequence / "labels" / f"{scan}.label")
    assert semantickitti.unmatched_inputs(str(tmp_path)) == {
        "labels_without_points": [str(sequence / "labels" / "000001.label")]}
    _meta, frames = semantickitti.read_log(semantickitti.list_logs(str(tmp_path))[0])
    assert [f.frame_index for f in frames] == [0]


# ------------------------------------------------------------------------------------------ AV2 flow rule
AV2_FLOW_HISTOGRAM = {"ignore": 82168, "pole": 40, "vehicle": 18072, "pedestrian": 380}
AV2_FLOW_CHANGED_POINTS = 520  # points the grown cuboids add to the exact rule's labels
def av2_vertices(c, length: float, width: float) -> np.ndarray:
    """(8, 3) cuboid vertices in av2-api's order (``Cuboid.vertices_m``): object-frame corners
    (+-l/2, +-w/2, +-h/2) in the order 0..7 of its docstring figure, through the full rotation."""
    signs = np.array([[1, 1, 1], [1, -1, 1], [1, -1, -1], [1, 1, -1],
                      [-1, 1, 1], [-1, -1, 1], [-1, -1, -1], [-1, 1, -1]], float)
    corners = signs * [length / 2, width / 2, c.height_m / 2]
    return corners @ rotation(c.qw, c.qx, c.qy, c.qz).T + [c.tx_m, c.ty_m, c.tz_m]


def av2_interior(xyz: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """av2-api ``compute_interior_points_mask``: projections on the three edges from vertex 2, inclusive."""
    mask = np.ones(len(xyz), bool)
    for other in (6, 3, 1):
        edge = vertices[2] - vertices[other]
        along = xyz @ edge
        mask &= (along >= vertices[other] @ edge) & (along <= vertices[2] @ edge)
    return mask


@needs_real_data
def test_av2_flow_rule_reproduces_av2_api_scene_flow_labels_point_for_point():
    """``Flow.from_sweep_pair``'s category per point, recomputed the av2-api way: cuboids with
    num_interior_pts >= 1 (the data loader's filter), length and width + 0.2 m, later cuboids overwrite."""
    _meta, frames = av2.read_log(str(av2_log_dir()), box_rule="flow")
    [frame] = list(frames)
    _, exact = only_frame(av2, str(av2_log_dir()))
    xyz = frame.points[:, :3].astype(np.float64)
    annotations = feather.read_feather(av2_log_dir() / "annotations.feather")
    cuboids = annotations[(annotations.timestamp_ns == AV2_SWEEP_NS) & (annotations.num_interior_pts >= 1)]
    expected = np.full(len(xyz), CLASS_ID["ignore"])
    for c in cuboids.itertuples():
        expected[av2_interior(xyz, av2_vertices(c, c.length_m + 0.2, c.width_m + 0.2))] = CLASS_ID[av2.LABEL_MAP[c.category]]
    np.testing.assert_array_equal(frame.labels, expected)
    assert histogram(frame.labels) == AV2_FLOW_HISTOGRAM
    # The vertex test is the same as the exact rule's for unchanged sizes: num_interior_pts again.
    for c in cuboids.itertuples():
        assert av2_interior(xyz, av2_vertices(c, c.length_m, c.width_m)).sum() == c.num_interior_pts
    # Boxes do not depend on the rule; only the labels do (the grown cuboids take in more points).
    np.testing.assert_array_equal(frame.boxes, exact.boxes)
    assert (frame.labels != exact.labels).sum() == AV2_FLOW_CHANGED_POINTS
    with pytest.raises(ValueError, match="box rule 'loose'"):
        av2.read_log(str(av2_log_dir()), box_rule="loose")
