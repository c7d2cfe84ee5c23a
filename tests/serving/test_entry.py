"""serving/entry.py: the serve stage - blessing gate, registration, model resolution, AOTInductor and its
fallback, and promotion / rollback of real packages through the CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import numpy as np
import pytest

from pipeline.errors import StageFailed, UserError
from pipeline.registry import PromotionRefused, Registry
from serving.entry import resolve_model, run
from serving.package import verify_package
from serving.runtime import load
from tests.serving.conftest import register_model, serve_config


def quiet(_message: str) -> None:
    """A ``say`` that prints nothing."""


@pytest.fixture
def fresh(tmp_path):
    """An empty home with fast packaging settings: (cfg, registry)."""
    cfg = serve_config(str(tmp_path / "home"), example_points=300, latency_runs=1)
    return cfg, Registry.open(cfg)


# ----------------------------------------------------------------------------------------- the gate
def test_an_unblessed_model_is_refused_with_the_reasons(fresh):
    cfg, registry = fresh
    model, _ = register_model(registry, blessed=False, reasons=("mIoU 0.12 < 0.30", "vehicle recall 0.2 < 0.5"))
    with pytest.raises(StageFailed) as info:
        run(cfg, registry, say=quiet, model=model.ref)
    assert "not blessed" in str(info.value) and "mIoU 0.12 < 0.30; vehicle recall 0.2 < 0.5" in str(info.value)
    assert registry.list(kind="package") == []


def test_a_model_never_evaluated_is_refused(fresh):
    cfg, registry = fresh
    model, _ = register_model(registry, blessed=None, with_metrics=False)
    with pytest.raises(StageFailed, match="has not been evaluated"):
        run(cfg, registry, say=quiet, model=model.ref)
    assert registry.list(kind="package") == []


def test_model_references_resolve_like_the_other_stages(served):
    cfg, registry, model, _ = served
    for ref in (None, "", "1", "v1", "bev_segnet@v1", "model:bev_segnet@v1"):
        assert resolve_model(cfg, registry, ref).id == model.id
    with pytest.raises(UserError, match="no artifact"):
        resolve_model(cfg, registry, "v9")
    with pytest.raises(UserError, match="is a dataset, not a model"):
        resolve_model(cfg, registry, "dataset:fleet-lidar@v1")


# ----------------------------------------------------------------------------------------- the package record
def test_the_package_is_registered_with_model_and_metrics_as_parents(served):
    _cfg, registry, model, result = served
    art = registry.get(result["ref"])
    assert art.kind == "package" and art.state == "succeeded"
    assert {p.ref for p in registry.parents(art.id)} == {model.ref, "metrics:bev_segnet@v1"}
    assert result["location"] == os.path.join(art.location, "bev_segnet-v1")
    assert result["tarball"] == os.path.join(art.location, "bev_segnet-v1.tar.gz") and os.path.isfile(result["tarball"])
    assert art.meta["manifest_sha256"] == verify_package(result["location"])["manifest_sha256"]
    assert art.meta["model"] == model.ref and art.meta["run_id"] == "test-run"
    assert result["tables"] and result["tables"][0][1][0] == "runtime"


def test_an_unchanged_request_is_a_cache_hit(served):
    cfg, registry, model, result = served
    again = run(cfg, registry, say=quiet, model=model.ref)
    assert again["cached"] and again["ref"] == result["ref"]


def test_a_failing_aot_inductor_falls_back_to_the_exported_program_and_says_why(fresh, monkeypatch):
    import torch

    def broken(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler in this sandbox\nmore detail")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    cfg, registry = fresh
    cfg.serve.aot_inductor = True
    model, _ = register_model(registry, seed=2, with_metrics=False)
    messages = []
    result = run(cfg, registry, say=messages.append, model=model.ref)
    assert result["pt2_format"] == "exported_program"
    assert result["aoti_error"] == "RuntimeError: no C++ compiler in this sandbox"
    assert any("AOTInductor could not compile" in m for m in messages)
    package = load(result["location"], runtime="pt2")
    points, expected = package.example()
    assert np.array_equal(package.predict(points), expected)
    assert package.metadata.evaluation["metrics_ref"] is None  # no metrics artifact: no summary
    assert {p.kind for p in registry.parents(registry.get(result["ref"]).id)} == {"model"}


@pytest.mark.slow
def test_aot_inductor_package_agrees_with_torchscript_and_eager(aoti_served):
    result = aoti_served[3]
    assert result["pt2_format"] == "aoti" and "aoti_error" not in result
    torchscript, compiled = load(result["location"]), load(result["location"], runtime="pt2")
    meta = compiled.metadata
    assert meta.runtimes["pt2"]["format"] == "aoti" and meta.runtimes["pt2"]["compile_seconds"] > 0
    assert meta.agreement["pt2_vs_eager"]["agrees"] and meta.agreement["pt2_vs_torchscript"]["agrees"]
    points, expected = compiled.example()
    assert np.array_equal(compiled.predict(points), expected)
    # A point count other than the example's: the .pt2 was exported with a dynamic N.
    cloud = points[:777] * 0.9
    np.testing.assert_allclose(compiled.predict_logits(cloud), torchscript.predict_logits(cloud), atol=1e-4)


# ----------------------------------------------------------------------------------------- promotion
def avp(env, *args):
    return subprocess.run(["avp", *args], env=env, capture_output=True, text=True, timeout=300)


def test_promotion_and_rollback_of_real_packages_through_the_cli(avp_env):
    from pipeline import config
    from serving.http import open_package

    cfg = config.load({"home": avp_env["AVP_HOME"]}, env={})
    registry = Registry.open(cfg)
    first, _ = register_model(registry, seed=0)
    second, _ = register_model(registry, seed=1)
    unblessed, _ = register_model(registry, seed=5, blessed=False, reasons=("mIoU too low",))
    fast = ["--example-points", "400", "--max-points", "20000", "--set", "serve.aot_inductor=false",
            "--set", "serve.latency_runs=1"]

    out = avp(avp_env, "serve", "--model", unblessed.ref, *fast)
    assert out.returncode == 1 and "not blessed by evaluation: mIoU too low" in out.stderr

    out = avp(avp_env, "serve", "--model", first.ref, *fast)  # the CLI path once...
    assert out.returncode == 0 and "package:bev_segnet@v1" in out.stdout, out.stderr
    cfg.serve.example_points, cfg.serve.max_points, cfg.serve.aot_inductor = 400, 20_000, False
    run(cfg, registry, say=quiet, model=second.ref)  # ...and the entry function directly (no second torch import)
    packages = registry.list(kind="package")
    assert [p.ref for p in packages] == ["package:bev_segnet@v1", "package:bev_segnet@v2"]

    out = avp(avp_env, "registry", "promote", "package:bev_segnet@v1")
    assert out.returncode == 0 and "perception/bev_segnet/1.0" in out.stdout, out.stderr
    out = avp(avp_env, "registry", "promote", "package:bev_segnet@v2")
    assert out.returncode == 0 and "perception/bev_segnet/1.1" in out.stdout, out.stderr
    assert open_package("perception/bev_segnet", registry).ref == "package:bev_segnet@v2"

    out = avp(avp_env, "registry", "rollback", "perception/bev_segnet")
    assert out.returncode == 0 and "perception/bev_segnet/1.0" in out.stdout, out.stderr
    production = open_package("perception/bev_segnet", registry)
    assert production.ref == "package:bev_segnet@v1"
    points, expected = production.example()
    assert np.array_equal(production.predict(points), expected)

    # Withdrawing the model's blessing withdraws its package's eligibility too.
    registry.set_blessing(second.id, False, ["regression found later"])
    with pytest.raises(PromotionRefused, match="not blessed"):
        registry.promote("package:bev_segnet@v2", "perception", "bev_segnet")


def test_the_evaluation_report_is_summarised_without_its_curves():
    """The evaluate stage's metrics.json shape: headline numbers in, matrices/curves/samples out."""
    import json

    from serving.entry import metrics_summary
    from tests.serving.conftest import evaluation_metrics

    metrics = evaluation_metrics("model:bev_segnet@v1", "dataset:fleet-lidar@v1", "metrics:bev_segnet@v1", miou=0.52)
    baseline = {"segmentation": {"miou": 0.5}}
    summary = metrics_summary(dataclasses.replace(metrics, baseline=baseline))
    assert summary["miou"] == 0.52 and summary["class_iou"] == {"ground": 0.9, "vehicle": 0.5}
    assert summary["class_recall"]["vehicle"] == 0.6 and summary["baseline_miou"] == 0.5
    assert summary["planner"] == {"missed_brakes": 1, "false_brakes": 2}
    assert summary["latency_ms"] == {"torchscript": {"p50": 12.0, "p99": 15.0}} and summary["macs"] == 123
    assert summary["verdict_reasons"] == ["all checks passed"] and summary["thresholds"] == {"min_miou": 0.3}
    assert "confusion" not in json.dumps(summary) and "samples_ms" not in json.dumps(summary)


def test_the_metrics_behind_the_current_verdict_are_used(fresh):
    from serving.entry import find_metrics

    _cfg, registry = fresh
    model, first = register_model(registry, seed=0)
    second = registry.build("metrics", "bev_segnet", entry_point="tests", config={"again": True},
                            builder=lambda staging, record: None, parents=[model])
    assert find_metrics(registry, registry.get(model.id)).ref == second.ref  # no record: the newest
    registry.update_meta(model.id, metrics_ref=first.ref)  # what the evaluate stage records
    assert find_metrics(registry, registry.get(model.id)).ref == first.ref
