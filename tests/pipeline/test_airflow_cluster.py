"""`make airflow-cluster` as an operator uses it (scripts/airflow_cluster.sh, the same script and code): Airflow
with the CeleryExecutor, PostgreSQL and Redis on free 127.0.0.1 ports. A run triggered through the REST API on
tiny data runs every task on a Celery worker, `train` on the training queue's worker, and writes the registry
in PostgreSQL; a two-day backfill with two runs at a time leaves one dataset version per day and a consistent
registry. Everything is stopped by PID (SIGINT to the launcher, as Ctrl-C) in a finally block."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from pipeline import config
from pipeline.registry import Registry
from pipeline.servers import free_port, pg_bin_dir, redis_server_binary
from tests.dags.test_dag_run import REPO, airflow_env, run
from tests.dags.test_standalone import wait_for
from tests.dags.test_ui import awaiting_approval, finished, task_states
from tests.pipeline.test_servers import gone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
DAG = "/api/v2/dags/avp_daily"
TASKS = ("ingest", "validate", "train", "evaluate", "serve", "approve_promotion")


@pytest.fixture
def cluster_home():
    """A pipeline home outside pytest's private tmp folder: as root, PostgreSQL runs as the postgres user,
    which must reach its data folder under the home."""
    if pg_bin_dir() is None or redis_server_binary() is None:
        reason = "the cluster test needs PostgreSQL and redis-server (`make test` as root installs them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="avp-cluster-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _celery_records(db_url: str, run_id: str) -> dict[str, tuple]:
    """task_id -> (hostname, queue, Celery task id, Celery status, Celery worker node, Celery queue), from the
    metadata DB: the task instance as the scheduler recorded it, joined with Celery's own result record."""
    import psycopg

    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT ti.task_id, ti.hostname, ti.queue, ti.external_executor_id, c.status, c.worker, c.queue "
            "FROM task_instance ti LEFT JOIN celery_taskmeta c ON c.task_id = ti.external_executor_id "
            "WHERE ti.dag_id = 'avp_daily' AND ti.run_id = %s", (run_id,)).fetchall()
    return {row[0]: row[1:] for row in rows}


def _log_days(registry: Registry, dataset) -> list[str]:
    """The days (UTC) of the drive logs a dataset was built from, from its parents in the registry."""
    return sorted({dt.datetime.fromtimestamp(p.meta["start_time_ns"] / 1e9, dt.timezone.utc).date().isoformat()
                   for p in registry.parents(dataset.id) if p.kind == "log"})


def test_celery_cluster_runs_a_triggered_dag_and_a_parallel_backfill(cluster_home):
    port = free_port()
    env = airflow_env(cluster_home, AIRFLOW__API__PORT=str(port), AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True")
    env.pop("AIRFLOW_HOME")  # the script's own: <AVP_HOME>/cluster/airflow
    home = Path(env["AVP_HOME"])
    launcher_log = cluster_home / "launcher.log"
    with open(launcher_log, "w") as log:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "airflow_cluster.sh")], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state_file = home / "cluster" / "cluster.json"
    state: dict = {}
    try:
        def ready():
            assert proc.poll() is None, f"the launcher exited: {launcher_log.read_text()[-3000:]}"
            return "Airflow UI:" in launcher_log.read_text()

        wait_for(ready, 300, "the cluster to be ready")
        state = json.loads(state_file.read_text())
        registry_url = state["postgres"]["registry_url"]
        assert registry_url.endswith("/avp") and f":{state['postgres']['port']}/" in registry_url
        env["AVP_REGISTRY_URL"] = registry_url
        assert run(env, "avp", "simulate").returncode == 0  # the drive logs, registered in PostgreSQL

        client = httpx.Client(base_url=state["api_url"], timeout=30)
        wait_for(lambda: client.get(DAG).status_code == 200, 180, "the DAG to be parsed")
        # Unpausing creates the latest scheduled run (catchup=False) next to ours: both run, one at a time, the
        # scheduled one first. It asks a person to approve its package (the HITL task waits on the triggerer);
        # the operator rejects it through the REST API. Ours promotes without asking (auto_promote).
        assert client.patch(DAG, json={"is_paused": False}).status_code == 200
        triggered = wait_for(lambda: (r := client.post(f"{DAG}/dagRuns", json={
            "logical_date": None, "conf": {"auto_promote": True}}))
                             .status_code in (200, 201) and r, 60, "the trigger to be accepted")
        run_id = triggered.json()["dag_run_id"]
        [scheduled] = wait_for(lambda: [r["dag_run_id"] for r in client.get(f"{DAG}/dagRuns").json()["dag_runs"]
                                        if r["run_type"] == "scheduled"], 120, "the scheduled run")
        worker_log = home / "cluster" / "logs" / "worker.log"

        def asks_for_approval():
            assert finished(client, scheduled) is None, (task_states(client, scheduled), worker_log.read_text()[-3000:])
            return awaiting_approval(client, scheduled)

        wait_for(asks_for_approval, 900, f"the scheduled run {scheduled} to ask for approval")
        answer = client.patch(f"{DAG}/dagRuns/{scheduled}/taskInstances/approve_promotion/-1/hitlDetails",
                              json={"chosen_options": ["Reject"], "params_input": {"reason": "not on the cluster"}})
        assert answer.status_code == 200, answer.text
        assert wait_for(lambda: finished(client, scheduled), 300, f"run {scheduled}") == "success"
        assert wait_for(lambda: finished(client, run_id), 900, f"run {run_id}") == "success", \
            worker_log.read_text()[-3000:]

        tis = client.get(f"{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        assert {t["task_id"]: t["state"] for t in tis} == {task: "success" for task in TASKS}
        hostnames = state["worker_hostnames"]
        nodes = state["celery_nodes"]
        assert {t["task_id"]: t["hostname"] for t in tis} == {
            task: hostnames["training-worker" if task == "train" else "worker"] for task in TASKS}
        assert {t["task_id"]: t["queue"] for t in tis} == {
            task: "training" if task == "train" else "default" for task in TASKS}
        # Every task instance went through Celery: its Celery task id is recorded, and Celery's result backend
        # says which worker node took it from which queue, and that it completed.
        # (the Celery task of the last task instance can end a moment after Airflow marked the run done)
        records = wait_for(lambda: (r := _celery_records(state["postgres"]["airflow_db"], run_id)) and all(
            row[3] == "SUCCESS" for row in r.values()) and r, 60, "Celery to record every task's end")
        for task in TASKS:
            hostname, queue, celery_id, status, node, celery_queue = records[task]
            worker = "training-worker" if task == "train" else "worker"
            assert celery_id and status == "SUCCESS", (task, records[task])
            assert (node, celery_queue, hostname) == (nodes[worker], queue, hostnames[worker]), (task, records[task])

        cfg = config.load({"home": str(home), "registry_url": registry_url}, env={})
        registry = Registry.open(cfg)
        assert registry.url.startswith("postgresql") and not (home / "registry.db").exists()
        served = client.get(f"{DAG}/dagRuns/{run_id}/taskInstances/serve/xcomEntries/return_value").json()["value"]
        package = registry.get(served)  # the package this run's serve task returned, read from PostgreSQL
        assert package.kind == "package" and package.state == "succeeded"
        assert {a.kind for _d, a in registry.lineage(package.id, "up")} >= {"model", "metrics", "dataset", "log"}
        auto = registry.production(cfg.serve.namespace, package.name)  # auto_promote, on the training worker's DB
        assert auto.artifact_id == package.id and auto.promoted_by == f"auto_promote ({run_id})"
        rejected = registry.get(client.get(
            f"{DAG}/dagRuns/{scheduled}/taskInstances/serve/xcomEntries/return_value").json()["value"])
        assert "promotion rejected: not on the cluster" in [e["reason"] for e in registry.events(rejected.id)]

        # A backfill of two days, two runs at a time: one dataset version per day, a consistent registry.
        backfill = wait_for(lambda: (r := client.post("/api/v2/backfills", json={
            "dag_id": "avp_daily", "from_date": "2026-11-02T00:00:00Z", "to_date": "2026-11-03T00:00:00Z",
            "max_active_runs": 2})).status_code in (200, 201) and r.json(), 60, "the backfill to be accepted")
        assert backfill["max_active_runs"] == 2

        def backfill_runs():
            runs = client.get(f"{DAG}/dagRuns", params={"run_type": "backfill"}).json()["dag_runs"]
            states = sorted(r["state"] for r in runs)
            return len(runs) == 2 and all(s in ("success", "failed") for s in states) and states

        assert wait_for(backfill_runs, 1500, f"backfill {backfill['id']}") == ["success", "success"]
        # One dataset per day, the one each run's ingest returned, holding exactly the logs recorded before that
        # day (the simulated fleet drove on Nov 1 and 2); no two datasets with the same content.
        runs = client.get(f"{DAG}/dagRuns", params={"run_type": "backfill"}).json()["dag_runs"]
        per_day = {r["logical_date"][:10]: registry.get(client.get(
            f"{DAG}/dagRuns/{r['dag_run_id']}/taskInstances/ingest/xcomEntries/return_value").json()["value"])
            for r in runs}
        assert {day: _log_days(registry, ds) for day, ds in per_day.items()} == {
            "2026-11-02": ["2026-11-01"], "2026-11-03": ["2026-11-01", "2026-11-02"]}
        keys = [d.content_key for d in registry.list("dataset", state="succeeded")]
        assert len(keys) == len(set(keys))
        everything = registry.list()
        versions = [(a.kind, a.name, a.version) for a in everything]
        assert len(versions) == len(set(versions))
        assert not [a.ref for a in everything if a.state in ("building", "registered")]
        packages = registry.list("package", state="succeeded")
        assert len(packages) >= 2
        for pkg in sorted(packages, key=lambda p: p.version):  # through the CLI, on the same PostgreSQL registry
            promoted = run(env, "avp", "registry", "promote", pkg.ref)
            assert promoted.returncode == 0, promoted.stderr[-2000:]
        statuses = [p.status for p in registry.promotions()]  # the run's auto promotion, then one per package
        assert len(statuses) == len(packages) + 1
        assert statuses.count("production") == 1 and statuses.count("previous") == len(packages)
        assert registry.production(cfg.serve.namespace, packages[0].name).artifact_id == max(
            packages, key=lambda p: p.version).id
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the launcher stops every process by PID
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pids = dict(state.get("pids", {}))
        pids.update({name: state[name]["pid"] for name in ("postgres", "redis") if name in state})
        left = {name: pid for name, pid in pids.items() if not gone(pid)}
        for pid in left.values():
            os.killpg(pid, signal.SIGKILL)
    assert proc.returncode == 0, launcher_log.read_text()[-3000:]
    assert not left, f"still running after the launcher stopped: {left}"
