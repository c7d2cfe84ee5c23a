"""The package's variants: ``model.ts`` is frozen TorchScript that equals eager on the example and on logged
frames (in Python and in the C++ consumer); the variant the evaluation chose is the package's default
runtime (``runtimes.default``) for ``serving.load``, ``avp serve-http`` and the C++ consumer; an int8 choice
ships the evaluation's int8 program; a choice the package cannot carry falls back to TorchScript."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pipeline.contracts import PackageMetadata
from serving import artifacts
from serving.package import compare_logits, default_runtime
from serving.runtime import load
from tests.serving.conftest import evaluation_metrics, register_model, serve_config

INT8_CHOICE = {"variant": "int8_pt2e", "runtime": "int8", "file": "model_int8.pt2", "fallback": False,
               "eligible": ["int8_pt2e"], "excluded": {}, "reason": "int8_pt2e (model_int8.pt2) is served: test"}


def logged_frames(count: int = 3) -> list[np.ndarray]:
    """Points of real simulated drive-log frames (the evaluation tests' small sensor)."""
    from tests.evaluation import builders

    return [f.points for _log, _city, frames in builders.simulated_logs()[-2:] for f in frames][:count]


def test_packaged_torchscript_is_frozen_and_equals_eager_on_the_example_and_logged_frames(served):
    _cfg, _registry, model_art, result = served
    packaged = torch.jit.load(os.path.join(result["location"], "model.ts"))
    assert list(packaged.named_parameters()) == []  # frozen: the weights are constants of the graph
    assert "prim::GetAttr" not in str(packaged.graph)
    eager, _spec = artifacts.load_model(model_art.location)
    metadata = PackageMetadata.load_from(result["location"])
    assert metadata.agreement["torchscript_vs_eager"]["agrees"]
    for points in logged_frames():
        inputs = artifacts.frame_inputs(points)
        with torch.inference_mode():
            comparison = compare_logits(eager(*inputs)[0].numpy(), packaged(*inputs)[0].numpy())
        assert comparison["agrees"] and comparison["class_match_rate"] == 1.0, comparison


def test_a_package_without_an_evaluation_choice_names_torchscript_and_python_serves_the_fastest(served):
    metadata = PackageMetadata.load_from(served[3]["location"])
    assert metadata.runtimes["default"]["serve_runtime"] == "torchscript"  # what the C++ consumer runs
    assert "no evaluation choice" in metadata.runtimes["default"]["reason"]
    assert metadata.runtimes["default"]["from_evaluation"] is False
    with load(served[3]["location"]) as model:  # auto without a choice: the fastest verified runtime here
        assert model.runtime_choice["how"].startswith("auto: the fastest on this host")
        assert model.runtime in model.runtime_choice["measured_p50_ms"]


def test_default_runtime_serves_the_choice_only_when_the_package_carries_it():
    pt2 = {**INT8_CHOICE, "variant": "aot_inductor", "runtime": "pt2", "file": "model.pt2", "reason": "fast"}
    built = {"torchscript": True, "pt2": True, "int8": False}
    assert default_runtime(pt2, built, "") == {"variant": "aot_inductor", "serve_runtime": "pt2", "file": "model.pt2",
                                               "reason": "chosen by the evaluation: fast", "from_evaluation": True}
    fallback = default_runtime(pt2, {**built, "pt2": False}, "")
    assert fallback["serve_runtime"] == "torchscript" and fallback["variant"] == "torchscript_frozen"
    assert "model.pt2 is not an AOTInductor program" in fallback["reason"]
    fallback = default_runtime(INT8_CHOICE, built, "no compiled int8 program")
    assert fallback["serve_runtime"] == "torchscript" and "but no compiled int8 program" in fallback["reason"]


@pytest.fixture(scope="module")
def int8_served(tmp_path_factory):
    """A model whose evaluation chose int8: its metrics artifact holds the int8 program compiled the way
    the evaluate stage compiles it (``evaluation.variants.build_int8``), and the serve stage ships it."""
    from evaluation import variants
    from pipeline.registry import Registry
    from serving.entry import run

    home = str(tmp_path_factory.mktemp("serving-int8") / "home")
    cfg = serve_config(home)
    registry = Registry.open(cfg)
    model_art, _ = register_model(registry, seed=5, with_metrics=False)
    dataset = [p for p in registry.parents(model_art.id) if p.kind == "dataset"][0]
    eager, _spec = artifacts.load_model(model_art.location)
    calibration = [artifacts.frame_inputs(points) for points in logged_frames(2)]

    def write_metrics(staging, record):
        metrics = evaluation_metrics(model_art.ref, dataset.ref, record.ref)
        candidate = copy.deepcopy(metrics.candidate)
        candidate["variants"] = {"choice": INT8_CHOICE}
        variants.build_int8(eager, calibration, artifacts.ExportSpec(cfg.serve.max_points),
                            os.path.join(staging, artifacts.COMPILED_DIR, artifacts.COMPILED_INT8_DIR),
                            torch.device("cpu"), say=lambda m: None)
        type(metrics).from_dict({**metrics.to_dict(), "candidate": candidate}, "metrics.json").save_to(staging)

    registry.build("metrics", model_art.name, entry_point="tests", config={"int8": True}, builder=write_metrics,
                   parents=[model_art, dataset])
    result = run(cfg, registry, say=lambda m: None, run_id="int8-run", model=model_art.ref)
    return result, eager


@pytest.mark.slow
def test_an_int8_choice_ships_the_evaluations_int8_program_as_the_default(int8_served):
    result, eager = int8_served
    folder = result["location"]
    metadata = PackageMetadata.load_from(folder)
    assert metadata.runtimes["default"]["serve_runtime"] == "int8"
    assert metadata.runtimes["default"]["file"] == "model_int8.pt2"
    int8 = metadata.runtimes["int8"]
    assert int8["format"] == "aoti" and int8["compiled_by"] == "evaluate"
    assert os.path.isfile(os.path.join(folder, "model_int8.pt2"))
    # the int8 program reproduces its own packaged logits and stays close to the float model's classes
    with load(folder) as model:
        assert model.runtime == "int8"
        assert model.self_check()["agrees"]
        points, expected_classes = model.example()
        assert (model.predict(points) == expected_classes).mean() > 0.9
    assert metadata.agreement["int8_vs_eager"]["class_match_rate"] > 0.9
    assert "int8_latency_ms" in metadata.performance
    with load(folder, runtime="torchscript") as model:
        assert model.self_check()["agrees"]


@pytest.fixture(scope="module")
def consumer():
    from tests.serving.test_cpp import BUILD_SCRIPT

    if not (shutil.which("cmake") and shutil.which("g++")):
        pytest.skip("needs cmake and g++")
    import sys

    out = subprocess.run(["bash", str(BUILD_SCRIPT)], env={**os.environ, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_cpp_consumer_runs_the_default_variant_and_the_frozen_torchscript(consumer, int8_served, served):
    from tests.serving.test_cpp import fields, run_consumer

    folder = int8_served[0]["location"]
    out = run_consumer(consumer, folder)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "default_runtime=int8" in out.stdout and "runtime=torchscript " not in out.stdout
    report = fields(out.stdout, "int8")
    assert report["match"] == "yes" and report["real_mismatches"] == "0", out.stdout
    out = run_consumer(consumer, folder, "--runtime", "torchscript")
    assert out.returncode == 0 and fields(out.stdout, "torchscript")["match"] == "yes", out.stdout + out.stderr
    # a package without a choice: the frozen TorchScript by default
    out = run_consumer(consumer, served[3]["location"])
    assert out.returncode == 0 and "default_runtime=torchscript" in out.stdout, out.stdout + out.stderr
    assert fields(out.stdout, "torchscript")["match"] == "yes"
