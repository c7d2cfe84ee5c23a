"""A published dataset's files are checked against its manifest, and the manifest against the registry,
before validate, train or evaluate opens any of them (Petastorm unpickles ``_common_metadata``): a changed,
added or removed file, or an edited manifest, is refused naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.contracts import MANIFEST_DIGEST, ContractError, seal_dataset, verified_manifest
from tests.manifests import make_manifest

SPLITS = {"train": {"logs": ["a"], "frames": 1, "points": 1, "row_groups": [1]}}


def _write(staging: str) -> None:
    Path(staging, "train").mkdir()
    Path(staging, "train", "part-00000.parquet").write_bytes(b"PAR1 rows PAR1")
    Path(staging, "train", "_common_metadata").write_bytes(b"pickled unischema")


def _dataset(registry, sealed: bool = True):
    def build(staging, _record):
        _write(staging)
        manifest = make_manifest("test", SPLITS, {"a": {"frames": 1}})
        if sealed:
            return seal_dataset(staging, manifest)
        manifest.save_to(staging)
        return None
    art = registry.build("dataset", "fleet-lidar", entry_point="tests", config={"sealed": sealed}, builder=build)
    return registry.update_meta(art.id, validation="passed")


def test_a_sealed_dataset_lists_every_file_and_verifies(registry):
    art = _dataset(registry)
    manifest = verified_manifest(art)
    files = {p.relative_to(art.location).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in Path(art.location).rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert manifest.files == files and set(files) == {"train/part-00000.parquet", "train/_common_metadata"}
    assert art.meta[MANIFEST_DIGEST] == hashlib.sha256(Path(art.location, "manifest.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("tamper, message", [
    (lambda d: Path(d, "train", "_common_metadata").write_bytes(b"evil pickle"),
     r"train/_common_metadata of dataset:fleet-lidar@v1 does not match its checksum"),
    (lambda d: Path(d, "train", "part-00001.parquet").write_bytes(b"extra"), "is not listed in the manifest"),
    (lambda d: Path(d, "train", "part-00000.parquet").unlink(), "part-00000.parquet of .* is missing"),
])
def test_a_changed_added_or_removed_file_is_refused(registry, tamper, message):
    art = _dataset(registry)
    tamper(art.location)
    with pytest.raises(ContractError, match=message):
        verified_manifest(art)


def test_an_edited_manifest_is_refused_even_with_matching_file_checksums(registry):
    art = _dataset(registry)
    Path(art.location, "train", "_common_metadata").write_bytes(b"evil pickle")
    path = Path(art.location, "manifest.json")
    data = json.loads(path.read_text())
    data["files"]["train/_common_metadata"] = hashlib.sha256(b"evil pickle").hexdigest()
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="does not match the checksum the registry recorded"):
        verified_manifest(art)


def test_an_unsealed_dataset_is_read_with_a_warning(registry):
    art = _dataset(registry, sealed=False)
    said = []
    assert verified_manifest(art, said.append).splits["train"].frames == 1
    assert said and "read unverified" in said[0]


@pytest.mark.parametrize("stage", ["validate", "train"])
def test_stages_refuse_a_tampered_dataset_before_reading_it(cfg, registry, stage):
    art = _dataset(registry)
    Path(art.location, "train", "_common_metadata").write_bytes(b"evil pickle")
    with pytest.raises(ContractError, match="_common_metadata .* does not match its checksum"):
        stages.invoke(stage, cfg, say=lambda _m: None, dataset=art.ref)
