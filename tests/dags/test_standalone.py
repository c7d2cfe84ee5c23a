"""`airflow standalone` as an operator uses it: start on localhost, trigger the DAG through the REST API,
wait for the run to succeed, backfill two days, stop with SIGINT. Bounded in time; loopback only."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.airflow_standalone import standalone_airflow, wait_for

pytestmark = pytest.mark.slow


def test_standalone_runs_a_triggered_dag_and_a_backfill(tmp_path):
    # The scheduled run Airflow creates for the latest day (catchup is off) asks for approval and nobody
    # answers: a 1 s approval timeout ends it (production unchanged) before the triggered run starts.
    with standalone_airflow(tmp_path, AVP_SERVE__APPROVAL_TIMEOUT_S="1") as airflow:
        env = airflow.env
        client = airflow.client()
        dag = wait_for(lambda: (r := client.get("/api/v2/dags/avp_daily")).status_code == 200 and r.json(), 120,
                       "the DAG to be parsed")
        assert dag["is_paused"] is False  # AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
        # SQLite behind a busy scheduler can answer a write with 500 (database locked): retry a few times
        triggered = wait_for(lambda: (r := client.post("/api/v2/dags/avp_daily/dagRuns",
                                                       json={"logical_date": None, "conf": {"auto_promote": True}}))
                             .status_code in (200, 201) and r, 60, "the trigger to be accepted")
        run_id = triggered.json()["dag_run_id"]

        def finished():
            state = client.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}").json()["state"]
            return state if state in ("success", "failed") else None

        assert wait_for(finished, 900, f"run {run_id}") == "success", airflow.log_tail()
        tasks = client.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        assert {t["task_id"]: t["state"] for t in tasks} == {
            "ingest": "success", "validate": "success", "train": "success", "evaluate": "success", "serve": "success",
            "approve_promotion": "success"}

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
        # the triggered run promoted on its own (auto_promote); the scheduled run's request timed out
        production = registry.production("perception", "bev_segnet")
        assert production is not None and production.promoted_by.startswith("auto_promote")
        timed_out = [e for p in registry.list("package") for e in registry.events(p.id)
                     if e["reason"].startswith("promotion request timed out")]
        assert timed_out and all(e["by"] == "airflow" for e in timed_out)
