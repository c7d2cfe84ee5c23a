"""evaluation.hardware: every variant timed and checked against eager, the exported variant made with the
serving export spec and kept for the serve stage, and the fallback when AOTInductor fails. Timings are
never asserted. (Latency statistics and the MAC count are tested with serving.artifacts.)"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from evaluation import hardware
from pipeline.contracts import CompiledProgram
from serving import artifacts


class PointLinear(nn.Module):
    """The model contract at its smallest: one linear layer from each point's 4 values to 8 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.linear(points) * valid.unsqueeze(-1).to(points.dtype)


# The serving export spec's upper bound in these tests (serve.max_points).
MAX_POINTS = 1000


def frames(sizes=(300, 500)):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]


def test_every_variant_is_timed_and_agrees_with_eager(tmp_path):
    model = PointLinear().eval()
    script = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(script))
    messages = []
    result = hardware.measure(model, str(script), frames(), runs=3, warmup=1, device=torch.device("cpu"),
                              aot_inductor=False, max_points=MAX_POINTS, compiled_dir=str(tmp_path / "compiled"),
                              say=messages.append)
    assert set(result["variants"]) == {"eager", "torchscript", "exported"}
    for name, v in result["variants"].items():
        assert v["runs"] == 3 and len(v["samples_ms"]) == 3
        assert v["min_ms"] <= v["p50_ms"] <= v["p90_ms"] <= v["p99_ms"] <= v["max_ms"]
        assert v["max_abs_diff_vs_eager"] < 1e-5, name
        assert v["peak_memory_mb"] is not None
    assert "AOTInductor switched off" in result["variants"]["exported"]["note"]
    assert result["parameters"] == 4 * 8 + 8 and result["macs"] == 300 * 4 * 8
    assert result["points_per_frame"] == [300, 500]


def test_a_failing_aot_inductor_falls_back_to_the_exported_program(tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    messages = []
    result = hardware.measure(PointLinear().eval(), None, frames(), runs=2, warmup=0, device=torch.device("cpu"),
                              aot_inductor=True, max_points=MAX_POINTS, compiled_dir=str(tmp_path), say=messages.append)
    exported = result["variants"]["exported"]
    assert "AOTInductor failed (RuntimeError: no C++ compiler here)" in exported["note"]
    assert exported["max_abs_diff_vs_eager"] < 1e-5
    assert "torchscript" not in result["variants"] and any("no model.ts" in n for n in result["notes"])


@pytest.mark.slow
def test_aot_inductor_package_runs_and_matches_eager(tmp_path):
    result = hardware.measure(PointLinear().eval(), None, frames(), runs=2, warmup=1, device=torch.device("cpu"),
                              aot_inductor=True, max_points=MAX_POINTS, compiled_dir=str(tmp_path), say=lambda _m: None)
    assert "aot_inductor" in result["variants"], result["variants"].keys()
    assert result["variants"]["aot_inductor"]["max_abs_diff_vs_eager"] < 1e-5
    record = json.loads((tmp_path / CompiledProgram.FILE).read_text())
    assert record["format"] == "aoti" and record["compile_seconds"] > 0
    assert record["sha256"] == hashlib.sha256((tmp_path / artifacts.COMPILED_PT2).read_bytes()).hexdigest()


def test_matmul_peak_is_a_positive_rate():
    assert hardware.matmul_peak_gflops(size=64, repeats=2) > 0


def test_cuda_requested_without_a_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA device"):
        hardware.pick_device("cuda")
    assert hardware.pick_device("auto").type == "cpu"


def test_the_exported_variant_is_the_serving_program_and_is_kept_with_its_record(tmp_path):
    model = PointLinear().eval()
    compiled = tmp_path / "compiled"
    hardware.measure(model, None, frames(), runs=1, warmup=0, device=torch.device("cpu"), aot_inductor=False,
                     max_points=MAX_POINTS, compiled_dir=str(compiled), say=lambda _m: None)
    record = json.loads((compiled / CompiledProgram.FILE).read_text())
    pt2 = compiled / artifacts.COMPILED_PT2
    assert record["sha256"] == hashlib.sha256(pt2.read_bytes()).hexdigest()
    assert record["format"] == "exported_program" and record["aoti_error"] == "skipped: evaluate.aot_inductor is false"
    assert record["export_spec"] == {"num_points": [1, MAX_POINTS], "batch": 1} and record["device"] == "cpu"
    # The saved program's own constraints: the point count ranges over the serving spec, 1..max_points.
    program = torch.export.load(str(pt2))
    ranges = {(int(r.lower), int(r.upper)) for r in program.range_constraints.values()}
    assert ranges == {(1, MAX_POINTS)}
    module = program.module()
    one = artifacts.frame_inputs(np.ones((1, 4), np.float32))
    assert torch.allclose(module(*one), model(*one))
    with pytest.raises(Exception):  # the program's input guard refuses more than max_points
        module(*artifacts.frame_inputs(np.ones((MAX_POINTS + 1, 4), np.float32)))


def test_a_frame_beyond_the_serving_limit_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"latency frame 1 has 500 points.*1 to 400 \(serve.max_points\)"):
        hardware.measure(PointLinear().eval(), None, frames(), runs=1, warmup=0, device=torch.device("cpu"),
                         aot_inductor=False, max_points=400, compiled_dir=str(tmp_path), say=lambda _m: None)
