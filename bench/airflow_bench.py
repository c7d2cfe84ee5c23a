"""Airflow benchmark: time from a trigger (REST API, as the UI's Trigger button) to the first task running,
for the avp_daily DAG and, in the same `airflow standalone`, for a one-task no-op DAG (the scheduler's
own floor on this machine).

    .venv/bin/python -m bench.airflow_bench [--trials 5]

Each trial triggers a run, waits until its first task is running, then marks the run failed (so no trial
waits on a whole pipeline) and waits until it is over: `max_active_runs=1` would queue the next one.
Latency = the first task's start_date - the run's queued_at (both stamped by Airflow on this machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time

import httpx

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, ValueError, KeyError):
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


def trial(client: httpx.Client, dag_id: str) -> dict:
    response = _wait(lambda: (r := client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None}))
                     .status_code in (200, 201) and r, 60, "the trigger to be accepted")
    posted = time.monotonic()
    run = response.json()
    run_id = run["dag_run_id"]

    def started():
        for t in client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]:
            if t["task_id"] == FIRST_TASK[dag_id] and t.get("start_date"):
                return t

    ti = _wait(started, 120, f"{dag_id}'s first task to start", every=0.05)
    seen = time.monotonic() - posted
    _end_run(client, dag_id, run_id)
    return {"latency": (_time(ti["start_date"]) - _time(run["queued_at"])).total_seconds(), "seen": seen}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="avp-bench-airflow-")
    dags = os.path.join(tmp, "dags")
    os.makedirs(dags)
    os.symlink(os.path.join(REPO, "dags", "avp_daily.py"), os.path.join(dags, "avp_daily.py"))
    with open(os.path.join(dags, "bench_noop.py"), "w") as fh:
        fh.write(NOOP_DAG)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVP_", "AIRFLOW"))}
    env.update({"AVP_HOME": os.path.join(tmp, "home"), "AIRFLOW__CORE__DAGS_FOLDER": dags,
                "AIRFLOW__API__PORT": str(port)})
    log_path = os.path.join(tmp, "standalone.log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "airflow_standalone.sh")], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait(lambda: client.get("/api/v2/monitor/health").json()["scheduler"]["status"] == "healthy", 300,
              "the API server and scheduler", every=1)
        for dag_id in FIRST_TASK:
            _wait(lambda: client.get(f"/api/v2/dags/{dag_id}").status_code == 200, 180, f"{dag_id} to be parsed",
                  every=1)
        ready = time.monotonic() - started
        # Unpausing avp_daily (catchup=False) creates one scheduled run: end it before measuring.
        for run in client.get("/api/v2/dags/avp_daily/dagRuns").json()["dag_runs"]:
            _end_run(client, "avp_daily", run["dag_run_id"])
        results = {dag_id: [] for dag_id in FIRST_TASK}
        for _ in range(args.trials):
            for dag_id in ("bench_noop", "avp_daily"):  # interleaved, so load hits both alike
                results[dag_id].append(trial(client, dag_id))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"airflow standalone ready (API healthy, DAGs parsed) {ready:.1f} s after start; {args.trials} trials")
    print("| DAG (first task) | trigger -> first task running s: median | min | max | seen by the client (median) s |")
    print("|---|---|---|---|---|")
    for dag_id, rows in results.items():
        lat = [r["latency"] for r in rows]
        print(f"| {dag_id} ({FIRST_TASK[dag_id]}) | {statistics.median(lat):.2f} | {min(lat):.2f} | {max(lat):.2f} "
              f"| {statistics.median(r['seen'] for r in rows):.2f} |")
    ratio = statistics.median(r["latency"] for r in results["avp_daily"]) / statistics.median(
        r["latency"] for r in results["bench_noop"])
    print(f"avp_daily / no-op DAG: {ratio:.2f}x (target: first task running < 5 s after the trigger)")


if __name__ == "__main__":
    main()
