"""Horovod on Spark: the driver of ``train.launcher=spark``.

``python -m training.spark_launch JOB.json`` (started by ``training.launch`` like ``horovodrun``) opens a
Spark session on ``train.spark_master`` (``spark://host:7077``, ``yarn``, ``k8s://...``; the application is
named ``avp-train-<model ref>``) and runs ``horovod.spark.run(run_rank, num_proc=np)``: every rank is a
process that a Spark task starts on an executor, and runs ``training.trainer.main`` - the same trainer
program as under ``horovodrun`` or ``torchrun`` - on its Petastorm shard of the dataset in the shared
pipeline home. Rank 0 writes checkpoints, progress events, TensorBoard and the final files there, so the
``avp train`` process that started this driver publishes the model as it does locally.

Stops: the ranks are not children of this process (they belong to the executors), so a SIGTERM here
writes ``<logs>/stop-requested``; every rank watches for it and sends itself SIGTERM, which makes all
ranks checkpoint at the next step boundary and exit 143, as a local SIGTERM does. A rank that dies fails
the Horovod job (its peers' allreduce breaks, or times out after ``train.rank_timeout_s``), and this
driver exits non-zero.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time

from pipeline.contracts import TrainJob

STOP_FILE = "stop-requested"


def _watch_for_stop(path: str) -> None:
    """In a rank: SIGTERM this process when the driver asks the job to stop (the trainer checkpoints)."""
    while not os.path.exists(path):
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def run_rank(job_path: str) -> int:
    """One Horovod rank inside a Spark task: the trainer's own entry point (it exits the process with the
    rank's status on failure)."""
    from training import trainer

    logs_dir = TrainJob.load(job_path).logs_dir
    threading.Thread(target=_watch_for_stop, args=(os.path.join(logs_dir, STOP_FILE),), daemon=True,
                     name="stop-watch").start()
    return trainer.main([job_path])


def main(argv: list[str] | None = None) -> int:
    """Drive the job's ranks on the Spark master; exit 0 when every rank finished."""
    argv = sys.argv[1:] if argv is None else argv
    job_path = argv[0]
    job = TrainJob.load(job_path)
    train = job.train
    stop_path = os.path.join(job.logs_dir, STOP_FILE)

    def request_stop(signum, _frame):
        print(f"received {signal.Signals(signum).name}: asking the ranks to checkpoint and stop", flush=True)
        with open(stop_path, "w"):
            pass

    signal.signal(signal.SIGTERM, request_stop)
    # The executors run the nodes' Python (PYSPARK_PYTHON); the same interpreter when unset.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import horovod.spark
    from pyspark import SparkConf, SparkContext

    from training.launch import Placement, rank_settings

    # horovod.spark.run picks MPI or Gloo by importing its torch extension in forked children, three times: a
    # second or more each while this process has not loaded torch, instant once it has. Load it while the Spark
    # driver starts. (The children are forked by the main thread later, with no import in flight.)
    preload = threading.Thread(target=importlib.import_module, args=("horovod.torch",), daemon=True,
                               name="preload-horovod-torch")
    preload.start()

    placement = Placement.from_train(train)
    app = f"avp-train-{job.provenance.get('model_ref', job.run_id)}"
    # A SparkContext is all horovod.spark.run needs; a SparkSession would also start the SQL engine (seconds
    # of class loading on the driver, competing with the executors' start on a small host).
    context = SparkContext.getOrCreate(SparkConf().setMaster(train["spark_master"]).setAppName(app)
                                       .set("spark.task.cpus", "1").set("spark.task.maxFailures", "1")
                                       .set("spark.ui.showConsoleProgress", "false"))
    started = time.time()
    try:
        print(f"Spark application {context.applicationId} ({app}) on {train['spark_master']}: "
              f"{job.world} Horovod ranks", flush=True)
        preload.join()
        horovod.spark.run(run_rank, args=(job_path,), num_proc=job.world, start_timeout=placement.rank_timeout_s,
                          env=rank_settings(placement), executable=os.environ["PYSPARK_PYTHON"], verbose=1)
    except Exception as exc:  # the ranks' own reports are in error-rank-*.json; this says how the job ended
        print(f"the Horovod job on Spark failed after {time.time() - started:.0f} s: {type(exc).__name__}: {exc}",
              flush=True)
        return 1
    finally:
        context.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
