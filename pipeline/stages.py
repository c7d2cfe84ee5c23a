"""One entry function per stage, shared by the CLI and the Airflow DAG.

``invoke(stage, cfg, **inputs)`` records the run (resolved config + provenance under ``<home>/runs``),
opens the registry, imports the stage's entry function lazily (so ``avp --help`` and DAG parsing stay
fast) and calls ``entry(cfg, registry, **inputs)``. Entry functions return a result dict whose
``ref`` is an artifact reference: small enough for XCom, never data.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import re
import uuid
from typing import Any, Callable

from pipeline import config as config_mod
from pipeline import provenance
from pipeline.errors import UserError
from pipeline.registry import Artifact, NotFound, Registry

# stage name -> "module:function"; a new stage adds one line here and one CLI subcommand.
ENTRY_POINTS = {
    "simulate": "spark_jobs.simulate:run",
    "ingest": "spark_jobs.ingest:run",
    "validate": "spark_jobs.validate:run",
    "train": "training.entry:run",
    "evaluate": "evaluation.entry:run",
    "serve": "serving.entry:run",
}


def entry_function(stage: str) -> Callable[..., dict[str, Any]]:
    module, _, func = ENTRY_POINTS[stage].partition(":")
    return getattr(importlib.import_module(module), func)


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
    registry = Registry.open(cfg)
    run_id = record_run(cfg, registry, stage, inputs)
    result = entry_function(stage)(cfg, registry, say=say, run_id=run_id, **inputs)
    result.setdefault("run_id", run_id)
    return result
