"""A real PostgreSQL server for the registry tests (Debian's ``postgresql`` package), and a ``registry_cfg``
fixture that runs a test once on SQLite and once on PostgreSQL.

The server is a throwaway cluster (``initdb`` into a temporary folder) started once per session by
``pipeline.servers.start_postgres`` on a free 127.0.0.1 port (as the ``postgres`` user when the tests run as
root) and stopped by its PID at the end. Each test gets a database of its own. Without the server binaries the PostgreSQL
cases are skipped with a line saying how to install them; under CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from pipeline.servers import ServerUnavailable, start_postgres
from tests.prerequisites import missing


def _unavailable(reason: str) -> None:
    missing(f"PostgreSQL tests skipped: {reason}")


@pytest.fixture(scope="session")
def postgres_server():
    root = Path(tempfile.mkdtemp(prefix="avp-pg-"))  # not under pytest's tmp: the postgres user must reach it
    try:
        try:
            server = start_postgres(root, fsync=False)
        except ServerUnavailable as why:
            _unavailable(str(why))
        with server:
            yield server
    finally:
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
