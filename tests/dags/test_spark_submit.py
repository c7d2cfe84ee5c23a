"""Ingest through `SparkSubmitOperator` on a real Spark standalone cluster: a master and a worker started
on localhost from pyspark's own `spark-class` (tests/spark_cluster.py), an Airflow Spark connection to
it, and the real DAG run by `airflow dags test`. The dataset must be built by an application on that master, be validated by the
next task, and be the very dataset a local `avp ingest` of the same day finds in its cache; the model
must be trained by Horovod ranks running as tasks of a second application on that master."""

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
    env = airflow_env(tmp_path, AVP_SPARK_CONN_ID="avp_spark", AIRFLOW_CONN_AVP_SPARK=master_url,
                      AVP_TRAIN__BACKEND="horovod", AVP_TRAIN__NP="2")  # Horovod ranks as tasks on the worker
    migrate = run(env, "airflow", "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    assert run(env, "avp", "simulate").returncode == 0

    assert run(env, "airflow", "pools", "set", "avp_training", "1", "one training at a time").returncode == 0

    # Evaluate and serve are the DAG-run test's business: here ingest and train run on the cluster.
    out = run(env, "airflow", "dags", "test", "avp_daily", "2026-11-03", "--mark-success-pattern",
              "^(evaluate|serve|approve_promotion)$")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "spark_submit_ingest" in log and f"--master {master_url}" in log

    registry = Registry.open(config.load({"home": env["AVP_HOME"]}, env={}))
    [dataset] = registry.list("dataset", state="succeeded")
    assert dataset.meta["spark_master"] == master_url  # built by the cluster, not a local session
    assert dataset.meta["validation"] == "passed"  # and the next task validated it
    assert dataset.meta["date_to"] == "2026-11-03"  # the run's data interval reached the job
    [model] = registry.list("model", state="succeeded")
    assert model.meta["launcher"] == "spark" and model.meta["spark_master"] == master_url  # the connection's
    assert [p.ref for p in registry.parents(model.id)] == [dataset.ref]
    assert f"Returned value was: {model.ref}" in log  # XCom carries the reference only
    apps = httpx.get(f"{ui_url}/json/", timeout=10).json()["completedapps"]
    assert sorted((a["name"], a["state"]) for a in apps) == [(f"avp-ingest-{dataset.ref}", "FINISHED"),
                                                             (f"avp-train-{model.ref}", "FINISHED")]

    # The same stage locally, for the same day: the cluster's dataset is found in the cache.
    local = run(env, "avp", "ingest", "--date-to", "2026-11-03")
    assert local.returncode == 0, local.stderr[-2000:]
    assert f"{dataset.ref} (cache hit)" in local.stdout
    [result_file] = (Path(env["AVP_HOME"]) / "runs" / "airflow" / "avp_daily").glob("*/ingest-result.json")
    assert json.loads(result_file.read_text())["ref"] == dataset.ref  # what the job reported to the DAG
