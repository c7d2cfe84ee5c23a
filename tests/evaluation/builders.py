"""Test builders: a tiny simulated dataset and tiny trained models, registered the way the real stages do.

* ``register_sim_dataset``: a few short simulated drive logs (the fleet simulator at low resolution, so a
  frame has ~2k points with real streets, cars in the ego lane, pedestrians and ground-truth boxes),
  written as ingest writes them (``encode_frame`` -> ``write_row_group`` -> ``write_petastorm_metadata`` + manifest).
* ``register_model``: a small ``bev_segnet`` trained in this process for a few steps, published as a
  ``model`` artifact with the training stage's files (``model.pt``, ``model.json``, ``model.ts``,
  ``metrics.json``) and the dataset as its parent.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.config import SimulateConfig
from pipeline.contracts import ModelSpec, TrainMetrics
from tests.manifests import make_manifest

# Simulated sensor small enough to keep frames light (16 beams x 256 columns).
SIM = SimulateConfig(logs=7, frames=3, beams=16, azimuth_steps=256, days=2, seed=3)
SPLITS = {"train": 4, "val": 1, "test": 2}  # logs per split, in fleet order
TINY_MODEL = {"x_range_m": [-51.2, 51.2], "y_range_m": [-51.2, 51.2], "cell_size_m": 1.6, "point_channels": [16],
              "backbone_channels": [16, 24], "neck_channels": 16, "head_channels": 16}


def simulated_logs(sim: SimulateConfig = SIM) -> list[tuple[str, str, list]]:
    """``(log_id, city, frames)`` of every simulated log."""
    from spark_jobs.simulator import fleet_plan, simulate_log

    return [(meta.log_id, meta.city, list(simulate_log(meta, sim))) for meta in fleet_plan(sim)]


def write_dataset(location: str, logs: list[tuple[str, str, list]], splits: dict[str, int] = SPLITS) -> dict:
    """One row group per log, Petastorm metadata per split and a ``manifest.json`` like ingest's."""
    from spark_jobs.ingest import write_petastorm_metadata
    from spark_jobs.rows import encode_frame, write_row_group

    split_info, logs_info = {}, {}
    start = 0
    for split, count in splits.items():
        chosen = logs[start:start + count]
        start += count
        os.makedirs(os.path.join(location, split), exist_ok=True)
        for g, (log_id, city, frames) in enumerate(chosen):
            name = f"{split}/part-{g:05d}.parquet"
            write_row_group(os.path.join(location, name), [encode_frame(f, city, 1.0) for f in frames])
            labels = np.concatenate([f.labels for f in frames])
            values, counts = np.unique(labels, return_counts=True)
            logs_info[log_id] = {"log_id": log_id, "split": split, "city": city, "frames": len(frames),
                                        "points": int(len(labels)),
                                        "class_points": {str(int(v)): int(c) for v, c in zip(values, counts)}}
        if chosen:
            write_petastorm_metadata(os.path.join(location, split))
        split_info[split] = {"logs": [c[0] for c in chosen], "frames": sum(len(c[2]) for c in chosen),
                             "points": sum(logs_info[c[0]]["points"] for c in chosen),
                             "row_groups": [len(c[2]) for c in chosen]}
    manifest = make_manifest("test", split_info, logs_info, source="sim")
    manifest.save_to(location)
    return manifest


def register_sim_dataset(registry, logs, name: str = "fleet-lidar"):
    """The simulated logs as a validated dataset artifact."""
    art = registry.build("dataset", name, entry_point="tests.evaluation.builders:register_sim_dataset",
                         config={"sim": SIM.__dict__, "splits": SPLITS},
                         builder=lambda staging, _rec: write_dataset(staging, logs) and None)
    return registry.update_meta(art.id, validation="passed")


def train_tiny(frames: list, steps: int, seed: int = 0, points_per_frame: int = 1500) -> torch.nn.Module:
    """A tiny ``bev_segnet`` trained for ``steps`` Adam steps on ``frames`` (points subsampled)."""
    from pipeline.taxonomy import IGNORE
    from training.models import build_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("bev_segnet", TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        batch = [frames[(2 * step + k) % len(frames)] for k in range(2)]
        picks = [rng.choice(len(f.points), size=min(points_per_frame, len(f.points)), replace=False) for f in batch]
        points = torch.from_numpy(np.stack([f.points[p] for f, p in zip(batch, picks)]))
        labels = torch.from_numpy(np.stack([f.labels[p].astype(np.int64) for f, p in zip(batch, picks)]))
        logits = model(points, torch.ones(points.shape[:2], dtype=torch.bool))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_metrics(dataset: str, loss: float = 1.0, val_miou: float = 0.4) -> TrainMetrics:
    """A training ``metrics.json`` for a model made in a test: one epoch's headline numbers."""
    return TrainMetrics(model="bev_segnet", dataset=dataset, epochs=[{"epoch": 0, "loss": loss, "val_miou": val_miou}],
                        final={"loss": loss, "val_miou": val_miou, "val_iou": None, "global_step": 1},
                        first_epoch_loss=2 * loss, majority_baseline=None, class_weights={}, train_class_points={},
                        samples_per_s=None, data_wait_fraction=None, parameters_sha256="", state_sha256="",
                        backend="ddp", world=1)


def register_model(registry, dataset, model: torch.nn.Module, tag: str):
    """Publish ``model`` as ``model:bev_segnet@vN`` with the training stage's files; ``tag`` keys it."""
    from training.models import config_to_dict

    def write(staging: str, _record) -> None:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(staging, "model.pt"))
        ModelSpec.for_model("bev_segnet", config_to_dict(model.config)).save_to(staging)
        torch.jit.save(torch.jit.script(model), os.path.join(staging, "model.ts"))
        train_metrics(dataset.ref).save_to(staging)

    return registry.build("model", "bev_segnet", entry_point="tests.evaluation.builders:register_model",
                          config={"tag": tag}, builder=write, parents=[dataset])


def log_tally(ground: tuple[int, int], vehicle: tuple[int, int], pedestrian: tuple[int, int] = (100, 60),
              planner: tuple[int, int, int, int] = (20, 10, 2, 1), bins: int = 10) -> list[float]:
    """One log's tally vector (``evaluation.statistics.Layout``) from (points, correctly predicted points)
    per class - the misses predicted as ground, or as vehicle for ground - and the planner's (frames,
    needed brakes, missed, false brakes). Objects: one vehicle box per 20 vehicle points, found in
    proportion to the vehicle recall. Calibration: every point at confidence 0.75, so the ECE is
    |accuracy - 0.75|."""
    from evaluation.statistics import Layout
    from pipeline.taxonomy import CLASS_ID, NUM_CLASSES, OBJECT_CLASS_IDS

    layout = Layout(bins)
    vector = np.zeros(layout.size)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for name, (points, correct) in (("ground", ground), ("vehicle", vehicle), ("pedestrian", pedestrian)):
        c = CLASS_ID[name]
        confusion[c, c] = correct
        confusion[c, CLASS_ID["vehicle" if name == "ground" else "ground"]] = points - correct
    vector[layout.confusion] = confusion.ravel()
    total = confusion.sum()
    calibration = np.zeros((bins, 3))
    calibration[int(0.75 * bins)] = (total, np.trace(confusion), 0.75 * total)
    vector[layout.calibration] = calibration.ravel()
    objects = np.zeros((len(OBJECT_CLASS_IDS), 4))
    boxes = vehicle[0] // 20
    found = round(boxes * vehicle[1] / max(vehicle[0], 1))
    objects[OBJECT_CLASS_IDS.index(CLASS_ID["vehicle"])] = (found, found, found, boxes)
    vector[layout.objects] = objects.ravel()
    vector[layout.planner] = planner
    return vector.tolist()


def tallies(logs: list[tuple[str, str, list[float]]], bins: int = 10) -> dict:
    """The ``tallies`` of a scored split (``SliceTally.as_dict``) from ``(log id, city, log_tally(...))``,
    with no slice dimension but the city: what ``statistics.describe`` and ``compare`` read."""
    return {"calibration_bins": bins, "logs": [log for log, _c, _v in logs], "cities": [c for _l, c, _v in logs],
            "dimensions": {"all": {"groups": ["all"], "counts": [[vector] for _l, _c, vector in logs]}}}


def fleet(change=None, seed: int = 0) -> dict:
    """Production-like ``{"tallies": ...}`` of 17 logs: four logs in each of atlanta, boston, chicago and
    dallas and one in "solo". ``change(index, city, parts)`` -> keyword overrides of ``log_tally`` makes a
    candidate scored on the same logs."""
    rng = np.random.default_rng(seed)
    logs = []
    for i, city in enumerate([c for c in ("atlanta", "boston", "chicago", "dallas") for _ in range(4)] + ["solo"]):
        parts = {"ground": (1000, int(rng.integers(880, 920))), "vehicle": (200, int(rng.integers(140, 160))),
                 "pedestrian": (100, int(rng.integers(55, 65))), "planner": (20, 10, 2, 1)}
        parts.update((change or (lambda _i, _c, _p: {}))(i, city, parts))
        logs.append((f"log-{i:02d}", city, log_tally(**parts)))
    return {"tallies": tallies(logs)}
