"""Typed artifact contracts: the JSON files one stage writes and other stages (or people) read.

Each file has one class here, its file name declared once (``FILE``), and every producer and consumer
goes through it::

    manifest.json   Manifest         ingest writes; validate, train, evaluate read
    model.json      ModelSpec        the trainer writes; evaluate and serve read (how to rebuild model.pt)
    metrics.json    TrainMetrics     the trainer writes (model artifact); train and serve read
    metrics.json    EvaluationMetrics  evaluate writes (metrics artifact); evaluate and serve read
    job.json        TrainJob         the train stage writes; every training rank reads
    metadata.json   PackageMetadata  serve writes into the package; the runtime, HTTP server and C++ read

``load`` refuses, naming the file and the field, a missing field, an unknown field, a value of the
wrong type and a ``schema_version`` newer than this code; a file without ``schema_version`` (written
before the contracts existed) is version 1. ``save`` writes atomically (``pipeline.files``) and checks
the object the way ``load`` would first, so whatever is written can be read back. Nested parts whose
keys are data (per-class tables, per-log statistics, the resolved config) stay plain dicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.errors import UserError
from pipeline.files import atomic_file, sha256_file
from pipeline.taxonomy import CLASSES, NUM_CLASSES

# The file names, declared once (a model artifact and a metrics artifact each hold a metrics.json).
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.json"
METRICS_FILE = "metrics.json"
JOB_FILE = "job.json"
PACKAGE_METADATA_FILE = "metadata.json"
COMPILED_PROGRAM_FILE = "export.json"
# The call every registered model answers (what model.json and model.ts record).
MODEL_INPUT = "points float32 [B, N, 4] (x, y, z, intensity), valid bool [B, N]"
MODEL_OUTPUT = f"logits float32 [B, N, {NUM_CLASSES}]"


class ContractError(UserError):
    """An artifact file does not match its contract; the message names the file and the field."""


def json_ready(value: Any) -> Any:
    """``value`` as strict JSON data: NaN and infinities become None, numpy scalars and arrays Python
    values (anything with ``tolist``), tuples lists and dict keys strings."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):
        return json_ready(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (nested records built from their dicts)."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], where)
        raise TypeError(f"unsupported contract type {hint}")  # a programming error in this module
    if value is None:
        raise ContractError(f"{where} should be {_type_name(hint)}, found null")
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, where)
    expected = origin or hint
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(expected)
    if not (ok(value) if ok else isinstance(value, expected)):
        raise ContractError(f"{where} should be {_type_name(hint)}, found {type(value).__name__} "
                            f"{json.dumps(value, default=str)[:60]}")
    if expected is dict and args:
        return {k: _convert(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if expected is list and args:
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    return value


@dataclass(frozen=True, kw_only=True)
class Record:
    """A typed JSON object: every field declared, each checked on the way in."""

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Record":
        """Build from parsed JSON; ``where`` (the file, and the path inside it) goes into every error."""
        if not isinstance(data, dict):
            raise ContractError(f"{where} should be a JSON object ({cls.__name__}), found {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ContractError(f"{where}: unknown field {unknown[0]!r} for {cls.__name__} "
                                f"(known fields: {', '.join(fields)})")
        missing = [name for name, f in fields.items() if name not in data and
                   f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ContractError(f"{where}: missing field {missing[0]!r} of {cls.__name__}")
        return cls(**{name: _convert(value, hints[name], f"{where}: field {name!r}") for name, value in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict JSON data (fields in declaration order)."""
        return json_ready({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Contract(Record):
    """A whole artifact file: a ``Record`` with a file name, a schema version, load and save."""

    FILE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    SORT_KEYS: ClassVar[bool] = True  # False where key order means something (taxonomy order)

    schema_version: int = 1

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Contract":
        if isinstance(data, dict):
            version = data.get("schema_version", 1)  # files from before the contracts: version 1
            if isinstance(version, int) and not isinstance(version, bool) and version > cls.VERSION:
                raise ContractError(f"{where}: schema_version {version} is newer than this code reads "
                                    f"({cls.__name__} up to {cls.VERSION}); update avp")
            if isinstance(version, int) and version < 1:
                raise ContractError(f"{where}: field 'schema_version' is {version}; versions start at 1")
        return super().from_dict(data, where)

    @classmethod
    def parse(cls, text: str | bytes, where: str):
        """From the text of a file; ``where`` names it in errors."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ContractError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str):
        """Read and check ``path``."""
        try:
            with open(path, "rb") as fh:
                text = fh.read()
        except OSError as exc:
            raise ContractError(f"{path}: cannot read the {cls.FILE} ({exc.strerror or exc})") from None
        return cls.parse(text, path)

    @classmethod
    def load_from(cls, folder: str):
        """Read ``<folder>/<FILE>``."""
        return cls.load(os.path.join(folder, cls.FILE))

    def dumps(self) -> str:
        """The file's text: indented strict JSON with a final newline."""
        data = self.to_dict()
        type(self).from_dict(data, f"{type(self).__name__} being written")  # what is written loads back
        return json.dumps(data, indent=2, sort_keys=self.SORT_KEYS, allow_nan=False, default=str) + "\n"

    def save(self, path: str) -> str:
        """Write atomically to ``path``; returns it."""
        text = self.dumps().encode()
        with atomic_file(path) as fh:
            fh.write(text)
        return path

    def save_to(self, folder: str) -> str:
        """Write ``<folder>/<FILE>``; returns the path."""
        return self.save(os.path.join(folder, self.FILE))


# ----------------------------------------------------------------------------------------- manifest.json
@dataclass(frozen=True, kw_only=True)
class SplitInfo(Record):
    """One split of a dataset: its logs, counts, Petastorm row group sizes (in file order) and folder."""

    logs: list[str]
    frames: int
    points: int
    row_groups: list[int]
    path: str


@dataclass(frozen=True, kw_only=True)
class Manifest(Contract):
    """The dataset manifest ingest writes beside the splits."""

    FILE: ClassVar[str] = MANIFEST_FILE

    dataset: str
    source: str
    split_mode: str
    date_from: str
    date_to: str
    shares: dict[str, float]
    reader_ranks: int
    splits: dict[str, SplitInfo]
    logs: dict[str, dict[str, Any]]  # per-log statistics (frames, points, class_points, city, sha256, ...)
    quarantined: list[dict[str, Any]]  # {log_id, handle, reason}
    # sha256 of every other file of the dataset by relative path (Parquet parts, Petastorm's pickled
    # _common_metadata): checked by ``verified_manifest`` before any reader opens one
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    # inputs left out because their other half is missing (importer ``unmatched_inputs``): problem -> files
    input_warnings: dict[str, list[str]] = dataclasses.field(default_factory=dict)


# The registry meta key of a dataset's manifest checksum: the manifest lists every file's checksum, the
# registry vouches for the manifest, so no file of a published dataset can change unnoticed.
MANIFEST_DIGEST = "manifest_sha256"


def dataset_files(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the manifest, by relative path ('/'-separated)."""
    out = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != MANIFEST_FILE:
                out[relative] = sha256_file(path)
    return dict(sorted(out.items()))


def seal_dataset(folder: str, manifest: Manifest) -> dict[str, str]:
    """Write ``manifest`` into the dataset ``folder`` with the checksums of every file there; returns the
    registry meta that vouches for it (``{MANIFEST_DIGEST: sha256 of manifest.json}``)."""
    path = dataclasses.replace(manifest, files=dataset_files(folder)).save_to(folder)
    return {MANIFEST_DIGEST: sha256_file(path)}


def verified_manifest(dataset: Any, say: Any = print) -> Manifest:
    """The manifest of a dataset artifact once every file of the dataset matches it: the manifest's own
    checksum against the registry's (``MANIFEST_DIGEST`` in the artifact's meta), then each file's against
    the manifest, with no file missing or added. Readers call this before opening any file (Petastorm
    unpickles ``_common_metadata``). A dataset whose record has no checksum (written by hand, or before
    checksums) is read unverified, with a warning. ``ContractError`` names the file that does not match."""
    location, expected = dataset.location, dataset.meta.get(MANIFEST_DIGEST)
    path = os.path.join(location, MANIFEST_FILE)
    if expected is not None:
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ContractError(f"{path}: cannot read the {MANIFEST_FILE} ({exc.strerror or exc})") from None
        if actual != expected:
            raise ContractError(f"{path} of {dataset.ref} does not match the checksum the registry recorded: the "
                                "dataset was modified after it was published; rebuild it (avp ingest --force)")
    manifest = Manifest.load(path)
    if expected is None and not manifest.files:
        say(f"warning: {dataset.ref} has no recorded checksums (not built by this ingest): read unverified")
        return manifest
    found = dataset_files(location)
    for name in sorted(set(found) | set(manifest.files)):
        if found.get(name) != manifest.files.get(name):
            what = ("is not listed in the manifest" if name not in manifest.files else
                    "is missing" if name not in found else "does not match its checksum in the manifest")
            raise ContractError(f"{os.path.join(location, name)} of {dataset.ref} {what}: the dataset was modified "
                                "after it was published; rebuild it (avp ingest --force)")
    return manifest


# ----------------------------------------------------------------------------------------- model.json
@dataclass(frozen=True, kw_only=True)
class ModelSpec(Contract):
    """How to rebuild a model artifact's ``model.pt``: the registered model name and its full options."""

    FILE: ClassVar[str] = MODEL_FILE

    model: str
    options: dict[str, Any]
    num_classes: int
    classes: list[str]
    input: str
    output: str

    @classmethod
    def for_model(cls, model: str, options: dict[str, Any]) -> "ModelSpec":
        """The spec of registered model ``model`` built with the full ``options`` (its config as a dict)."""
        return cls(model=model, options=options, num_classes=NUM_CLASSES, classes=list(CLASSES),
                   input=MODEL_INPUT, output=MODEL_OUTPUT)


# ----------------------------------------------------------------------------------------- metrics.json
@dataclass(frozen=True, kw_only=True)
class TrainMetrics(Contract):
    """What training measured, in the model artifact: per-epoch history, final numbers, digests."""

    FILE: ClassVar[str] = METRICS_FILE

    model: str
    dataset: str
    epochs: list[dict[str, Any]]
    final: dict[str, Any]  # loss, val_miou, val_iou, global_step
    first_epoch_loss: float | None
    majority_baseline: dict[str, Any] | None
    class_weights: dict[str, float]
    train_class_points: dict[str, int]
    samples_per_s: float | None
    data_wait_fraction: float | None
    parameters_sha256: str
    state_sha256: str
    backend: str
    world: int
    torchscript_max_abs_diff: float | None = None  # None when no rank ran a step to check it on


@dataclass(frozen=True, kw_only=True)
class EvaluationMetrics(Contract):
    """The evaluate stage's metrics artifact: every metric of the candidate (and its baseline), the verdict."""

    FILE: ClassVar[str] = METRICS_FILE
    SORT_KEYS: ClassVar[bool] = False  # per-class tables are in taxonomy order

    model: str
    model_name: str
    dataset: str
    split: str
    metrics_ref: str
    created_at: str
    host: str
    code_version: str
    settings_key: str
    thresholds: dict[str, float]
    candidate: dict[str, Any]  # segmentation, objects, planner, scenes, pr_curves, hardware, settings
    baseline_model: str | None
    baseline_source: str | None
    baseline: dict[str, Any] | None
    verdict: dict[str, Any]  # blessed, reasons, checks
    worst_scenes: list[str]
    feedback: dict[str, Any]  # weights, file


# ----------------------------------------------------------------------------------------- export.json
@dataclass(frozen=True, kw_only=True)
class CompiledProgram(Contract):
    """What evaluate compiled and timed (``compiled/model.pt2`` in its metrics artifact), so the serve stage
    ships that very program: what it was compiled for, how, and the file's SHA-256."""

    FILE: ClassVar[str] = COMPILED_PROGRAM_FILE

    model_fingerprint: str  # sha256 of the model's class, config and weights
    export_spec: dict[str, Any]  # serving.artifacts.ExportSpec.as_dict()
    torch: str
    device: str
    cpu_isa: str | None  # the vector instruction set the C++ was compiled for (CPU only)
    format: str  # aoti | exported_program
    aoti_error: str | None
    compile_seconds: float | None = None
    file: str
    sha256: str


# ----------------------------------------------------------------------------------------- job.json
@dataclass(frozen=True, kw_only=True)
class JobDataset(Record):
    """The dataset a training job reads: its reference, folder, content key and manifest."""

    ref: str
    location: str
    content_key: str
    manifest: Manifest


@dataclass(frozen=True, kw_only=True)
class TrainJob(Contract):
    """The training job the train stage hands to every rank: what to train on, where to write, provenance."""

    FILE: ClassVar[str] = JOB_FILE

    run_id: str
    backend: str
    world: int
    device: str
    train: dict[str, Any]  # the resolved TrainConfig
    model_options: dict[str, Any]
    dataset: JobDataset
    state_dir: str
    final_dir: str
    logs_dir: str
    progress_file: str
    resume: bool
    provenance: dict[str, Any]
    config: dict[str, Any]  # the whole resolved PipelineConfig


# ----------------------------------------------------------------------------------------- metadata.json
@dataclass(frozen=True, kw_only=True)
class PackageMetadata(Contract):
    """A serving package's description: provenance, evaluation, class map, input spec, runtimes, checks."""

    FILE: ClassVar[str] = PACKAGE_METADATA_FILE

    format: str
    format_version: int
    created_at: str
    package: dict[str, Any]
    model: dict[str, Any]
    dataset: dict[str, Any] | None
    evaluation: dict[str, Any]
    provenance: dict[str, Any]
    classes: list[str]
    class_map: dict[str, str]
    input: dict[str, Any]
    output: dict[str, Any]
    preprocessing: dict[str, Any]
    example: dict[str, Any]
    runtimes: dict[str, Any]
    agreement: dict[str, Any]
    performance: dict[str, Any]
