"""Local PostgreSQL and Redis servers on free 127.0.0.1 ports, started and stopped by PID.

One place for the servers this repo starts on one machine: the registry tests' throwaway PostgreSQL
(``tests/pipeline/conftest.py``) and ``make airflow-cluster`` (``pipeline.airflow_cluster``: Airflow's
metadata DB and the avp registry in one PostgreSQL server, Redis as the Celery broker).

* PostgreSQL is Debian's ``postgresql`` package (``/usr/lib/postgresql/<major>/bin``) or ``AVP_PG_BIN``.
  ``initdb`` runs once per data folder (trust authentication for TCP on 127.0.0.1 only); as root, the
  cluster belongs to the package's ``postgres`` user, because PostgreSQL refuses to run as root.
* Redis is Debian's ``redis-server`` (or ``AVP_REDIS_SERVER``), without persistence: a broker's queue is
  rebuilt by the scheduler after a restart.

Each server runs in its own process group (a terminal's Ctrl-C reaches the launcher, which stops the
servers after the processes that use them) and is stopped by its PID: SIGINT (PostgreSQL's fast
shutdown) or SIGTERM (Redis), then SIGKILL to its group after a timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

PG_INSTALL_HINT = ("install the server with `apt-get install postgresql` as root (`make test` run as root does this) "
                   "or point AVP_PG_BIN at the folder holding initdb and postgres")
REDIS_INSTALL_HINT = ("install it with `apt-get install redis-server` as root (`make test` run as root does this) "
                      "or point AVP_REDIS_SERVER at a redis-server binary")


class ServerUnavailable(RuntimeError):
    """The server's binaries or driver are not installed here (the message says how to get them)."""


class ServerFailed(RuntimeError):
    """A server was found but did not start; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pg_bin_dir() -> Path | None:
    """AVP_PG_BIN, else the newest /usr/lib/postgresql/<major>/bin (Debian), else initdb on PATH."""
    if os.environ.get("AVP_PG_BIN"):
        candidates = [Path(os.environ["AVP_PG_BIN"])]
    else:
        debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
        candidates = sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
        if shutil.which("initdb"):
            candidates.append(Path(shutil.which("initdb")).parent)
    return next((d for d in candidates if (d / "initdb").exists() and (d / "postgres").exists()), None)


def redis_server_binary() -> Path | None:
    found = os.environ.get("AVP_REDIS_SERVER") or shutil.which("redis-server")
    return Path(found) if found and Path(found).exists() else None


@dataclass
class ServerProcess:
    """A server started here: its process (the leader of its own process group) and its log."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.proc.returncode} at startup; "
                                   f"{self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"{self.name} did not accept connections on 127.0.0.1:{self.port} in "
                                   f"{timeout:.0f} s; {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> None:
        stop_process_group(self.proc, self.stop_signal, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30, *,
                       whole_group: bool = False) -> None:
    """Send ``sig`` to ``proc`` (to its whole process group with ``whole_group``, as a terminal's Ctrl-C
    does); if it is still there after ``timeout`` s, SIGKILL its process group (it was started with
    ``start_new_session=True``, so the group is its own: children included).

    Descendants that left the group are ended too: Airflow runs every task in a process group of its own
    (its supervisor calls setpgid), so a task running at shutdown, and whatever it started, would outlive
    the group. They are noted before the signal and get SIGTERM, then SIGKILL."""
    # only while it runs: a reaped PID may already belong to another process, whose children are not ours
    running = proc.poll() is None
    family = _descendants(proc.pid) if running else []
    if running:
        try:
            (os.killpg if whole_group else os.kill)(proc.pid, sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (or the leader that ignored sig)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    _end(family, timeout)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _end(processes: list[psutil.Process], timeout: float) -> None:
    """SIGTERM the processes still alive (psutil refuses a PID that was reused meanwhile), then SIGKILL."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _gone, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _as_postgres_user() -> dict:
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


@dataclass
class PostgresServer(ServerProcess):
    user: str = "avp"
    stop_signal: int = signal.SIGINT  # fast shutdown: ends the sessions, then the server

    def url(self, database: str, driver: str = "psycopg") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{database}"

    def admin(self):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                               autocommit=True, connect_timeout=5)

    def create_database(self, name: str) -> None:
        """Create ``name`` unless it exists (a restarted cluster keeps its databases)."""
        with self.admin() as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')

    def _accepts(self) -> bool:
        import psycopg

        try:
            self.admin().close()
            return True
        except psycopg.OperationalError:
            return False


def start_postgres(root: Path, port: int | None = None, user: str = "avp",
                   max_connections: int = 300, fsync: bool = True) -> PostgresServer:
    """A PostgreSQL server with its data in ``root/data`` (initdb'd on first use) on 127.0.0.1:``port``
    (a free one by default), superuser ``user`` with trust authentication, log in ``root/server.log``."""
    bindir = pg_bin_dir()
    if bindir is None:
        raise ServerUnavailable(f"no PostgreSQL server binaries (initdb, postgres) found; {PG_INSTALL_HINT}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ServerUnavailable("the psycopg driver is not installed (it is in requirements.txt: run `make setup`)")
    as_user = _as_postgres_user()
    root.mkdir(parents=True, exist_ok=True)
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    if not (data / "PG_VERSION").exists():
        init = subprocess.run([bindir / "initdb", "-D", data, "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync"],
                              cwd=root, capture_output=True, text=True, **as_user)
        if init.returncode != 0:
            raise ServerFailed(f"initdb {data} failed (as root, every folder above it must be readable by the "
                               f"postgres user): {init.stderr.strip()}")
    port = port or free_port()
    log_path = root / "server.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [bindir / "postgres", "-D", data, "-p", str(port), "-c", "listen_addresses=127.0.0.1",
             "-c", "unix_socket_directories=", "-c", f"fsync={'on' if fsync else 'off'}",
             "-c", f"max_connections={max_connections}"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
    server = PostgresServer(name="PostgreSQL", port=port, proc=proc, log_path=log_path, user=user)
    server.wait_ready(server._accepts)
    return server


@dataclass
class RedisServer(ServerProcess):
    stop_signal: int = field(default=signal.SIGTERM)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _accepts(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2).ping())
        except redis.exceptions.ConnectionError:
            return False


def start_redis(root: Path, port: int | None = None) -> RedisServer:
    """A Redis server on 127.0.0.1:``port`` (a free one by default), no persistence, log in ``root/redis.log``."""
    binary = redis_server_binary()
    if binary is None:
        raise ServerUnavailable(f"no redis-server found; {REDIS_INSTALL_HINT}")
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ServerUnavailable("the redis client is not installed (it is in requirements.txt: run `make setup`)")
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = root / "redis.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root),
                                 "--save", "", "--appendonly", "no", "--daemonize", "no"],
                                cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = RedisServer(name="Redis", port=port, proc=proc, log_path=log_path)
    server.wait_ready(server._accepts)
    return server
