"""serving/package.py and serving/runtime.py: the package round trip, and every way of tampering with it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from serving.package import (
    MANIFEST,
    PackageError,
    make_tarball,
    read_manifest,
    synthetic_scan,
    verify_package,
    write_manifest,
)
from serving.runtime import InvalidInput, load


def eager_model(model_artifact):
    """The trained model rebuilt from its artifact's files, independently of the package code."""
    from training.models import build_model

    with open(os.path.join(model_artifact.location, "model.json")) as fh:
        spec = json.load(fh)
    model = build_model(spec["model"], spec["options"])
    model.load_state_dict(torch.load(os.path.join(model_artifact.location, "model.pt"), weights_only=True))
    return model.eval()


# ----------------------------------------------------------------------------------------- round trip
def test_round_trip_loads_verifies_and_predicts_like_the_model(served):
    _cfg, _registry, model_art, result = served
    package = load(result["location"])
    points, expected = package.example()
    assert points.shape == (2000, 4) and expected.shape == (2000,)
    assert np.array_equal(package.predict(points), expected)

    # A cloud the packager never saw: the package and the eager model agree point by point.
    cloud = synthetic_scan(3000, seed=7, x_range=(-12.8, 12.8), y_range=(-12.8, 12.8))
    with torch.no_grad():
        logits = eager_model(model_art)(torch.from_numpy(cloud)[None], torch.ones(1, 3000, dtype=torch.bool))[0]
    np.testing.assert_allclose(package.predict_logits(cloud), logits.numpy(), atol=1e-4)
    assert np.array_equal(package.predict(cloud), logits.argmax(-1).numpy())
    assert package.predict(cloud).dtype == np.int64


def test_metadata_carries_provenance_evaluation_and_input_spec(served):
    _cfg, registry, model_art, result = served
    meta = load(result["location"]).metadata
    assert meta.package["ref"] == result["ref"] == "package:bev_segnet@v1"
    assert meta.model["ref"] == model_art.ref and meta.model["version"] == model_art.version
    assert meta.model["training_run_id"] == "train-0"
    assert meta.dataset["ref"] == "dataset:fleet-lidar@v1"
    prov = meta.provenance
    assert prov["run_id"] == "test-run" and prov["user"] and len(prov["git_sha"]) >= 7 and "diff_hash" in prov
    evaluation = meta.evaluation
    assert evaluation["verdict"] == "blessed" and evaluation["metrics_ref"] == "metrics:bev_segnet@v1"
    assert evaluation["summary"]["miou"] == 0.41 and evaluation["summary"]["class_iou"]["vehicle"] == 0.5
    assert "confusion" not in evaluation["summary"]  # matrices stay in the evaluation report
    perf = meta.performance
    assert perf["macs"] > 0 and perf["parameters"] > 0
    assert perf["torchscript_latency_ms"]["p50"] > 0 and perf["pt2_latency_ms"]["runs"] == 3
    assert meta.class_map["5"] == "vehicle" and len(meta.classes) == 8
    assert meta.input["points"]["shape"] == ["N", 4] and meta.input["max_points"] == 50_000
    pt2 = meta.runtimes["pt2"]
    assert pt2["dynamic_shapes"] == {"num_points": [1, 50_000]} and pt2["batch"] == 1
    assert pt2["compiled_by"] == "serve" and pt2["aoti_error"] == "skipped: serve.aot_inductor is false"
    assert meta.preprocessing["bev_grid"]["cell_size_m"] == 0.4
    assert meta.example["input"]["shape"] == [2000, 4] and meta.example["expected_classes"]["dtype"] == "int64"
    for pair in ("torchscript_vs_eager", "pt2_vs_eager", "pt2_vs_torchscript"):
        assert meta.agreement[pair]["agrees"] and meta.agreement[pair]["class_match_rate"] == 1.0
    # The TorchScript file carries provenance of its own.
    extra = {"metadata.json": ""}
    torch.jit.load(os.path.join(result["location"], "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["package"] == result["ref"]


def test_raw_example_files_match_their_declared_shapes(served):
    folder = served[3]["location"]
    meta = json.loads(open(os.path.join(folder, "metadata.json")).read())
    example = meta["example"]
    n, k = example["num_points"], example["num_classes"]
    assert os.path.getsize(os.path.join(folder, "example_input.bin")) == n * 4 * 4
    assert os.path.getsize(os.path.join(folder, "expected_output.bin")) == n * 8
    assert os.path.getsize(os.path.join(folder, "expected_logits.bin")) == n * k * 4
    logits = np.fromfile(os.path.join(folder, "expected_logits.bin"), dtype="<f4").reshape(n, k)
    assert np.array_equal(logits.argmax(-1), np.fromfile(os.path.join(folder, "expected_output.bin"), dtype="<i8"))


def test_both_runtimes_and_the_tarball_give_the_same_classes(served):
    result = served[3]
    points, expected = load(result["location"]).example()
    assert np.array_equal(load(result["location"], runtime="pt2").predict(points), expected)
    with load(result["tarball"]) as from_tarball:
        extracted = from_tarball.folder
        assert np.array_equal(from_tarball.predict(points), expected)
    assert not os.path.exists(extracted)  # the temporary extraction is removed on close


def test_manifest_is_sha256sum_format_and_lists_every_file(served):
    folder = served[3]["location"]
    entries, _digest = read_manifest(folder)
    assert sorted(entries) == sorted(n for n in os.listdir(folder) if n != MANIFEST)
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "--strict", "-c", MANIFEST], cwd=folder, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_tarball_is_reproducible(served, tmp_path):
    folder = served[3]["location"]
    first = make_tarball(folder, str(tmp_path / "a.tar.gz"))
    second = make_tarball(folder, str(tmp_path / "b.tar.gz"))
    assert first == second


@pytest.mark.slow
def test_serve_ships_the_program_the_evaluation_compiled_and_timed(tmp_path):
    """The evaluate stage's AOTInductor model.pt2 (kept with its metrics) is what the package carries:
    the same bytes, not a second compile; serve alone (the aoti_served fixture) compiles its own."""
    from evaluation import hardware
    from pipeline.contracts import CompiledProgram
    from pipeline.registry import Registry
    from serving import artifacts
    from serving.entry import run
    from tests.serving.conftest import evaluation_metrics, register_model, serve_config

    cfg = serve_config(str(tmp_path / "home"), aot_inductor=True)
    registry = Registry.open(cfg)
    model, _ = register_model(registry, seed=4, with_metrics=False)
    frames = [synthetic_scan(n, seed, (-12.8, 12.8), (-12.8, 12.8)) for n, seed in ((1500, 1), (2500, 2))]

    def evaluate(staging, record):
        net, _spec = artifacts.load_model(model.location)
        measured = hardware.measure(net, os.path.join(model.location, "model.ts"), frames, runs=2, warmup=1,
                                    device=torch.device("cpu"), aot_inductor=True, max_points=cfg.serve.max_points,
                                    compiled_dir=os.path.join(staging, artifacts.COMPILED_DIR), say=lambda _m: None)
        metrics = evaluation_metrics(model.ref, registry.parents(model.id)[0].ref, record.ref)
        replace(metrics, candidate={**metrics.candidate, "hardware": measured}).save_to(staging)

    metrics = registry.build("metrics", "bev_segnet", entry_point="tests", config={"seed": 4}, builder=evaluate,
                             parents=[model])
    messages = []
    result = run(cfg, registry, say=messages.append, model=model.ref)
    compiled = os.path.join(metrics.location, artifacts.COMPILED_DIR)
    evaluated = open(os.path.join(compiled, artifacts.COMPILED_PT2), "rb").read()
    shipped = open(os.path.join(result["location"], "model.pt2"), "rb").read()
    assert shipped == evaluated
    record = json.loads(open(os.path.join(compiled, CompiledProgram.FILE)).read())
    assert record["sha256"] == hashlib.sha256(shipped).hexdigest()
    assert any("reused the evaluation's AOTInductor model.pt2" in m for m in messages)
    package = load(result["location"], runtime="pt2")
    pt2 = package.metadata.runtimes["pt2"]
    assert pt2["format"] == "aoti" and pt2["compiled_by"] == "evaluate"
    assert pt2["compile_seconds"] == record["compile_seconds"] and pt2["dynamic_shapes"] == {"num_points": [1, 50_000]}
    points, expected = package.example()
    assert np.array_equal(package.predict(points), expected)
    with torch.no_grad():
        logits = eager_model(model)(torch.from_numpy(frames[1])[None], torch.ones(1, 2500, dtype=torch.bool))[0]
    np.testing.assert_allclose(package.predict_logits(frames[1]), logits.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------------- tampering
def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _refused(folder: str, *fragments: str) -> str:
    with pytest.raises(PackageError) as info:
        load(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_modified_byte_of_model_ts_is_refused(package_copy):
    _flip_byte(os.path.join(package_copy, "model.ts"), os.path.getsize(os.path.join(package_copy, "model.ts")) // 2)
    _refused(package_copy, "model.ts", "checksum mismatch")


def test_a_modified_byte_of_the_example_is_refused(package_copy):
    _flip_byte(os.path.join(package_copy, "expected_output.bin"), 0)
    _refused(package_copy, "expected_output.bin", "checksum mismatch")


def test_an_added_file_is_refused(package_copy):
    with open(os.path.join(package_copy, "extra.py"), "w") as fh:
        fh.write("print('hello')\n")
    _refused(package_copy, "extra.py", "not listed")


def test_an_added_file_in_a_subfolder_is_refused(package_copy):
    os.makedirs(os.path.join(package_copy, "sub"))
    with open(os.path.join(package_copy, "sub", "x.bin"), "wb") as fh:
        fh.write(b"x")
    _refused(package_copy, "sub/x.bin", "not listed")


def test_a_deleted_file_is_refused(package_copy):
    os.remove(os.path.join(package_copy, "model.pt2"))
    _refused(package_copy, "model.pt2", "missing")


def test_a_missing_manifest_is_refused(package_copy):
    os.remove(os.path.join(package_copy, MANIFEST))
    _refused(package_copy, MANIFEST, "missing")


@pytest.mark.parametrize("name", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd", "./model.ts",
                                  "a//b", "c:\\x", "..\\x"])
def test_a_manifest_entry_escaping_the_folder_is_refused(package_copy, tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"secret")
    with open(os.path.join(package_copy, MANIFEST), "a") as fh:
        fh.write(f"{'0' * 64}  {name}\n")
    _refused(package_copy, repr(name), "not a plain relative path")


def test_a_symlink_is_refused_even_when_listed(package_copy, tmp_path):
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"data")
    os.symlink(target, os.path.join(package_copy, "link.bin"))
    with pytest.raises(PackageError, match="link.bin: is a symbolic link"):
        write_manifest(package_copy)  # the packager refuses to list it...
    with open(os.path.join(package_copy, MANIFEST), "a") as fh:  # ...and a hand-written entry is refused too
        fh.write(f"{'0' * 64}  link.bin\n")
    _refused(package_copy, "link.bin")


def test_a_malformed_manifest_line_is_refused(package_copy):
    lines = len(read_manifest(package_copy)[0])
    with open(os.path.join(package_copy, MANIFEST), "a") as fh:
        fh.write("not a checksum line\n")
    _refused(package_copy, MANIFEST, f"line {lines + 1}")


def test_a_consistently_rewritten_package_is_caught_by_the_registry_digest(package_copy, served):
    _flip_byte(os.path.join(package_copy, "model.ts"), 100)
    new_digest = write_manifest(package_copy)  # an attacker who also rewrites the manifest...
    assert verify_package(package_copy)["manifest_sha256"] == new_digest  # ...passes the folder check alone,
    recorded = served[3]["manifest_sha256"]
    with pytest.raises(PackageError, match="differs from the registry's record"):
        load(package_copy, expected_manifest_sha256=recorded)  # but not the registry's digest.


def test_a_tarball_with_an_escaping_member_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("pkg/../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(PackageError, match="not a plain relative path"):
        load(str(evil))
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_a_tarball_with_a_link_is_refused(tmp_path):
    evil = tmp_path / "link.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("pkg/model.ts")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(PackageError, match="link or special file"):
        load(str(evil))


def test_a_path_that_is_not_a_package_is_refused(tmp_path):
    with pytest.raises(PackageError, match="no such package"):
        load(str(tmp_path / "nothing"))
    with pytest.raises(PackageError, match="MANIFEST.sha256: missing"):
        load(str(tmp_path))


# ----------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("points, fragment", [
    (np.zeros((5, 3), np.float32), "shape (N, 4)"),
    (np.zeros((2, 5, 4), np.float32), "shape (N, 4)"),
    (np.array([["a", "b", "c", "d"]]), "must be numbers"),
    (np.array([[np.nan, 0, 0, 0]], np.float32), "NaN or inf"),
    (np.array([[0, np.inf, 0, 0]], np.float32), "NaN or inf"),
    (np.array([[1e39, 0, 0, 0]], np.float64), "NaN or inf"),  # finite in float64, inf as float32
])
def test_bad_points_are_refused_with_a_clear_message(served, points, fragment):
    package = load(served[3]["location"])
    with pytest.raises(InvalidInput, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        package.predict(points)


def test_too_many_points_is_a_413(served):
    package = load(served[3]["location"])
    with pytest.raises(InvalidInput) as info:
        package.predict(np.zeros((50_001, 4), np.float32))
    assert info.value.status == 413


def test_an_empty_cloud_gives_no_classes_and_float64_input_is_accepted(served):
    package = load(served[3]["location"])
    assert package.predict(np.zeros((0, 4), np.float32)).shape == (0,)
    points, expected = package.example()
    assert np.array_equal(package.predict(points.astype(np.float64).tolist()), expected)


def test_self_check_passes_on_the_package_and_fails_on_a_wrong_runtime(served):
    package = load(served[3]["location"], runtime="torchscript")
    assert package.self_check()["agrees"]
    package._forwards.get()  # its one replica, replaced by a runtime gone wrong
    package._forwards.put(lambda points, valid: torch.zeros(1, points.shape[1], 8))
    with pytest.raises(PackageError, match="expected_logits.bin: the torchscript runtime"):
        package.self_check()
