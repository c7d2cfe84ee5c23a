"""evaluation.hardware: latency statistics, the FLOP/MAC count against a hand count, every variant timed
and checked against eager, and the fallback when AOTInductor fails. Timings are never asserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from evaluation import hardware


class PointLinear(nn.Module):
    """The model contract at its smallest: one linear layer from each point's 4 values to 8 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.linear(points) * valid.unsqueeze(-1).to(points.dtype)


def frames(sizes=(300, 500)):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]


def test_latency_stats_of_known_samples():
    stats = hardware.latency_stats([10.0, 20.0, 30.0, 40.0], points_per_call=1000)
    assert stats["min_ms"] == 10.0 and stats["p50_ms"] == 25.0 and stats["max_ms"] == 40.0 and stats["mean_ms"] == 25.0
    assert stats["p99_ms"] == pytest.approx(np.percentile([10, 20, 30, 40], 99))
    assert stats["jitter_ms"] == pytest.approx(stats["p99_ms"] - 25.0)
    assert stats["std_ms"] == pytest.approx(np.std([10, 20, 30, 40]))
    assert stats["frames_per_s"] == pytest.approx(40.0) and stats["points_per_s"] == pytest.approx(40_000.0)


def test_flop_counter_macs_equal_the_hand_count():
    model = PointLinear().eval()
    inputs = hardware.frame_inputs(frames((300,))[0], torch.device("cpu"))
    counted = hardware.count_flops(model, inputs)
    assert counted["macs"] == 300 * 4 * 8  # one multiply-add per weight per point (bias not counted)
    assert counted["flops"] == 2 * counted["macs"]
    assert counted["macs_per_stage"] == {"linear": 300 * 4 * 8}


def test_every_variant_is_timed_and_agrees_with_eager(tmp_path):
    model = PointLinear().eval()
    script = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(script))
    messages = []
    result = hardware.measure(model, str(script), frames(), runs=3, warmup=1, device=torch.device("cpu"),
                              aot_inductor=False, workdir=str(tmp_path / "work"), say=messages.append)
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
                              aot_inductor=True, workdir=str(tmp_path), say=messages.append)
    exported = result["variants"]["exported"]
    assert "AOTInductor failed (RuntimeError: no C++ compiler here)" in exported["note"]
    assert exported["max_abs_diff_vs_eager"] < 1e-5
    assert "torchscript" not in result["variants"] and any("no model.ts" in n for n in result["notes"])


@pytest.mark.slow
def test_aot_inductor_package_runs_and_matches_eager(tmp_path):
    result = hardware.measure(PointLinear().eval(), None, frames(), runs=2, warmup=1, device=torch.device("cpu"),
                              aot_inductor=True, workdir=str(tmp_path), say=lambda _m: None)
    assert "aot_inductor" in result["variants"], result["variants"].keys()
    assert result["variants"]["aot_inductor"]["max_abs_diff_vs_eager"] < 1e-5


def test_matmul_peak_is_a_positive_rate():
    assert hardware.matmul_peak_gflops(size=64, repeats=2) > 0


def test_cuda_requested_without_a_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA device"):
        hardware.pick_device("cuda")
    assert hardware.pick_device("auto").type == "cpu"
