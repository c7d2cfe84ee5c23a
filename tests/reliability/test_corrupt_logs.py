"""Corrupt drive logs among good ones: each bad log is quarantined with its reason and nothing else is hurt.

The generator (``tests/reliability/corrupt_logs.py``) writes every kind of damage it knows; the fast tests
check each kind against selection and extraction directly, the slow one runs the real ``avp ingest``
(Spark) over all of them mixed with simulated logs - without the capabilities that let root read a
chmod 000 file - and checks the dataset: every bad log quarantined with its reason, every good one
ingested once, the splits balanced over the good logs only, and a log repaired later given its slot
while every earlier assignment stays.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config, stages
from pipeline.contracts import verified_manifest
from pipeline.home import Home
from pipeline.registry import Registry
from spark_jobs.extract import LogTask, extract_log
from spark_jobs.ingest import select_logs
from spark_jobs.sources import mcap_log
from tests.reliability.corrupt_logs import MAX_POINTS, clean_frames, read_capability_dropped, write_corrupt_logs

REPO = Path(__file__).resolve().parents[2]
SHARES = {"train": 0.75, "test": 0.15, "val": 0.10}


def quarantine_reasons(home: Path) -> tuple[dict[str, str], list[str]]:
    """What selection and extraction (run directly, no Spark) make of the logs in ``home``: the reason per
    quarantined log id, and the ids that pass."""
    cfg = config.load({"home": str(home), "ingest.max_points": MAX_POINTS}, env={})
    selected, rejected = select_logs(cfg, Home.from_config(str(home)), lambda _m: None)
    reasons = {r["log_id"]: r["reason"] for r in rejected}
    passed = []
    for s in selected:
        summary, _rows = extract_log(LogTask(mcap_log.__name__, s["handle"], s["meta"].log_id, "c", 1.0,
                                             s["sha256"]), MAX_POINTS)
        if "reason" in summary:
            reasons[s["meta"].log_id] = summary["reason"]
        else:
            passed.append(s["meta"].log_id)
    return reasons, passed


def check_kinds(kinds, reasons: dict[str, str], ingested: set[str]) -> dict[str, bool]:
    """Per kind: were its logs quarantined with one of the expected reasons and its good ids ingested?"""
    return {c.kind: all(any(piece in reasons.get(log_id, "") for piece in pieces)
                        for log_id, pieces in c.quarantined.items())
            and all(log_id in ingested and log_id not in reasons for log_id in c.ingested)
            for c in kinds}


def test_the_generator_has_every_kind_and_selection_and_extraction_catch_each(tmp_path):
    logs = tmp_path / "home" / "logs"
    logs.mkdir(parents=True)
    mcap_log.write_log(str(logs / "good-0.mcap"), *clean_frames("good-0", 1))
    kinds = write_corrupt_logs(logs, logs / "good-0.mcap", unreadable=False)
    assert len(kinds) >= 25
    reasons, passed = quarantine_reasons(tmp_path / "home")
    verdicts = check_kinds(kinds, reasons, set(passed))
    assert [kind for kind, ok in verdicts.items() if not ok] == [], reasons
    assert passed == ["good-0"]  # the identical copy is the same log, once


def test_repeated_or_decreasing_timestamps_are_quarantined_with_the_frames_named(tmp_path):
    from tests.reliability.corrupt_logs import write_raw

    meta, frames = clean_frames("log-a", 0)
    frames[2].timestamp_ns = frames[1].timestamp_ns - 1
    write_raw(tmp_path / "log-a.mcap", meta, frames, mcap_log.log_metadata(meta, len(frames)))
    summary, rows = extract_log(LogTask(mcap_log.__name__, str(tmp_path / "log-a.mcap"), "log-a", "c", 1.0, ""), 10**6)
    assert rows == [] and summary["reason"].startswith("frame 2: timestamp ") and "after frame 1" in summary["reason"]


def test_an_unreadable_log_is_quarantined_not_fatal(tmp_path):
    """Root reads a chmod 000 file anyway: selection runs in a child without that capability."""
    logs = tmp_path / "home" / "logs"
    logs.mkdir(parents=True)
    for i in range(2):
        mcap_log.write_log(str(logs / f"good-{i}.mcap"), *clean_frames(f"good-{i}", i))
    (logs / "good-1.mcap").chmod(0)
    code = ("import json, sys; from tests.reliability.test_corrupt_logs import quarantine_reasons; "
            "print(json.dumps(quarantine_reasons(sys.argv[1])))")
    out = subprocess.run([*read_capability_dropped(), sys.executable, "-c", code, str(tmp_path / "home")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reasons, passed = json.loads(out.stdout.strip().splitlines()[-1])
    assert passed == ["good-0"] and "PermissionError" in reasons["good-1"]


def _ingest(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*read_capability_dropped(), sys.executable, "-m", "pipeline.cli", "ingest"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)


def _manifest(cfg) -> dict:
    """The manifest of the latest succeeded dataset (what the last ingest published)."""
    return json.loads(Path(Registry.open(cfg).get("dataset:fleet-lidar").location, "manifest.json").read_text())


def _check_balance(split_of: dict[str, str]) -> None:
    for split, share in SHARES.items():
        count = list(split_of.values()).count(split)
        assert abs(count - share * len(split_of)) <= 1, (split, count, len(split_of))


@pytest.mark.slow
def test_corrupt_logs_among_good_ones_are_quarantined_alone_and_the_splits_stay_balanced(tmp_path, avp_env):
    home = tmp_path / "home"
    overrides = {"home": str(home), "simulate.logs": "16", "simulate.frames": "3", "simulate.days": "1",
                 "simulate.beams": "16", "simulate.azimuth_steps": "256"}
    cfg = config.load(overrides, env={})
    stages.invoke("simulate", cfg, say=lambda m: None)
    logs = home / "logs"
    good = sorted(p.stem for p in logs.glob("*.mcap"))
    kinds = write_corrupt_logs(logs, logs / f"{good[0]}.mcap")
    env = {**avp_env, "AVP_INGEST__MAX_POINTS": str(MAX_POINTS), "AVP_INGEST__ROWS_PER_GROUP": "4",
           "PYTHONPATH": str(REPO)}

    first = _ingest(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = _manifest(cfg)
    reasons = {q["log_id"]: q["reason"] for q in manifest["quarantined"]}
    split_of = {log: split for split, info in manifest["splits"].items() for log in info["logs"]}
    verdicts = check_kinds(kinds, reasons, set(split_of))
    print(f"corrupt-log kinds: {len(verdicts)} tried, {sum(verdicts.values())} quarantined with their reason")
    assert [kind for kind, ok in verdicts.items() if not ok] == [], reasons
    assert sorted(split_of) == good  # every good log once (its identical copy too), no bad one
    assert set(reasons) == {log_id for c in kinds for log_id in c.quarantined}
    _check_balance(split_of)
    registry = Registry.open(cfg)
    ledger = registry.assignments("split:fleet-lidar:hash")
    assert ledger == split_of  # no slot for a quarantined log, no row for an unsafe id
    [record] = registry.list("log", good[0])  # the copy is the same log, read from the file named after it
    assert record.location == str(logs / f"{good[0]}.mcap")
    assert not any(a.name in ("..", "evil") or " " in a.name for a in registry.list("log"))

    # the quarantined logs are repaired: each gets its slot now, and no log that had one moves
    repaired = ["bad-nan-point", "bad-repeated-timestamp", "bad-truncated-50pct", "bad-unsupported-version"]
    for seed, log_id in enumerate(repaired):
        mcap_log.write_log(str(logs / f"{log_id}.mcap"), *clean_frames(log_id, 1000 + seed))
    second = _ingest(env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    grown = _manifest(cfg)
    grown_split_of = {log: split for split, info in grown["splits"].items() for log in info["logs"]}
    assert sorted(grown_split_of) == sorted([*good, *repaired])
    assert all(grown_split_of[log] == split for log, split in split_of.items())
    _check_balance(grown_split_of)
    assert registry.assignments("split:fleet-lidar:hash") == grown_split_of
    sealed = verified_manifest(registry.get("dataset:fleet-lidar"))  # every file checksummed by ingest
    assert any(name.endswith("_common_metadata") for name in sealed.files)
