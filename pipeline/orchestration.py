"""What the Airflow tasks need beyond the stage entry functions: the DAG's params (from the stage specs),
the run's config from its params and data interval, and one call per stage. Kept here (not in ``dags/``)
so the DAG file is wiring only."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import typing
from typing import Any, Literal, Mapping

from pipeline import config as config_mod
from pipeline import stages
from pipeline.errors import StageFailed

# DAG-only params: which logs a run selects (mapped onto ingest.date_from/date_to by ``run_overrides``).
WINDOW_PARAMS: dict[str, dict[str, Any]] = {
    "window": {"default": "cumulative", "enum": ["cumulative", "rolling"],
               "description": "which logs make the dataset"},
    "window_days": {"default": 7, "type": "integer", "minimum": 1, "description": "days in a rolling window"},
}
# DAG-only params: where the run stops and a registered dataset to train on instead of ingesting one (the
# registry API's POST /datasets and /models set them), and whether a blessed package skips the human approval.
UNTIL_STAGES = ("validate", "train", "evaluate", "serve")
BUILD_PARAMS: dict[str, dict[str, Any]] = {
    "until": {"default": "serve", "enum": list(UNTIL_STAGES),
              "description": "the last stage this run performs (validate: a dataset build stops after validation)"},
    "dataset": {"default": None, "type": ["null", "string"],
                "description": "a registered dataset (dataset:name@vN) to train on instead of ingesting one"},
    # read by the approve_promotion task (pipeline.approval): skip the human wait
    "auto_promote": {"default": False, "type": "boolean",
                     "description": "promote a blessed package without waiting for a person's approval "
                                    "(for teams that gate on metrics alone)"},
}
# Config fields a DAG run may set by their full name (declared as params of that name). Nothing else in a
# run's conf reaches the config: where data is read, which Spark master runs ingest and where the pipeline
# writes are the deployment's (its environment and Airflow connections), never a trigger's.
# ``ingest.source_path`` is the folder of a real dataset a run imports with the ``source`` param (issue 15): it is
# only read, and the dataset is written into the deployment's home like any other.
CONF_FIELDS = ("ingest.train_share", "ingest.test_share", "ingest.val_share", "ingest.source_path")
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def declared_fields() -> dict[str, str]:
    """DAG param -> the config field it sets: the stage flags that name a param, then ``CONF_FIELDS``."""
    return {**stages.dag_param_fields(), **{dotted: dotted for dotted in CONF_FIELDS}}


def dag_params() -> dict[str, dict[str, Any]]:
    """The DAG's params as ``airflow.sdk.Param`` keyword arguments: one per stage flag that names a DAG param
    and one per ``CONF_FIELDS`` field (type, enum, range and description from its config field; ``None``
    keeps the config's value, a boolean defaults to the config default), then the window params. Light: no
    Airflow, torch or Spark."""
    params = {}
    for name, dotted in declared_fields().items():
        doc = config_mod.describe(dotted)
        if doc.annotation is bool:
            params[name] = {"default": doc.default, "type": "boolean", "description": doc.summary()}
            continue
        choices = typing.get_args(doc.annotation) if typing.get_origin(doc.annotation) is Literal else ()
        json_type = "string" if choices else _JSON_TYPES[doc.annotation]
        params[name] = {"default": None, "type": ["null", json_type], "description": doc.summary()}
        if choices:
            params[name]["enum"] = [None, *choices]
        if dotted in config_mod.BOUNDS:
            params[name].update(config_mod.BOUNDS[dotted].json_schema())
    return {**params, **WINDOW_PARAMS, **BUILD_PARAMS}


def _day(value: Any) -> dt.date:
    if value is None:
        return dt.datetime.now(dt.timezone.utc).date()
    if isinstance(value, str):
        return dt.date.fromisoformat(value[:10])
    return value.date() if isinstance(value, dt.datetime) else value


def run_config(params: Mapping[str, Any] | None, interval_start: Any = None, interval_end: Any = None,
               deployment: Mapping[str, Any] | None = None) -> config_mod.PipelineConfig:
    """The resolved config of one DAG run (see ``run_overrides``); ``deployment`` overrides come from the
    DAG's own environment (``train_overrides``), never from a run's conf."""
    return config_mod.load({**run_overrides(params, interval_start, interval_end), **(deployment or {})})


def run_overrides(params: Mapping[str, Any] | None, interval_start: Any = None,
                  interval_end: Any = None) -> dict[str, Any]:
    """The config overrides of one DAG run, from its params and data interval.

    The data interval selects the logs: ``window="cumulative"`` builds the day's dataset from every log
    recorded before the end of the interval, ``window="rolling"`` from the ``window_days`` days before
    it. (Airflow 3's daily timetable gives zero-length intervals at the trigger time, so the run at
    midnight of day D takes the logs recorded before D.) A manually triggered run has no data interval:
    it takes everything up to now.

    Only declared params reach the config: with ``dag_run_conf_overrides_params`` (on, so that a trigger's
    conf sets params) Airflow passes every key of the conf through, and a key the DAG does not declare -
    ``ingest.spark_master``, ``home`` - is refused with a ``ConfigError`` rather than honoured or dropped.
    """
    params = dict(params or {})
    fields = declared_fields()
    dag_only = {*WINDOW_PARAMS, *BUILD_PARAMS}
    undeclared = sorted(set(params) - set(fields) - dag_only)
    if undeclared:
        raise config_mod.ConfigError(f"DAG run conf sets {', '.join(map(repr, undeclared))}, which the DAG does not "
                                     f"declare; its params are {', '.join(sorted([*fields, *dag_only]))}")
    overrides = {field: params[name] for name, field in fields.items() if params.get(name) is not None}
    end = _day(interval_end) if interval_end is not None else _day(None) + dt.timedelta(days=1)
    overrides["ingest.date_to"] = end.isoformat()
    window = params.get("window", WINDOW_PARAMS["window"]["default"])
    if window == "rolling":
        days = int(params.get("window_days") or WINDOW_PARAMS["window_days"]["default"])
        overrides["ingest.date_from"] = (end - dt.timedelta(days=days)).isoformat()
    elif window not in WINDOW_PARAMS["window"]["enum"]:
        raise config_mod.ConfigError(f"DAG param window: {window!r} is not allowed; "
                                     f"allowed values: {', '.join(WINDOW_PARAMS['window']['enum'])}")
    return overrides


def run_stage(stage: str, params: Mapping[str, Any] | None, interval_start: Any = None, interval_end: Any = None,
              *, deployment: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Any]:
    """Run one stage for a DAG run exactly as ``avp <stage>`` would, returning its small result dict."""
    from pipeline import lineage

    cfg = run_config(params, interval_start, interval_end, deployment)
    result = stages.invoke(stage, cfg, say=print, **inputs)
    lineage.report(cfg, result.get("ref"))  # the task's OpenLineage inputs and output (when it is enabled)
    return {k: v for k, v in result.items() if k != "tables"}


def ingest_or_given(params: Mapping[str, Any] | None, interval_start: Any = None, interval_end: Any = None) -> str:
    """The run's dataset: the registered one its ``dataset`` param names, else the one ingest builds."""
    given = (params or {}).get("dataset")
    return given if given else run_stage("ingest", params, interval_start, interval_end)["ref"]


def skip_past_until(stage: str, params: Mapping[str, Any] | None) -> None:
    """Skip ``stage`` (and so everything after it) when it comes after the run's ``until`` param."""
    until = (params or {}).get("until") or BUILD_PARAMS["until"]["default"]
    if until not in UNTIL_STAGES:
        raise config_mod.ConfigError(f"DAG param until: {until!r} is not allowed; allowed values: "
                                     f"{', '.join(UNTIL_STAGES)}")
    if UNTIL_STAGES.index(stage) > UNTIL_STAGES.index(until):
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"until={until}: this run stops after {until}")


def require_blessed(evaluation: Mapping[str, Any]) -> None:
    """Raise ``StageFailed`` with the reasons when evaluation did not bless the model."""
    if not evaluation.get("blessed"):
        reasons = "; ".join(evaluation.get("reasons") or ["no reasons recorded"])
        raise StageFailed(f"model {evaluation.get('model', '?')} is not blessed, nothing to serve: {reasons}")


# ----------------------------------------------------------------------------------------- spark-submit
# Ingest on a Spark cluster: with AVP_SPARK_CONN_ID naming an Airflow Spark connection, the DAG runs
# ``plan_ingest`` (the request below) -> ``SparkSubmitOperator`` (``spark_jobs/ingest.py --request ...``,
# the same stage entry function, on the connection's master) -> ``ingest`` (reads the job's result).
INGEST_APPLICATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "spark_jobs", "ingest.py")


def spark_submit_request(params: Mapping[str, Any] | None, interval_start: Any, interval_end: Any,
                         dag_id: str, run_id: str) -> str:
    """The request (JSON) the spark-submit ingest job runs: this DAG run's config overrides and the file
    it writes its result to. Resolving the config here fails a bad param in Airflow, before any Spark
    job starts; a result left by an earlier try is removed so a stale one can never be read."""
    from pipeline.home import Home

    overrides = run_overrides(params, interval_start, interval_end)
    cfg = config_mod.load(overrides)
    overrides.update({"home": cfg.home, "ingest.spark_master": ""})  # the master is the connection's
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in (dag_id, run_id)]
    result_file = os.path.join(Home.from_config(cfg.home).runs, "airflow", *safe, "ingest-result.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    return json.dumps({"overrides": overrides, "result_file": result_file}, sort_keys=True)


def spark_submit_env() -> dict[str, str]:
    """Environment of the spark-submit process: the driver runs this venv's Python (client mode, on the
    Airflow worker); executors run ``PYSPARK_PYTHON`` when the worker's environment sets it (the
    project's Python on the cluster nodes), else the same interpreter (one machine, or the same image)."""
    return {"PYSPARK_DRIVER_PYTHON": sys.executable, "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)}


def spark_submit_result(request: str) -> dict[str, Any]:
    """What the spark-submit ingest job of ``request`` reported (``{"ref": ..., ...}``)."""
    path = json.loads(request)["result_file"]
    if not os.path.exists(path):
        raise StageFailed(f"the spark-submit ingest job finished without writing its result {path}: "
                          "see the spark-submit task's log")
    with open(path) as fh:
        return json.load(fh)


def spark_master_of(conn_id: str) -> str:
    """The master URL of an Airflow Spark connection, resolved exactly as ``SparkSubmitOperator`` does
    (the provider's hook: ``spark://host:port``, ``yarn``, ``k8s://https://...``)."""
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    return SparkSubmitHook(conn_id=conn_id)._resolve_connection()["master"]


def train_overrides(spark_conn_id: str) -> dict[str, Any]:
    """The train task's deployment overrides: with a Spark connection, the ranks run as Horovod tasks on its
    master (``train.launcher=spark``); without one, none."""
    if not spark_conn_id:
        return {}
    return {"train.launcher": "spark", "train.spark_master": spark_master_of(spark_conn_id)}
