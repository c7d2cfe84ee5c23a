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
    "000001": {"ignore": 120169, "vehicle": 81, "cyclist": 18},
    "000002": {"ignore": 126824, "vehicle": 67},
    "000003": {"ignore": 112436, "vehicle": 674},
    "000004": {"ignore": 115871, "vehicle": 105},
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


@needs_real_data
@pytest.mark.parametrize("sample", KITTI_SAMPLES)
def test_kitti_boxes_go_back_to_the_label_in_the_camera_frame(sample):
    _, frame = only_frame(kitti, str(KITTI_ROOT / "training" / "velodyne" / f"{sample}.bin"))
    objects = [o for o in kitti_objects(sample) if o["type"] not in ("DontCare", "Misc")]
    assert len(frame.boxes) == len(objects) == KITTI_BOXES[sample]
    velo_to_rect = kitti_calib(sample)
    expected_class = {"Car": "vehicle", "Van": "vehicle", "Truck": "vehicle", "Pedestrian": "pedestrian",
                      "Cyclist": "cyclist"}
    for i, (box, obj) in enumerate(zip(frame.boxes.astype(np.float64), objects)):
        cx, cy, cz, length, width, height, yaw, class_id, track_id = box
        centre = velo_to_rect @ [cx, cy, cz, 1]
        np.testing.assert_allclose(centre[:3], [obj["x"], obj["y"] - obj["h"] / 2, obj["z"]], atol=1e-4)
        np.testing.assert_allclose([length, width, height], [obj["l"], obj["w"], obj["h"]], rtol=1e-6)
        yaw_error = (yaw - (-obj["ry"] - math.pi / 2) + math.pi) % (2 * math.pi) - math.pi
        assert abs(yaw_error) < 0.01
        assert CLASSES[int(class_id)] == expected_class[obj["type"]] and track_id == i


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
