"""Fixtures for the serving tests: small real models registered as artifacts, and packages built from
them by the real stage entry (no training: a seeded ``build_model`` is a model like any other)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pipeline.contracts import EvaluationMetrics, ModelSpec

# A 64 x 64-cell grid and narrow layers: the same code paths as the default model, a fraction of the work.
SMALL_MODEL = {"x_range_m": [-12.8, 12.8], "y_range_m": [-12.8, 12.8], "cell_size_m": 0.4,
               "point_channels": [16], "backbone_channels": [16, 32], "neck_channels": 16, "head_channels": 16}
EXAMPLE_POINTS = 2000


def register_model(registry, seed: int = 0, blessed: bool | None = True, with_metrics: bool = True,
                   reasons: tuple[str, ...] = (), dataset=None):
    """A dataset record (unless ``dataset`` is given), a model artifact laid out like the train stage's
    (model.pt, model.json, model.ts, metrics.json) with weights from ``seed``, its blessing, and an
    evaluation metrics artifact."""
    from tests.evaluation.builders import train_metrics
    from training.checkpoint import save_torchscript
    from training.models import build_model, config_to_dict

    dataset = dataset or registry.build("dataset", "fleet-lidar", entry_point="tests", config={},
                                        builder=lambda staging, record: None)

    def write_model(staging, record):
        torch.manual_seed(seed)
        model = build_model("bev_segnet", SMALL_MODEL).eval()
        torch.save(model.state_dict(), os.path.join(staging, "model.pt"))
        ModelSpec.for_model("bev_segnet", config_to_dict(model.config)).save_to(staging)
        example = (torch.rand(1, 64, 4) * 10, torch.ones(1, 64, dtype=torch.bool))
        save_torchscript(model, os.path.join(staging, "model.ts"), {"run_id": f"train-{seed}"}, example)
        train_metrics(dataset.ref).save_to(staging)
        return {"run_id": f"train-{seed}"}

    model = registry.build("model", "bev_segnet", entry_point="tests", config={"seed": seed},
                           builder=write_model, parents=[dataset])
    if blessed is not None:
        model = registry.set_blessing(model.id, blessed, reasons)
    metrics = None
    if with_metrics:
        def write_metrics(staging, record):
            evaluation_metrics(model.ref, dataset.ref, record.ref, blessed=bool(blessed)).save_to(staging)

        metrics = registry.build("metrics", "bev_segnet", entry_point="tests", config={"seed": seed},
                                 builder=write_metrics, parents=[model, dataset])
    return model, metrics


def evaluation_metrics(model: str, dataset: str, ref: str, blessed: bool = True, miou: float = 0.41) -> EvaluationMetrics:
    """An evaluate stage ``metrics.json`` with small headline numbers and a matrix (which packages leave out)."""
    classes = {"ground": {"iou": 0.9, "recall": 0.95}, "vehicle": {"iou": 0.5, "recall": 0.6}}
    return EvaluationMetrics(
        model=model, model_name="bev_segnet", dataset=dataset, split="test", metrics_ref=ref, created_at="now",
        host="test", code_version="", settings_key="", thresholds={"min_miou": 0.3},
        candidate={"segmentation": {"miou": miou, "accuracy": 0.9, "frames": 4, "classes": classes,
                                    "confusion": [[1] * 8] * 8},
                   "planner": {"missed_brakes": 1, "false_brakes": 2, "events": [{"x": 1}]},
                   "hardware": {"macs": 123, "variants": {"torchscript": {"p50_ms": 12.0, "p99_ms": 15.0,
                                                                          "samples_ms": [1.0] * 40}}}},
        baseline_model=None, baseline_source=None, baseline=None,
        verdict={"blessed": blessed, "reasons": ["all checks passed"], "checks": []}, worst_scenes=[],
        feedback={"weights": {}, "file": "feedback/sample_weights.json"})


def serve_config(home: str, **serve):
    """A pipeline config on ``home`` with small, fast packaging settings (``serve`` overrides them)."""
    from pipeline import config

    values = {"home": home, "serve.example_points": EXAMPLE_POINTS, "serve.latency_runs": 3,
              "serve.aot_inductor": False, "serve.onnx": False, "serve.max_points": 50_000}
    values.update({f"serve.{k}": v for k, v in serve.items()})
    return config.load(values, env={})


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One blessed model packaged by the serve stage (ExportedProgram .pt2: no C++ compile; with ONNX),
    shared by the read-only tests; returns (cfg, registry, model artifact, stage result)."""
    from pipeline.registry import Registry
    from serving.entry import run

    home = str(tmp_path_factory.mktemp("serving") / "home")
    cfg = serve_config(home, onnx=True)
    registry = Registry.open(cfg)
    model, _metrics = register_model(registry, seed=0)
    result = run(cfg, registry, say=lambda m: None, run_id="test-run", model=model.ref)
    return cfg, registry, model, result


@pytest.fixture
def package_copy(served, tmp_path):
    """A private copy of the shared package folder that a test may tamper with."""
    target = tmp_path / os.path.basename(served[3]["location"])
    shutil.copytree(served[3]["location"], target)
    return str(target)


@pytest.fixture(scope="session")
def aoti_served(tmp_path_factory):
    """A blessed model packaged with AOTInductor (a C++ compile: use from slow tests only)."""
    from pipeline.registry import Registry
    from serving.entry import run

    home = str(tmp_path_factory.mktemp("serving-aoti") / "home")
    cfg = serve_config(home, aot_inductor=True)
    registry = Registry.open(cfg)
    model, _metrics = register_model(registry, seed=3)
    result = run(cfg, registry, say=lambda m: None, run_id="aoti-run", model=model.ref)
    return cfg, registry, model, result
