"""Run one model over the test frames and collect every model and system metric in one pass.

Per frame: logits -> predictions (argmax) and softmax scores -> the confusion matrix (whole split and the
frame's log), the precision-recall histograms, the object matching and the planner's two decisions.
The result is plain JSON-ready data; the candidate and the production model go through exactly the
same code on exactly the same frames, so the blessing compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from evaluation import objects as objects_mod
from evaluation import planner as planner_mod
from evaluation import segmentation as seg
from evaluation import statistics
from evaluation.frames import LoggedFrame
from pipeline.taxonomy import CLASSES
from serving import artifacts

# Bump when a metric's definition changes: stored metrics of another version are not reused as a baseline.
METRICS_VERSION = 2


@dataclass(frozen=True)
class Settings:
    """How objects are made and matched, how the planner decides, the PR thresholds, and the slices and
    calibration bins the per-log tallies are kept by (``statistics``)."""

    objects: objects_mod.ObjectSettings
    planner: planner_mod.PlannerSettings
    pr_thresholds: int
    slices: tuple[statistics.SliceSpec, ...]
    calibration_bins: int

    @classmethod
    def from_config(cls, ev: Any) -> "Settings":
        """From an ``EvaluateConfig``."""
        band_edges = objects_mod.parse_bands(ev.distance_bands_m)
        return cls(
            objects=objects_mod.ObjectSettings(radius=ev.cluster_radius_m, min_points=ev.min_object_points,
                                               min_share=ev.match_min_share, margin=ev.box_margin_m,
                                               band_edges=band_edges),
            planner=planner_mod.PlannerSettings(lane_width=ev.lane_width_m, horizon=ev.planner_horizon_m,
                                                ttc_threshold=ev.ttc_threshold_s, min_speed=ev.min_speed_mps,
                                                radius=ev.cluster_radius_m, min_points=ev.min_object_points),
            pr_thresholds=ev.pr_thresholds, slices=statistics.parse_slices(ev.slices, band_edges),
            calibration_bins=ev.calibration_bins)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"objects": asdict(self.objects), "planner": asdict(self.planner), "pr_thresholds": self.pr_thresholds,
                "slices": [asdict(s) for s in self.slices], "calibration_bins": self.calibration_bins,
                "metrics_version": METRICS_VERSION}


def predict(model: torch.nn.Module, points: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Logits ``[N, K]`` of one frame (batch of one, every point valid)."""
    with torch.no_grad():
        return model(*artifacts.frame_inputs(points, device))[0].float().cpu().numpy()


def score_model(model: torch.nn.Module, frames: Sequence[LoggedFrame], settings: Settings,
                device: torch.device | str = "cpu", say: Callable[[str], None] = print) -> dict[str, Any]:
    """Segmentation, PR curves, objects, planner and per-scene metrics of ``model`` on ``frames``."""
    overall = seg.SegmentationAccumulator()
    curves = seg.PRAccumulator(seg.pr_thresholds(settings.pr_thresholds))
    objects = objects_mod.ObjectAccumulator(settings.objects)
    planner = planner_mod.PlannerAccumulator(settings.planner)
    tally = statistics.SliceTally(settings.slices, settings.calibration_bins, settings.objects.band_edges)
    per_log: dict[str, tuple[seg.SegmentationAccumulator, objects_mod.ObjectAccumulator]] = {}
    cities: dict[str, str] = {}
    for i, frame in enumerate(frames):
        logits = predict(model, frame.points, device)
        predicted = logits.argmax(axis=1)
        overall.update(frame.labels, predicted)
        scores = seg.softmax(logits)
        curves.update(frame.labels, scores)
        matched = objects_mod.match_frame(frame.points, frame.labels, predicted, frame.boxes, settings.objects)
        objects.update(matched)
        log_seg, log_objects = per_log.setdefault(
            frame.log_id, (seg.SegmentationAccumulator(), objects_mod.ObjectAccumulator(settings.objects)))
        log_seg.update(frame.labels, predicted)
        log_objects.update(matched)
        cities[frame.log_id] = frame.city
        decision = planner_mod.decide(frame.log_id, frame.frame_index, frame.points, frame.labels, predicted,
                                      frame.speed, settings.planner)
        planner.update(decision)
        tally.update(frame, predicted, scores, matched, decision)
        if (i + 1) % 25 == 0:
            say(f"  scored {i + 1}/{len(frames)} frames")
    system = planner.summary()
    scenes = {}
    for log, (log_seg, log_objects) in sorted(per_log.items()):
        summary = log_seg.summary()
        object_summary = log_objects.summary()
        scenes[log] = {
            "city": cities[log], "frames": summary["frames"], "points": summary["points"], "miou": summary["miou"],
            "accuracy": summary["accuracy"],
            # per-class IoU of the classes present in the scene (those its mIoU averages)
            "iou": {name: m["iou"] if m["points"] else None for name, m in summary["classes"].items()},
            "object_recall": {name: m["recall"] for name, m in object_summary.items()},
            **{k: system["scenes"][log][k] for k in ("missed_brakes", "false_brakes", "truth_brakes")},
        }
    segmentation = overall.summary()
    return {"segmentation": segmentation, "pr_curves": curves.curves(), "objects": objects.summary(),
            "planner": system, "scenes": scenes, "classes": list(CLASSES), "settings": settings.as_dict(),
            "tallies": tally.as_dict()}


def worst_scenes(scenes: dict[str, dict[str, Any]], count: int) -> list[str]:
    """The ``count`` logs with the lowest mIoU (ties: more missed brakes first, then log id), and never
    more than half of the scenes: "worst" must single some out, or up-weighting them means nothing."""
    scored = [(s["miou"], -s["missed_brakes"], log) for log, s in scenes.items() if s["miou"] is not None]
    return [log for _miou, _missed, log in sorted(scored)[:max(0, min(count, len(scored) // 2))]]
