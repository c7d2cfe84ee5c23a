"""The validate stage end to end on tiny datasets: real Spark pass, real Petastorm files, real GE validations.

Every dataset is built from a spec (logs with a split, a city, a class distribution) with the ingest
helpers (``encode_frame`` -> ``write_row_group`` -> ``write_petastorm_metadata`` + a manifest) and
registered with ``registry.build("dataset", ...)``, so validate sees exactly what ingest would publish.
One Spark session (the ``spark`` fixture, which validate's ``get_session`` then reuses) serves the module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pytest

from pipeline import config
from pipeline.errors import StageFailed, UserError
from pipeline.frames import BOX_COLUMNS, Frame
from pipeline.home import Home
from pipeline.registry import Registry
from pipeline.taxonomy import CLASS_ID
from tests.manifests import make_manifest

pytestmark = pytest.mark.slow

# A distribution every class is comfortably part of; pedestrians at 5% so that "five times as many in
# one city" is a clear drift there (and only a moderate one over the whole dataset).
BASE = {"ignore": 0.02, "ground": 0.40, "building": 0.20, "vegetation": 0.15, "pole": 0.05,
        "vehicle": 0.10, "pedestrian": 0.05, "cyclist": 0.03}
POINTS_PER_FRAME = 400


@dataclass
class LogSpec:
    log_id: str
    split: str
    city: str
    frames: int = 3
    shares: dict = field(default_factory=lambda: dict(BASE))


def fleet(prefix: str = "log", cities=("boston", "pittsburgh")) -> list[LogSpec]:
    """10 logs, 8/1/1 over train/test/val (within the default tolerance of 75/15/10), two cities with five
    logs each (the default ``drift_min_city_logs``, so each city gets drift checks of its own)."""
    splits = ["train"] * 8 + ["test", "val"]
    return [LogSpec(f"{prefix}-{i:02d}", split, cities[i % len(cities)]) for i, split in enumerate(splits)]


def labels_for(shares: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly apportioned labels (no sampling noise, so a clean version never drifts by chance)."""
    names = list(shares)
    weights = np.array([shares[k] for k in names], dtype=np.float64)
    counts = np.floor(weights / weights.sum() * n).astype(int)
    counts[np.argsort(-(weights / weights.sum() * n - counts))[: n - counts.sum()]] += 1
    labels = np.concatenate([np.full(c, CLASS_ID.get(k, k if isinstance(k, int) else 0), np.uint8)
                             for k, c in zip(names, counts)])
    return rng.permutation(labels)


def make_frame(spec: LogSpec, index: int, rng: np.random.Generator) -> Frame:
    points = np.concatenate([rng.uniform(-30, 30, (POINTS_PER_FRAME, 3)), rng.uniform(0, 1, (POINTS_PER_FRAME, 1))],
                            axis=1).astype(np.float32)
    boxes = np.zeros((2, len(BOX_COLUMNS)), np.float32)
    boxes[:, 3:6] = 1.5
    boxes[:, 7] = [CLASS_ID["vehicle"], CLASS_ID["pedestrian"]]
    boxes[:, 8] = [1, 2]
    return Frame(log_id=spec.log_id, frame_index=index, timestamp_ns=1_800_000_000_000_000_000 + index * 100_000_000,
                 points=points, labels=labels_for(spec.shares, POINTS_PER_FRAME, rng), boxes=boxes,
                 ego=np.zeros(6), gps=np.array([42.36, -71.06, 10.0]), route=np.zeros(3))


def build_dataset(registry: Registry, logs: list[LogSpec], name: str = "fleet-lidar",
                  tweak_frame: Callable[[Frame], Frame] | None = None,
                  tweak_rows: Callable[[str, list[dict]], list[dict]] | None = None):
    """Write ``logs`` as a Petastorm dataset the way ingest does and register it as ``dataset:<name>``."""
    from spark_jobs.ingest import write_petastorm_metadata
    from spark_jobs.rows import encode_frame, write_row_group

    def build(staging, record):
        rng = np.random.default_rng(record.version)
        summaries = {}
        for split in ("train", "test", "val"):
            os.makedirs(os.path.join(staging, split))
            rows = []
            for spec in [s for s in logs if s.split == split]:
                for i in range(spec.frames):
                    frame = make_frame(spec, i, rng)
                    frame = tweak_frame(frame) if tweak_frame else frame
                    rows.append(encode_frame(frame, spec.city, 1.0))
                summaries[spec.log_id] = {"log_id": spec.log_id, "split": split, "city": spec.city,
                                          "frames": spec.frames}
            if tweak_rows:
                rows = tweak_rows(split, rows)
            if rows:
                half = (len(rows) + 1) // 2  # two files of one row group per split, as with reader_ranks=2
                for g, chunk in enumerate((rows[:half], rows[half:])):
                    if chunk:
                        write_rows(os.path.join(staging, split, f"part-{g:05d}.parquet"), chunk, write_row_group)
                write_petastorm_metadata(os.path.join(staging, split))
        make_manifest(record.ref, {s: {"logs": [l.log_id for l in logs if l.split == s], "frames": 0, "points": 0,
                                       "row_groups": []} for s in ("train", "test", "val")},
                      summaries, reader_ranks=2).save_to(staging)
        return {"frames": sum(s.frames for s in logs)}

    spec_key = [(s.log_id, s.split, s.city, s.frames, sorted(s.shares.items(), key=str)) for s in logs]
    return registry.build("dataset", name, entry_point="tests:build_dataset", builder=build,
                          config={"logs": repr(spec_key), "tweaks": repr((tweak_frame, tweak_rows))})


def write_rows(path: str, rows: list[dict], write_row_group) -> None:
    """``write_row_group``, except for rows holding a None: the ingest schema is non-nullable, so those are
    written with a nullable copy of it (as another writer might)."""
    if not any(v is None for r in rows for v in r.values()):
        write_row_group(path, rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spark_jobs.rows import arrow_schema

    schema = pa.schema([f.with_nullable(True) for f in arrow_schema()])
    pq.write_table(pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema), path,
                   row_group_size=len(rows), compression="none")


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from spark_jobs.spark import get_session

    home = Home.from_config(str(tmp_path_factory.mktemp("spark-home")))
    return get_session("local[2]", home, app_name="test-validate")


def validate(cfg, registry, dataset=None, **overrides):
    from spark_jobs import validate as stage

    for dotted, value in overrides.items():
        config.set_value(cfg, dotted, value)
    messages: list[str] = []
    try:
        result = stage.run(cfg, registry, say=messages.append, dataset=dataset)
    except StageFailed as exc:
        exc.messages = messages  # type: ignore[attr-defined]
        raise
    result["messages"] = messages
    return result


def failed_checks(message: str) -> set[str]:
    return {line.strip()[2:].split(":", 1)[0] for line in message.splitlines() if line.strip().startswith("- ")}


def ped_times_five_in(city: str):
    """A spec transform: five times as many pedestrians in ``city`` (other classes unchanged)."""
    def apply(logs):
        return [replace(s, shares={**s.shares, "pedestrian": s.shares["pedestrian"] * 5}) if s.city == city else s
                for s in logs]
    return apply


# ----------------------------------------------------------------------------------------- tests
def test_clean_first_version_passes_skips_drift_and_records_the_verdict(cfg, registry, spark):
    data = build_dataset(registry, fleet())
    result = validate(cfg, registry)
    assert result["verdict"] == "passed" and result["dataset"] == data.ref
    assert result["previous"] is None
    assert any("first version" in m and "drift checks" in m and "skipped" in m for m in result["messages"])
    meta = registry.get(data.id).meta
    assert meta["validation"] == "passed" and meta["validation_ref"] == result["ref"]

    validation = registry.get(result["ref"])
    assert {p.kind for p in registry.parents(validation.id)} == {"dataset", "statistics"}
    summary = json.load(open(os.path.join(validation.location, "validation.json")))
    assert {c["name"] for c in summary["checks"]}.isdisjoint({"class_share_drift", "class_kl_drift"})
    assert summary["skipped"] == ["class_share_drift", "class_kl_drift"]
    assert os.path.exists(result["report"]) and os.path.exists(os.path.join(validation.location, "class_distribution.png"))

    stats = json.load(open(os.path.join(registry.get(result["statistics"]).location, "statistics.json")))
    train = stats["splits"]["train"]
    assert train["frames"] == 24 and len(train["logs"]) == 8
    assert {log["frames"] for log in train["logs"].values()} == {3}
    assert train["points"] == 24 * POINTS_PER_FRAME
    assert int(train["class_points"][str(CLASS_ID["ground"])]) == 24 * 160  # 40% of 400, exactly apportioned
    assert train["box_classes"] == {str(CLASS_ID["vehicle"]): 24, str(CLASS_ID["pedestrian"]): 24}
    assert train["cities"]["boston"]["frames"] == 12
    assert set(train["missing"].values()) == {0} and set(train["non_finite"].values()) == {0}

    # Re-validating reuses the statistics and the validation (content keys), and gives the same verdict.
    again = validate(cfg, registry)
    assert again["statistics"] == result["statistics"] and again["ref"] == result["ref"]
    assert any("cache hit" in m for m in again["messages"])


def test_drift_scenario(cfg, registry, spark):
    """v1 clean (passes, first version); v2 has five times the pedestrians in boston (fails on drift against
    v1, report readable offline); v3 is clean again (compared with v1, since v2 did not pass); loosened
    drift thresholds let v2 pass."""
    build_dataset(registry, fleet())
    first = validate(cfg, registry)
    build_dataset(registry, ped_times_five_in("boston")(fleet("new")))
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry)
    message = str(failure.value)
    assert failed_checks(message) == {"class_share_drift", "class_kl_drift"}, message
    assert "pedestrian share rose from 5.0% to 20.8% in city boston (moved 15.7 points, more than 10.0)" in message
    assert "KL divergence of the class distribution in city boston is 0.15" in message
    assert "pittsburgh" not in message and "whole dataset" not in message  # only boston moved enough
    assert "report: " in message
    assert any("pedestrian share rose from 5.0% to 20.8% in city boston" in m for m in failure.value.messages)
    v2 = registry.get("dataset:fleet-lidar@v2")
    assert v2.meta["validation"] == "failed"
    validation = registry.get(v2.meta["validation_ref"])
    parents = registry.parents(validation.id)
    assert sorted(p.kind for p in parents) == ["dataset", "statistics", "statistics"]
    assert first["statistics"] in {p.ref for p in parents}  # the previous version's statistics

    # the report of the failed version renders offline and names the move in words
    report = os.path.join(validation.location, "report.html")
    assert "pedestrian share rose from 5.0% to 20.8% in city boston" in open(report).read()
    pages = [os.path.join(d, f) for d, _, fs in os.walk(validation.location) for f in fs if f.endswith(".html")]
    assert len(pages) >= 5  # report, index, validation pages, suite pages
    for page in pages:
        text = open(page).read()
        for remote in ('<link rel="stylesheet" href="http', '<script src="http', 'src="https://'):
            assert remote not in text, (page, remote)  # nothing is fetched from the network
    index = open(os.path.join(validation.location, "data_docs", "index.html")).read()
    assert "bootstrapTable" not in index and "<tbody><tr>" in index and "validations/class_drift/" in index

    # v3 is clean: compared with v1, the last version that passed
    build_dataset(registry, fleet("back"))
    third = validate(cfg, registry)
    assert third["previous"] == "dataset:fleet-lidar@v1" and third["verdict"] == "passed"

    # drift thresholds come from config: loosened, v2 passes against v1
    loosened = validate(cfg, registry, dataset="2", **{"validate.max_linf_drift": 0.2, "validate.max_kl_drift": 0.5})
    assert loosened["verdict"] == "passed" and loosened["previous"] == "dataset:fleet-lidar@v1"
    assert registry.get("dataset:fleet-lidar@v2").meta["validation"] == "passed"


def test_missing_class_fails(cfg, registry, spark):
    no_cyclists = [replace(s, shares={k: v for k, v in s.shares.items() if k != "cyclist"}) for s in fleet()]
    build_dataset(registry, no_cyclists)
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry)
    assert failed_checks(str(failure.value)) == {"required_classes_present"}
    assert "class cyclist is missing: 0 points" in str(failure.value)


def off_ratio(logs):
    """5/3/2 logs instead of 8/1/1: train and test are off by more than 10 points, val by exactly 10."""
    return [replace(s, split=split) for s, split in zip(logs, ["train"] * 5 + ["test"] * 3 + ["val"] * 2)]


def test_split_ratio_off_fails(cfg, registry, spark):
    build_dataset(registry, off_ratio(fleet()))
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry)
    message = str(failure.value)
    assert failed_checks(message) == {"split_shares"}
    assert "train has 5 of 10 logs (50.0%), target 75.0% +- 10.0%" in message
    assert "test has 3 of 10 logs (30.0%), target 15.0% +- 10.0%" in message
    assert "val has" not in message  # 20% is within 10 +- 10


def test_nulls_and_non_finite_values_fail(cfg, registry, spark):
    def nan_points(frame):
        if frame.log_id == "log-01" and frame.frame_index == 0:
            frame.points[3, 0] = np.nan
        return frame

    def null_boxes(split, rows):
        if split == "test":
            rows[0] = {**rows[0], "boxes": None}
        return rows

    build_dataset(registry, fleet(), tweak_frame=nan_points, tweak_rows=null_boxes)
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry)
    message = str(failure.value)
    assert failed_checks(message) == {"no_missing_values", "no_non_finite_values"}
    assert "1 frame(s) in test have a missing boxes" in message
    assert "1 frame(s) in train have NaN/inf values in points" in message


def test_class_id_outside_the_taxonomy_fails(cfg, registry, spark):
    logs = fleet()
    logs[2] = replace(logs[2], shares={**logs[2].shares, 9: 0.01})
    build_dataset(registry, logs)
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry)
    assert failed_checks(str(failure.value)) == {"class_ids_in_taxonomy"}
    assert "class id 9 (12 points in train) is outside the taxonomy 0..7" in str(failure.value)


def test_thresholds_come_from_config(cfg, registry, spark):
    build_dataset(registry, fleet())
    # ground is 40% of the points: a 35% cap fails it, the default 95% does not
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry, **{"validate.max_class_share": 0.35})
    assert failed_checks(str(failure.value)) == {"class_shares_within_bounds"}
    assert "ground share 40.0% is outside [0.0%, 35.0%]" in str(failure.value)
    assert validate(cfg, registry, **{"validate.max_class_share": 0.95})["verdict"] == "passed"


def test_warn_only_does_not_raise_but_marks_the_dataset_failed(cfg, registry, spark):
    data = build_dataset(registry, off_ratio(fleet()))
    result = validate(cfg, registry, dataset="1", **{"validate.warn_only": True})
    assert result["verdict"] == "failed"
    assert any("split_shares" in m for m in result["messages"])
    assert registry.get(data.id).meta["validation"] == "failed"
    assert registry.get(data.id).meta["validation_ref"] == result["ref"]


def test_dataset_references(cfg, registry, spark):
    with pytest.raises(UserError, match="avp ingest"):
        validate(cfg, registry)
    build_dataset(registry, fleet())
    assert validate(cfg, registry, dataset="dataset:fleet-lidar@v1")["dataset"] == "dataset:fleet-lidar@v1"
    with pytest.raises(UserError, match="no artifact"):
        validate(cfg, registry, dataset="7")
    with pytest.raises(UserError, match="not a dataset"):
        validate(cfg, registry, dataset="model:fleet-lidar@v1")


def test_simulated_fleet_ingest_then_validate_passes_with_defaults(tmp_path, spark):
    """End to end with the simulator: the first day's logs, then both days; clean data passes the default
    suite, and the second version is compared with the first."""
    from pipeline import stages

    base = {"home": str(tmp_path / "home"), "simulate.logs": "12", "simulate.frames": "2", "simulate.days": "2",
            "simulate.beams": "16", "simulate.azimuth_steps": "256"}
    first_day = config.load({**base, "ingest.date_to": "2026-11-02"}, env={})
    stages.invoke("simulate", first_day, say=lambda m: None)
    stages.invoke("ingest", first_day, say=lambda m: None)
    first = stages.invoke("validate", first_day, say=lambda m: None)
    assert first["verdict"] == "passed" and first["previous"] is None, first["tables"][0]

    both_days = config.load(base, env={})
    stages.invoke("ingest", both_days, say=lambda m: None)
    messages = []
    second = stages.invoke("validate", both_days, say=messages.append)
    # two logs per city on the first day: too few scenes for a per-city comparison, and it says so
    assert any(m.startswith("no per-city drift check for") and "drift_min_city_logs=5" in m for m in messages)
    assert second["verdict"] == "passed", second["tables"][0]
    assert second["previous"] == first["dataset"] and second["dataset"].endswith("@v2")
    registry = Registry.open(both_days)
    assert registry.get(second["dataset"]).meta["validation"] == "passed"


def test_an_expectation_registered_from_outside_runs_in_the_suite(cfg, registry, spark, monkeypatch):
    """The 'add an expectation' recipe of docs/architecture.md, done once: a table builder and a check
    builder registered from here take part in validation like the built-in ones (GE runs them, the gate
    names them), and they are gone again when the test ends."""
    import great_expectations.expectations as gxe
    import pandas as pd

    from spark_jobs import expectations as suite

    def city_table(inputs: suite.SuiteInputs) -> dict[str, pd.DataFrame]:
        cities = [log["city"] for split in inputs.statistics["splits"].values() for log in split["logs"].values()]
        return {"cities": pd.DataFrame([{"key": c, "city": c, "logs": cities.count(c)} for c in sorted(set(cities))])}

    def known_cities(inputs: suite.SuiteInputs) -> list[suite.Check]:
        return [suite.Check("cities_known", "cities", "every city is one the fleet operates in",
                            gxe.ExpectColumnValuesToBeInSet(column="city", value_set=["boston", "pittsburgh"]),
                            lambda r: f"city {r['city']} ({r['logs']} logs) is not operated in")]

    monkeypatch.setattr(suite, "TABLE_BUILDERS", [*suite.TABLE_BUILDERS, city_table])
    monkeypatch.setattr(suite, "CHECK_BUILDERS", [*suite.CHECK_BUILDERS, known_cities])

    build_dataset(registry, fleet())
    passed = validate(cfg, registry)
    summary = json.load(open(os.path.join(registry.get(passed["ref"]).location, "validation.json")))
    assert passed["verdict"] == "passed" and "cities_known" in {c["name"] for c in summary["checks"]}

    build_dataset(registry, fleet(cities=("boston", "atlantis")))
    with pytest.raises(StageFailed) as failure:
        validate(cfg, registry)
    assert failed_checks(str(failure.value)) == {"cities_known"}
    assert "city atlantis (5 logs) is not operated in" in str(failure.value)
