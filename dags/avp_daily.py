"""
### avp_daily: fleet drive logs -> a served LiDAR segmentation model, every day

`ingest -> validate -> train -> evaluate -> serve -> approve_promotion`. Each task calls the same stage
entry function as `avp <stage>` on the command line (`pipeline.stages.invoke`), so a stage run here and on
a laptop is the same code. Tasks pass artifact references (`dataset:fleet-lidar@v7`) through XCom; data stays in the
pipeline home (`AVP_HOME`).

* **Data interval**: the daily run at midnight of day D (its logical date; Airflow 3's daily timetable
  has zero-length intervals at the trigger time) builds the dataset from every log recorded before D
  (`window=cumulative`) or in the `window_days` days before D (`window=rolling`). A manually triggered
  run has no logical date and takes everything up to now.
* **Gates**: a failed validation fails `validate`, so training never starts on a broken dataset; a model
  that is not blessed makes `serve` skip, with the reasons in its log.
* **Human approval**: `approve_promotion` waits for a person (*Required actions*, or the task's
  *Required action* tab) to promote the new package to production or reject it, with a reason; both are
  recorded in the registry with the person's name. The request shows the model card and the comparison
  with production. No answer within `serve.approval_timeout_s` leaves production unchanged. Param
  `auto_promote` promotes a blessed package without asking; backfill runs never promote. Rollback:
  `avp registry rollback perception/bev_segnet`.
* **Retries are safe**: every stage is content-keyed in the registry, so a retried or re-run day reuses
  what already succeeded, and `train` resumes from its latest checkpoint.
* **Backfills**: `airflow backfill create --dag-id avp_daily --from-date 2026-11-01 --to-date 2026-11-03`
  (or *Backfill* in the UI) gives one dataset version per day; re-running a day is a cache hit.
* **Params** (Trigger DAG w/ config): epochs, backend, np, force, window, window_days, split (declared by
  the stage specs in `pipeline/stages.py`) and the split shares by their full names, e.g.
  `{"ingest.train_share": 0.8, "ingest.test_share": 0.1}`, each with its range; `auto_promote` skips the human
  approval. A conf key the DAG does not
  declare fails the run: the Spark master and the home are the deployment's, not a trigger's. `until`
  (validate|train|evaluate|serve) ends the run after that stage (later tasks skip) and `dataset` trains on a
  registered dataset instead of ingesting (the registry API's `POST /datasets` and `POST /models` trigger runs
  with them; docs/registry.md).
* One training at a time through the `avp_training` pool; with `AVP_TRAINING_QUEUE` set (CeleryExecutor,
  see docs/deploy.md) `train` goes to that queue's workers (GPU hosts), every other task to the default one.
* **Spark cluster**: with `AVP_SPARK_CONN_ID` set (to an Airflow Spark connection, e.g.
  `AIRFLOW_CONN_AVP_SPARK=spark://spark-master:7077`) in the environment of the DAG processor and
  workers, ingest becomes `plan_ingest -> spark_submit_ingest -> ingest`: `SparkSubmitOperator` runs
  the same job (`spark_jobs/ingest.py`) on that master instead of a local session, and `ingest` reads
  the dataset reference it reported; `train` drives Horovod on the same master (`train.launcher=spark`,
  ranks as Spark tasks). See docs/airflow.md and docs/training.md.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import Asset, Param, dag, task

from pipeline.approval import ApprovePromotion
from pipeline.orchestration import dag_params

DATASET_ASSET = Asset("avp://dataset/fleet-lidar")
MODEL_ASSET = Asset("avp://model/bev_segnet")
PACKAGE_ASSET = Asset("avp://package/bev_segnet")
# An Airflow Spark connection id: ingest runs through spark-submit on its master (see doc_md).
SPARK_CONN_ID = os.environ.get("AVP_SPARK_CONN_ID", "")
# The Celery queue `train` is sent to (the GPU workers' queue, e.g. "training"); unset: the default queue.
# Executors without queues (LocalExecutor) ignore it.
TRAINING_QUEUE = os.environ.get("AVP_TRAINING_QUEUE", "")


@dag(
    dag_id="avp_daily",
    schedule="@daily",
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["avp", "perception"],
    default_args={"retries": 1, "retry_delay": dt.timedelta(seconds=20)},
    params={name: Param(**spec) for name, spec in dag_params().items()},
)
def avp_daily():
    @task(outlets=[DATASET_ASSET])
    def ingest(params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Spark reads the day's drive logs and writes Petastorm train/test/val splits (75/15/10 by log)."""
        from pipeline.orchestration import ingest_or_given

        return ingest_or_given(params, data_interval_start, data_interval_end)

    @task
    def plan_ingest(params=None, data_interval_start=None, data_interval_end=None, dag_run=None) -> str:
        """The spark-submit ingest job's request: this run's config (params, data interval), checked here,
        and the file the job writes its result to."""
        from pipeline.orchestration import spark_submit_request

        return spark_submit_request(params, data_interval_start, data_interval_end, dag_run.dag_id, dag_run.run_id)

    def spark_submit_ingest(request):
        """`SparkSubmitOperator`: the ingest job (`spark_jobs/ingest.py`) on the connection's Spark master."""
        from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

        from pipeline.orchestration import INGEST_APPLICATION, spark_submit_env

        return SparkSubmitOperator(task_id="spark_submit_ingest", conn_id=SPARK_CONN_ID,
                                   application=INGEST_APPLICATION, application_args=["--request", request],
                                   name="avp-ingest", env_vars=spark_submit_env(),
                                   doc_md=spark_submit_ingest.__doc__)

    @task(task_id="ingest", outlets=[DATASET_ASSET])
    def ingest_result(request: str) -> str:
        """The dataset the spark-submit job built: its reference, from the job's result file."""
        from pipeline.orchestration import spark_submit_result

        return spark_submit_result(request)["ref"]

    @task
    def validate(dataset: str, params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Great Expectations: label distributions, frame counts, drift against the previous version."""
        from pipeline.orchestration import run_stage

        run_stage("validate", params, data_interval_start, data_interval_end, dataset=dataset)
        return dataset

    @task(pool="avp_training", outlets=[MODEL_ASSET], **({"queue": TRAINING_QUEUE} if TRAINING_QUEUE else {}))
    def train(dataset: str, params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Data-parallel training (Horovod or DDP) on the validated dataset; resumes from its checkpoint.
        With a Spark connection, Horovod's ranks run as Spark tasks on its master (`horovod.spark.run`)."""
        from pipeline.orchestration import run_stage, skip_past_until, train_overrides

        skip_past_until("train", params)
        return run_stage("train", params, data_interval_start, data_interval_end,
                         deployment=train_overrides(SPARK_CONN_ID), dataset=dataset, resume=True)["ref"]

    @task
    def evaluate(model: str, params=None, data_interval_start=None, data_interval_end=None) -> dict:
        """Model, system and hardware metrics on the test split, and the blessing verdict."""
        from pipeline.orchestration import run_stage, skip_past_until

        skip_past_until("evaluate", params)
        result = run_stage("evaluate", params, data_interval_start, data_interval_end, model=model)
        return {"model": model, "ref": result["ref"], "blessed": bool(result["blessed"]),
                "reasons": list(result.get("reasons", []))}

    @task(outlets=[PACKAGE_ASSET])
    def serve(evaluation: dict, params=None, data_interval_start=None, data_interval_end=None) -> str:
        """Package a blessed model (TorchScript + torch.export + provenance); skip an unblessed one."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.errors import StageFailed
        from pipeline.orchestration import require_blessed, run_stage, skip_past_until

        skip_past_until("serve", params)
        try:
            require_blessed(evaluation)
        except StageFailed as why:
            raise AirflowSkipException(str(why)) from None
        return run_stage("serve", params, data_interval_start, data_interval_end, model=evaluation["model"])["ref"]

    if SPARK_CONN_ID:
        request = plan_ingest()
        dataset = ingest_result(request)
        spark_submit_ingest(request) >> dataset
    else:
        dataset = ingest()
    package = serve(evaluate(train(validate(dataset))))
    ApprovePromotion(task_id="approve_promotion", package=package,
                     doc_md="Human approval before production: promote the package `serve` built (shown with its "
                            "model card and the comparison with production) or reject it, with a reason; see "
                            "`pipeline/approval.py`.")


avp_daily()
