"""Ingest through `SparkSubmitOperator` on a real Spark standalone cluster: a master and a worker started
on localhost from pyspark's own `spark-class` (tests/spark_cluster.py), an Airflow Spark connection to
it, and the real DAG run by `airflow dags test`. The dataset must be built by an application on that master, be validated by the
next task, and be the very dataset a local `avp ingest` of the same day finds in its cache."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pipeline import config
from pipeline.registry import Registry
from tests.dags.test_dag_run import airflow_env, run
from tests.spark_cluster import standalone_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def spark_cluster(tmp_path):
    """(master URL, master web UI URL) of a one-worker (2 cores) standalone cluster bound to 127.0.0.1."""
    with standalone_cluster(tmp_path / "spark") as cluster:
        yield cluster.master_url, cluster.ui_url


def test_ingest_runs_through_spark_submit_on_a_standalone_cluster(tmp_path, spark_cluster):
    master_url, ui_url = spark_cluster
    env = airflow_env(tmp_path, AVP_SPARK_CONN_ID="avp_spark", AIRFLOW_CONN_AVP_SPARK=master_url)
    migrate = run(env, "airflow", "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    assert run(env, "avp", "simulate").returncode == 0

    # The training half is the DAG-run test's business: here ingest (on the cluster) and validate run.
    out = run(env, "airflow", "dags", "test", "avp_daily", "2026-11-03",
              "--mark-success-pattern", "^(train|evaluate|serve)$")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "spark_submit_ingest" in log and f"--master {master_url}" in log

    registry = Registry.open(config.load({"home": env["AVP_HOME"]}, env={}))
    [dataset] = registry.list("dataset", state="succeeded")
    assert dataset.meta["spark_master"] == master_url  # built by the cluster, not a local session
    assert dataset.meta["validation"] == "passed"  # and the next task validated it
    assert dataset.config["date_to"] == "2026-11-03"  # the run's data interval reached the job
    apps = httpx.get(f"{ui_url}/json/", timeout=10).json()["completedapps"]
    assert [(a["name"], a["state"]) for a in apps] == [(f"avp-ingest-{dataset.ref}", "FINISHED")]

    # The same stage locally, for the same day: the cluster's dataset is found in the cache.
    local = run(env, "avp", "ingest", "--date-to", "2026-11-03")
    assert local.returncode == 0, local.stderr[-2000:]
    assert f"{dataset.ref} (cache hit)" in local.stdout
    [result_file] = (Path(env["AVP_HOME"]) / "runs" / "airflow" / "avp_daily").glob("*/ingest-result.json")
    assert json.loads(result_file.read_text())["ref"] == dataset.ref  # what the job reported to the DAG
