"""System metrics: a deliberately simple longitudinal planner driven by perception, against the same
planner driven by the ground truth.

A segmentation model is only as good as the decisions made from it, so every test frame is given to a
toy planner twice - once with the points the model *predicts* as vehicle / pedestrian / cyclist, once
with the points *labelled* so - and the two decisions are compared:

* **Obstacles.** The object-class points (any of the three classes: for braking the class does not
  matter) are grouped in bird's-eye view exactly like predicted objects (``objects.cluster_points``:
  single linkage at ``radius``, groups under ``min_points`` dropped as noise). The same filter is applied
  to the ground truth so that the comparison measures perception, not the filter.
* **Corridor.** The ego corridor is the straight strip ahead of the sensor, ``0 < x < horizon`` and
  ``|y| < lane_width / 2`` in the LiDAR frame. The obstacle distance is the smallest ``x`` of an
  obstacle point in it (infinite when there is none).
* **Decision.** Brake when ``distance / ego speed < ttc_threshold``: the time to collision assuming the
  obstacle stands still (the evaluation has no tracks, hence no obstacle velocities - a conservative
  assumption that makes a car driving ahead at the ego's speed a braking reason too). Below
  ``min_speed`` the ego is standing and never brakes.
* **Metrics**, per frame and per scene (log): a **missed brake** (ground truth brakes, perception does
  not: a safety event) and a **false brake** (perception brakes, ground truth does not: a comfort
  event); rates are missed / frames where the ground truth brakes and false / frames where it does not.

What this is not: no lateral planning, no curved lanes (the corridor follows the sensor's heading), no
prediction of other actors, no dynamics of the brake itself. It turns "points classified" into "frames
where the car would have done the wrong thing", which is what Uber ATG's system metrics ask for, at the
smallest cost. See docs/evaluation.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evaluation.objects import cluster_points
from pipeline.taxonomy import OBJECT_CLASS_IDS


@dataclass(frozen=True)
class PlannerSettings:
    """The corridor, the time-to-collision rule and the obstacle filter (see the module docstring)."""

    lane_width: float = 3.5
    horizon: float = 40.0
    ttc_threshold: float = 2.0
    min_speed: float = 0.5
    radius: float = 0.75
    min_points: int = 5


def obstacle_distance(points: np.ndarray, classes: np.ndarray, settings: PlannerSettings) -> float:
    """Distance along x to the nearest obstacle point in the ego corridor (``inf`` when there is none).

    ``classes`` are per-point taxonomy ids: the labels for the ground truth, the predictions for
    perception. Obstacle points are those of an object class that belong to a group of at least
    ``min_points`` (noise filter); grouping uses all of them, so an object reaching into the corridor
    with only a few points still counts.
    """
    points = np.asarray(points)
    obstacle = np.flatnonzero(np.isin(classes, OBJECT_CLASS_IDS))
    if len(obstacle) == 0:
        return math.inf
    group = cluster_points(points[obstacle, :2], settings.radius, settings.min_points)
    xy = points[obstacle[group >= 0], :2]
    ahead = (xy[:, 0] > 0) & (xy[:, 0] < settings.horizon) & (np.abs(xy[:, 1]) < settings.lane_width / 2)
    return float(xy[ahead, 0].min()) if ahead.any() else math.inf


def should_brake(distance: float, speed: float, settings: PlannerSettings) -> bool:
    """The longitudinal rule: brake when the time to reach the obstacle at the current speed is short."""
    if speed < settings.min_speed or not math.isfinite(distance):
        return False
    return distance / speed < settings.ttc_threshold


@dataclass
class FrameDecision:
    """The planner's two decisions on one frame."""

    log_id: str
    frame_index: int
    speed: float
    truth_distance: float
    perceived_distance: float
    truth_brake: bool
    perceived_brake: bool

    @property
    def missed(self) -> bool:
        return self.truth_brake and not self.perceived_brake

    @property
    def false_brake(self) -> bool:
        return self.perceived_brake and not self.truth_brake


def decide(log_id: str, frame_index: int, points: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
           speed: float, settings: PlannerSettings) -> FrameDecision:
    """Run the planner on the ground truth and on the prediction of one frame."""
    truth = obstacle_distance(points, labels, settings)
    perceived = obstacle_distance(points, predicted, settings)
    return FrameDecision(log_id, int(frame_index), float(speed), truth, perceived,
                         should_brake(truth, speed, settings), should_brake(perceived, speed, settings))


def _counts(decisions: list[FrameDecision]) -> dict[str, Any]:
    """Frames, brakes, missed and false brakes and their rates over ``decisions``."""
    frames = len(decisions)
    truth_brakes = sum(d.truth_brake for d in decisions)
    missed = sum(d.missed for d in decisions)
    false = sum(d.false_brake for d in decisions)
    both = [abs(d.perceived_distance - d.truth_distance) for d in decisions
            if math.isfinite(d.truth_distance) and math.isfinite(d.perceived_distance)]
    return {
        "frames": frames, "truth_brakes": truth_brakes, "perceived_brakes": sum(d.perceived_brake for d in decisions),
        "missed_brakes": missed, "false_brakes": false,
        "missed_brake_rate": missed / truth_brakes if truth_brakes else None,
        "false_brake_rate": false / (frames - truth_brakes) if frames - truth_brakes else None,
        # how far off the perceived obstacle distance is when both see one in the corridor
        "distance_error_m": float(np.mean(both)) if both else None,
    }


@dataclass
class PlannerAccumulator:
    """Every frame's decisions; ``summary()`` gives the totals, per-scene numbers and the disagreements."""

    settings: PlannerSettings
    decisions: list[FrameDecision] = field(default_factory=list)

    def update(self, decision: FrameDecision) -> None:
        self.decisions.append(decision)

    def summary(self, max_events: int = 50) -> dict[str, Any]:
        scenes: dict[str, list[FrameDecision]] = {}
        for d in self.decisions:
            scenes.setdefault(d.log_id, []).append(d)
        events = [{**asdict(d), "event": "missed brake" if d.missed else "false brake"}
                  for d in self.decisions if d.missed or d.false_brake]
        for e in events:  # JSON has no infinity
            for key in ("truth_distance", "perceived_distance"):
                e[key] = e[key] if math.isfinite(e[key]) else None
        return {"settings": asdict(self.settings), **_counts(self.decisions),
                "scenes": {log: _counts(ds) for log, ds in sorted(scenes.items())},
                "events": events[:max_events], "events_total": len(events)}
