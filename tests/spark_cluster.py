"""A real Spark standalone cluster for tests: a master and workers started with pyspark's own
``spark-class``, each worker on its own loopback address (``SPARK_LOCAL_IP``, inherited by its executors,
so a task can tell which "host" it runs on), all stopped by PID when the ``with`` block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from pipeline.servers import free_port, stop_process_group
from tests.dags.test_standalone import wait_for

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SparkCluster:
    master_url: str  # spark://127.0.0.1:PORT
    ui_url: str  # the master's web UI; /json/ lists workers and applications
    workers: tuple[str, ...]  # each worker's address

    def status(self) -> dict:
        """The master's ``/json/`` view: alive workers, active and completed applications."""
        return httpx.get(f"{self.ui_url}/json/", timeout=10).json()


@contextlib.contextmanager
def standalone_cluster(work_dir: Path, workers: Sequence[tuple[str, int]] = (("127.0.0.1", 2),),
                       memory: str = "2g") -> Iterator[SparkCluster]:
    """A master on 127.0.0.1 and one worker per ``(address, cores)``; yields when every worker registered."""
    import pyspark

    spark_class = str(Path(pyspark.__file__).parent / "bin" / "spark-class")
    port, ui = free_port(), free_port()
    base = {**os.environ, "PYSPARK_PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    master_url, ui_url = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui}"
    work_dir.mkdir(parents=True, exist_ok=True)
    logs = open(work_dir / "spark-cluster.log", "w")
    procs: list[subprocess.Popen] = []

    def start(command: list[str], address: str, worker_dir: str = "") -> None:
        env = {**base, "SPARK_LOCAL_IP": address, "SPARK_WORKER_DIR": worker_dir or str(work_dir / "work")}
        procs.append(subprocess.Popen([spark_class, *command], env=env, stdout=logs, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
               "--webui-port", str(ui)], "127.0.0.1")
        for index, (address, cores) in enumerate(workers):
            start(["org.apache.spark.deploy.worker.Worker", "--host", address, "--cores", str(cores), "--memory",
                   memory, "--webui-port", str(free_port()), master_url], address,
                  str(work_dir / f"worker-{index}"))
        cluster = SparkCluster(master_url, ui_url, tuple(address for address, _ in workers))

        def all_registered():
            try:
                return cluster.status().get("aliveworkers", 0) >= len(workers)
            except (httpx.HTTPError, ValueError):
                return False

        wait_for(all_registered, 120, f"{len(workers)} Spark worker(s) to register with the master")
        yield cluster
    finally:
        for proc in reversed(procs):  # workers, then the master
            stop_process_group(proc, signal.SIGTERM, timeout=30)
        logs.close()
