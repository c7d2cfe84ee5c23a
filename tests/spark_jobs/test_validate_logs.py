"""The validate stage's per-log checks failing, each with the sentence that names the log: a log with
frames in two splits (leakage), logs with too few or too many frames, and a log the manifest lists but
the files do not hold. Same real Spark + GE path and dataset builder as test_validate.py."""

from __future__ import annotations

import pytest

from pipeline.errors import StageFailed
from tests.spark_jobs.test_validate import LogSpec, build_dataset, failed_checks, fleet, spark, validate  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("spark")]  # one Spark session, as in test_validate.py


def failure_of(cfg, registry, **overrides) -> str:
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry, **overrides)
    return str(failure.value)


def test_a_log_with_frames_in_two_splits_is_leakage(cfg, registry):
    logs = fleet()
    leaked = LogSpec(logs[0].log_id, "test", logs[0].city)  # log-00 is in train; some of its frames in test too
    build_dataset(registry, [*logs, leaked])
    message = failure_of(cfg, registry)
    assert "log_in_one_split" in failed_checks(message)
    assert f"log {logs[0].log_id} has frames in" in message and "and another split" in message


def test_frames_per_log_bounds_come_from_config(cfg, registry):
    logs = fleet()
    logs[3] = LogSpec(logs[3].log_id, logs[3].split, logs[3].city, frames=1)
    logs[4] = LogSpec(logs[4].log_id, logs[4].split, logs[4].city, frames=5)
    build_dataset(registry, logs)
    message = failure_of(cfg, registry, **{"validate.min_frames_per_log": 2, "validate.max_frames_per_log": 4})
    assert failed_checks(message) == {"frames_per_log"}
    assert f"log {logs[3].log_id} (train) has 1 frames, outside 2..4" in message
    assert f"log {logs[4].log_id} (train) has 5 frames, outside 2..4" in message
    assert "has 3 frames" not in message  # the bounds are inclusive
    assert validate(cfg, registry, **{"validate.min_frames_per_log": 1, "validate.max_frames_per_log": 5})[
        "verdict"] == "passed"


def test_a_manifest_log_without_frames_fails(cfg, registry):
    logs = fleet()
    ghost = LogSpec("log-ghost", "train", logs[0].city, frames=0)  # listed, never written
    build_dataset(registry, [*logs, ghost])
    message = failure_of(cfg, registry)
    assert "manifest_logs_present" in failed_checks(message)
    assert "1 log(s) listed in the manifest have no frames: log-ghost" in message
