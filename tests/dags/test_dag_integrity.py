"""The DAG file: imports cleanly and quickly, wiring only, the expected tasks and dependencies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert list(dagbag.dags) == ["avp_daily"]


def test_tasks_dependencies_and_operator_controls(dagbag):
    dag = dagbag.dags["avp_daily"]
    edges = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert edges == {"ingest": ["validate"], "validate": ["train"], "train": ["evaluate"],
                     "evaluate": ["serve"], "serve": ["approve_promotion"], "approve_promotion": []}
    assert dag.task_dict["train"].pool == "avp_training"
    assert set(dag.params) >= {"epochs", "backend", "np", "force", "window", "auto_promote"}
    assert dag.params["auto_promote"] is False  # a person approves unless the run says otherwise
    assert dag.doc_md and "backfill" in dag.doc_md
    outlets = {t.task_id: [a.uri for a in t.outlets] for t in dag.tasks}
    assert outlets["ingest"] == ["avp://dataset/fleet-lidar"] and outlets["train"] == ["avp://model/bev_segnet"]
    for t in dag.tasks:  # every task's docstring renders in the UI
        assert t.doc_md or getattr(t, "doc", None), t.task_id


def test_dag_file_imports_nothing_heavy():
    code = ("import sys, time; t = time.time(); import dags.avp_daily; "
            "heavy = [m for m in ('torch', 'pyspark', 'petastorm', 'great_expectations', 'spark_jobs', 'training') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_spark_connection_turns_ingest_into_spark_submit(tmp_path):
    """With AVP_SPARK_CONN_ID set, ingest is plan -> SparkSubmitOperator -> result, and still feeds validate."""
    code = """if True:
        import json, os
        from airflow.dag_processing.dagbag import DagBag
        dag = DagBag(dag_folder=os.path.join(os.getcwd(), "dags")).dags["avp_daily"]
        submit = dag.task_dict["spark_submit_ingest"]
        print(json.dumps({"edges": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
                          "type": type(submit).__name__, "conn": submit._conn_id, "app": submit.application,
                          "args0": submit.application_args[0], "env": sorted(submit.env_vars),
                          "outlets": [a.uri for a in dag.task_dict["ingest"].outlets]}))
    """
    env = {**os.environ, "AVP_SPARK_CONN_ID": "avp_spark", "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["edges"] == {"plan_ingest": ["ingest", "spark_submit_ingest"], "spark_submit_ingest": ["ingest"],
                              "ingest": ["validate"], "validate": ["train"], "train": ["evaluate"],
                              "evaluate": ["serve"], "serve": ["approve_promotion"], "approve_promotion": []}
    assert found["type"] == "SparkSubmitOperator" and found["conn"] == "avp_spark"
    assert found["app"] == str(REPO / "spark_jobs" / "ingest.py") and os.path.isfile(found["app"])
    assert found["args0"] == "--request" and found["env"] == ["PYSPARK_DRIVER_PYTHON", "PYSPARK_PYTHON"]
    assert found["outlets"] == ["avp://dataset/fleet-lidar"]


@pytest.mark.parametrize("queue", ["", "training"])
def test_training_queue_routes_only_train(tmp_path, queue):
    """AVP_TRAINING_QUEUE sends `train` (only) to that Celery queue; unset, every task is on the default queue."""
    code = """if True:
        import json, os
        from airflow.configuration import conf
        from airflow.dag_processing.dagbag import DagBag
        dag = DagBag(dag_folder=os.path.join(os.getcwd(), "dags")).dags["avp_daily"]
        print(json.dumps({"default": conf.get("operators", "default_queue"),
                          "queues": {t.task_id: t.queue for t in dag.tasks}}))
    """
    env = {**os.environ, "AVP_TRAINING_QUEUE": queue, "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    default = found["default"]
    assert found["queues"] == {task: (queue or default) if task == "train" else default
                               for task in ("ingest", "validate", "train", "evaluate", "serve", "approve_promotion")}
