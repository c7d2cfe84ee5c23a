"""What the Airflow tasks need beyond the stage entry functions: the run's config from the DAG's params
and data interval, and one call per stage. Kept here (not in ``dags/``) so the DAG file is wiring only."""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from pipeline import config as config_mod
from pipeline.errors import StageFailed

# DAG param -> config field; a param left at None keeps the config default (or AVP_* environment value).
PARAM_FIELDS = {
    "epochs": "train.epochs",
    "backend": "train.backend",
    "np": "train.np",
    "force": "force",
    "split": "ingest.split",
    "spark_master": "ingest.spark_master",
}


def _day(value: Any) -> dt.date:
    if value is None:
        return dt.datetime.now(dt.timezone.utc).date()
    if isinstance(value, str):
        return dt.date.fromisoformat(value[:10])
    return value.date() if isinstance(value, dt.datetime) else value


def run_config(params: Mapping[str, Any] | None, interval_start: Any = None,
               interval_end: Any = None) -> config_mod.PipelineConfig:
    """The resolved config of one DAG run.

    The data interval selects the logs: ``window="cumulative"`` builds the day's dataset from every log
    recorded before the end of the interval, ``window="rolling"`` from the ``window_days`` days before
    it. (Airflow 3's daily timetable gives zero-length intervals at the trigger time, so the run at
    midnight of day D takes the logs recorded before D.) A manually triggered run has no data interval:
    it takes everything up to now.
    """
    params = dict(params or {})
    overrides = {field: params[name] for name, field in PARAM_FIELDS.items() if params.get(name) is not None}
    end = _day(interval_end) if interval_end is not None else _day(None) + dt.timedelta(days=1)
    overrides["ingest.date_to"] = end.isoformat()
    if params.get("window", "cumulative") == "rolling":
        days = int(params.get("window_days") or 7)
        overrides["ingest.date_from"] = (end - dt.timedelta(days=days)).isoformat()
    elif params.get("window", "cumulative") != "cumulative":
        raise config_mod.ConfigError(f"DAG param window: {params['window']!r} is not allowed; "
                                     "allowed values: cumulative, rolling")
    return config_mod.load(overrides)


def run_stage(stage: str, params: Mapping[str, Any] | None, interval_start: Any = None, interval_end: Any = None,
              **inputs: Any) -> dict[str, Any]:
    """Run one stage for a DAG run exactly as ``avp <stage>`` would, returning its small result dict."""
    from pipeline import stages

    cfg = run_config(params, interval_start, interval_end)
    result = stages.invoke(stage, cfg, say=print, **inputs)
    return {k: v for k, v in result.items() if k != "tables"}


def require_blessed(evaluation: Mapping[str, Any]) -> None:
    """Raise ``StageFailed`` with the reasons when evaluation did not bless the model."""
    if not evaluation.get("blessed"):
        reasons = "; ".join(evaluation.get("reasons") or ["no reasons recorded"])
        raise StageFailed(f"model {evaluation.get('model', '?')} is not blessed, nothing to serve: {reasons}")
