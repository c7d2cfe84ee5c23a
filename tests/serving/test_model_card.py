"""serving/model_card.py: every package carries MODEL_CARD.md and MODEL_CARD.html, generated from the registry
lineage and the metrics, covered by the manifest. The expected figures are recomputed here from the inputs."""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import replace

import pytest

from pipeline.contracts import Manifest, SplitInfo
from pipeline.registry import Registry
from pipeline.taxonomy import CLASSES
from serving.package import MANIFEST, MODEL_CARD, MODEL_CARD_HTML, PackageError, read_manifest, verify_package
from tests.serving.conftest import evaluation_metrics, register_model, serve_config

DAY = dt.datetime(2026, 11, 1, 8, tzinfo=dt.timezone.utc)
LOGS = {  # log id: (city, days after DAY, source, class points by taxonomy id)
    "log-a": ("pittsburgh", 0, "sim", {1: 700, 5: 200, 6: 100}),
    "log-b": ("miami", 1, "sim", {1: 500, 2: 300, 7: 200}),
    "log-c": ("miami", 2, "kitti", {1: 400, 5: 100}),
}


def _objects(bands_objects: dict[str, int]) -> dict:
    return {"recall": 0.5, "precision": 0.5, "objects": sum(bands_objects.values()),
            "bands": {band: {"recall": 0.5, "objects": n} for band, n in bands_objects.items()}}


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    """A package whose model was trained on a dataset of three logged drives (two simulated, one recorded)
    and evaluated against a production model; returns (registry, stage result, the card's Markdown)."""
    from serving.entry import run

    home = str(tmp_path_factory.mktemp("card") / "home")
    cfg = serve_config(home, card_recall_floor=0.7, card_min_band_objects=10)
    registry = Registry.open(cfg)
    logs = [registry.record("log", name, content_key=name, location=f"/logs/{name}", entry_point="tests",
                            meta={"city": city, "source": source, "log_id": name,
                                  "start_time_ns": int((DAY + dt.timedelta(days=day)).timestamp() * 1e9)})
            for name, (city, day, source, _points) in LOGS.items()]

    def write_dataset(staging, record):
        Manifest(dataset=record.ref, source="mcap", split_mode="hash", date_from="", date_to="2026-11-04",
                 shares={"train": 0.75, "test": 0.15, "val": 0.1}, reader_ranks=1,
                 splits={split: SplitInfo(logs=ids, frames=3 * len(ids), points=1000 * len(ids), row_groups=[],
                                          path=split)
                         for split, ids in (("train", ["log-a", "log-b"]), ("test", ["log-c"]), ("val", []))},
                 logs={name: {"city": city, "frames": 3, "class_points": {str(k): v for k, v in points.items()}}
                       for name, (city, _day, _source, points) in LOGS.items()},
                 quarantined=[]).save_to(staging)
        return {"validation": "passed", "date_to": "2026-11-04"}

    dataset = registry.build("dataset", "fleet-lidar", entry_point="tests", config={"logs": 3},
                             builder=write_dataset, parents=logs)
    model, _ = register_model(registry, seed=5, with_metrics=False, dataset=dataset)

    def write_metrics(staging, record):
        metrics = evaluation_metrics(model.ref, dataset.ref, record.ref, miou=0.41)
        candidate = {**metrics.candidate, "objects": {"vehicle": _objects({"0-20": 30, "20-40": 4}),
                                                      "pedestrian": _objects({"0-20": 12, "20-40": 11})}}
        baseline = {"segmentation": {"miou": 0.45, "classes": {"ground": {"iou": 0.8}, "vehicle": {"iou": 0.6}}}}
        replace(metrics, candidate=candidate, baseline=baseline, baseline_model="model:bev_segnet@v0",
                baseline_source="scored in this run").save_to(staging)

    registry.build("metrics", "bev_segnet", entry_point="tests", config={}, builder=write_metrics,
                   parents=[model, dataset])
    result = run(cfg, registry, say=lambda m: None, run_id="card-run", model=model.ref)
    with open(os.path.join(result["location"], MODEL_CARD), encoding="utf-8") as fh:
        return registry, result, fh.read()


def section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_card_is_in_the_package_and_covered_by_its_manifest(carded, tmp_path):
    import shutil

    _registry, result, card = carded
    entries, _digest = read_manifest(result["location"])
    assert {MODEL_CARD, MODEL_CARD_HTML} <= set(entries)
    copy = tmp_path / "pkg"
    shutil.copytree(result["location"], copy)
    with open(copy / MODEL_CARD, "a", encoding="utf-8") as fh:
        fh.write("\nAll classes are perfect.\n")  # an edit after publishing
    with pytest.raises(PackageError, match=f"{MODEL_CARD}: checksum mismatch"):
        verify_package(str(copy))
    os.remove(copy / MODEL_CARD_HTML)
    with pytest.raises(PackageError, match=MODEL_CARD_HTML):
        verify_package(str(copy))
    assert MANIFEST not in card


def test_training_data_section_matches_the_dataset(carded):
    registry, result, card = carded
    data = section(card, "Training data")
    assert "dataset:fleet-lidar@v1" in data and "3 logs (0 quarantined) from 2 cities: miami, pittsburgh" in data
    assert "from 2026-11-01 to 2026-11-03" in data  # the drives' start times, not the selection window
    assert "kitti, sim (2 of 3 logs simulated)" in data
    totals: dict[str, int] = {}
    for _city, _day, _source, points in LOGS.values():
        for label, n in points.items():
            totals[CLASSES[label]] = totals.get(CLASSES[label], 0) + n
    for name, n in totals.items():
        assert f"{name} {n / sum(totals.values()):.1%}" in data
    assert "| train | 2 | 6 | 2000 |" in data


def test_evaluation_comparison_limitations_and_provenance(carded):
    registry, result, card = carded
    evaluation = section(card, "Evaluation")
    assert "mIoU **0.410**" in evaluation and "| vehicle | n/a | 0.600 | 0.500 |  |" in evaluation
    assert "| vehicle | 0.500 (30) | 0.500 (4) |" in evaluation  # recall (objects) per distance band
    assert "| torchscript | 12.0 | 15.0 |" in evaluation  # latency on the evaluating hardware
    comparison = section(card, "Comparison with production")
    assert "model:bev_segnet@v0 (scored in this run)" in comparison
    assert "| vehicle | 0.500 | 0.600 | -0.100 |" in comparison and "| mIoU | 0.410 | 0.450 | -0.040 |" in comparison
    limits = section(card, "Known limitations")
    # recall floor 0.7: ground (0.95) passes, vehicle (0.6) does not
    assert "under 0.7: vehicle (0.600)." in limits
    # fewer than 10 objects: only vehicle 20-40 m (4); pedestrian's bands have 12 and 11
    assert "fewer than 10 test objects (their recall is uncertain): vehicle 20-40 m (4 objects)." in limits
    assert "2 of 3 training logs are simulated" in limits
    package = registry.get(result["ref"])
    provenance = section(card, "Provenance")
    assert f"git `{package.git_sha}`" in provenance and "run `card-run`" in provenance
    assert result["model"] in provenance and '"seed": 5' in provenance  # the model's training config


def test_html_rendering_holds_the_same_tables_and_loads_nothing_from_outside(carded):
    _registry, result, card = carded
    with open(os.path.join(result["location"], MODEL_CARD_HTML), encoding="utf-8") as fh:
        page = fh.read()
    assert page.startswith("<!DOCTYPE html>") and "<h2>Known limitations</h2>" in page
    assert page.count("<table>") == sum(line.startswith("|---") for line in card.splitlines())
    assert "<td>vehicle</td>" in page
    assert not re.search(r"(src|href)=\"https?:", page)
