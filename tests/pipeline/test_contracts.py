"""pipeline.contracts: every artifact file round-trips, and a missing, unknown or mistyped field, or a
newer schema, is refused with the file and the field named; a file from before the contracts loads."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from pipeline import contracts
from pipeline.contracts import (
    ContractError,
    EvaluationMetrics,
    JobDataset,
    Manifest,
    ModelSpec,
    PackageMetadata,
    TrainJob,
    TrainMetrics,
)
from tests.manifests import make_manifest

MANIFEST = make_manifest("dataset:fleet-lidar@v3", {
    "train": {"logs": ["a", "b"], "frames": 6, "points": 600, "row_groups": [3, 3]},
    "test": {"logs": ["c"], "frames": 2, "points": 200, "row_groups": [2]},
}, {"a": {"frames": 3, "class_points": {"1": 10}}, "b": {"frames": 3}, "c": {"frames": 2}}, reader_ranks=2)


def samples() -> dict[type, contracts.Contract]:
    """One filled-in instance of every contract."""
    from tests.evaluation.builders import train_metrics
    from tests.serving.conftest import evaluation_metrics

    job = TrainJob(run_id="r1", backend="ddp", world=2, device="cpu", train={"epochs": 2, "lr": 0.01},
                   model_options={}, dataset=JobDataset(ref=MANIFEST.dataset, location="/data/v3", content_key="k",
                                                        manifest=MANIFEST),
                   state_dir="/s", final_dir="/s/final", logs_dir="/l", progress_file="/l/progress.jsonl",
                   resume=False, provenance={"git_sha": "abc"}, config={"home": "/h"})
    package = PackageMetadata(format="avp-serving-package", format_version=1, created_at="now",
                              package={"ref": "package:bev_segnet@v1"}, model={"ref": "model:bev_segnet@v1"},
                              dataset=None, evaluation={"metrics_ref": None}, provenance={}, classes=["unlabelled"],
                              class_map={"0": "unlabelled"}, input={"max_points": 10}, output={}, preprocessing={},
                              example={"num_classes": 8}, runtimes={"pt2": {"format": "exported_program"}},
                              agreement={}, performance={"macs": 1})
    return {Manifest: MANIFEST, ModelSpec: ModelSpec.for_model("bev_segnet", {"cell_size_m": 0.8}),
            TrainMetrics: train_metrics("dataset:fleet-lidar@v3"),
            EvaluationMetrics: evaluation_metrics("model:bev_segnet@v1", "dataset:fleet-lidar@v3", "metrics:x@v1"),
            TrainJob: job, PackageMetadata: package}


@pytest.fixture(scope="module", params=[Manifest, ModelSpec, TrainMetrics, EvaluationMetrics, TrainJob, PackageMetadata],
                ids=lambda c: c.__name__)
def sample(request):
    return samples()[request.param]


def written(tmp_path, data: dict, name: str) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_round_trip_through_the_file(sample, tmp_path):
    path = sample.save_to(str(tmp_path))
    assert path == str(tmp_path / sample.FILE)
    loaded = type(sample).load_from(str(tmp_path))
    assert loaded == sample and loaded.schema_version == type(sample).VERSION == 1
    on_disk = json.loads(open(path).read())
    assert on_disk["schema_version"] == 1
    assert set(on_disk) == {f.name for f in dataclasses.fields(sample)}


def test_a_file_without_schema_version_is_version_1(sample, tmp_path):
    old = {k: v for k, v in sample.to_dict().items() if k != "schema_version"}  # what the code before wrote
    loaded = type(sample).load(written(tmp_path, old, sample.FILE))
    assert loaded.schema_version == 1 and loaded == sample


def test_a_missing_field_is_named(sample, tmp_path):
    data = sample.to_dict()
    field = next(f.name for f in dataclasses.fields(sample) if f.default is dataclasses.MISSING)
    del data[field]
    path = written(tmp_path, data, sample.FILE)
    with pytest.raises(ContractError, match=f"{path}: missing field '{field}'"):
        type(sample).load(path)


def test_an_unknown_field_is_named(sample, tmp_path):
    path = written(tmp_path, {**sample.to_dict(), "colour": "blue"}, sample.FILE)
    with pytest.raises(ContractError, match=f"{path}: unknown field 'colour'"):
        type(sample).load(path)


def test_a_wrong_type_is_named(sample, tmp_path):
    hints = {f.name: f.type for f in dataclasses.fields(sample)}
    field = next(name for name, hint in hints.items() if hint == "str")
    path = written(tmp_path, {**sample.to_dict(), field: 12}, sample.FILE)
    with pytest.raises(ContractError, match=f"{path}: field '{field}' should be str, found int 12"):
        type(sample).load(path)


def test_a_newer_schema_is_refused(sample, tmp_path):
    path = written(tmp_path, {**sample.to_dict(), "schema_version": 2}, sample.FILE)
    with pytest.raises(ContractError, match="schema_version 2 is newer than this code reads"):
        type(sample).load(path)


def test_nested_records_are_checked_with_their_path(tmp_path):
    data = MANIFEST.to_dict()
    data["splits"]["train"]["row_groups"] = [3, "three"]
    with pytest.raises(ContractError, match=r"field 'splits'\['train'\]: field 'row_groups'\[1\] should be int"):
        Manifest.load(written(tmp_path, data, "manifest.json"))
    data = MANIFEST.to_dict()
    data["splits"]["train"]["shards"] = 2
    with pytest.raises(ContractError, match=r"field 'splits'\['train'\]: unknown field 'shards' for SplitInfo"):
        Manifest.load(written(tmp_path, data, "manifest.json"))


def test_attribute_access_reaches_nested_records():
    assert MANIFEST.splits["train"].row_groups == [3, 3] and MANIFEST.splits["test"].path == "test"
    job = samples()[TrainJob]
    assert job.dataset.manifest.splits["train"].logs == ["a", "b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.world = 3


def test_bool_is_not_an_int_and_an_int_is_a_float(tmp_path):
    data = samples()[TrainMetrics].to_dict()
    with pytest.raises(ContractError, match="field 'world' should be int, found bool"):
        TrainMetrics.from_dict({**data, "world": True}, "metrics.json")
    assert TrainMetrics.from_dict({**data, "first_epoch_loss": 2}, "metrics.json").first_epoch_loss == 2


def test_not_json_and_not_an_object_are_refused(tmp_path):
    path = tmp_path / "model.json"
    path.write_text("{not json")
    with pytest.raises(ContractError, match=f"{path}: not valid JSON"):
        ModelSpec.load(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ContractError, match=f"{path} should be a JSON object \\(ModelSpec\\), found list"):
        ModelSpec.load(str(path))
    with pytest.raises(ContractError, match="cannot read the model.json"):
        ModelSpec.load_from(str(tmp_path / "nowhere"))


def test_saving_refuses_what_loading_would(tmp_path):
    bad = dataclasses.replace(samples()[ModelSpec], num_classes="eight")
    with pytest.raises(ContractError, match="field 'num_classes' should be int"):
        bad.save_to(str(tmp_path))
    assert not (tmp_path / "model.json").exists()


def test_files_are_strict_json_and_evaluation_keeps_its_key_order(tmp_path):
    metrics = samples()[EvaluationMetrics]
    odd = dataclasses.replace(metrics, candidate={**metrics.candidate, "zeta": math.inf,
                                                   "alpha": [np.float32(0.5), math.nan], "count": np.int64(3)})
    text = open(odd.save_to(str(tmp_path))).read()
    loaded = json.loads(text)  # strict: json.loads would accept NaN, so check the text too
    assert "NaN" not in text and "Infinity" not in text
    assert loaded["candidate"]["zeta"] is None and loaded["candidate"]["alpha"] == [0.5, None]
    assert loaded["candidate"]["count"] == 3
    assert list(loaded)[:3] == ["schema_version", "model", "model_name"]  # declaration order, not sorted
    assert list(loaded["candidate"])[-3:] == ["zeta", "alpha", "count"]


def test_the_file_names_are_declared_once():
    assert Manifest.FILE == contracts.MANIFEST_FILE == "manifest.json"
    assert ModelSpec.FILE == contracts.MODEL_FILE and TrainJob.FILE == contracts.JOB_FILE
    assert TrainMetrics.FILE == EvaluationMetrics.FILE == contracts.METRICS_FILE
    assert PackageMetadata.FILE == contracts.PACKAGE_METADATA_FILE
