"""Configuration as code: typed dataclasses with defaults that make the demo work.

Every value can be overridden, in increasing priority, by environment variables
(``AVP_HOME``, ``AVP_REGISTRY_URL``, ``AVP_<SECTION>__<FIELD>`` such as ``AVP_TRAIN__EPOCHS=3``) and by
CLI flags (``--set train.epochs=3`` or a stage's own flags such as ``avp train --epochs 3``).
Values are coerced to the annotated type; a value that does not fit fails with a ``ConfigError`` naming
the field and what is allowed. Rules that span fields (the split shares sum to 1, lower bounds) are checked
once on the resolved config, so fields can be set in any order. A field is documented by its comment;
``field_help`` reads it back for the CLI's flag help and the DAG's param descriptions. ``resolved(cfg)`` is
the plain dict every run records.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import os
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping


class ConfigError(ValueError):
    """A configuration value is unknown or does not fit its field."""


@dataclass
class SimulateConfig:
    """The fleet simulator: how many drive logs, how long, and over which days."""

    logs: int = 24  # number of drive logs
    frames: int = 20  # frames per log, recorded at 10 Hz
    beams: int = 32
    azimuth_steps: int = 1024
    max_range_m: float = 60.0
    range_noise_m: float = 0.02
    dropout: float = 0.05  # share of returns lost
    start_date: str = "2026-11-01"  # first day, YYYY-MM-DD
    days: int = 3  # the logs are spread over this many days
    seed: int = 0  # random seed (same seed, same bytes)


@dataclass
class IngestConfig:
    """Extraction of drive logs into Petastorm train/test/validation datasets."""

    dataset_name: str = "fleet-lidar"  # dataset name in the registry
    # what to import from source_path: the fleet's MCAP logs or a real dataset (kitti, semantickitti, av2)
    source: Literal["mcap", "kitti", "semantickitti", "av2"] = "mcap"
    source_path: str = ""  # empty: <home>/logs for mcap
    split: Literal["hash", "geo"] = "hash"  # hash (stable per log id) or geo (GeoSplit cells)
    train_share: float = 0.75
    test_share: float = 0.15
    val_share: float = 0.10
    geo_cell_m: float = 2000.0  # side of a GeoSplit cell
    date_from: str = ""  # inclusive, YYYY-MM-DD; empty: no lower bound
    date_to: str = ""  # exclusive, YYYY-MM-DD; empty: no upper bound
    spark_master: str = "local[2]"  # Spark master URL, e.g. local[2] or spark://host:7077
    reader_ranks: int = 2  # row groups are laid out in multiples of this so every rank gets equal rows
    rows_per_group: int = 8
    max_points: int = 200_000  # a frame with more points than this is quarantined


@dataclass
class ValidateConfig:
    """Great Expectations suite thresholds and the gate before training."""

    warn_only: bool = False  # report failed expectations but do not stop (exploration)
    split_tolerance: float = 0.10  # absolute tolerance on the 75/15/10 log shares
    min_frames_per_log: int = 1
    max_frames_per_log: int = 100_000
    max_class_share: float = 0.95
    min_class_share: float = 0.0
    max_linf_drift: float = 0.10
    max_kl_drift: float = 0.10
    required_classes: str = "all"  # comma-separated class names that must have points; all = every class but ignore
    min_class_points: int = 1  # a required class with fewer points (over all splits) is missing
    finite_columns: str = "points,boxes,ego,sample_weight"  # must hold no NaN/inf (gps/route may be NaN: no fix)
    drift_by_city: bool = True  # drift checks per city as well as over the whole dataset
    drift_min_city_logs: int = 5  # a city is compared on its own only with this many logs in both versions
    kl_tail_weight_holdout: float = 0.001  # prior weight for a class the previous version did not have


@dataclass
class TrainConfig:
    """Data-parallel training of a registered model."""

    model: str = "bev_segnet"  # registered model name (see training/models)
    backend: Literal["horovod", "ddp"] = "horovod"  # horovod (horovodrun --gloo) or ddp (torchrun)
    np: int = 2  # number of training processes (ranks), each reading its own shard
    epochs: int = 4  # passes over the train split
    batch_size: int = 2  # frames per rank per step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    checkpoint_every: int = 20  # steps
    max_points: int = 40_000  # points sampled per frame for training
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_options: str = ""  # JSON object of model config overrides, e.g. '{"cell_size_m": 0.8}'
    shuffle_buffer: int = 32  # frames mixed across row groups by each rank's per-epoch shuffle
    keep_checkpoints: int = 3  # newest checkpoints kept in <home>/checkpoints/<model>-<key>/
    prefetch_batches: int = 4  # batches each rank's background reader decodes ahead
    # where the ranks run: local (this host), spark (Horovod ranks as Spark tasks on train.spark_master)
    # or hosts (horovodrun/torchrun over train.hosts)
    launcher: Literal["local", "spark", "hosts"] = "local"
    spark_master: str = "local[2]"  # launcher=spark: Spark master URL, e.g. spark://host:7077, yarn, k8s://...
    hosts: str = ""  # launcher=hosts: host:slots list whose slots add up to np, e.g. h1:2,h2:2
    nnodes: int = 1  # ddp: nodes of one job, each started by its own avp train --node-rank R (np counts all ranks)
    node_rank: int = 0  # ddp with nnodes > 1: this node; node 0 builds and publishes the model, the others only train
    rdzv: str = ""  # ddp with nnodes > 1: HOST:PORT of the rendezvous on node 0 (torchrun --rdzv-endpoint)
    rank_timeout_s: int = 120  # a rank waiting longer than this for a lost peer (or to start) fails the run


@dataclass
class EvaluateConfig:
    """Evaluation (model, system and hardware metrics on the test split) and the blessing gate."""

    # blessing: absolute thresholds, and the largest loss allowed against the production model
    min_miou: float = 0.30  # the lowest acceptable test mIoU
    min_class_recall: float = 0.0  # every class with test points must reach this point recall
    # TorchScript p99 on the evaluating host (model.ts is what ships). The default suits the demo's shared
    # 2-core CPU; set the target hardware's real budget in production.
    latency_p99_budget_ms: float = 2000.0
    max_regression: float = 0.05  # no class IoU, scene mIoU or missed-brake rate may lose more than this
    max_missed_brake_rate: float = 1.0  # share of needed brakes the planner may miss (1.0: not gated)
    # hardware metrics
    latency_runs: int = 20  # timed calls per variant (eager, TorchScript, exported)
    latency_warmup: int = 3  # untimed calls first (allocator, TorchScript profiling runs)
    latency_frames: int = 8  # distinct logged test frames the timed calls cycle through
    aot_inductor: bool = True  # compile the torch.export program with AOTInductor (else time the program)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the model is scored and timed
    # objects: predicted points of a class grouped in bird's-eye view, matched to ground-truth boxes
    cluster_radius_m: float = 0.75  # points closer than this (x, y) belong to one object
    min_object_points: int = 5  # fewer points: noise (prediction) or not seen by the sensor (ground truth)
    match_min_share: float = 0.5  # a cluster matches a box holding at least this share of its points
    box_margin_m: float = 0.2  # boxes are grown by this much for matching (points on a face, noise)
    distance_bands_m: str = "20,40"  # band edges: 0-20, 20-40, 40+ m
    pr_thresholds: int = 50  # score thresholds of the precision-recall curves
    # system metrics: the longitudinal planner (see docs/evaluation.md)
    lane_width_m: float = 3.5  # the ego corridor is |y| < lane_width_m / 2
    planner_horizon_m: float = 40.0  # and 0 < x < planner_horizon_m
    ttc_threshold_s: float = 2.0  # brake when distance / ego speed falls below this
    min_speed_mps: float = 0.5  # slower than this the ego is standing: no brake decision
    # feedback to ingest: the worst test scenes and the train logs most like them are up-weighted
    worst_scenes: int = 3
    hard_scene_weight: float = 2.0
    similar_train_logs: int = 2  # per worst scene: train logs of its city with the closest class mix


@dataclass
class ServeConfig:
    """Serving package and HTTP server."""

    namespace: str = "perception"
    # approve_promotion in the DAG waits this long for a person's decision; then production stays unchanged
    approval_timeout_s: int = 3 * 24 * 3600
    host: str = "127.0.0.1"  # address avp serve-http binds
    port: int = 8765  # port avp serve-http listens on
    max_points: int = 300_000  # largest cloud the server accepts and the .pt2 is exported for
    example_points: int = 20_000  # points in the package's example cloud (latency is measured on it)
    example_seed: int = 0
    latency_runs: int = 20  # timed calls per runtime when packaging
    aot_inductor: bool = True  # compile model.pt2 with AOTInductor (else save the ExportedProgram)
    runtime: Literal["torchscript", "pt2"] = "torchscript"  # what serving.load / avp serve-http run
    threads: int = 0  # intra-op threads of avp serve-http (0: torch's default, one per core)
    # the model card's known limitations (MODEL_CARD.md in every package)
    card_recall_floor: float = 0.5  # classes whose test point recall is below this are listed
    card_min_band_objects: int = 20  # distance bands with fewer test objects than this are listed as thinly tested


@dataclass
class RegistryConfig:
    """How a build holds on to its record (the database itself is ``registry_url``)."""

    # A build owns its record for lease_s and renews it every lease_renew_s; a lease left to expire (host
    # lost, process frozen or cut off from the database) lets another process abort the build and take over.
    # Registry checks 0 < lease_renew_s < lease_s (here the two could be set one after the other).
    lease_s: float = 60.0
    lease_renew_s: float = 10.0


@dataclass
class PipelineConfig:
    """The whole pipeline: one home for everything it writes, one registry, one section per stage."""

    home: str = "./.avp"
    registry_url: str = ""  # empty: sqlite:///<home>/registry.db
    seed: int = 0
    force: bool = False  # rebuild even when a succeeded artifact has the same content key
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


_TOP_LEVEL_ENV = {"AVP_HOME": "home", "AVP_REGISTRY_URL": "registry_url", "AVP_SEED": "seed"}


def coerce(path: str, value: Any, annotation: Any) -> Any:
    """Turn ``value`` (often a string from a flag or the environment) into ``annotation``: bool, int,
    float, str, a Literal, or a tuple (``"-51.2,51.2"`` or JSON ``"[-51.2, 51.2]"``); ``ConfigError`` naming
    ``path`` and what is allowed otherwise. Shared by the pipeline config and the model configs."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config field {path}: {value!r} is not allowed; allowed values: {', '.join(map(str, args))}"
            )
        return value
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            items = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"config field {path}: {value!r} is not a sequence")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(f"{path}[{i}]", item, args[0]) for i, item in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"config field {path}: expected {len(args)} values, got {len(items)} ({value!r})")
        return tuple(coerce(f"{path}[{i}]", item, arg) for i, (item, arg) in enumerate(zip(items, args)))
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"config field {path}: {value!r} is not {kind[annotation]}") from None
    raise ConfigError(f"config field {path}: unsupported type {annotation!r}")


def _section_fields(obj: Any) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(obj)}


def field_help(section: type) -> dict[str, str]:
    """Each field's documentation, read from the dataclass's source: the comment at the end of its line, else
    the comment lines right above it. CLI flag help and Airflow param descriptions come from here, so a
    knob is documented once, next to its default."""
    try:
        source = textwrap.dedent(inspect.getsource(section))
    except (OSError, TypeError):  # no source (a frozen build): no help, still a working config
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    own_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            (own_line if lines[row - 1].lstrip().startswith("#") else trailing)[row] = text
    helps = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.end_lineno in trailing:
                helps[node.target.id] = trailing[node.end_lineno]
                continue
            above, row = [], node.lineno - 1
            while row in own_line:
                above.insert(0, own_line[row])
                row -= 1
            if above:
                helps[node.target.id] = " ".join(above)
    return helps


@dataclass(frozen=True)
class FieldDoc:
    """What the CLI and the DAG params need to know about one config field."""

    path: str
    annotation: Any
    default: Any
    help: str

    def summary(self) -> str:
        """The help with where the value lives and its default: flag help and DAG param description."""
        return f"{self.help} ({self.path}, default {self.default!r})".lstrip()


def describe(dotted: str) -> FieldDoc:
    """Type, default and documentation of ``section.field`` (or a top-level field)."""
    owner: Any = PipelineConfig()
    *sections, name = dotted.split(".")
    for section in sections:
        owner = getattr(owner, section)
    fields = _section_fields(owner)
    if name not in fields or dataclasses.is_dataclass(fields[name][1]):
        raise ConfigError(f"unknown config field {dotted!r}")
    return FieldDoc(dotted, fields[name][1], getattr(owner, name), field_help(type(owner)).get(name, ""))


def set_value(cfg: PipelineConfig, dotted: str, value: Any) -> None:
    """Set ``section.field`` (or a top-level field) on ``cfg``, coerced to the field's type. Rules that span
    fields are not checked here (``check_rules`` runs once on the whole config)."""
    parts = dotted.split(".")
    target: Any = cfg
    for depth, name in enumerate(parts):
        fields = _section_fields(target)
        if name not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"unknown config field {dotted!r}: {where} has {', '.join(sorted(fields))}"
            )
        _, annotation = fields[name]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(annotation):
                raise ConfigError(f"config field {dotted!r} is a section; set one of its fields")
            setattr(target, name, coerce(dotted, value, annotation))
        else:
            if not dataclasses.is_dataclass(annotation):
                raise ConfigError(f"config field {'.'.join(parts[: depth + 1])!r} has no sub-fields")
            target = getattr(target, name)


# Lower bounds of numeric fields, checked on the resolved config and offered to Airflow as Param minimums.
MINIMUMS = {"train.np": 1, "train.epochs": 1, "train.batch_size": 1, "train.nnodes": 1, "train.node_rank": 0,
            "train.rank_timeout_s": 1, "simulate.logs": 1, "simulate.frames": 1,
            "serve.approval_timeout_s": 1}


def check_rules(cfg: PipelineConfig) -> None:
    """The rules that span fields, run once on the fully resolved config (after the environment, ``--set``,
    flags and DAG params are all applied: ``--set ingest.train_share=0.8 --set ingest.test_share=0.1`` is
    fine in either order). Every broken rule is reported in one ``ConfigError``."""
    problems = []
    ing = cfg.ingest
    shares = {"train_share": ing.train_share, "test_share": ing.test_share, "val_share": ing.val_share}
    if any(s < 0 for s in shares.values()) or abs(sum(shares.values()) - 1.0) > 1e-6:
        given = " + ".join(f"{name} {value:g}" for name, value in shares.items())
        problems.append(f"config fields ingest.train_share/test_share/val_share must be >= 0 and sum to 1, "
                        f"got {given} = {sum(shares.values()):g}")
    for path, minimum in MINIMUMS.items():
        value = get_value(cfg, path)
        if value < minimum:
            problems.append(f"config field {path}: {value} must be at least {minimum}")
    if problems:
        raise ConfigError("; ".join(problems))


def get_value(cfg: Any, dotted: str) -> Any:
    """The value of ``section.field`` (or a top-level field) on ``cfg``."""
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def load(overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Defaults, then environment variables, then explicit ``overrides`` (dotted names)."""
    env = os.environ if env is None else env
    cfg = PipelineConfig()
    for var, name in _TOP_LEVEL_ENV.items():
        if env.get(var):
            set_value(cfg, name, env[var])
    for var, value in sorted(env.items()):
        if var.startswith("AVP_") and "__" in var:
            section, _, name = var[4:].partition("__")
            set_value(cfg, f"{section.lower()}.{name.lower()}", value)
    for dotted, value in (overrides or {}).items():
        set_value(cfg, dotted, value)
    check_rules(cfg)
    return cfg


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """``["train.epochs=3", ...]`` from ``--set`` flags into a dict, with a clear error for a bad pair."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.field=value, got {pair!r}")
        out[key.strip()] = value
    return out


def resolved(cfg: Any) -> dict[str, Any]:
    """The fully resolved config (or one section of it) as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def canonical_json(obj: Any) -> str:
    """Stable JSON used for hashing: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
