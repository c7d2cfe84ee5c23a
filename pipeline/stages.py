"""One declaration per stage: its ``StageSpec``, from which the CLI, the Airflow params and dispatch follow.

A spec names the stage's entry function (``"module:function"``, imported only when the stage runs, so
``avp --help`` and DAG parsing stay fast), its help, the config section it reads, the fields of that
section offered as ``avp <stage> --flag`` (and, when a flag names a ``param``, as an Airflow DAG param),
its inputs (artifact references and switches passed to the entry function) and the registry kind it
produces. ``pipeline.cli`` builds the subcommands from ``STAGES``, ``pipeline.orchestration`` the DAG params;
flag help and param descriptions are the config fields' own comments (``config.field_help``).

``invoke(stage, cfg, **inputs)`` checks the inputs against the spec, records the run (resolved config +
provenance under ``<home>/runs``), opens the registry and calls ``entry(cfg, registry, say, run_id,
**inputs)``. Entry functions return a result dict whose ``ref`` is an artifact reference: small enough for
XCom, never data. A spec that produces nothing is a command (``avp serve-http``): ``run_command`` calls
``entry(cfg, say, **inputs)`` outside the registry.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pipeline import config as config_mod
from pipeline import provenance
from pipeline.errors import UserError
from pipeline.registry import KINDS, Artifact, NotFound, Registry


@dataclass(frozen=True)
class Flag:
    """A config field offered as a command-line flag; its help is the field's comment in pipeline/config.py."""

    field: str  # a field of the stage's config section (of the top level for COMMON_FLAGS)
    name: str = ""  # the flag; default --field-name
    param: str = ""  # also an Airflow DAG param of this name ("": command line only)
    second_field: str = ""  # set by the same flag's second value (--source KIND PATH)

    def flag_name(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")


@dataclass(frozen=True)
class Input:
    """A keyword argument of the entry function: an artifact reference, or a switch (``--resume``)."""

    name: str
    help: str
    switch: bool = False
    required: bool = False

    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class StageSpec:
    """Everything the CLI, the DAG and ``invoke`` know about a stage; see the module docstring."""

    name: str
    entry: str  # "module:function"
    help: str
    section: str  # the config section the stage reads ("" for the top level)
    produces: str  # the registry kind of its artifact; "" for a command outside the registry
    flags: tuple[Flag, ...] = ()
    inputs: tuple[Input, ...] = ()

    def entry_function(self) -> Callable[..., Any]:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)

    def flag_fields(self) -> list[tuple[Flag, tuple[str, ...]]]:
        """Each flag with the dotted config fields it sets (a stage's flags, then the common ones)."""
        common = COMMON_FLAGS if self.produces else ()
        return [(flag, tuple(_dotted(section, f) for f in (flag.field, flag.second_field) if f))
                for section, flags in ((self.section, self.flags), ("", common)) for flag in flags]

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        allowed = [i.name for i in self.inputs]
        for name in inputs:
            if name not in allowed:
                raise UserError(f"stage {self.name!r} has no input {name!r}; "
                                f"its inputs are: {', '.join(allowed) or 'none'}")
        for item in self.inputs:
            if item.required and inputs.get(item.name) is None:
                raise UserError(f"stage {self.name!r} needs its input {item.name!r}")


def _dotted(section: str, field: str) -> str:
    return f"{section}.{field}" if section else field


# Flags of every stage (fields of the top level of the config).
COMMON_FLAGS = (Flag("force", param="force"),)

STAGES: dict[str, StageSpec] = {}


def register(spec: StageSpec) -> StageSpec:
    """Add ``spec`` to ``STAGES`` after checking it: a known artifact kind, flags naming real config fields,
    no flag or DAG param declared twice."""
    if spec.name in STAGES:
        raise ValueError(f"stage {spec.name!r} is already registered")
    if spec.produces and spec.produces not in KINDS:
        raise ValueError(f"stage {spec.name!r} produces {spec.produces!r}, not a registry kind ({', '.join(KINDS)})")
    names = [flag.flag_name() for flag, _ in spec.flag_fields()] + [i.flag_name() for i in spec.inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"stage {spec.name!r} declares a flag twice: {names}")
    for _flag, fields in spec.flag_fields():
        for dotted in fields:
            config_mod.describe(dotted)  # ConfigError for a field that does not exist
    taken = dag_param_fields()
    for flag, (dotted, *_) in spec.flag_fields():
        if flag.param and taken.get(flag.param, dotted) != dotted:
            raise ValueError(f"DAG param {flag.param!r} of stage {spec.name!r} already sets {taken[flag.param]}")
    STAGES[spec.name] = spec
    return spec


def dag_param_fields() -> dict[str, str]:
    """DAG param -> the config field it sets, over every registered stage."""
    return {flag.param: fields[0] for spec in STAGES.values() for flag, fields in spec.flag_fields() if flag.param}


def spec_of(stage: str) -> StageSpec:
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return STAGES[stage]


ARTIFACT_HELP = "{} reference or version (default: the latest)"
for _spec in (
    StageSpec("simulate", "spark_jobs.simulate:run", section="simulate", produces="log",
              help="write deterministic simulated fleet drive logs (MCAP) into the pipeline home",
              flags=(Flag("logs"), Flag("frames"), Flag("days"), Flag("start_date"), Flag("seed"))),
    StageSpec("ingest", "spark_jobs.ingest:run", section="ingest", produces="dataset",
              help="extract drive logs into Petastorm train/test/val datasets with Spark",
              flags=(Flag("split", param="split"), Flag("date_from"), Flag("date_to"),
                     Flag("spark_master"), Flag("dataset_name", name="--name"),
                     Flag("source", param="source", second_field="source_path"))),
    StageSpec("validate", "spark_jobs.validate:run", section="validate", produces="validation",
              help="check a dataset with Great Expectations (distributions, drift) and gate training",
              flags=(Flag("warn_only"),), inputs=(Input("dataset", ARTIFACT_HELP.format("dataset")),)),
    StageSpec("train", "training.entry:run", section="train", produces="model",
              help="train a LiDAR segmentation model on a validated dataset (Horovod or DDP, N processes)",
              flags=(Flag("backend", param="backend"), Flag("np", param="np"), Flag("epochs", param="epochs"),
                     Flag("model"), Flag("batch_size"), Flag("launcher"), Flag("spark_master"), Flag("hosts"),
                     Flag("nnodes"), Flag("node_rank"), Flag("rdzv")),
              inputs=(Input("dataset", ARTIFACT_HELP.format("dataset")),
                      Input("resume", "continue from the newest checkpoint of this training request", switch=True))),
    StageSpec("evaluate", "evaluation.entry:run", section="evaluate", produces="metrics",
              help="model, system and hardware metrics on the test split, a report, and the blessing verdict",
              flags=(Flag("latency_runs"), Flag("min_miou"), Flag("max_regression"), Flag("device"), Flag("split")),
              inputs=(Input("model", ARTIFACT_HELP.format("model")),
                      Input("dataset", "dataset reference to evaluate on (default: the model's own dataset)"))),
    StageSpec("serve", "serving.entry:run", section="serve", produces="package",
              help="package a blessed model (TorchScript + AOTInductor .pt2 + metadata + manifest) for the C++ "
                   "consumer and the HTTP server",
              flags=(Flag("example_points"), Flag("max_points")),
              inputs=(Input("model", ARTIFACT_HELP.format("model")),)),
    StageSpec("serve-http", "serving.http:serve", section="serve", produces="",
              help="serve a package over HTTP (POST /v1/segment, /healthz, /metadata, /metrics)",
              flags=(Flag("host"), Flag("port")),
              inputs=(Input("package", "package folder or .tar.gz, package:NAME@vN, or NAMESPACE/NAME "
                                       "(its production package at start)"),
                      Input("production", "NAMESPACE/NAME: serve its production package and follow "
                                          "promotions and rollbacks"))),
):
    register(_spec)


def resolve_input(registry: Registry, kind: str, default_name: str, given: str | None, *,
                  hint: str, purpose: str) -> Artifact:
    """The succeeded ``kind`` artifact a stage was asked to use.

    ``given`` may be ``kind:name@vN``, ``name@vN``, ``N``/``vN`` (a version of ``default_name``) or None
    for the latest succeeded version of ``default_name``. Anything else is a ``UserError`` (exit 2) that
    says what to run (``hint``) or which state was found.
    """
    text = "" if given is None else str(given).strip()
    if not text:
        ref = f"{kind}:{default_name}"
    elif re.fullmatch(r"v?\d+", text):
        ref = f"{kind}:{default_name}@v{text.lstrip('v')}"
    elif ":" not in text:
        ref = f"{kind}:{text}"
    else:
        ref = text
    try:
        art = registry.get(ref)
    except NotFound as exc:
        raise UserError(f"{exc}; {hint}") from None
    if art.kind != kind:
        raise UserError(f"{art.ref} is a {art.kind}, not a {kind}")
    if art.state != "succeeded":
        raise UserError(f"{art.ref} is {art.state}; only a succeeded {kind} can be {purpose}")
    return art


def record_run(cfg: config_mod.PipelineConfig, registry: Registry, stage: str,
               inputs: dict[str, Any]) -> str:
    """Write ``<home>/runs/<id>/run.json``: stage, inputs, fully resolved config and provenance."""
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{stage}-{uuid.uuid4().hex[:6]}"
    run_dir = registry.home.join("runs", run_id)
    registry.home.fs.makedirs(run_dir, exist_ok=True)
    record = {"run_id": run_id, "stage": stage, "inputs": inputs,
              "config": config_mod.resolved(cfg), "provenance": provenance.snapshot()}
    with registry.home.fs.open(os.path.join(run_dir, "run.json") if "://" not in run_dir
                               else run_dir + "/run.json", "w") as fh:
        json.dump(record, fh, indent=2, default=str)
    return run_id


def invoke(stage: str, cfg: config_mod.PipelineConfig, say: Callable[[str], None] = print,
           **inputs: Any) -> dict[str, Any]:
    """Run one stage exactly as both the CLI and the DAG do."""
    spec = spec_of(stage)
    if not spec.produces:
        raise UserError(f"{stage!r} is a command, not a stage: run it with run_command")
    spec.check_inputs(inputs)
    registry = Registry.open(cfg)
    run_id = record_run(cfg, registry, stage, inputs)
    result = spec.entry_function()(cfg, registry, say=say, run_id=run_id, **inputs)
    result.setdefault("run_id", run_id)
    return result


def run_command(name: str, cfg: config_mod.PipelineConfig, say: Callable[[str], None] = print,
                **inputs: Any) -> int:
    """Run a command spec (one that produces no artifact, e.g. ``serve-http``); returns its exit code."""
    spec = spec_of(name)
    if spec.produces:
        raise UserError(f"{name!r} is a stage, not a command: run it with invoke")
    spec.check_inputs(inputs)
    return spec.entry_function()(cfg, say=say, **inputs)
