"""What makes a run reproducible: code version (git SHA + hash of uncommitted changes), user, host,
Airflow context, and a content hash of the code a stage's entry point runs."""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import getpass
import hashlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

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


# The person a registry API request authenticated as (``acting_as``): what the registry records as "by".
_acting_user: contextvars.ContextVar[str] = contextvars.ContextVar("avp_acting_user", default="")


@contextlib.contextmanager
def acting_as(name: str) -> Iterator[None]:
    """Within the block (this thread or task only), ``user()`` is ``name``."""
    token = _acting_user.set(name)
    try:
        yield
    finally:
        _acting_user.reset(token)


def user() -> str:
    """Who acts: the API caller inside ``acting_as``, else the OS user."""
    if _acting_user.get():
        return _acting_user.get()
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


def project_packages(root: Path) -> frozenset[str]:
    """The top-level packages of the repository at ``root`` (folders with an ``__init__.py``)."""
    return frozenset(p.parent.name for p in root.glob("*/__init__.py"))


def module_file(module: str, root: Path) -> Path | None:
    """The source file of a module of the repository at ``root`` (a package's ``__init__.py``), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` anywhere in the file may load (function-level
    imports too): for ``from a.b import c``, both ``a.b`` and ``a.b.c`` (``c`` may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up ``level - 1`` packages from this module's package
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


@functools.lru_cache(maxsize=None)
def code_closure(modules: tuple[str, ...], root: Path = REPO_ROOT) -> tuple[str, ...]:
    """The repository files (relative paths, sorted) that running ``modules`` executes as far as imports
    show: each module, the ``__init__.py`` of its packages, and - transitively - every module of this
    repository's packages that they import. Imports of other distributions are not followed.

    Static analysis cannot see a module loaded by name (``importlib``, a subprocess ``python -m``, a
    registry filled by discovery): the caller names those in ``modules`` as well. A name in ``modules``
    that is not a module of the repository is a ``ValueError``.
    """
    packages = project_packages(root)
    missing = [m for m in modules if module_file(m, root) is None]
    if missing:
        raise ValueError(f"code modules {', '.join(missing)} are not modules of the repository at {root}")
    files: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        parts = name.split(".")
        if parts[0] not in packages:
            continue
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            path = module_file(prefix, root)
            if path is not None and prefix not in files:
                files[prefix] = path
                pending.extend(_imported_modules(path, prefix))
    return tuple(sorted(str(p.relative_to(root)) for p in files.values()))


@functools.lru_cache(maxsize=None)
def code_version(*modules: str, root: Path = REPO_ROOT) -> str:
    """sha256 over the relative paths and bytes of ``code_closure(modules)``, in path order.

    Part of every content key: changing the code a stage runs invalidates its cached artifacts, and
    changing any other file does not.
    """
    digest = hashlib.sha256()
    for rel in code_closure(tuple(sorted(set(modules))), root):
        digest.update(rel.encode() + b"\0")
        data = (root / rel).read_bytes()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()
