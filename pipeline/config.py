"""Configuration as code: typed dataclasses with defaults that make the demo work.

Every value can be overridden, in increasing priority, by environment variables
(``AVP_HOME``, ``AVP_REGISTRY_URL``, ``AVP_<SECTION>__<FIELD>`` such as ``AVP_TRAIN__EPOCHS=3``) and by
CLI flags (``--set train.epochs=3`` or a stage's own flags such as ``avp train --epochs 3``).
Values are coerced to the annotated type; a value that does not fit fails with a ``ConfigError`` naming
the field and what is allowed. Every numeric field's range (``BOUNDS``), the formats of text fields
(``FORMATS``) and rules that span fields (the split shares sum to 1) are checked once on the resolved
config, so fields can be set in any order. A field is documented by its comment;
``field_help`` reads it back for the CLI's flag help and the DAG's param descriptions. ``resolved(cfg)`` is
the plain dict every run records.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import inspect
import io
import json
import math
import os
import re
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

    dataset_name: str = ""  # dataset name in the registry; empty: fleet-lidar for mcap, else the source (kitti, ...)
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
    # av2 per-point labels: exact (cuboid interiors, AV2's num_interior_pts) or flow (av2-api's scene-flow
    # labels: length/width + 0.2 m, cuboids with points only, later cuboid wins); see docs/label-maps.md
    av2_box_rule: Literal["exact", "flow"] = "exact"


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
    # TorchScript p99 on the evaluating host (model.ts is what ships), and the p99 budget of the variant chosen
    # to serve. The default suits the demo's shared 2-core CPU; set the target hardware's real budget in production.
    latency_p99_budget_ms: float = 2000.0
    max_regression: float = 0.05  # no class IoU, scene mIoU or missed-brake rate may lose more than this
    max_missed_brake_rate: float = 1.0  # share of needed brakes the planner may miss (1.0: not gated)
    # statistics (docs/evaluation.md): bootstrap over test logs, slices, the paired test against production
    bootstrap_resamples: int = 1000  # resamples of the test logs per slice (0: point estimates only)
    bootstrap_seed: int = 0  # same seed, same inputs: same intervals
    confidence_level: float = 0.95  # of every interval
    # slices, ';'-separated: city | distance (edges of distance_bands_m, or distance:10,30) | speed_mps:EDGES |
    # hour_utc:EDGES; the whole test split is always one slice
    slices: str = "city;distance;speed_mps:3,10;hour_utc:6,12,18"
    min_slice_logs: int = 3  # a slice with fewer test logs is reported as too small, not judged
    min_slice_count: int = 10  # nor a metric resting on fewer points, objects or needed brakes than this
    # an interval straddling -max_regression ("not enough evidence") blocks for: safety (missed brakes), all, none
    undecided_blocks: Literal["safety", "all", "none"] = "safety"
    calibration_bins: int = 15  # confidence bins of the expected calibration error and reliability diagram
    # hardware metrics
    latency_runs: int = 20  # timed calls per variant (eager, TorchScript, exported)
    latency_warmup: int = 3  # untimed calls first (allocator, TorchScript profiling runs)
    latency_frames: int = 8  # distinct logged test frames the timed calls cycle through
    aot_inductor: bool = True  # compile the torch.export program with AOTInductor (else time the program)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the model is scored and timed
    # inference variants (docs/evaluation.md): the fastest within the budget and these losses against eager is served
    variant_max_miou_drop: float = 0.5  # mIoU points (1 point = 0.01 mIoU) a served variant may lose
    variant_max_class_iou_drop: float = 1.0  # IoU points any class may lose
    int8: bool = True  # build the int8 PT2E variant (x86 CPU: quantized once, compiled once by AOTInductor)
    int8_calibration_frames: int = 8  # validation frames its activation observers see
    # the frames scored: the test split, or all of the dataset (one the model never trained on, e.g. a real
    # import evaluated with a fleet model: avp evaluate --model REF --dataset REF --split all)
    split: Literal["test", "all"] = "test"
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
    onnx: bool = True  # also export model.onnx into the package, checked with onnxruntime
    # What serving.load and avp serve-http run. auto: the variant the evaluation chose (metadata.json
    # runtimes.default), else the fastest runtime the package verified that passes its example here.
    runtime: Literal["auto", "torchscript", "pt2", "int8", "onnx"] = "auto"
    threads: int = 0  # intra-op threads of each inference worker (0: the cores divided among the workers)
    workers: int = 1  # inference workers of avp serve-http, each running its own replica of the model
    queue_size: int = 16  # requests waiting for a worker; one more is answered 429 with Retry-After
    deadline_ms: int = 10_000  # a request not answered within this (queueing included) is answered 504
    max_batch: int = 1  # dynamic batching: up to this many queued requests in one forward (1: off)
    max_batch_wait_ms: float = 2.0  # how long a worker waits for a batch to fill
    poll_s: float = 5.0  # how often avp serve-http --production reads the production alias
    header_timeout_s: float = 10.0  # a connection that has not sent its request headers by then is closed
    body_timeout_s: float = 30.0  # a request body not received by then is answered 408
    max_connections: int = 128  # connections beyond this are closed as soon as they are accepted
    drain_s: float = 30.0  # after SIGTERM, how long in-flight requests get to finish
    docs: bool = False  # serve the OpenAPI schema and its pages (/openapi.json, /docs)
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
    # The registry API on its own (`avp registry serve`; inside Airflow the plugin uses Airflow's login)
    api_host: str = "127.0.0.1"  # address avp registry serve binds
    api_port: int = 8766  # port avp registry serve listens on
    token_env: str = "AVP_REGISTRY_TOKEN"  # environment variable with the API's bearer token (never in a file)
    airflow_url: str = ""  # Airflow API server that POST /datasets and /models trigger avp_daily on ("": none)
    airflow_token_env: str = "AVP_AIRFLOW_TOKEN"  # environment variable with a JWT for that Airflow API server


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
            if isinstance(value, bool) or math.isnan(float(value)):  # NaN passes every comparison: refused
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


FLEET_DATASET = "fleet-lidar"  # the simulated fleet's dataset (ingest.dataset_name for source mcap)

@dataclass(frozen=True)
class Bound:
    """The range of a numeric field: ``minimum <= value <= maximum`` (``None``: open on that side), or
    strictly above/below with ``exclusive_minimum``/``exclusive_maximum``. NaN is never in range."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None."""
        if value != value:
            return "is not a number (NaN)"
        lo, hi = self.minimum, self.maximum
        if lo is not None and (value <= lo if self.exclusive_minimum else value < lo):
            return f"must be {'above' if self.exclusive_minimum else 'at least'} {lo:g}"
        if hi is not None and (value >= hi if self.exclusive_maximum else value > hi):
            return f"must be {'below' if self.exclusive_maximum else 'at most'} {hi:g}"
        return None

    def json_schema(self) -> dict[str, float]:
        """The same range as JSON-schema keywords (Airflow ``Param`` validation of DAG params)."""
        out: dict[str, float] = {}
        if self.minimum is not None:
            out["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            out["exclusiveMaximum" if self.exclusive_maximum else "maximum"] = self.maximum
        return out


def _at_least(minimum: float, maximum: float | None = None) -> Bound:
    return Bound(minimum, maximum)


def _positive(maximum: float | None = None) -> Bound:
    return Bound(0, maximum, exclusive_minimum=True)


_SHARE = Bound(0, 1)  # a fraction, both ends allowed
_SEED = Bound(0, 2**32 - 1)  # numpy and torch seeds
_MAX_PROCESSES = 1024  # ranks, nodes, readers: more is a typo or a hostile request, not a cluster we run

# The range of every numeric config field, by dotted path (a test checks that none is missing). Checked on
# the resolved config - after environment variables, --set, flags and DAG params - and offered to Airflow
# as each DAG param's minimum/maximum.
BOUNDS: dict[str, Bound] = {
    "seed": _SEED,
    "simulate.logs": _at_least(1, 100_000), "simulate.frames": _at_least(1, 100_000),
    "simulate.beams": _at_least(1, 1024), "simulate.azimuth_steps": _at_least(1, 100_000),
    "simulate.max_range_m": _positive(10_000), "simulate.range_noise_m": _at_least(0, 100),
    "simulate.dropout": Bound(0, 1, exclusive_maximum=True),  # 1 would lose every return: a log of no points
    "simulate.days": _at_least(1, 36_500), "simulate.seed": _SEED,
    "ingest.train_share": _SHARE, "ingest.test_share": _SHARE, "ingest.val_share": _SHARE,
    "ingest.geo_cell_m": _positive(20_000_000), "ingest.reader_ranks": _at_least(1, _MAX_PROCESSES),
    "ingest.rows_per_group": _at_least(1, 1_000_000), "ingest.max_points": _at_least(1, 100_000_000),
    "validate.split_tolerance": _SHARE, "validate.min_frames_per_log": _at_least(0),
    "validate.max_frames_per_log": _at_least(1), "validate.max_class_share": _SHARE,
    "validate.min_class_share": _SHARE, "validate.max_linf_drift": _at_least(0), "validate.max_kl_drift": _at_least(0),
    "validate.min_class_points": _at_least(0), "validate.drift_min_city_logs": _at_least(1),
    "validate.kl_tail_weight_holdout": _positive(1),
    "train.np": _at_least(1, _MAX_PROCESSES), "train.epochs": _at_least(1, 100_000),
    "train.batch_size": _at_least(1, 65_536), "train.lr": _positive(), "train.weight_decay": _at_least(0),
    "train.checkpoint_every": _at_least(1), "train.max_points": _at_least(1, 100_000_000), "train.seed": _SEED,
    "train.shuffle_buffer": _at_least(1, 1_000_000), "train.keep_checkpoints": _at_least(1),
    "train.prefetch_batches": _at_least(1, 1024), "train.nnodes": _at_least(1, _MAX_PROCESSES),
    "train.node_rank": _at_least(0, _MAX_PROCESSES - 1), "train.rank_timeout_s": _at_least(1, 86_400),
    "evaluate.min_miou": _SHARE, "evaluate.min_class_recall": _SHARE, "evaluate.latency_p99_budget_ms": _positive(),
    "evaluate.max_regression": _SHARE, "evaluate.max_missed_brake_rate": _SHARE,
    "evaluate.bootstrap_resamples": _at_least(0, 1_000_000), "evaluate.bootstrap_seed": _SEED,
    "evaluate.confidence_level": Bound(0, 1, exclusive_minimum=True, exclusive_maximum=True),
    "evaluate.min_slice_logs": _at_least(1), "evaluate.min_slice_count": _at_least(0),
    "evaluate.calibration_bins": _at_least(1, 10_000),
    "evaluate.latency_runs": _at_least(1, 100_000), "evaluate.latency_warmup": _at_least(0, 100_000),
    "evaluate.latency_frames": _at_least(1, 100_000), "evaluate.cluster_radius_m": _positive(),
    "evaluate.min_object_points": _at_least(1), "evaluate.match_min_share": _SHARE,
    "evaluate.box_margin_m": _at_least(0), "evaluate.pr_thresholds": _at_least(1, 100_000),
    "evaluate.lane_width_m": _positive(), "evaluate.planner_horizon_m": _positive(),
    "evaluate.ttc_threshold_s": _positive(), "evaluate.min_speed_mps": _at_least(0),
    "evaluate.worst_scenes": _at_least(0), "evaluate.hard_scene_weight": _positive(),
    "evaluate.similar_train_logs": _at_least(0),
    "evaluate.variant_max_miou_drop": _at_least(0, 100), "evaluate.variant_max_class_iou_drop": _at_least(0, 100),
    "evaluate.int8_calibration_frames": _at_least(1, 100_000),
    "serve.port": _at_least(1, 65_535), "serve.max_points": _at_least(2, 100_000_000),
    "serve.example_points": _at_least(1, 100_000_000), "serve.example_seed": _SEED,
    "serve.latency_runs": _at_least(1, 100_000), "serve.threads": _at_least(0, _MAX_PROCESSES),
    "serve.workers": _at_least(1, _MAX_PROCESSES), "serve.queue_size": _at_least(1, 1_000_000),
    "serve.deadline_ms": _at_least(1, 3_600_000), "serve.max_batch": _at_least(1, 1024),
    "serve.max_batch_wait_ms": _at_least(0, 60_000), "serve.poll_s": _positive(86_400),
    "serve.header_timeout_s": _positive(3600), "serve.body_timeout_s": _positive(3600),
    "serve.max_connections": _at_least(1, 1_000_000), "serve.drain_s": _at_least(0, 3600),
    "serve.card_recall_floor": _SHARE, "serve.card_min_band_objects": _at_least(0),
    "serve.approval_timeout_s": _at_least(1, 365 * 86_400),
    "registry.api_port": _at_least(1, 65_535), "registry.lease_s": _positive(), "registry.lease_renew_s": _positive(),
}

# Text fields with a format, by dotted path: (pattern the whole value must match, what is expected).
_DATE = r"\d{4}-\d{2}-\d{2}"
_SPARK_MASTER = (r"local(\[(\*|[1-9]\d*)(,[0-9]+)?\])?|local-cluster\[\d+,\d+,\d+\]"
                 r"|spark://[\w.-]+(:\d+)?(,[\w.-]+(:\d+)?)*|yarn"
                 r"|k8s://\S+|mesos://\S+")
FORMATS: dict[str, tuple[str, str]] = {
    "simulate.start_date": (_DATE, "a date YYYY-MM-DD"),
    "ingest.date_from": (f"({_DATE})?", "a date YYYY-MM-DD or empty"),
    "ingest.date_to": (f"({_DATE})?", "a date YYYY-MM-DD or empty"),
    "ingest.spark_master": (f"({_SPARK_MASTER})?", "a Spark master URL (local[N], spark://HOST:PORT, yarn, "
                                                  "k8s://..., mesos://...) or empty for spark-submit's"),
    "train.spark_master": (_SPARK_MASTER, "a Spark master URL (local[N], spark://HOST:PORT, yarn, k8s://..., "
                                          "mesos://...)"),
}


def numeric_fields(section: Any = None, prefix: str = "") -> list[str]:
    """Dotted paths of every int and float field (bools are not numbers here)."""
    section = PipelineConfig() if section is None else section
    out = []
    for name, (_f, annotation) in _section_fields(section).items():
        if dataclasses.is_dataclass(annotation):
            out += numeric_fields(getattr(section, name), f"{prefix}{name}.")
        elif annotation in (int, float):
            out.append(prefix + name)
    return out


def _format_problem(path: str, value: str) -> str | None:
    pattern, expected = FORMATS[path]
    if not re.fullmatch(pattern, value):
        return f"config field {path}: {value!r} is not {expected}"
    if "date" in expected and value:
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            return f"config field {path}: {value!r} is not a real date"
    return None


def check_rules(cfg: PipelineConfig) -> None:
    """The rules that span fields, run once on the fully resolved config (after the environment, ``--set``,
    flags and DAG params are all applied: ``--set ingest.train_share=0.8 --set ingest.test_share=0.1`` is
    fine in either order), and every field's range (``BOUNDS``) and format (``FORMATS``). Every broken rule
    is reported in one ``ConfigError``."""
    problems = []
    for path, bound in BOUNDS.items():
        value = get_value(cfg, path)
        why = bound.problem(value)
        if why:
            problems.append(f"config field {path}: {value} {why}")
    for path in FORMATS:
        why = _format_problem(path, get_value(cfg, path))
        if why:
            problems.append(why)
    ing = cfg.ingest
    shares = {"train_share": ing.train_share, "test_share": ing.test_share, "val_share": ing.val_share}
    if not abs(sum(shares.values()) - 1.0) <= 1e-6:
        given = " + ".join(f"{name} {value:g}" for name, value in shares.items())
        problems.append(f"config fields ingest.train_share/test_share/val_share must be >= 0 and sum to 1, "
                        f"got {given} = {sum(shares.values()):g}")
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
    if not cfg.ingest.dataset_name:  # a real import is its own dataset, never a version of the fleet's
        cfg.ingest.dataset_name = FLEET_DATASET if cfg.ingest.source == "mcap" else cfg.ingest.source
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
