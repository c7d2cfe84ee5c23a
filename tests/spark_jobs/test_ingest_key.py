"""Ingest's content key holds what changes the dataset's bytes and nothing that only chooses the logs: the
logs are the dataset's parents (each with its checksum), so the window that selected them is not in it."""

from __future__ import annotations

import pytest

from evaluation import feedback
from pipeline import config
from pipeline.home import Home
from spark_jobs import ingest

SPLITS = {"log-a": "train", "log-b": "test"}


def key(**overrides):
    cfg = config.load({k: str(v) for k, v in overrides.items()}, env={})
    return ingest.key_config(cfg, SPLITS, {"log-a": 2.0})


@pytest.mark.parametrize("field, value", [
    ("ingest.date_from", "2026-11-01"), ("ingest.date_to", "2026-11-04"), ("ingest.source_path", "/mnt/logs"),
    ("ingest.spark_master", "spark://cluster:7077"),
])
def test_what_only_selects_the_logs_is_not_in_the_key(field, value):
    assert key(**{field: value}) == key()


@pytest.mark.parametrize("field, value", [
    ("ingest.reader_ranks", 4), ("ingest.rows_per_group", 3), ("ingest.max_points", 1000),
    ("ingest.source", "kitti"), ("ingest.dataset_name", "other"),
    ("ingest.geo_cell_m", 500), ("ingest.split", "geo"),
])
def test_what_changes_the_bytes_is_in_the_key(field, value):
    assert key(**{field: value}) != key()


def test_splits_and_weights_are_in_the_key():
    cfg = config.load({}, env={})
    base = ingest.key_config(cfg, SPLITS, {"log-a": 2.0})
    assert ingest.key_config(cfg, {**SPLITS, "log-b": "val"}, {"log-a": 2.0}) != base
    assert ingest.key_config(cfg, SPLITS, {"log-a": 3.0}) != base


def test_a_weight_of_one_is_no_weight(cfg):
    """Rows of a log listed at 1.0 are the rows of an unlisted log, so the two give the same key."""
    home = Home.from_config(cfg.home)
    assert ingest._sample_weights(home, ["log-a"]) == {}  # no feedback yet
    feedback.merge_sample_weights(home.join(feedback.FEEDBACK_DIR), {"log-a": 2.0, "log-b": 1.0, "log-c": 3.0})
    assert ingest._sample_weights(home, ["log-a", "log-b"]) == {"log-a": 2.0}  # log-c is not selected
