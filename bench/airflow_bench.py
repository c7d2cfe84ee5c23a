"""Airflow benchmark: LocalExecutor/SQLite (`make airflow`: `airflow standalone`) against CeleryExecutor/PostgreSQL
(`make airflow-cluster`: Redis broker, two Celery workers), side by side in one run, on tiny data.

    .venv/bin/python -m bench.airflow_bench [--trials 5]

For each deployment, started by its own script with the avp_daily DAG and a one-task no-op DAG (the scheduler's
own floor on this machine):

* trigger -> first task running: each trial triggers a run through the REST API (as the UI's Trigger button),
  waits until its first task is running, then marks the run failed (so no trial waits on a whole pipeline)
  and waits until it is over (`max_active_runs=1` would queue the next one). Latency = the first task's
  start_date - the run's queued_at (both stamped by Airflow on this machine).
* whole DAG: one triggered avp_daily run with `force` (every stage rebuilds) on the tiny simulated data of
  tests/dags/test_dag_run.py; wall time = the run's end_date - queued_at.

The deployments run one after the other (2 cores), each in its own temporary pipeline home.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pipeline.servers import free_port
from tests.dags.test_dag_run import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOOP_DAG = '''
import datetime as dt
from airflow.sdk import dag, task


@dag(dag_id="bench_noop", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), catchup=False)
def bench_noop():
    @task
    def noop():
        """Does nothing: the trigger-to-start floor."""

    noop()


bench_noop()
'''
FIRST_TASK = {"avp_daily": "ingest", "bench_noop": "noop"}
DEPLOYMENTS = {"LocalExecutor / SQLite": "airflow_standalone.sh", "CeleryExecutor / PostgreSQL": "airflow_cluster.sh"}


def _wait(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, ValueError, KeyError, OSError):
            value = None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _end_run(client: httpx.Client, dag_id: str, run_id: str) -> None:
    """Mark the run failed (its running task is stopped) and wait until it is really over."""
    _wait(lambda: client.patch(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"}).status_code
          in (200, 201), 60, f"{run_id} to be marked failed", every=1)

    def over():
        tis = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        return all(t["state"] not in ("running", "queued", "scheduled", "restarting") for t in tis)

    _wait(over, 120, f"{run_id}'s tasks to stop", every=1)


def _trigger(client: httpx.Client, dag_id: str, conf: dict | None = None) -> dict:
    body = {"logical_date": None, **({"conf": conf} if conf else {})}
    return _wait(lambda: (r := client.post(f"/api/v2/dags/{dag_id}/dagRuns", json=body)).status_code in (200, 201)
                 and r, 60, "the trigger to be accepted").json()


def trial(client: httpx.Client, dag_id: str) -> dict:
    posted = time.monotonic()
    run = _trigger(client, dag_id)
    run_id = run["dag_run_id"]

    def started():
        for t in client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]:
            if t["task_id"] == FIRST_TASK[dag_id] and t.get("start_date"):
                return t

    ti = _wait(started, 120, f"{dag_id}'s first task to start", every=0.05)
    seen = time.monotonic() - posted
    _end_run(client, dag_id, run_id)
    return {"latency": (_time(ti["start_date"]) - _time(run["queued_at"])).total_seconds(), "seen": seen}


def whole_run(client: httpx.Client) -> float:
    run_id = _trigger(client, "avp_daily", {"force": True, "auto_promote": True})["dag_run_id"]

    def finished():
        run = client.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}").json()
        return run if run["state"] in ("success", "failed") else None

    run = _wait(finished, 1200, f"avp_daily run {run_id}", every=1)
    if run["state"] != "success":
        raise RuntimeError(f"avp_daily run {run_id} failed: see the deployment's logs")
    return (_time(run["end_date"]) - _time(run["queued_at"])).total_seconds()


def bench_deployment(script: str, dags: str, home: Path, trials: int) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVP_", "AIRFLOW"))}
    env.update(TINY)
    env.update({"AVP_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": dags, "AIRFLOW__API__PORT": str(port)})
    log_path = home.parent / f"{script}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", os.path.join(REPO, "scripts", script)], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait(lambda: proc.poll() is None and client.get("/api/v2/monitor/health").json()["scheduler"]["status"]
              == "healthy", 300, f"{script}: the API server and scheduler", every=1)
        cluster_state = home / "cluster" / "cluster.json"
        if script == DEPLOYMENTS["CeleryExecutor / PostgreSQL"]:  # ready once both workers answer (the launcher says)
            _wait(lambda: "Airflow UI:" in Path(log_path).read_text(), 300, "the Celery workers", every=1)
            env["AVP_REGISTRY_URL"] = json.loads(cluster_state.read_text())["postgres"]["registry_url"]
        for dag_id in FIRST_TASK:
            _wait(lambda: client.get(f"/api/v2/dags/{dag_id}").status_code == 200, 180, f"{dag_id} to be parsed",
                  every=1)
        ready = time.monotonic() - started
        simulate = subprocess.run([os.path.join(os.path.dirname(sys.executable), "avp"), "simulate"], env=env,
                                  cwd=REPO, capture_output=True, text=True)
        if simulate.returncode != 0:
            raise RuntimeError(f"avp simulate failed: {simulate.stderr[-2000:]}")
        # Unpausing avp_daily (catchup=False) creates one scheduled run: end it before measuring.
        for run in client.get("/api/v2/dags/avp_daily/dagRuns").json()["dag_runs"]:
            _end_run(client, "avp_daily", run["dag_run_id"])
        latencies = {dag_id: [] for dag_id in FIRST_TASK}
        for _ in range(trials):
            for dag_id in ("bench_noop", "avp_daily"):  # interleaved, so load hits both alike
                latencies[dag_id].append(trial(client, dag_id))
        return {"ready": ready, "latencies": latencies, "whole": whole_run(client)}
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: both scripts stop everything they started
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="avp-bench-airflow-"))
    tmp.chmod(0o755)  # as root, PostgreSQL runs as the postgres user, which must reach its data folder
    dags = tmp / "dags"
    dags.mkdir()
    (dags / "avp_daily.py").symlink_to(os.path.join(REPO, "dags", "avp_daily.py"))
    (dags / "bench_noop.py").write_text(NOOP_DAG)
    results = {}
    for name, script in DEPLOYMENTS.items():
        (tmp / script).mkdir()
        results[name] = bench_deployment(script, str(dags), tmp / script / "home", args.trials)
    print(f"{args.trials} trials per DAG; tiny data (tests/dags/test_dag_run.py TINY); temp folder {tmp}")
    print("| deployment | ready s | no-op: trigger -> first task s (median / min / max) "
          "| avp_daily: trigger -> ingest running s (median / min / max) | seen by the client (median) s "
          "| whole avp_daily run (force) s |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for name, result in results.items():
        cells = []
        for dag_id in ("bench_noop", "avp_daily"):
            lat = [r["latency"] for r in result["latencies"][dag_id]]
            medians[name, dag_id] = statistics.median(lat)
            cells.append(f"{statistics.median(lat):.2f} / {min(lat):.2f} / {max(lat):.2f}")
        seen = statistics.median(r["seen"] for r in result["latencies"]["avp_daily"])
        print(f"| {name} | {result['ready']:.0f} | {cells[0]} | {cells[1]} | {seen:.2f} | {result['whole']:.1f} |")
    local, celery = DEPLOYMENTS
    for dag_id in FIRST_TASK:
        added = medians[celery, dag_id] - medians[local, dag_id]
        print(f"{dag_id}: Celery adds {added:+.2f} s to trigger -> first task (goal: under 1 s)")


if __name__ == "__main__":
    main()
