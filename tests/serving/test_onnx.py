"""serving/onnx_export.py: model.onnx in the package, checked with onnxruntime; an export that fails
is recorded and leaves a valid package without ONNX."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from serving.onnx_export import ONNX, export_onnx
from serving.package import compare_logits, verify_package
from serving.runtime import load
from tests.serving.conftest import register_model, serve_config


def test_the_package_carries_model_onnx_that_matches_eager(served):
    result = served[3]
    model = load(result["location"], runtime="onnx")
    onnx = model.metadata.runtimes["onnx"]
    assert onnx["file"] == ONNX and onnx["error"] is None and onnx["opset"] >= 18 and onnx["onnxruntime"]
    assert onnx["check"]["agrees"] and onnx["check"]["max_abs_diff"] <= onnx["check"]["tolerance"]
    assert ONNX in verify_package(result["location"])["files"]
    assert "onnx_latency_ms" in model.metadata.performance
    # Parity, independently of the recorded check: the packaged eager logits and another cloud.
    points, expected = model.example()
    spec = model.metadata.example["expected_logits"]
    eager = np.fromfile(os.path.join(result["location"], spec["file"]), "<f4").reshape(spec["shape"])
    assert compare_logits(eager, model.predict_logits(points))["agrees"]
    assert np.array_equal(model.predict(points), expected)
    other = points[:777] * np.float32(0.5)
    torchscript = load(result["location"])
    assert compare_logits(torchscript.predict_logits(other), model.predict_logits(other))["agrees"]


class Unexportable(torch.nn.Module):
    """A model using an operator the ONNX exporter has no translation for (``nextafter``)."""

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.nextafter(points, points + 1) * valid.unsqueeze(-1)


def test_an_operator_onnx_cannot_express_is_named_and_no_file_is_left(tmp_path):
    model = Unexportable().eval()
    example = (torch.rand(1, 16, 4), torch.ones(1, 16, dtype=torch.bool))
    exported = torch.export.export(model, example)
    path = str(tmp_path / ONNX)
    info = export_onnx(exported, path, example, model(*example)[0].numpy())
    assert info["file"] is None and info["check"] is None and not os.path.exists(path)
    assert info["error"].startswith("export failed: ") and "nextafter" in info["error"]


@pytest.mark.slow
def test_a_failed_export_leaves_a_valid_package_without_onnx(tmp_path, monkeypatch):
    """The stage with the exporter failing (the error the unit test above gets from the real exporter):
    the package is published, verified and served without model.onnx, and metadata.json says why."""
    from torch.onnx._internal.exporter._errors import ConversionError

    from pipeline.registry import Registry
    from serving.entry import run

    def failing_export(*_args, **_kwargs):
        raise ConversionError("No ONNX function found for <OpOverload(op='aten.scatter_reduce', overload='two')>")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    cfg = serve_config(str(tmp_path / "home"), onnx=True, example_points=300, latency_runs=1)
    registry = Registry.open(cfg)
    model, _ = register_model(registry, seed=2)
    result = run(cfg, registry, say=lambda m: None, model=model.ref)
    assert ONNX not in verify_package(result["location"])["files"]
    served = load(result["location"], runtime="auto")
    onnx = served.metadata.runtimes["onnx"]
    assert onnx["file"] is None and "aten.scatter_reduce" in onnx["error"]
    assert served.runtime in ("torchscript", "pt2") and "onnx" not in served.runtime_choice["candidates"]
    points, expected = served.example()
    assert np.array_equal(served.predict(points), expected)
    with pytest.raises(Exception, match="no verified model.onnx"):
        load(result["location"], runtime="onnx")
