"""The fleet simulator: determinism, the fleet plan, the sensor model, labels and boxes, city mixes and
the ego's kinematics. Small fleets (a few logs of a few frames) keep the file fast."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import SimulateConfig
from pipeline.geometry import points_in_boxes
from pipeline.home import check_name
from pipeline.taxonomy import CLASS_ID, CLASSES, OBJECT_CLASS_IDS
from spark_jobs import simulator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = SimulateConfig(logs=3, frames=3, days=3)
DOWNTOWN, SUBURB, HIGHWAY = "sanfrancisco", "atlanta", "dallas"


def simulate(meta, cfg):
    """All frames of one log as a list."""
    return list(simulator.simulate_log(meta, cfg))


def digest(frames) -> str:
    """sha256 over everything a frame carries."""
    h = hashlib.sha256()
    for f in frames:
        h.update(f"{f.log_id}|{f.frame_index}|{f.timestamp_ns}|".encode())
        for array in (f.points, f.labels, f.boxes, f.ego, f.gps, f.route):
            h.update(str(array.dtype).encode() + str(array.shape).encode() + array.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def fleet():
    """Six logs, two per city, four frames each, with the default 32 x 1024 sweep."""
    cfg = SimulateConfig(logs=6, frames=4, days=2)
    plan = simulator.fleet_plan(cfg)
    return cfg, plan, {m.log_id: simulate(m, cfg) for m in plan}


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_and_log_give_identical_bytes_and_another_seed_changes_them():
    meta = simulator.fleet_plan(SMALL)[0]
    first, again = simulate(meta, SMALL), simulate(meta, SMALL)
    for a, b in zip(first, again):
        assert a.points.tobytes() == b.points.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()
        assert a.boxes.tobytes() == b.boxes.tobytes()
    other = simulate(meta, dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert other[0].points.tobytes() != first[0].points.tobytes()
    assert other[0].boxes.tobytes() != first[0].boxes.tobytes()
    assert digest(other) != digest(first)


def test_a_log_is_the_same_alone_in_a_bigger_fleet_in_any_order_and_in_another_process():
    alone_plan = simulator.fleet_plan(dataclasses.replace(SMALL, logs=2))
    big_cfg = dataclasses.replace(SMALL, logs=5)
    big_plan = simulator.fleet_plan(big_cfg)
    assert big_plan[:2] == alone_plan  # growing the fleet keeps the existing logs
    alone = digest(simulate(alone_plan[1], SMALL))
    in_fleet = {m.log_id: digest(simulate(m, big_cfg)) for m in reversed(big_plan)}
    assert in_fleet[alone_plan[1].log_id] == alone
    assert len(set(in_fleet.values())) == len(big_plan)  # and different logs differ
    # A fresh interpreter with another string-hash salt (what a worker process sees) gives the same bytes.
    code = ("import sys; from tests.spark_jobs.test_simulator import *; "
            "plan = simulator.fleet_plan(SMALL); print(digest(simulate(plan[1], SMALL)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == alone


# ------------------------------------------------------------------------------------ fleet plan
def test_fleet_plan_spreads_logs_over_days_and_cities_with_unique_safe_ids():
    cfg = SimulateConfig(logs=18, days=6, start_date="2026-11-01", seed=3)
    plan = simulator.fleet_plan(cfg)
    assert plan == simulator.fleet_plan(cfg)  # deterministic
    assert len(plan) == 18 and len({m.log_id for m in plan}) == 18
    first_day = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    pairs = set()
    for m in plan:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", m.log_id) and check_name(m.log_id)
        assert m.city in simulator.CITIES and m.city in m.log_id
        assert m.source == "sim" and m.vehicle_id and m.software_version
        start = dt.datetime.fromtimestamp(m.start_time_ns / 1e9, dt.timezone.utc)
        day = (start.date() - first_day.date()).days
        assert 0 <= day < cfg.days and 7 <= start.hour < 19
        assert start.strftime("%Y%m%d") in m.log_id
        pairs.add((day, m.city))
    assert pairs == {(d, c) for d in range(6) for c in simulator.CITIES}  # every day sees every city
    # Every city appears among the first len(CITIES) logs, and each day gets its share.
    assert {m.city for m in plan[:len(simulator.CITIES)]} == set(simulator.CITIES)
    days = [dt.datetime.fromtimestamp(m.start_time_ns / 1e9, dt.timezone.utc).date() for m in plan]
    assert all(days.count(d) == 3 for d in set(days))
    # The seed moves start times but not the identities of the logs.
    reseeded = simulator.fleet_plan(dataclasses.replace(cfg, seed=4))
    assert [m.log_id for m in reseeded] == [m.log_id for m in plan]
    assert [m.start_time_ns for m in reseeded] != [m.start_time_ns for m in plan]


def test_bad_inputs_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="not a date"):
        simulator.fleet_plan(SimulateConfig(start_date="yesterday"))
    meta = dataclasses.replace(simulator.fleet_plan(SMALL)[0], city="atlantis")
    with pytest.raises(ValueError, match="unknown city 'atlantis'"):
        next(simulator.simulate_log(meta, SMALL))


def test_cities_really_differ_and_have_plausible_origins():
    assert len(simulator.CITIES) >= 3
    for name, city in simulator.CITIES.items():
        assert city.name == name and re.fullmatch(r"[a-z]+", name)
        assert -90 < city.origin_lat < 90 and -180 < city.origin_lon < 180
    downtown, suburb, highway = (simulator.CITIES[c] for c in (DOWNTOWN, SUBURB, HIGHWAY))
    assert downtown.walkers_per_100m > 10 * highway.walkers_per_100m
    traffic = {c: c.vehicles_per_100m * c.lanes_per_direction for c in (highway, suburb)}
    assert traffic[highway] > 2 * traffic[suburb]


# ------------------------------------------------------------------------------------ sensor model
def test_labels_are_taxonomy_ids_and_every_class_occurs_in_a_small_fleet(fleet):
    _, _, logs = fleet
    seen = set()
    for frames in logs.values():
        for f in frames:
            assert f.points.dtype == np.float32 and f.points.shape[1] == 4 and f.labels.dtype == np.uint8
            assert f.labels.shape == (len(f.points),)
            assert np.isin(f.labels, np.arange(len(CLASSES))).all()
            assert np.isfinite(f.points).all()
            assert (f.points[:, 3] >= 0).all() and (f.points[:, 3] <= 1).all()
            seen |= set(np.unique(f.labels).tolist())
    wanted = {CLASS_ID[c] for c in ("ground", "building", "vegetation", "pole", "vehicle", "pedestrian", "cyclist")}
    assert wanted <= seen, [CLASSES[i] for i in wanted - seen]


def _check_points_and_boxes(frames, inflation: float) -> int:
    """Every actor point lies in a box of its class (inflated by ``inflation`` m on every side) and every
    box contains at least one point of its class. Returns the number of boxes checked."""
    checked = 0
    for f in frames:
        assert f.boxes.dtype == np.float32 and f.boxes.shape[1] == 9
        assert set(np.unique(f.boxes[:, 7]).tolist()) <= set(OBJECT_CLASS_IDS)
        tracks = f.boxes[:, 8]
        assert (tracks >= 1).all() and (tracks == np.round(tracks)).all() and len(set(tracks)) == len(tracks)
        assert (f.boxes[:, 3:6] > 0).all() and (np.abs(f.boxes[:, 6]) <= math.pi + 1e-6).all()  # float32(pi) > pi
        xyz = f.points[:, :3].astype(np.float64)
        for class_id in OBJECT_CLASS_IDS:
            mine = f.labels == class_id
            boxes = f.boxes[f.boxes[:, 7] == class_id].astype(np.float64)
            grown = boxes.copy()
            grown[:, 3:6] += 2 * inflation
            owner = points_in_boxes(xyz[mine], grown)
            assert (owner >= 0).all(), f"{(owner < 0).sum()} {CLASSES[class_id]} points outside every box"
            assert (np.bincount(owner, minlength=len(boxes)) >= 1).all(), "a box without points"
            checked += len(boxes)
    return checked


def test_actor_points_lie_in_their_boxes_and_every_box_has_points(fleet):
    cfg, _, logs = fleet
    # Range noise moves a point along its ray by a few cm; 10 sigma of slack covers it.
    checked = sum(_check_points_and_boxes(frames, 10 * cfg.range_noise_m) for frames in logs.values())
    assert checked > 50


def test_without_noise_points_lie_on_the_surfaces_exactly():
    cfg = dataclasses.replace(SMALL, range_noise_m=0.0, frames=2)
    meta = simulator.fleet_plan(cfg)[0]  # downtown: many pedestrians and cyclists
    frames = simulate(meta, cfg)
    assert _check_points_and_boxes(frames, 1e-3) > 10
    for f in frames:  # the road is the plane 1.8 m below the sensor
        road = f.points[f.labels == CLASS_ID["ground"]]
        assert len(road) and np.abs(road[:, 2] + simulator.SENSOR_HEIGHT_M).max() < 1e-3


def test_track_ids_keep_their_class_and_size_through_the_log(fleet):
    _, _, logs = fleet
    for frames in logs.values():
        first_seen: dict[float, np.ndarray] = {}
        for f in frames:
            for row in f.boxes:
                known = first_seen.setdefault(float(row[8]), row)
                assert known[7] == row[7] and np.array_equal(known[3:6], row[3:6])
        assert len(first_seen) > 5


def test_ranges_point_counts_and_dropout():
    base = dataclasses.replace(SMALL, frames=2, dropout=0.0)
    meta = simulator.fleet_plan(base)[0]
    full = simulate(meta, base)
    for f in full:
        assert len(f.points) <= base.beams * base.azimuth_steps
        assert np.linalg.norm(f.points[:, :3], axis=1).max() <= base.max_range_m + 1e-3
    dropped = simulate(meta, dataclasses.replace(base, dropout=0.3))
    for f, d in zip(full, dropped):
        assert 0.65 < len(d.points) / len(f.points) < 0.75
        # Dropout only removes returns: every remaining point is one of the full sweep's points.
        rows = lambda a: np.ascontiguousarray(a).view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()
        assert np.isin(rows(d.points), rows(f.points)).all()
    short = simulate(meta, dataclasses.replace(base, max_range_m=20.0))
    for f, s in zip(full, short):
        assert len(s.points) < len(f.points)
        assert np.linalg.norm(s.points[:, :3], axis=1).max() <= 20.0 + 1e-3
    coarse = dataclasses.replace(base, beams=8, azimuth_steps=256)
    for f in simulate(meta, coarse):
        assert 0 < len(f.points) <= 8 * 256


def test_intensity_depends_on_the_class(fleet):
    _, _, logs = fleet
    points = np.concatenate([f.points for frames in logs.values() for f in frames])
    labels = np.concatenate([f.labels for frames in logs.values() for f in frames])
    mean = {c: points[labels == CLASS_ID[c], 3].mean() for c in ("ground", "vehicle", "pedestrian")}
    assert mean["vehicle"] > mean["pedestrian"] and mean["vehicle"] > mean["ground"]


# ------------------------------------------------------------------------------------ cities
def test_the_class_mix_differs_between_cities(fleet):
    _, plan, logs = fleet
    counts = {c: np.zeros(len(CLASSES)) for c in simulator.CITIES}
    for m in plan:
        for f in logs[m.log_id]:
            counts[m.city] += np.bincount(f.labels, minlength=len(CLASSES))
    share = {c: v / v.sum() for c, v in counts.items()}
    pedestrian, vegetation = CLASS_ID["pedestrian"], CLASS_ID["vegetation"]
    assert share[DOWNTOWN][pedestrian] > 0.01
    assert share[DOWNTOWN][pedestrian] >= 2 * share[HIGHWAY][pedestrian]
    assert share[SUBURB][vegetation] >= 2 * share[DOWNTOWN][vegetation]
    cyclist = CLASS_ID["cyclist"]
    assert share[DOWNTOWN][cyclist] >= 2 * share[HIGHWAY][cyclist]
    # Heavy traffic: the highway city shows more moving vehicles per frame than the suburb.
    moving = {c: [] for c in simulator.CITIES}
    for m in plan:
        frames = logs[m.log_id]
        for before, after in zip(frames, frames[1:]):
            moving[m.city].append(len(_track_speeds(before, after, CLASS_ID["vehicle"], moving_only=True)))
    assert np.mean(moving[HIGHWAY]) > 2 * np.mean(moving[SUBURB])


# ------------------------------------------------------------------------------------ kinematics
def _world_xy(frame, boxes):
    """World (x, y) of box centres given in ``frame``'s sensor frame."""
    x, y, _, heading = frame.ego[:4]
    c, s = math.cos(heading), math.sin(heading)
    bx, by = boxes[:, 0].astype(np.float64), boxes[:, 1].astype(np.float64)
    return np.stack([x + c * bx - s * by, y + s * bx + c * by], axis=1)


def _track_speeds(before, after, class_id, moving_only=False) -> np.ndarray:
    """World speeds of the tracks of ``class_id`` seen in both frames."""
    a, b = (f.boxes[f.boxes[:, 7] == class_id] for f in (before, after))
    common, ia, ib = np.intersect1d(a[:, 8], b[:, 8], return_indices=True)
    dt_s = (after.timestamp_ns - before.timestamp_ns) / 1e9
    speeds = np.linalg.norm(_world_xy(after, b[ib]) - _world_xy(before, a[ia]), axis=1) / dt_s
    return speeds[speeds > 0.5] if moving_only else speeds


def test_ego_state_gps_and_route_are_consistent_with_the_motion(fleet):
    cfg, plan, logs = fleet
    for m in plan:
        frames = logs[m.log_id]
        city = simulator.CITIES[m.city]
        stamps = np.array([f.timestamp_ns for f in frames])
        assert stamps[0] == m.start_time_ns and (np.diff(stamps) == 100_000_000).all()
        assert [f.frame_index for f in frames] == list(range(cfg.frames))
        ego = np.stack([f.ego for f in frames])
        step = np.diff(ego[:, :2], axis=0)
        # Finite differences of the positions match the mean of the reported speeds / accelerations.
        np.testing.assert_allclose(np.linalg.norm(step, axis=1) / 0.1, (ego[1:, 4] + ego[:-1, 4]) / 2, atol=0.01)
        np.testing.assert_allclose(np.diff(ego[:, 4]) / 0.1, (ego[1:, 5] + ego[:-1, 5]) / 2, atol=0.01)
        travel_heading = np.arctan2(step[:, 1], step[:, 0])
        mean_heading = np.angle(np.exp(1j * ego[1:, 3]) + np.exp(1j * ego[:-1, 3]))
        assert np.abs(np.angle(np.exp(1j * (travel_heading - mean_heading)))).max() < 0.01
        assert (ego[:, 4] >= city.ego_speed_mps[0] - 1e-9).all() and (ego[:, 4] <= city.ego_speed_mps[1] + 0.01).all()
        assert np.abs(ego[:, 5]).max() < 3.0
        # GPS follows the ego through the local tangent plane, and starts near the city origin.
        gps = np.stack([f.gps for f in frames])
        north = np.radians(np.diff(gps[:, 0])) * simulator.EARTH_RADIUS_M
        east = np.radians(np.diff(gps[:, 1])) * simulator.EARTH_RADIUS_M * math.cos(math.radians(city.origin_lat))
        np.testing.assert_allclose(np.stack([east, north], axis=1), step, atol=1e-3)
        assert abs(gps[0, 0] - city.origin_lat) < 0.1 and abs(gps[0, 1] - city.origin_lon) < 0.1
        route = np.stack([f.route for f in frames])
        assert (np.abs(route[:, 0]) < 0.5).all() and (route[:, 2] == city.speed_limit_mps).all()
        assert np.abs(np.angle(np.exp(1j * (route[:, 1] - ego[:, 3])))).max() < 0.1  # following its lane


def test_actors_move_plausibly(fleet):
    _, plan, logs = fleet
    speeds = {c: [] for c in ("vehicle", "pedestrian", "cyclist")}
    for m in plan:
        frames = logs[m.log_id]
        for before, after in zip(frames, frames[1:]):
            for name in speeds:
                speeds[name].append(_track_speeds(before, after, CLASS_ID[name]))
    vehicle, pedestrian, cyclist = (np.concatenate(speeds[c]) for c in ("vehicle", "pedestrian", "cyclist"))
    moving = vehicle[vehicle > 0.05]
    assert len(moving) > 20 and len(vehicle) > len(moving)  # traffic and parked cars
    assert moving.min() > 4.9 and moving.max() < 15.1
    assert len(pedestrian) > 20 and pedestrian.max() < 1.55
    assert len(cyclist) > 3 and cyclist.min() > 2.9 and cyclist.max() < 6.1
