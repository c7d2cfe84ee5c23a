"""What makes a run reproducible: code version (git SHA + hash of uncommitted changes), user, host,
Airflow context, and a content hash of the code a stage's entry point runs."""

from __future__ import annotations

import functools
import getpass
import hashlib
import os
import socket
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "replace")


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit the code runs from, or ``unknown`` outside a git checkout."""
    sha = _git("rev-parse", "HEAD")
    return sha.strip() if sha else "unknown"


def uncommitted_diff() -> str:
    """Tracked changes against HEAD plus untracked files' names and content hashes."""
    diff = _git("diff", "HEAD", "--binary") or ""
    untracked = (_git("ls-files", "--others", "--exclude-standard") or "").split()
    for rel in sorted(untracked):
        path = REPO_ROOT / rel
        if path.is_file():
            diff += f"\nuntracked {rel} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return diff


@functools.lru_cache(maxsize=1)
def diff_hash() -> str:
    """sha256 of the uncommitted changes; empty string for a clean tree."""
    diff = uncommitted_diff()
    return hashlib.sha256(diff.encode()).hexdigest() if diff.strip() else ""


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def host() -> str:
    """This machine's name as recorded in the registry: ``AVP_HOSTNAME`` when set (a container's or a
    test's stand-in for another machine), else the OS host name."""
    return os.environ.get("AVP_HOSTNAME") or socket.gethostname()


def airflow_context() -> dict[str, str]:
    """Airflow exports these to every task process; empty outside Airflow."""
    keys = {"dag_id": "AIRFLOW_CTX_DAG_ID", "run_id": "AIRFLOW_CTX_DAG_RUN_ID", "task_id": "AIRFLOW_CTX_TASK_ID"}
    return {k: os.environ[v] for k, v in keys.items() if os.environ.get(v)}


def snapshot() -> dict[str, object]:
    """Everything recorded beside an artifact to say where it came from."""
    return {
        "git_sha": git_sha(),
        "diff_hash": diff_hash(),
        "user": user(),
        "host": host(),
        "pid": os.getpid(),
        **{f"airflow_{k}": v for k, v in airflow_context().items()},
    }


@functools.lru_cache(maxsize=None)
def code_version(*packages: str) -> str:
    """sha256 over the Python sources of the given top-level packages (e.g. ``"spark_jobs"``).

    Part of every content key: changing the code an entry point runs invalidates its cached artifacts.
    """
    digest = hashlib.sha256()
    for package in sorted(set(packages)):
        base = REPO_ROOT / package
        for path in sorted(base.rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
