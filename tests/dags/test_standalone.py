"""`airflow standalone` as an operator uses it: start on localhost, trigger the DAG through the REST API,
wait for the run to succeed, backfill two days, stop with SIGINT. Bounded in time; loopback only."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time

import httpx
import pytest

from pipeline.servers import free_port
from tests.dags.test_dag_run import REPO, airflow_env, run

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_standalone_runs_a_triggered_dag_and_a_backfill(tmp_path):
    port = free_port()
    env = airflow_env(tmp_path, AIRFLOW__API__HOST="127.0.0.1", AIRFLOW__API__PORT=str(port),
                      AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
                      AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False")
    assert run(env, "avp", "simulate").returncode == 0
    log = open(tmp_path / "standalone.log", "w")
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "airflow_standalone.sh")], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            try:
                health = httpx.get(f"{base}/api/v2/monitor/health", timeout=5).json()
                return health.get("scheduler", {}).get("status") == "healthy" and health
            except (httpx.HTTPError, ValueError):
                return None

        wait_for(healthy, 240, "the API server and scheduler")
        client = httpx.Client(base_url=base, timeout=30)
        dag = wait_for(lambda: (r := client.get("/api/v2/dags/avp_daily")).status_code == 200 and r.json(), 120,
                       "the DAG to be parsed")
        assert dag["is_paused"] is False  # AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
        # SQLite behind a busy scheduler can answer a write with 500 (database locked): retry a few times
        triggered = wait_for(lambda: (r := client.post("/api/v2/dags/avp_daily/dagRuns", json={"logical_date": None}))
                             .status_code in (200, 201) and r, 60, "the trigger to be accepted")
        run_id = triggered.json()["dag_run_id"]

        def finished():
            state = client.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}").json()["state"]
            return state if state in ("success", "failed") else None

        assert wait_for(finished, 900, f"run {run_id}") == "success", open(tmp_path / "standalone.log").read()[-3000:]
        tasks = client.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        assert {t["task_id"]: t["state"] for t in tasks} == {
            "ingest": "success", "validate": "success", "train": "success", "evaluate": "success", "serve": "success"}

        # A backfill over two days, as the UI's Backfill button creates it: one dataset version per day.
        backfill = wait_for(lambda: (r := client.post("/api/v2/backfills", json={
            "dag_id": "avp_daily", "from_date": "2026-11-02T00:00:00Z", "to_date": "2026-11-03T00:00:00Z",
            "max_active_runs": 1})).status_code in (200, 201) and r.json(), 60, "the backfill to be accepted")

        def backfill_runs():
            runs = client.get("/api/v2/dags/avp_daily/dagRuns", params={"run_type": "backfill"}).json()["dag_runs"]
            states = sorted(r["state"] for r in runs)
            return len(runs) == 2 and all(s in ("success", "failed") for s in states) and states

        assert wait_for(backfill_runs, 900, f"backfill {backfill['id']}") == ["success", "success"]
        from pipeline import config
        from pipeline.registry import Registry

        # Each day's dataset holds exactly the logs recorded before it: the day 2026-11-02 those of Nov 1,
        # the day 2026-11-03 every log (the simulated fleet drove on Nov 1 and 2), as the triggered run did;
        # a day that selects the same logs with the same weights reuses the dataset instead of rebuilding it.
        registry = Registry.open(config.load({"home": env["AVP_HOME"]}, env={}))
        log_days = {d.ref: sorted({dt.datetime.fromtimestamp(p.meta["start_time_ns"] / 1e9, dt.timezone.utc)
                                   .date().isoformat() for p in registry.parents(d.id) if p.kind == "log"})
                    for d in registry.list("dataset", state="succeeded")}
        assert {tuple(days) for days in log_days.values()} == {("2026-11-01",), ("2026-11-01", "2026-11-02")}, log_days
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends; SIGTERM leaves workers behind
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    assert proc.returncode is not None
