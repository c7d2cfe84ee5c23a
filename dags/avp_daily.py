"""
### avp_daily: fleet drive logs -> a served LiDAR segmentation model, every day

`ingest -> validate -> train -> evaluate -> serve`. Each task calls the same stage entry function as
`avp <stage>` on the command line (`pipeline.stages.invoke`), so a stage run here and on a laptop is the
same code. Tasks pass artifact references (`dataset:fleet-lidar@v7`) through XCom; data stays in the
pipeline home (`AVP_HOME`).

* **Data interval**: the daily run at midnight of day D (its logical date; Airflow 3's daily timetable
  has zero-length intervals at the trigger time) builds the dataset from every log recorded before D
  (`window=cumulative`) or in the `window_days` days before D (`window=rolling`). A manually triggered
  run has no logical date and takes everything up to now.
* **Gates**: a failed validation fails `validate`, so training never starts on a broken dataset; a model
  that is not blessed makes `serve` skip, with the reasons in its log.
* **Retries are safe**: every stage is content-keyed in the registry, so a retried or re-run day reuses
  what already succeeded, and `train` resumes from its latest checkpoint.
* **Backfills**: `airflow backfill create --dag-id avp_daily --from-date 2026-11-01 --to-date 2026-11-03`
  (or *Backfill* in the UI) gives one dataset version per day; re-running a day is a cache hit.
* **Params** (Trigger DAG w/ config): epochs, backend, np, force, window, window_days, split.
* One training at a time through the `avp_training` pool.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, Param, dag, task

DATASET_ASSET = Asset("avp://dataset/fleet-lidar")
MODEL_ASSET = Asset("avp://model/bev_segnet")
PACKAGE_ASSET = Asset("avp://package/bev_segnet")


@dag(
    dag_id="avp_daily",
    schedule="@daily",
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["avp", "perception"],
    default_args={"retries": 1, "retry_delay": dt.timedelta(seconds=20)},
    params={
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="training epochs (default: config)"),
        "backend": Param(None, type=["null", "string"], enum=[None, "horovod", "ddp"],
                         description="distributed backend (default: horovod)"),
        "np": Param(None, type=["null", "integer"], minimum=1, description="training processes"),
        "force": Param(False, type="boolean", description="rebuild even when a cached artifact matches"),
        "window": Param("cumulative", enum=["cumulative", "rolling"], description="which logs make the dataset"),
        "window_days": Param(7, type="integer", minimum=1, description="days in a rolling window"),
        "split": Param(None, type=["null", "string"], enum=[None, "hash", "geo"], description="split mode"),
    },
)
def avp_daily():
    @task(outlets=[DATASET_ASSET])
    def ingest(params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Spark reads the day's drive logs and writes Petastorm train/test/val splits (75/15/10 by log)."""
        from pipeline.orchestration import run_stage

        return run_stage("ingest", params, data_interval_start, data_interval_end)["ref"]

    @task
    def validate(dataset: str, params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Great Expectations: label distributions, frame counts, drift against the previous version."""
        from pipeline.orchestration import run_stage

        run_stage("validate", params, data_interval_start, data_interval_end, dataset=dataset)
        return dataset

    @task(pool="avp_training", outlets=[MODEL_ASSET])
    def train(dataset: str, params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Data-parallel training (Horovod or DDP) on the validated dataset; resumes from its checkpoint."""
        from pipeline.orchestration import run_stage

        return run_stage("train", params, data_interval_start, data_interval_end, dataset=dataset,
                         resume=True)["ref"]

    @task
    def evaluate(model: str, params=None, data_interval_start=None, data_interval_end=None) -> dict:
        """Model, system and hardware metrics on the test split, and the blessing verdict."""
        from pipeline.orchestration import run_stage

        result = run_stage("evaluate", params, data_interval_start, data_interval_end, model=model)
        return {"model": model, "ref": result["ref"], "blessed": bool(result["blessed"]),
                "reasons": list(result.get("reasons", []))}

    @task(outlets=[PACKAGE_ASSET])
    def serve(evaluation: dict, params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Package a blessed model (TorchScript + torch.export + provenance); skip an unblessed one."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.errors import StageFailed
        from pipeline.orchestration import require_blessed, run_stage

        try:
            require_blessed(evaluation)
        except StageFailed as why:
            raise AirflowSkipException(str(why)) from None
        return run_stage("serve", params, data_interval_start, data_interval_end, model=evaluation["model"])["ref"]

    serve(evaluate(train(validate(ingest()))))


avp_daily()
