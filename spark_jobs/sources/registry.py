"""The importer registry: every drive-log source is a module implementing ``Importer``, registered by name.

An importer module describes itself once, at import time, like a model module does::

    SOURCE = "my_format"            # the ``ingest.source`` value that selects it

    def list_logs(root): ...        # the log handles under a dataset root, sorted
    def source_files(handle): ...   # the files one log is read from (checksummed: a changed file is a new log)
    def read_metadata(handle): ...  # the log's LogMeta, cheaply (ingest selects logs by date with it)
    def unmatched_inputs(root): ... # {problem: [what]} for files under root that cannot be paired up
    def read_log(handle): ...       # (LogMeta, iterator of Frames)

    register_importer(sys.modules[__name__])

and ingest only ever says ``get_importer(cfg.ingest.source)``. The registry imports every module of
``spark_jobs.sources`` on the first lookup, so adding an importer means adding one file (and its name to
the ``ingest.source`` choices in ``pipeline.config``; a test checks the two agree). Spark workers do not
look importers up: a task carries its importer's module name and imports just that module.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Iterator, Protocol, runtime_checkable

from pipeline.frames import Frame, LogMeta
from pipeline.taxonomy import CLASSES, IGNORE

__all__ = ["Importer", "register_importer", "get_importer", "list_importers", "labelled_classes"]


@runtime_checkable
class Importer(Protocol):
    """What ingest needs from a drive-log source (a module implements it with module-level names)."""

    SOURCE: str

    def list_logs(self, root: str) -> list[str]:
        """Handles (paths, shipped to Spark workers) of every log under ``root``, sorted; a ``UserError``
        naming ``root`` when it holds no data of this kind."""

    def source_files(self, handle: str) -> list[str]:
        """The files the log is read from, in a fixed order: their names and bytes are its checksum."""

    def read_metadata(self, handle: str) -> LogMeta:
        """The log's metadata without decoding its frames; raises on a log that cannot be read."""

    def read_log(self, handle: str) -> tuple[LogMeta, Iterator[Frame]]:
        """The log's metadata and its frames in frame order (lazily decoded)."""

    def unmatched_inputs(self, root: str) -> dict[str, list[str]]:
        """Inputs under ``root`` that are left out because their other half is missing (a label file
        without its point cloud, ...): problem name -> the files (or file: item) concerned. Ingest prints
        a warning line per problem and records the lists in the dataset's manifest (``input_warnings``)."""


_IMPORTERS: dict[str, ModuleType] = {}


def register_importer(module: ModuleType) -> ModuleType:
    """Register an importer module under its ``SOURCE``; returns it.

    A module missing part of ``Importer`` is a ``TypeError`` naming what is missing. Registering a second
    module under a taken name is a ``ValueError``; the same module again (imported twice, e.g. under
    ``importlib.reload``) replaces itself.
    """
    if not isinstance(module, ModuleType):
        raise TypeError(f"an importer is a module, got {type(module).__name__}")
    if not isinstance(module, Importer):
        members = [*Importer.__annotations__, *(k for k, v in vars(Importer).items()
                                                 if callable(v) and not k.startswith("_"))]
        missing = [name for name in members if not hasattr(module, name)]
        raise TypeError(f"importer module {module.__name__} lacks {', '.join(missing)} "
                        "(see spark_jobs.sources.registry.Importer)")
    name = module.SOURCE
    if not name or not isinstance(name, str):
        raise ValueError(f"importer module {module.__name__}: SOURCE must be a non-empty string, got {name!r}")
    existing = _IMPORTERS.get(name)
    if existing is not None and existing.__name__ != module.__name__:
        raise ValueError(f"source {name!r} is already registered by {existing.__name__}; pick another name")
    _IMPORTERS[name] = module
    return module


def _discover() -> None:
    """Import every module of ``spark_jobs.sources`` so that each registers itself (once per process)."""
    import spark_jobs.sources as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def list_importers() -> list[str]:
    """Names of all registered sources, sorted."""
    _discover()
    return sorted(_IMPORTERS)


def get_importer(source: str) -> ModuleType:
    """The importer registered under ``source``; ``ValueError`` listing the registered names otherwise."""
    if source not in _IMPORTERS:
        _discover()
    try:
        return _IMPORTERS[source]
    except (KeyError, TypeError):
        raise ValueError(f"unknown source {source!r}; registered importers: {', '.join(sorted(_IMPORTERS))}") from None


def labelled_classes(source: str) -> list[str]:
    """The taxonomy classes (not ignore, in taxonomy order) a source can label: the values of its importer's
    ``LABEL_MAP`` (source label -> class); an importer without one writes taxonomy labels as they are (mcap),
    and so does a source no importer is registered for (datasets written directly, as the tests do): every
    class. Validation requires and bounds these, not classes the source cannot have."""
    if source not in list_importers():
        return [name for i, name in enumerate(CLASSES) if i != IGNORE]
    label_map = getattr(get_importer(source), "LABEL_MAP", None)
    names = set(label_map.values()) if label_map is not None else set(CLASSES)
    return [name for i, name in enumerate(CLASSES) if i != IGNORE and name in names]
