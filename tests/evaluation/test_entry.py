"""The evaluate stage end to end on a tiny simulated dataset and two tiny trained models.

Model v1 (40 training steps) is evaluated first: there is no production model, so it is judged on the
absolute thresholds; its metrics are checked against scikit-learn on the TorchScript model's own
predictions. v1 is then promoted, and v2 (3 steps: much worse) is evaluated against it: the paired
regression test refuses it, and the registry will not promote it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import entry
from pipeline import cli, config
from pipeline.errors import UserError
from pipeline.registry import PromotionRefused, Registry
from tests.evaluation import builders

SETTINGS = {"evaluate.min_miou": 0.15, "evaluate.latency_runs": 3, "evaluate.latency_warmup": 1,
            "evaluate.latency_frames": 2, "evaluate.latency_p99_budget_ms": 60000, "evaluate.worst_scenes": 1,
            "evaluate.similar_train_logs": 1,
            # two test logs: judge slices of one log too (the statistics' own tests cover the minimums)
            "evaluate.min_slice_logs": 1}


def make_cfg(home, **overrides):
    return config.load({"home": str(home), **SETTINGS, **overrides}, env={})


def quiet(_message):
    pass


def test_no_model_is_a_clear_user_error(cfg, registry):
    with pytest.raises(UserError, match="run `avp train` first"):
        entry.run(cfg, registry, say=quiet)
    with pytest.raises(UserError, match="no artifact 'model:bev_segnet@v7'"):
        entry.run(cfg, registry, say=quiet, model="7")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A home with the simulated dataset and the two models; returns (home, logs, dataset, v1, v2)."""
    home = tmp_path_factory.mktemp("evaluate") / "home"
    registry = Registry.open(make_cfg(home))
    logs = builders.simulated_logs()
    dataset = builders.register_sim_dataset(registry, logs)
    train_frames = [f for _log, _city, frames in logs[:builders.SPLITS["train"]] for f in frames]
    good = builders.register_model(registry, dataset, builders.train_tiny(train_frames, steps=40), "good")
    bad = builders.register_model(registry, dataset, builders.train_tiny(train_frames, steps=3, seed=1), "bad")
    return home, logs, dataset, good, bad


@pytest.fixture(scope="module")
def first(world):
    """The first evaluation (no production model), AOTInductor on."""
    home = world[0]
    cfg = make_cfg(home)
    return entry.run(cfg, Registry.open(cfg), say=quiet, model="1")


@pytest.mark.slow
def test_first_model_is_judged_on_absolute_thresholds_and_recorded(world, first):
    home, _logs, dataset, good, _bad = world
    registry = Registry.open(make_cfg(home))
    metrics_art = registry.get(first["ref"])
    assert metrics_art.kind == "metrics" and metrics_art.name == "bev_segnet"
    assert {p.ref for p in registry.parents(metrics_art.id)} == {good.ref, dataset.ref}
    assert first["blessed"] is True, first["reasons"]
    assert any("no production model" in r for r in first["reasons"])
    model = registry.get(good.id)
    assert model.blessed is True and model.meta["blessing_reasons"] == first["reasons"]
    assert model.meta["metrics_ref"] == first["ref"]
    assert any("blessed" in e["reason"] for e in registry.events(good.id))
    metrics = json.loads(Path(first["metrics"]).read_text())
    assert metrics["verdict"]["blessed"] is True and metrics["baseline"] is None
    hw = metrics["candidate"]["hardware"]
    assert {"eager", "torchscript"} <= set(hw["variants"]) and len(hw["variants"]) == 3
    assert hw["macs"] > 0 and hw["parameters"] == sum(p.numel() for p in builders.train_tiny([], 0).parameters())
    titles = [t[0] for t in first["tables"]]
    assert titles[-1] == "verdict: BLESSED" and any(t.startswith("latency on cpu") for t in titles)


@pytest.mark.slow
def test_metrics_equal_scikit_learn_on_the_torchscript_models_predictions(world, first):
    from sklearn.metrics import confusion_matrix, jaccard_score, precision_recall_fscore_support

    _home, logs, _dataset, good, _bad = world
    scripted = torch.jit.load(os.path.join(good.location, "model.ts"))
    test_logs = logs[builders.SPLITS["train"] + builders.SPLITS["val"]:]
    labels, predicted = [], []
    for _log, _city, frames in test_logs:
        for frame in frames:
            points = torch.from_numpy(frame.points).unsqueeze(0)
            with torch.no_grad():
                logits = scripted(points, torch.ones(points.shape[:2], dtype=torch.bool))[0]
            labels.append(frame.labels.astype(np.int64))
            predicted.append(logits.argmax(-1).numpy())
    labels, predicted = np.concatenate(labels), np.concatenate(predicted)
    scored = labels != 0
    y_true, y_pred = labels[scored], predicted[scored]
    metrics = json.loads(Path(first["metrics"]).read_text())
    seg = metrics["candidate"]["segmentation"]
    assert np.array_equal(np.asarray(seg["confusion"]), confusion_matrix(y_true, y_pred, labels=list(range(8))))
    present = [c for c in range(1, 8) if (y_true == c).any()]
    precision, recall, _f, _s = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    ious = jaccard_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    names = ["ignore", "ground", "building", "vegetation", "pole", "vehicle", "pedestrian", "cyclist"]
    for k, c in enumerate(present):
        m = seg["classes"][names[c]]
        assert m["recall"] == pytest.approx(recall[k])
        assert m["iou"] == pytest.approx(ious[k])
        if m["precision"] is not None:
            assert m["precision"] == pytest.approx(precision[k])
    assert seg["miou"] == pytest.approx(float(np.mean(ious)))
    assert seg["frames"] == sum(len(f) for _l, _c, f in test_logs)
    assert set(metrics["candidate"]["scenes"]) == {log for log, _c, _f in test_logs}


@pytest.mark.slow
def test_report_is_one_offline_html_file_with_plots(first):
    page = Path(first["report"]).read_text()
    assert page.count('src="data:image/png;base64,') >= 5  # PR, confusion, distance, latency, scenes
    assert not re.search(r'(src|href)="(http|//)', page)  # nothing fetched from anywhere
    for heading in ("Model metrics: points", "Model metrics: objects", "System metrics", "Hardware metrics", "Scenes"):
        assert heading in page
    assert "BLESSED" in page


@pytest.mark.slow
def test_worst_scenes_are_fed_back_to_ingest(world, first):
    home, _logs, _dataset, _good, _bad = world
    metrics = json.loads(Path(first["metrics"]).read_text())
    worst = metrics["worst_scenes"]
    assert len(worst) == 1 and worst[0] in metrics["candidate"]["scenes"]
    weights = json.loads((home / "feedback" / "sample_weights.json").read_text())
    assert weights[worst[0]] == 2.0
    train_logs = [log for log in weights if log != worst[0]]
    assert len(train_logs) == 1 and weights[train_logs[0]] == 2.0  # its most similar train log


@pytest.mark.slow
def test_same_request_is_a_cache_hit(world, first):
    cfg = make_cfg(world[0])
    again = entry.run(cfg, Registry.open(cfg), say=quiet, model="bev_segnet@v1")
    assert again["cached"] is True and again["ref"] == first["ref"] and again["blessed"] == first["blessed"]


@pytest.mark.slow
def test_a_worse_model_regresses_against_production_and_cannot_be_promoted(world, first):
    home, _logs, _dataset, good, bad = world
    cfg = make_cfg(home, **{"evaluate.aot_inductor": False})
    registry = Registry.open(cfg)
    registry.promote(good.id, cfg.serve.namespace, "bev_segnet")
    result = entry.run(cfg, registry, say=quiet, model="2")
    assert result["blessed"] is False
    metrics = json.loads(Path(result["metrics"]).read_text())
    # v1 was evaluated on this dataset with the same metric definitions: its stored metrics are the baseline
    assert metrics["baseline_model"] == good.ref and metrics["baseline_source"] == f"reused {first['ref']}"
    failed = [c for c in metrics["verdict"]["checks"] if not c["passed"]]
    assert "regression" in {c["check"] for c in failed}
    assert any(r.startswith("all: mIoU ") and f"vs production {good.ref}" in r and "95% CI" in r
               for r in result["reasons"])
    assert any(c["outcome"] == "fail" and c["blocks"] for c in metrics["verdict"]["comparisons"])
    assert registry.get(bad.id).blessed is False
    with pytest.raises(PromotionRefused, match="not blessed"):
        registry.promote(bad.id, cfg.serve.namespace, "bev_segnet")

    # Other metric definitions (object grouping radius): production is scored again, in this run, on the
    # same frames - and its point metrics equal v1's own evaluation.
    cfg = make_cfg(home, **{"evaluate.aot_inductor": False, "evaluate.cluster_radius_m": 1.0})
    again = entry.run(cfg, Registry.open(cfg), say=quiet, model="2")
    assert again["ref"] != result["ref"] and again["blessed"] is False
    rescored = json.loads(Path(again["metrics"]).read_text())
    assert rescored["baseline_source"] == "scored in this run"
    first_metrics = json.loads(Path(first["metrics"]).read_text())
    assert rescored["baseline"]["segmentation"] == first_metrics["candidate"]["segmentation"]


@pytest.mark.slow
def test_cli_prints_the_summary_tables(world, first, capsys):
    home = world[0]
    flags = [f"--set={k}={v}" for k, v in SETTINGS.items() if k != "evaluate.latency_runs"]
    code = cli.main(["evaluate", "--home", str(home), "--model", "1", "--latency-runs", "2",
                     "--set", "evaluate.aot_inductor=false", *flags])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("mIoU", "objects (BEV groups", "system metrics", "latency on cpu", "verdict:", "report"):
        assert text in out, text
