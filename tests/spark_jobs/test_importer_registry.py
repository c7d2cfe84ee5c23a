"""The importer protocol and registry: every ``ingest.source`` choice is a registered importer, registering
checks the protocol, and a new importer - this module, registered by the test below - is ingested like the
built-in ones, through the real Spark job, with no change to ingest.

This module is itself a (toy) importer: ``SOURCE`` and the four functions below. A toy log is one JSON file
``<log id>.toy.json``; its frames are drawn from a seeded generator.
"""

from __future__ import annotations

import json
import os
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest

from pipeline import config
from pipeline.config import IngestConfig
from pipeline.frames import BOX_COLUMNS, Frame, LogMeta
from spark_jobs.sources import registry as importers

# ------------------------------------------------------------------------------------ the toy importer
SOURCE = "toy"
DAY_NS = 1_793_491_200_000_000_000  # 2026-11-01 UTC


def list_logs(root: str) -> list[str]:
    return sorted(str(p) for p in Path(root).glob("*.toy.json"))


def source_files(handle: str) -> list[str]:
    return [handle]


def read_metadata(handle: str) -> LogMeta:
    spec = json.loads(Path(handle).read_text())
    return LogMeta(spec["log_id"], "toy-car", spec["city"], DAY_NS + spec["hour"] * 3_600_000_000_000, "toy-1", SOURCE)


def read_log(handle: str) -> tuple[LogMeta, typing.Iterator[Frame]]:
    meta = read_metadata(handle)
    spec = json.loads(Path(handle).read_text())
    return meta, (toy_frame(meta, spec["seed"], i) for i in range(spec["frames"]))


def unmatched_inputs(root: str) -> dict[str, list[str]]:
    return {}


def toy_frame(meta: LogMeta, seed: int, index: int) -> Frame:
    rng = np.random.default_rng([seed, index])
    points = rng.uniform(-20, 20, (300, 4)).astype(np.float32)
    points[:, 3] = np.abs(points[:, 3]) / 20
    box = np.array([[5, 1, 0.8, 4.5, 1.9, 1.6, 0.1, 5, 3]], np.float32)
    assert box.shape[1] == len(BOX_COLUMNS)
    return Frame(meta.log_id, index, meta.start_time_ns + index * 100_000_000, points=points,
                 labels=rng.integers(1, 8, len(points)).astype(np.uint8), boxes=box)


# ------------------------------------------------------------------------------------ the registry
def test_the_source_choices_are_the_registered_importers():
    choices = typing.get_args(typing.get_type_hints(IngestConfig)["source"])
    assert sorted(choices) == importers.list_importers() == ["av2", "kitti", "mcap", "semantickitti"]
    for name in choices:
        module = importers.get_importer(name)
        assert isinstance(module, importers.Importer) and module.SOURCE == name
        assert module.__name__.startswith("spark_jobs.sources.")


def test_an_unknown_source_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown source 'lidarx'; registered importers: av2, kitti, mcap"):
        importers.get_importer("lidarx")


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry with the built-in importers; whatever a test registers is dropped afterwards."""
    importers.list_importers()  # discover the built-in ones into the real registry first
    monkeypatch.setattr(importers, "_IMPORTERS", dict(importers._IMPORTERS))
    return importers


def fake_module(name: str, source: str, **skip: bool) -> types.ModuleType:
    module = types.ModuleType(name)
    module.SOURCE = source
    for member in ("list_logs", "source_files", "read_metadata", "read_log", "unmatched_inputs"):
        if not skip.get(member):
            setattr(module, member, lambda *_args: None)
    return module


def test_registering_checks_the_protocol_and_the_name(scratch_registry):
    with pytest.raises(TypeError, match="importer module half lacks source_files, read_log"):
        scratch_registry.register_importer(fake_module("half", "half", source_files=True, read_log=True))
    with pytest.raises(ValueError, match="source 'mcap' is already registered by spark_jobs.sources.mcap_log"):
        scratch_registry.register_importer(fake_module("other_mcap", "mcap"))
    with pytest.raises(TypeError, match="an importer is a module"):
        scratch_registry.register_importer(object())
    mcap = scratch_registry.get_importer("mcap")
    assert scratch_registry.register_importer(mcap) is mcap  # the same module again: a re-import
    assert "half" not in scratch_registry.list_importers()


def test_every_mcap_log_file_is_checksummed(tmp_path):
    mcap = importers.get_importer("mcap")
    path = tmp_path / "a.mcap"
    path.write_bytes(b"x")
    assert mcap.source_files(str(path)) == [str(path)]
    assert mcap.source_files(str(tmp_path / "gone.mcap")) == []


# ------------------------------------------------------------------------------------ ingest through it
def read_rows(location: str, split: str) -> list:
    from petastorm import make_reader

    with make_reader(f"file://{location}/{split}", reader_pool_type="dummy", num_epochs=1,
                     shuffle_row_groups=False) as reader:
        return [(row.log_id, int(row.frame_index), row.points) for row in reader]


@pytest.mark.slow
def test_a_toy_importer_registered_here_is_ingested_like_the_others(scratch_registry, tmp_path):
    from pipeline import stages
    from pipeline.registry import Registry

    scratch_registry.register_importer(sys.modules[__name__])
    root = tmp_path / "toy-logs"
    root.mkdir()
    logs = {f"toy-{i}": {"log_id": f"toy-{i}", "city": "pittsburgh", "hour": i, "frames": 2 + i % 2, "seed": i}
            for i in range(8)}
    for log_id, spec in logs.items():
        (root / f"{log_id}.toy.json").write_text(json.dumps(spec))
    cfg = config.load({"home": str(tmp_path / "home"), "ingest.spark_master": "local[1]",
                       "ingest.rows_per_group": "2"}, env={})
    # ``toy`` is not one of the shipped choices of ingest.source (a real importer adds its name there)
    cfg.ingest.source, cfg.ingest.source_path = SOURCE, str(root)
    result = stages.invoke("ingest", cfg, say=lambda m: None)

    art = Registry.open(cfg).get(result["ref"])
    manifest = json.loads(Path(art.location, "manifest.json").read_text())
    assert manifest["source"] == "toy" and not manifest["quarantined"]
    rows = [row for split in ("train", "test", "val") for row in read_rows(art.location, split)]
    assert sorted((log_id, index) for log_id, index, _p in rows) == sorted(
        (log_id, i) for log_id, spec in logs.items() for i in range(spec["frames"]))
    for log_id, index, points in rows:  # the Spark workers read the toy files through this module
        expected = toy_frame(read_metadata(str(root / f"{log_id}.toy.json")), logs[log_id]["seed"], index)
        np.testing.assert_array_equal(points, expected.points)
    parents = Registry.open(cfg).parents(art.id)
    assert sorted(p.name for p in parents) == sorted(logs) and all(os.path.isfile(p.location) for p in parents)
