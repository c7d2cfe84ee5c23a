"""A real PostgreSQL server for the registry tests (Debian's ``postgresql`` package), and a ``registry_cfg``
fixture that runs a test once on SQLite and once on PostgreSQL.

The server is a throwaway cluster (``initdb`` into a temporary folder) started once per session on a free
127.0.0.1 port, as the ``postgres`` user when the tests run as root (PostgreSQL refuses root), and stopped
by its PID at the end. Each test gets a database of its own. Without the server binaries the PostgreSQL
cases are skipped with a line saying how to install them; under CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = ("install the server with `apt-get install postgresql` as root (`make test` run as root does "
                "this) or point AVP_PG_BIN at the folder holding initdb and postgres")


def _pg_bin_dir() -> Path | None:
    """AVP_PG_BIN, else the newest /usr/lib/postgresql/<major>/bin (Debian), else initdb on PATH."""
    if os.environ.get("AVP_PG_BIN"):
        candidates = [Path(os.environ["AVP_PG_BIN"])]
    else:
        debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
        candidates = sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
        if shutil.which("initdb"):
            candidates.append(Path(shutil.which("initdb")).parent)
    return next((d for d in candidates if (d / "initdb").exists() and (d / "postgres").exists()), None)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    port: int
    user: str = "avp"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def admin(self):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                               autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def postgres_server():
    bindir = _pg_bin_dir()
    if bindir is None:
        _unavailable(f"no PostgreSQL server binaries (initdb, postgres) found; {INSTALL_HINT}")
    try:
        import psycopg
    except ImportError:
        _unavailable("the psycopg driver is not installed (it is in requirements.txt: run `make setup`)")
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the package's postgres user.
    as_user = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    root = Path(tempfile.mkdtemp(prefix="avp-pg-"))
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    init = subprocess.run([bindir / "initdb", "-D", data, "-U", "avp", "--auth=trust", "-E", "UTF8", "--no-sync"],
                          cwd=root, capture_output=True, text=True, **as_user)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stderr.strip()}")
    server = PostgresServer(port=_free_port())
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [bindir / "postgres", "-D", data, "-p", str(server.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={root}", "-c", "fsync=off", "-c", "max_connections=300"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, **as_user)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"PostgreSQL exited with {proc.returncode} at startup: {log_path.read_text()[-2000:]}")
            try:
                server.admin().close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL did not accept connections in 60 s: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions, then the server
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server."""
    name = f"avp_{uuid.uuid4().hex[:12]}"
    with postgres_server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.url(name)
    with postgres_server.admin() as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_cfg(request, tmp_path):
    """A pipeline config with a fresh home, its registry on SQLite (in the home) or on PostgreSQL."""
    from pipeline import config

    overrides = {"home": str(tmp_path / "home")}
    if request.param == "postgresql":
        overrides["registry_url"] = request.getfixturevalue("postgres_url")
    return config.load(overrides, env={})
