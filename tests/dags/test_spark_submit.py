"""Ingest through `SparkSubmitOperator` on a real Spark standalone cluster: a master and a worker started
on localhost from pyspark's own `spark-class`, an Airflow Spark connection to it, and the real DAG run by
`airflow dags test`. The dataset must be built by an application on that master, be validated by the
next task, and be the very dataset a local `avp ingest` of the same day finds in its cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pipeline import config
from pipeline.registry import Registry
from tests.dags.test_dag_run import airflow_env, run
from tests.dags.test_standalone import free_port, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def spark_cluster(tmp_path):
    """(master URL, master web UI URL) of a one-worker standalone cluster bound to 127.0.0.1."""
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    port, ui, worker_ui = free_port(), free_port(), free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_WORKER_DIR": str(tmp_path / "spark-work"),
           "PYSPARK_PYTHON": sys.executable}
    master_url, ui_url = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui}"
    logs = open(tmp_path / "spark-cluster.log", "w")
    procs = [subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)],
                              env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        procs.append(subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                       "--cores", "2", "--memory", "2g", "--webui-port", str(worker_ui), master_url],
                                      env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True))

        def alive_workers():
            try:
                return httpx.get(f"{ui_url}/json/", timeout=5).json().get("aliveworkers", 0) >= 1
            except (httpx.HTTPError, ValueError):
                return False

        wait_for(alive_workers, 120, "the Spark worker to register with the master")
        yield master_url, ui_url
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        logs.close()


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
    assert dataset.meta["date_to"] == "2026-11-03"  # the run's data interval reached the job
    apps = httpx.get(f"{ui_url}/json/", timeout=10).json()["completedapps"]
    assert [(a["name"], a["state"]) for a in apps] == [(f"avp-ingest-{dataset.ref}", "FINISHED")]

    # The same stage locally, for the same day: the cluster's dataset is found in the cache.
    local = run(env, "avp", "ingest", "--date-to", "2026-11-03")
    assert local.returncode == 0, local.stderr[-2000:]
    assert f"{dataset.ref} (cache hit)" in local.stdout
    [result_file] = (Path(env["AVP_HOME"]) / "runs" / "airflow" / "avp_daily").glob("*/ingest-result.json")
    assert json.loads(result_file.read_text())["ref"] == dataset.ref  # what the job reported to the DAG
