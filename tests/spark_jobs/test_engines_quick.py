"""The quick loop's contact with the real engines (``make test-fast`` runs it; it is not marked slow): one
real Spark job (the validate stage's statistics pass over Petastorm files) and one real Great Expectations
validation, on ten one-frame logs. The slow files test both engines in depth; this one makes sure a
broken Spark or GE install, or a broken hand-over between them, cannot pass the fast suite."""

from __future__ import annotations

import json
import os

from tests.spark_jobs.test_validate import POINTS_PER_FRAME, LogSpec, build_dataset, fleet, validate


def test_one_spark_job_and_one_ge_validation_on_tiny_data(cfg, registry):
    logs = [LogSpec(spec.log_id, spec.split, spec.city, frames=1) for spec in fleet()]
    data = build_dataset(registry, logs)
    result = validate(cfg, registry, **{"ingest.spark_master": "local[1]"})
    assert result["verdict"] == "passed" and result["dataset"] == data.ref

    stats = json.load(open(os.path.join(registry.get(result["statistics"]).location, "statistics.json")))
    assert {split: s["frames"] for split, s in stats["splits"].items()} == {"train": 8, "test": 1, "val": 1}
    assert stats["splits"]["train"]["points"] == 8 * POINTS_PER_FRAME  # counted by Spark, row by row

    summary = json.load(open(os.path.join(registry.get(result["ref"]).location, "validation.json")))
    names = {c["name"] for c in summary["checks"]}
    assert {"split_shares", "frames_per_log", "log_in_one_split", "manifest_logs_present"} <= names
    assert all(c["success"] for c in summary["checks"]), summary["checks"]
