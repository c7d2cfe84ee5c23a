"""evaluation.planner: the corridor, the time-to-collision rule, and missed / false brakes on constructed
scenes with one known missed brake and one known false brake."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import planner
from pipeline.taxonomy import CLASS_ID

VEHICLE, PEDESTRIAN, GROUND = CLASS_ID["vehicle"], CLASS_ID["pedestrian"], CLASS_ID["ground"]
SETTINGS = planner.PlannerSettings(lane_width=3.5, horizon=40.0, ttc_threshold=2.0, min_speed=0.5, radius=0.75,
                                   min_points=5)


def blob(x, y, n=12, spread=0.3):
    """``n`` points in a small square around (x, y) at bumper height."""
    side = int(math.ceil(math.sqrt(n)))
    grid = np.stack(np.meshgrid(np.linspace(-spread, spread, side), np.linspace(-spread, spread, side)), -1)
    xy = grid.reshape(-1, 2)[:n] + [x, y]
    return np.column_stack([xy, np.zeros(n), np.full(n, 0.5)]).astype(np.float32)


def frame(*objects):
    """Points and labels: ground all around plus ``(x, y, class)`` blobs."""
    ground = np.column_stack([np.linspace(-40, 40, 200), np.linspace(-10, 10, 200), np.full(200, -1.8),
                              np.zeros(200)]).astype(np.float32)
    parts, labels = [ground], [np.full(200, GROUND)]
    for x, y, class_id in objects:
        p = blob(x, y)
        parts.append(p)
        labels.append(np.full(len(p), class_id))
    return np.concatenate(parts), np.concatenate(labels).astype(np.uint8)


def test_obstacle_distance_only_counts_the_corridor_ahead():
    points, labels = frame((12.0, 0.5, VEHICLE), (5.0, 6.0, PEDESTRIAN), (-8.0, 0.0, VEHICLE), (60.0, 0.0, VEHICLE))
    # beside the lane (y = 6), behind (x = -8) and beyond the horizon (x = 60) do not count
    assert planner.obstacle_distance(points, labels, SETTINGS) == pytest.approx(12.0 - 0.3, abs=1e-5)
    points, labels = frame((5.0, 6.0, PEDESTRIAN))
    assert planner.obstacle_distance(points, labels, SETTINGS) == math.inf


def test_a_few_stray_points_are_not_an_obstacle():
    points, labels = frame()
    stray = blob(10.0, 0.0, n=3)
    points = np.concatenate([points, stray])
    labels = np.concatenate([labels, np.full(3, PEDESTRIAN, np.uint8)])
    assert planner.obstacle_distance(points, labels, SETTINGS) == math.inf


def test_time_to_collision_rule():
    assert planner.should_brake(15.0, 10.0, SETTINGS)  # 1.5 s
    assert not planner.should_brake(25.0, 10.0, SETTINGS)  # 2.5 s
    assert not planner.should_brake(1.0, 0.2, SETTINGS)  # standing still
    assert not planner.should_brake(math.inf, 10.0, SETTINGS)


def test_one_missed_and_one_false_brake_per_scene():
    acc = planner.PlannerAccumulator(SETTINGS)
    # scene A, frame 0: a pedestrian 12 m ahead at 10 m/s; perception calls it ground -> missed brake
    points, labels = frame((12.0, 0.0, PEDESTRIAN))
    predicted = labels.copy()
    predicted[labels == PEDESTRIAN] = GROUND
    acc.update(planner.decide("scene-a", 0, points, labels, predicted, 10.0, SETTINGS))
    # scene A, frame 1: the same pedestrian seen correctly -> both brake
    acc.update(planner.decide("scene-a", 1, points, labels, labels, 10.0, SETTINGS))
    # scene B, frame 0: a bush 10 m ahead predicted as a vehicle -> false brake
    points, labels = frame((10.0, 0.0, GROUND))
    predicted = labels.copy()
    predicted[-12:] = VEHICLE
    acc.update(planner.decide("scene-b", 0, points, labels, predicted, 8.0, SETTINGS))
    # scene B, frame 1: a car far ahead (35 m at 8 m/s = 4.4 s), seen: nobody brakes
    points, labels = frame((35.0, 0.0, VEHICLE))
    acc.update(planner.decide("scene-b", 1, points, labels, labels, 8.0, SETTINGS))

    summary = acc.summary()
    assert (summary["frames"], summary["truth_brakes"], summary["perceived_brakes"]) == (4, 2, 2)
    assert (summary["missed_brakes"], summary["false_brakes"]) == (1, 1)
    assert summary["missed_brake_rate"] == 0.5 and summary["false_brake_rate"] == 0.5
    a, b = summary["scenes"]["scene-a"], summary["scenes"]["scene-b"]
    assert (a["missed_brakes"], a["false_brakes"], a["missed_brake_rate"], a["false_brake_rate"]) == (1, 0, 0.5, None)
    assert (b["missed_brakes"], b["false_brakes"], b["missed_brake_rate"], b["false_brake_rate"]) == (0, 1, None, 0.5)
    events = {(e["log_id"], e["frame_index"]): e for e in summary["events"]}
    assert set(events) == {("scene-a", 0), ("scene-b", 0)}
    assert events[("scene-a", 0)]["event"] == "missed brake" and events[("scene-a", 0)]["perceived_distance"] is None
    assert events[("scene-b", 0)]["event"] == "false brake" and events[("scene-b", 0)]["truth_distance"] is None
    # where both saw the obstacle, they saw it at the same distance
    assert summary["distance_error_m"] == pytest.approx(0.0)
