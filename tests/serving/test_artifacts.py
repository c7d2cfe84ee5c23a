"""serving/artifacts.py: the model's deployable forms in one place - latency statistics and interleaved
timing, the FLOP/MAC count against a hand count, the model fingerprint, the one export spec, and when a
compiled model.pt2 may be reused. Timings are never asserted."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from pipeline.contracts import CompiledProgram
from serving import artifacts
from tests.evaluation.test_hardware import PointLinear  # the model contract at its smallest


def test_latency_stats_of_known_samples():
    stats = artifacts.latency_stats([10.0, 20.0, 30.0, 40.0], points_per_call=1000)
    assert stats["min_ms"] == 10.0 and stats["p50_ms"] == 25.0 and stats["max_ms"] == 40.0 and stats["mean_ms"] == 25.0
    assert stats["p99_ms"] == pytest.approx(np.percentile([10, 20, 30, 40], 99))
    assert stats["jitter_ms"] == pytest.approx(stats["p99_ms"] - 25.0)
    assert stats["std_ms"] == pytest.approx(np.std([10, 20, 30, 40]))
    assert stats["frames_per_s"] == pytest.approx(40.0) and stats["points_per_s"] == pytest.approx(40_000.0)


def test_timed_calls_are_interleaved_and_rotate_who_goes_first():
    calls = []

    def runner(name):
        return lambda points, valid: calls.append((name, int(points.shape[1])))

    inputs = [artifacts.frame_inputs(np.zeros((n, 4), np.float32)) for n in (3, 5)]
    samples = artifacts.time_interleaved({"a": runner("a"), "b": runner("b")}, inputs, 3, torch.device("cpu"))
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3}
    assert calls == [("a", 3), ("b", 3), ("b", 5), ("a", 5), ("a", 3), ("b", 3)]


def test_flop_counter_macs_equal_the_hand_count():
    model = PointLinear().eval()
    inputs = artifacts.frame_inputs(np.ones((300, 4), np.float32))
    assert inputs[0].shape == (1, 300, 4) and inputs[1].dtype == torch.bool and bool(inputs[1].all())
    counted = artifacts.count_flops(model, inputs)
    assert counted["macs"] == 300 * 4 * 8  # one multiply-add per weight per point (bias not counted)
    assert counted["flops"] == 2 * counted["macs"]
    assert counted["macs_per_stage"] == {"linear": 300 * 4 * 8}


def test_the_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    model = PointLinear()
    same = PointLinear()
    same.load_state_dict(model.state_dict())
    assert artifacts.model_fingerprint(model) == artifacts.model_fingerprint(same)
    with torch.no_grad():
        same.linear.bias[3] += 1e-6
    assert artifacts.model_fingerprint(model) != artifacts.model_fingerprint(same)


def test_the_export_spec_is_declared_once_and_checked():
    spec = artifacts.ExportSpec(1000)
    assert spec.as_dict() == {"num_points": [1, 1000], "batch": 1}
    with pytest.raises(ValueError, match="serve.max_points: 1 must be at least 2"):
        artifacts.ExportSpec(1)
    with pytest.raises(ValueError, match="the export example has 1001 points"):
        artifacts.export_program(PointLinear().eval(), artifacts.frame_inputs(np.ones((1001, 4), np.float32)), spec)


# ----------------------------------------------------------------------------------------- reuse
def compiled_folder(tmp_path, record, payload=b"an AOTInductor package", **info):
    """A compiled folder as the evaluate stage leaves it: model.pt2 and export.json."""
    folder = tmp_path / "compiled"
    folder.mkdir()
    (folder / artifacts.COMPILED_PT2).write_bytes(payload)
    artifacts.write_compiled_record(str(folder), record, {"format": "aoti", "aoti_error": None,
                                                          "compile_seconds": 12.5, **info})
    return folder


def test_a_matching_compiled_program_is_copied_and_checked(tmp_path):
    record = artifacts.compiled_record(PointLinear(), artifacts.ExportSpec(1000), "cpu")
    folder = compiled_folder(tmp_path, record)
    target = tmp_path / "package-model.pt2"
    info, why = artifacts.reuse_compiled(str(folder), record, str(target))
    assert info == {"format": "aoti", "aoti_error": None, "compile_seconds": 12.5}
    assert target.read_bytes() == b"an AOTInductor package"
    assert hashlib.sha256(b"an AOTInductor package").hexdigest()[:16] in why
    stored = json.loads((folder / CompiledProgram.FILE).read_text())
    assert stored["torch"] == torch.__version__ and stored["device"] == "cpu" and stored["cpu_isa"]


@pytest.mark.parametrize("change, reason", [
    ({"export_spec": {"num_points": [1, 999], "batch": 1}}, "another export spec"),
    ({"model_fingerprint": "0" * 64}, "another model fingerprint"),
    ({"torch": "0.0.0"}, "another torch"),
    ({"device": "cuda"}, "another device"),
])
def test_a_program_compiled_for_something_else_is_not_reused(tmp_path, change, reason):
    record = artifacts.compiled_record(PointLinear(), artifacts.ExportSpec(1000), "cpu")
    folder = compiled_folder(tmp_path, {**record, **change})
    target = tmp_path / "package-model.pt2"
    info, why = artifacts.reuse_compiled(str(folder), record, str(target))
    assert info is None and reason in why and not target.exists()


def test_a_modified_compiled_program_is_not_reused(tmp_path):
    record = artifacts.compiled_record(PointLinear(), artifacts.ExportSpec(1000), "cpu")
    folder = compiled_folder(tmp_path, record)
    (folder / artifacts.COMPILED_PT2).write_bytes(b"an AOTInductor packagf")
    target = tmp_path / "package-model.pt2"
    info, why = artifacts.reuse_compiled(str(folder), record, str(target))
    assert info is None and "SHA-256" in why and not target.exists()


def test_nothing_to_reuse_without_an_aot_inductor_compile(tmp_path):
    record = artifacts.compiled_record(PointLinear(), artifacts.ExportSpec(1000), "cpu")
    assert artifacts.reuse_compiled(None, record, str(tmp_path / "x"))[0] is None
    assert artifacts.reuse_compiled(str(tmp_path / "absent"), record, str(tmp_path / "x"))[0] is None
    folder = compiled_folder(tmp_path, record, format="exported_program")
    info, why = artifacts.reuse_compiled(str(folder), record, str(tmp_path / "x"))
    assert info is None and "did not compile with AOTInductor" in why and not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("damage", ["{not json", "without sha256"])
def test_an_unreadable_record_means_compiling_again(tmp_path, damage):
    record = artifacts.compiled_record(PointLinear(), artifacts.ExportSpec(1000), "cpu")
    folder = compiled_folder(tmp_path, record)
    path = folder / CompiledProgram.FILE
    if damage == "without sha256":
        stored = json.loads(path.read_text())
        del stored["sha256"]
        damage = json.dumps(stored)
    path.write_text(damage)
    info, why = artifacts.reuse_compiled(str(folder), record, str(tmp_path / "x"))
    assert info is None and "export.json is unreadable" in why and not os.path.exists(tmp_path / "x")
