"""pipeline.servers: real PostgreSQL and Redis servers on free 127.0.0.1 ports, stopped by PID, and a clear
error when a server is not installed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline import servers


def gone(pid: int) -> bool:
    """No process has this PID any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def server_root():
    if servers.pg_bin_dir() is None or servers.redis_server_binary() is None:
        pytest.skip("needs PostgreSQL and redis-server (`make test` as root installs them)")
    root = Path(tempfile.mkdtemp(prefix="avp-servers-"))  # reachable by the postgres user when run as root
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_redis_serves_then_stops_by_pid(server_root):
    import redis

    with servers.start_redis(server_root / "redis") as server:
        client = redis.Redis.from_url(server.url())
        client.set("avp", "42")
        assert client.get("avp") == b"42"
    assert gone(server.pid) and _port_free(server.port)


def test_postgres_keeps_its_databases_across_a_restart(server_root):
    with servers.start_postgres(server_root / "pg") as first:
        first.create_database("avp")
        first.create_database("avp")  # already there: nothing to do
        with first.admin() as conn:
            conn.execute("SELECT 1")
    assert gone(first.pid) and _port_free(first.port)
    with servers.start_postgres(server_root / "pg") as second:  # the same data folder: no second initdb
        with second.admin() as conn:
            names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert "avp" in names
    assert gone(second.pid)


def test_a_missing_server_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AVP_REDIS_SERVER", str(tmp_path / "no-redis-server"))
    monkeypatch.setenv("AVP_PG_BIN", str(tmp_path))
    with pytest.raises(servers.ServerUnavailable, match="apt-get install redis-server"):
        servers.start_redis(tmp_path / "redis")
    with pytest.raises(servers.ServerUnavailable, match="apt-get install postgresql"):
        servers.start_postgres(tmp_path / "pg")


def test_stopping_a_group_also_ends_descendants_that_left_it(tmp_path):
    # Airflow's task supervisor puts each task in a process group of its own: stopping `airflow
    # standalone` or a Celery worker by its group alone left a running task (and its trainer) behind.
    pids = tmp_path / "pids"
    escaped = ("import os, signal, time; os.setpgid(0, 0); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}} {{os.getpgid(0)}}\\n'); time.sleep(600)")
    leader = subprocess.Popen(["bash", "-c", f"{sys.executable} -c \"{escaped}\" & sleep 600 & wait"],
                              start_new_session=True)
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the escaping child never started"
        time.sleep(0.05)
    [(pid, pgid)] = [tuple(map(int, line.split())) for line in pids.read_text().splitlines()]
    assert pgid == pid != leader.pid  # it really left the leader's group
    servers.stop_process_group(leader, signal.SIGINT, timeout=2, whole_group=True)
    assert leader.returncode is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
