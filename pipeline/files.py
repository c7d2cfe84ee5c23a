"""Atomic file writes: a file appears complete under its name or not at all.

The data goes to a hidden temporary file beside the target (``.<name>.tmp-<pid>-<hex>``, so listings
and globs for the real names never see it), is flushed and fsynced, and is renamed over the target with
``os.replace``; a failure (or a kill: the temporary name carries the writer's pid) never leaves a
partial file under the real name, and an exception removes the temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from typing import IO, Any, Iterator

TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")  # what ``temporary_name`` makes (pid in group 1)


def temporary_name(path: str) -> str:
    """A hidden name beside ``path`` for writing it, tagged with this process's pid."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path to write ``path`` through (for writers that take a path, like pyarrow's);
    on success it is renamed to ``path``. ``durable=False`` skips the fsyncs, for files inside a folder
    that is itself published atomically later (a staging folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if durable:
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_file(path) as fh: fh.write(...)``: the file appears under ``path`` only once the
    block has finished without an exception, fsynced."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def atomic_write_json(path: str, obj: Any) -> None:
    """JSON (sorted keys, indented) written atomically."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    with atomic_file(path) as fh:
        fh.write(data)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
