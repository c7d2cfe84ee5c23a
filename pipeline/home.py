"""The pipeline home: one root (``AVP_HOME``) for logs, datasets, models, reports, the registry and scratch.

The root may be a local path or an fsspec URL (``file://``, ``s3://``, ``hdfs://``); the local layout is
what the demo and tests use, and URL roots work wherever the library that reads a path supports fsspec.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec

from pipeline.errors import UserError

# Artifact and log names become folder names: keep them to one safe path segment.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnsafeNameError(ValueError):
    """A name would escape its folder or is not a single safe path segment."""


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is one safe path segment, else raise naming what is wrong."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise UnsafeNameError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """Strip ``file://`` so local libraries get a plain path."""
    return path[len("file://"):] if path.startswith("file://") else path


@dataclass(frozen=True)
class Home:
    """Where everything lives. ``root`` is absolute (or a URL)."""

    root: str

    @classmethod
    def from_config(cls, home: str) -> "Home":
        home = local_path(home)
        if is_url(home):
            return cls(home.rstrip("/"))
        return cls(str(Path(home).expanduser().resolve()))

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if is_url(self.root) else os.path.join(self.root, *parts)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root)[0]

    # The fixed layout under the root.
    @property
    def logs(self) -> str:
        return self.join("logs")

    @property
    def artifacts(self) -> str:
        return self.join("artifacts")

    @property
    def runs(self) -> str:
        return self.join("runs")

    @property
    def scratch(self) -> str:
        return self.join("scratch")

    @property
    def spark(self) -> str:
        return self.join("spark")

    @property
    def airflow(self) -> str:
        return self.join("airflow")

    @property
    def registry_db(self) -> str:
        return self.join("registry.db")

    def artifact_dir(self, kind: str, name: str, version: int) -> str:
        return self.join("artifacts", check_name(kind, "artifact kind"), check_name(name, "artifact name"),
                         f"v{int(version)}")

    def ensure(self) -> "Home":
        """Create the layout; a home that is not a writable folder is a ``UserError`` naming it."""
        for path in (self.root, self.logs, self.artifacts, self.runs, self.scratch):
            try:
                self.fs.makedirs(path, exist_ok=True)
            except OSError as exc:  # a file, read-only, no permission: the setting's fault, said in one line
                raise UserError(f"pipeline home {self.root} (AVP_HOME / --home) is not usable: cannot create "
                                f"{path}: {exc.strerror or exc}") from None
        return self

    def registry_url(self, configured: str = "") -> str:
        if configured:
            return configured
        if is_url(self.root):
            raise ValueError(
                f"home {self.root} is remote: set registry_url (AVP_REGISTRY_URL) to a database URL"
            )
        return f"sqlite:///{self.registry_db}"
