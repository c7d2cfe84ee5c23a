"""The real DAG, run by Airflow (`airflow dags test`, SQLite metadata DB) on tiny simulated data:
a whole day ends with a registered package, a re-run day is served from cache, and a failed validation
stops the run before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.registry import Registry

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # two or three DAG runs per test

TINY = {  # small and fast, but every stage does its real work
    "AVP_SIMULATE__LOGS": "10", "AVP_SIMULATE__FRAMES": "3", "AVP_SIMULATE__DAYS": "2",
    "AVP_SIMULATE__BEAMS": "16", "AVP_SIMULATE__AZIMUTH_STEPS": "256",
    "AVP_INGEST__ROWS_PER_GROUP": "2", "AVP_VALIDATE__SPLIT_TOLERANCE": "0.2",
    "AVP_TRAIN__EPOCHS": "1", "AVP_TRAIN__NP": "1", "AVP_TRAIN__BACKEND": "ddp", "AVP_TRAIN__MAX_POINTS": "2000",
    "AVP_EVALUATE__MIN_MIOU": "0.0", "AVP_EVALUATE__LATENCY_RUNS": "2", "AVP_EVALUATE__LATENCY_WARMUP": "1",
    "AVP_EVALUATE__AOT_INDUCTOR": "false",
    "AVP_EVALUATE__LATENCY_P99_BUDGET_MS": "600000",  # a busy shared CPU must not make the model unblessed
    "AVP_SERVE__AOT_INDUCTOR": "false", "AVP_SERVE__EXAMPLE_POINTS": "500", "AVP_SERVE__LATENCY_RUNS": "2",
}


def airflow_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVP_", "AIRFLOW"))}
    env.update(TINY)
    env.update({
        "AVP_HOME": str(tmp / "home"), "AIRFLOW_HOME": str(tmp / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4", "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
    })
    env.update(extra)
    return env


def run(env, *args, timeout=900):
    return subprocess.run(list(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def dag_test(env, day):
    """(succeeded, log) of `airflow dags test` (it exits with "DagRun failed" when the run fails). Nobody is
    there to answer approve_promotion: it is marked done without promoting (a promotion would change the
    next evaluation's baseline, so a re-run day would no longer be a cache hit; the approval itself is
    tests/dags/test_hitl.py's and test_standalone's)."""
    out = run(env, "airflow", "dags", "test", "avp_daily", day, "--mark-success-pattern", "approve_promotion")
    return out.returncode == 0, out.stdout + out.stderr


def prepare(tmp: Path, **extra: str) -> Path:
    """An Airflow home (SQLite metadata DB, the training pool) and a pipeline home with simulated logs."""
    env = airflow_env(tmp, **extra)
    migrate = run(env, "airflow", "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    assert run(env, "airflow", "pools", "set", "avp_training", "1", "one training at a time").returncode == 0
    assert run(env, "avp", "simulate").returncode == 0
    return tmp


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("dag"))


def registry_for(env) -> Registry:
    return Registry.open(config.load({"home": env["AVP_HOME"]}, env={}))


def test_a_day_runs_end_to_end_and_a_rerun_is_served_from_cache(airflow_home):
    env = airflow_env(airflow_home)
    ok, log = dag_test(env, "2026-11-03")  # midnight of Nov 3: the logs of Nov 1 and 2
    assert ok, log[-4000:]
    registry = registry_for(env)
    [package] = registry.list("package", state="succeeded")
    kinds = {a.kind for _d, a in registry.lineage(package.id, "up")}
    assert {"model", "metrics", "dataset", "log"} <= kinds
    dataset = next(a for _d, a in registry.lineage(package.id, "up") if a.kind == "dataset")
    assert dataset.meta["validation"] == "passed" and dataset.dag_id == "avp_daily"
    assert dataset.meta["date_to"] == "2026-11-03"  # the data interval chose the logs
    assert Path(package.location).is_dir()

    counts = {kind: len(registry.list(kind)) for kind in ("dataset", "model", "metrics", "package")}
    ok, log = dag_test(env, "2026-11-03")  # the same day again
    assert ok, log[-4000:]
    assert {kind: len(registry.list(kind)) for kind in counts} == counts  # nothing rebuilt
    assert "cache hit" in log


def test_failed_validation_stops_the_run_before_training(airflow_home):
    # a class-share ceiling no real dataset meets: validation must fail and training must not start
    env = airflow_env(airflow_home, AVP_VALIDATE__MAX_CLASS_SHARE="0.05", AVP_INGEST__DATASET_NAME="strict")
    ok, log = dag_test(env, "2026-11-02")
    assert not ok and "DagRun failed" in log, log[-4000:]
    registry = registry_for(env)
    [dataset] = registry.list("dataset", "strict")
    assert dataset.meta["validation"] == "failed"
    assert registry.children(dataset.id) == [] or all(c.kind in ("statistics", "validation")
                                                     for c in registry.children(dataset.id))
    assert "class_shares_within_bounds" in log


KINDS = ("log", "dataset", "statistics", "validation", "model", "metrics", "package")


def test_a_day_with_no_new_logs_and_no_new_feedback_is_a_cache_hit_end_to_end(tmp_path):
    """The logs are simulated on Nov 1 and 2 only, so the runs of Nov 3 and Nov 4 select the same logs.
    Feedback is off (``evaluate.worst_scenes=0``: no hard scenes, so the weights file stays empty): with it
    on, day 1's evaluation would up-weight logs and day 2 would rightly build a new dataset."""
    no_feedback = {"AVP_EVALUATE__WORST_SCENES": "0"}
    env = airflow_env(prepare(tmp_path, **no_feedback), **no_feedback)
    ok, log = dag_test(env, "2026-11-03")
    assert ok, log[-4000:]
    registry = registry_for(env)
    built = {kind: [a.ref for a in registry.list(kind)] for kind in KINDS}
    assert all(len(built[kind]) == 1 for kind in KINDS if kind != "log") and len(built["log"]) == 10, built
    weights = Path(env["AVP_HOME"], "feedback", "sample_weights.json")
    assert json.loads(weights.read_text()) == {}  # the premise: day 1 gave no feedback

    ok, log = dag_test(env, "2026-11-04")  # a new window, the same logs
    assert ok, log[-4000:]
    assert {kind: [a.ref for a in registry.list(kind)] for kind in KINDS} == built  # nothing new, not a log
    for kind in ("dataset", "statistics", "validation", "model", "metrics", "package"):
        assert f"cache hit: {built[kind][0]} has the same content key" in log, kind
    [dataset] = registry.list("dataset")
    assert dataset.meta["date_to"] == "2026-11-03"  # built by day 1, reused by day 2
