"""`make airflow-cluster`: the cluster shape of Airflow, on this machine.

A PostgreSQL server (databases ``airflow``: the metadata DB and Celery's result backend; ``avp``: the
registry), a Redis broker, and Airflow's api-server, scheduler, dag-processor, triggerer and two Celery
workers: a general one (queue ``default``) and one on the ``training`` queue, which the DAG's ``train``
task is sent to (``AVP_TRAINING_QUEUE``; the pattern for GPU hosts). The same processes, settings and
environment variables as docker/compose.yaml and docs/deploy.md, with every server on 127.0.0.1.

Everything lives under ``<AVP_HOME>/cluster``: the servers' data and logs, one log per Airflow component
(``logs/``), the generated secrets that every component must share, and ``cluster.json`` (ports, URLs and
PIDs) for tools and tests. Every process runs in its own process group and is stopped by its PID, in
reverse order of start, on Ctrl-C (SIGINT) or SIGTERM, or when one of them dies.

    scripts/airflow_cluster.sh            (make airflow-cluster; sources scripts/airflow_env.sh first)
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.servers import (
    ServerFailed,
    ServerProcess,
    free_port,
    start_postgres,
    start_redis,
    stop_process_group,
)

TRAINING_QUEUE = "training"
DEFAULT_QUEUE = "default"  # Airflow's [operators] default_queue
AIRFLOW_DB, REGISTRY_DB = "airflow", "avp"
CELERY_CONCURRENCY = {"worker": 2, "training-worker": 1}  # 2 cores here; a GPU host: one training at a time
TRAINING_POOL = ("avp_training", "1", "one training at a time")
STATE_FILE = "cluster.json"
# Settings every Airflow process must share (generated once per cluster folder; compose takes them from the
# operator's environment).
SHARED_SECRETS = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY")
# Only for several workers on one machine: containers and hosts have host names of their own.
ONE_MACHINE_ONLY = ("AIRFLOW__CORE__HOSTNAME_CALLABLE",)


def worker_hostname() -> str:
    """Airflow's ``[core] hostname_callable`` here: the host name a component records (a task instance's
    ``hostname``). On one machine both workers share a host name, so each gets its own from
    ``AVP_WORKER_HOSTNAME``; without it, the machine's name as Airflow records it by default."""
    return os.environ.get("AVP_WORKER_HOSTNAME") or socket.getfqdn()


@dataclass
class Component:
    """An Airflow process: its command line and the environment it adds to the cluster's."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def components(folder: Path, host: str) -> list[Component]:
    """The Airflow processes, in start order (stopped in reverse)."""
    def worker(name: str, queue: str) -> Component:
        # Each worker serves its task logs on its own port and names itself in the task instances it runs.
        return Component(name, ["celery", "worker", "--queues", queue, "--concurrency", str(CELERY_CONCURRENCY[name]),
                                "--celery-hostname", f"{name}@{host}", "--pid", str(folder / f"{name}.pid")],
                         {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                          "AVP_WORKER_HOSTNAME": f"{name}.{host}"})

    return [
        Component("api-server", ["api-server"]),
        Component("scheduler", ["scheduler"]),
        Component("dag-processor", ["dag-processor"]),
        Component("triggerer", ["triggerer"], {"AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port())}),
        worker("worker", DEFAULT_QUEUE),
        worker("training-worker", TRAINING_QUEUE),
    ]


def _shared_secrets(folder: Path) -> dict[str, str]:
    """Keys every component must agree on (task tokens, sessions, encrypted connections): made once, kept."""
    path = folder / "secrets.json"
    if not path.exists():
        from cryptography.fernet import Fernet

        values = [secrets.token_urlsafe(32), secrets.token_urlsafe(32), Fernet.generate_key().decode()]
        path.write_text(json.dumps(dict(zip(SHARED_SECRETS, values))))
        path.chmod(0o600)
    return json.loads(path.read_text())


def cluster_env(base: dict[str, str], airflow_db: str, broker_url: str, registry_url: str) -> dict[str, str]:
    """The environment of every Airflow process, ``base`` plus: the CeleryExecutor, the metadata DB and Celery's
    result backend at ``airflow_db``, the broker, the registry, and `train` routed to the training queue.
    docker/compose.yaml sets the same (tests/docker/test_compose.py), except ``ONE_MACHINE_ONLY``."""
    env = dict(base)
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": airflow_db,  # psycopg 3 is also the async driver
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{airflow_db}",
        # Celery's own record of each task (celery_taskmeta) also names the worker node and queue that ran it
        "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": '{"result_extended": true}',
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipeline.airflow_cluster.worker_hostname",
        "AVP_REGISTRY_URL": registry_url,
        "AVP_TRAINING_QUEUE": TRAINING_QUEUE,
    })
    return env


def _airflow(env: dict[str, str], log: Path, *args: str) -> None:
    with open(log, "a") as out:
        done = subprocess.run(["airflow", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise ServerFailed(f"`airflow {' '.join(args)}` failed ({done.returncode}); {log}:\n"
                           f"{log.read_text(errors='replace')[-3000:]}")


def _celery_nodes(broker_url: str) -> set[str]:
    """The Celery node names that answer a ping through the broker."""
    from celery import Celery

    app = Celery(broker=broker_url)
    try:
        return {name for reply in (app.control.ping(timeout=1.0) or []) for name in reply}
    finally:
        app.close()


def _healthy(api_url: str) -> bool:
    import httpx

    try:
        health = httpx.get(f"{api_url}/api/v2/monitor/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    return all((health.get(part) or {}).get("status") == "healthy"
               for part in ("metadatabase", "scheduler", "dag_processor", "triggerer"))


class AirflowCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent; also on a failed start)."""

    def __init__(self, home: Path, env: dict[str, str] | None = None):
        self.folder = home / "cluster"
        self.base_env = dict(os.environ if env is None else env)
        self.host = socket.getfqdn()
        self.api_url = (f"http://{self.base_env.get('AIRFLOW__API__HOST', '127.0.0.1')}:"
                        f"{self.base_env.get('AIRFLOW__API__PORT', '8080')}")
        self.servers: list[ServerProcess] = []
        self.processes: dict[str, subprocess.Popen] = {}
        self.state: dict = {}

    def start(self, timeout: float = 300) -> dict:
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            postgres = start_postgres(self.folder / "postgres")
            self.servers.append(postgres)
            for database in (AIRFLOW_DB, REGISTRY_DB):
                postgres.create_database(database)
            redis = start_redis(self.folder / "redis")
            self.servers.append(redis)
            env = cluster_env(self.base_env, postgres.url(AIRFLOW_DB), redis.url(),
                              self.base_env.get("AVP_REGISTRY_URL") or postgres.url(REGISTRY_DB))
            env.update(_shared_secrets(self.folder))
            _airflow(env, logs / "db-migrate.log", "db", "migrate")
            _airflow(env, logs / "db-migrate.log", "pools", "set", *TRAINING_POOL)
            parts = components(self.folder, self.host)
            for part in parts:
                with open(logs / f"{part.name}.log", "a") as out:
                    self.processes[part.name] = subprocess.Popen(
                        ["airflow", *part.args], env={**env, **part.env}, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True)
            workers = {p.name: p.args[p.args.index("--celery-hostname") + 1] for p in parts if p.args[0] == "celery"}
            self.state = {
                "api_url": self.api_url, "folder": str(self.folder),
                "postgres": {"port": postgres.port, "pid": postgres.pid, "airflow_db": env[
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], "registry_url": env["AVP_REGISTRY_URL"]},
                "redis": {"port": redis.port, "pid": redis.pid, "broker_url": redis.url()},
                "training_queue": TRAINING_QUEUE, "celery_nodes": workers,
                "worker_hostnames": {p.name: p.env["AVP_WORKER_HOSTNAME"] for p in parts if p.name in workers},
                "pids": {name: proc.pid for name, proc in self.processes.items()},
            }
            (self.folder / STATE_FILE).write_text(json.dumps(self.state, indent=2))
            self._wait_ready(redis.url(), set(workers.values()), timeout)
        except BaseException:
            self.stop()
            raise
        return self.state

    def _wait_ready(self, broker_url: str, nodes: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        api_ok = False
        while True:
            self._check_alive()
            api_ok = api_ok or _healthy(self.api_url)
            if api_ok and nodes <= _celery_nodes(broker_url):
                return
            if time.monotonic() > deadline:
                raise ServerFailed(f"the Airflow cluster was not ready in {timeout:.0f} s (API healthy: {api_ok}, "
                                   f"Celery nodes expected: {sorted(nodes)}); logs in {self.folder / 'logs'}")
            time.sleep(1)

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise ServerFailed(f"Airflow {name} exited with {proc.returncode}; see "
                                   f"{self.folder / 'logs' / (name + '.log')}")

    def stop(self, timeout: float = 30) -> None:
        """Stop the Airflow processes (workers first, API server last), then Redis, then PostgreSQL."""
        for name in reversed(list(self.processes)):
            stop_process_group(self.processes.pop(name), signal.SIGTERM, timeout)
        while self.servers:
            self.servers.pop().stop(timeout)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> int:
    home = Path(os.environ.get("AVP_HOME") or ".avp").resolve()
    cluster = AirflowCluster(home)
    # Ctrl-C (SIGINT) and SIGTERM stop everything, then exit; SIGINT is set explicitly because a shell starts
    # background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        state = cluster.start()
        print(f"Airflow UI: {state['api_url']}  (CeleryExecutor; DAG avp_daily; Ctrl-C stops everything)\n"
              f"  metadata DB {state['postgres']['airflow_db']}, registry {state['postgres']['registry_url']}\n"
              f"  broker {state['redis']['broker_url']}; workers {', '.join(state['celery_nodes'].values())} "
              f"(`train` on queue {TRAINING_QUEUE!r})\n  logs and state: {cluster.folder}", flush=True)
        while True:
            time.sleep(2)
            cluster._check_alive()
    except KeyboardInterrupt:
        return 0
    except ServerFailed as why:
        print(f"airflow-cluster: {why}", file=sys.stderr)
        return 1
    finally:
        print("airflow-cluster: stopping", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        print("airflow-cluster: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
