"""The ``serve`` stage: a blessed model -> a registered ``package`` artifact.

``run`` is what ``avp serve`` and the Airflow task call:

1. Resolve the model (``model:name@vN``, ``name@vN``, ``N``/``vN`` of ``train.model``, or its latest
   succeeded version) and refuse one that evaluation has not blessed (``StageFailed`` with the reasons;
   the DAG skips serving). The latest is never silently swapped for an older blessed one.
2. Find the evaluation's ``metrics`` artifact of that model (the newest succeeded child), if any.
3. ``registry.build("package", <model name>, ...)``, content-keyed on the model and metrics versions,
   the code of ``serving``, ``training`` and ``pipeline`` and the packaging config. The builder writes
   ``<name>-v<N>/`` (see ``serving.package``) with its model card (``serving.model_card``), verifies it
   exactly as a consumer would, and writes ``<name>-v<N>.tar.gz`` beside it. The package record's parents
   are the model and the metrics.

Promotion is the registry's: ``avp registry promote package:<name>@vN`` makes it production as
``<serve.namespace>/<name>/<major>.<minor>`` (refused for a package of an unblessed model), and
``avp registry rollback <namespace>/<name>`` restores the previous production package.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from typing import Any, Callable

from pipeline import provenance
from pipeline.config import PipelineConfig
from pipeline.contracts import EvaluationMetrics, PackageMetadata, TrainMetrics
from pipeline.errors import StageFailed, UserError
from pipeline.registry import Artifact, Registry
from pipeline.stages import resolve_input

# ServeConfig fields that change the package's bytes; host, port, namespace, runtime and latency_runs
# only change how it is served or measured, so they stay out of the content key.
PACKAGE_FIELDS = ("max_points", "example_points", "example_seed", "aot_inductor", "onnx", "card_recall_floor",
                  "card_min_band_objects")
# A metrics.json value is copied into the package summary only when it is this small.
SUMMARY_MAX_ITEMS = 32


# ----------------------------------------------------------------------------------------- inputs
def resolve_model(cfg: PipelineConfig, registry: Registry, model: str | None) -> Artifact:
    """The model to package: a reference, a bare version of ``train.model``, or its latest."""
    return resolve_input(registry, "model", cfg.train.model, model,
                         hint="run `avp train` and `avp evaluate` first or pass --model REF", purpose="packaged")


def require_blessed(art: Artifact) -> None:
    """Only a model the evaluate stage blessed is packaged; ``StageFailed`` says why not."""
    if art.blessed:
        return
    if art.blessed is None:
        raise StageFailed(f"{art.ref} has not been evaluated, so it is not blessed; run "
                          f"`avp evaluate --model {art.ref}` first")
    reasons = art.meta.get("blessing_reasons") or []
    raise StageFailed(f"{art.ref} is not blessed by evaluation"
                      + (": " + "; ".join(map(str, reasons)) if reasons else "") + "; it is not packaged")


def find_metrics(registry: Registry, model: Artifact) -> Artifact | None:
    """The evaluation report behind the model's current verdict: the ``metrics_ref`` the evaluate stage
    recorded on the model, else the newest succeeded ``metrics`` artifact computed for it."""
    reports = [c for c in registry.children(model.id) if c.kind == "metrics" and c.state == "succeeded"]
    recorded = [c for c in reports if c.ref == model.meta.get("metrics_ref")]
    if recorded:
        return recorded[0]
    return max(reports, key=lambda a: (a.created_at, a.id)) if reports else None


def find_dataset(registry: Registry, model: Artifact) -> Artifact | None:
    """The dataset the model was trained on (its parent)."""
    datasets = [p for p in registry.parents(model.id) if p.kind == "dataset"]
    return datasets[0] if datasets else None


def metrics_summary(metrics: EvaluationMetrics) -> dict[str, Any]:
    """The small values of an evaluation's ``metrics.json``: scalars and short flat dicts/lists of
    scalars (mIoU, per-class IoU, latency, verdict...), leaving curves and matrices in the report."""
    return {**_small(metrics.to_dict()), **_evaluation_highlights(metrics)}


def _evaluation_highlights(metrics: EvaluationMetrics) -> dict[str, Any]:
    """The headline numbers of the evaluate stage's report (``evaluation.entry``): test mIoU, per-class
    IoU and recall, the planner's brake counts, per-runtime latency, and the baseline it was held to."""
    def get(tree: Any, *path: str) -> Any:
        for key in path:
            tree = tree.get(key) if isinstance(tree, dict) else None
        return tree

    candidate = metrics.candidate
    classes = get(candidate, "segmentation", "classes") or {}
    variants = get(candidate, "hardware", "variants") or {}
    planner = get(candidate, "planner") or {}
    out = {
        "miou": get(candidate, "segmentation", "miou"),
        "accuracy": get(candidate, "segmentation", "accuracy"),
        "test_frames": get(candidate, "segmentation", "frames"),
        "class_iou": {name: get(m, "iou") for name, m in classes.items() if isinstance(m, dict)},
        "class_recall": {name: get(m, "recall") for name, m in classes.items() if isinstance(m, dict)},
        "planner": {k: v for k, v in planner.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "latency_ms": {name: {"p50": get(v, "p50_ms"), "p99": get(v, "p99_ms")}
                       for name, v in variants.items() if isinstance(v, dict)},
        "macs": get(candidate, "hardware", "macs"),
        "baseline_miou": get(metrics.baseline, "segmentation", "miou"),
        "verdict_reasons": metrics.verdict.get("reasons"),
    }
    return {k: v for k, v in out.items() if v not in (None, {}, [])}


def _small(values: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """Recursively keep scalars and small containers of scalars (two levels deep at most)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            if not isinstance(value, str) or len(value) <= 200:
                out[key] = value
        elif isinstance(value, list) and len(value) <= SUMMARY_MAX_ITEMS and all(
                v is None or isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = value
        elif isinstance(value, dict) and depth < 1 and len(value) <= SUMMARY_MAX_ITEMS:
            inner = _small(value, depth + 1)
            if inner:
                out[key] = inner
    return out


def key_config(cfg: PipelineConfig) -> dict[str, Any]:
    """What determines the package's bytes (besides its parents and the code)."""
    return {field: getattr(cfg.serve, field) for field in PACKAGE_FIELDS}


def code_modules(model_name: str) -> tuple[str, ...]:
    """The code that makes the package: this module and its imports (``serving.package`` among them), and
    the model's modules (which the model registry imports by discovery, out of sight of the import analysis)."""
    from training.models.registry import model_modules

    return ("serving.entry", *model_modules(model_name))


def check_request(cfg: PipelineConfig) -> None:
    """Refuse packaging settings that cannot work before any compiling starts."""
    s = cfg.serve
    if s.max_points < 2:
        raise UserError(f"config field serve.max_points: {s.max_points} must be at least 2")
    if not 1 <= s.example_points <= s.max_points:
        raise UserError(f"config field serve.example_points: {s.example_points} must be between 1 and "
                        f"serve.max_points ({s.max_points})")
    if s.latency_runs < 1:
        raise UserError(f"config field serve.latency_runs: {s.latency_runs} must be at least 1")


def package_facts(registry: Registry, record: Artifact, model: Artifact, metrics: Artifact | None,
                  dataset: Artifact | None, run_id: str) -> dict[str, Any]:
    """What the registry knows, for ``metadata.json``: references, provenance, the evaluation verdict."""
    snap = provenance.snapshot()
    training = {}
    if os.path.exists(os.path.join(model.location, TrainMetrics.FILE)):
        trained = TrainMetrics.load_from(model.location)
        training = {k: getattr(trained, k) for k in ("first_epoch_loss", "backend", "world", "samples_per_s",
                                                      "parameters_sha256", "torchscript_max_abs_diff", "final")}
    return {
        "package": {"name": record.name, "version": record.version, "ref": record.ref,
                    "content_key": record.content_key, "run_id": run_id},
        "model": {"name": model.name, "version": model.version, "ref": model.ref, "content_key": model.content_key,
                  "git_sha": model.git_sha, "diff_hash": model.diff_hash, "created_by": model.created_by,
                  "created_at": model.created_at.isoformat(), "training_run_id": model.meta.get("run_id"),
                  "training": training},
        "dataset": None if dataset is None else {"name": dataset.name, "version": dataset.version,
                                                 "ref": dataset.ref, "content_key": dataset.content_key},
        "evaluation": {
            "verdict": "blessed" if model.blessed else "not blessed",
            "blessed": bool(model.blessed),
            "reasons": list(model.meta.get("blessing_reasons") or []),
            "metrics_ref": metrics.ref if metrics else None,
            "summary": metrics_summary(EvaluationMetrics.load_from(metrics.location)) if metrics else {},
        },
        "provenance": {"git_sha": snap["git_sha"], "diff_hash": snap["diff_hash"], "user": snap["user"],
                       "host": snap["host"], "run_id": run_id,
                       **{k: v for k, v in snap.items() if k.startswith("airflow_")}},
    }


# ----------------------------------------------------------------------------------------- the stage
def run(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None] = print, run_id: str = "",
        model: str | None = None) -> dict[str, Any]:
    """The serve stage; returns the package reference, its folder and tarball, and summary tables."""
    from serving.model_card import card_facts, write_model_card
    from serving.package import build_package, make_tarball, verify_package, write_manifest

    model_art = resolve_model(cfg, registry, model)
    require_blessed(model_art)
    check_request(cfg)
    metrics_art = find_metrics(registry, model_art)
    dataset_art = find_dataset(registry, model_art)
    run_id = run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-serve-{uuid.uuid4().hex[:6]}"
    say(f"packaging {model_art.ref}" + (f" with its evaluation {metrics_art.ref}" if metrics_art else
                                        " (no metrics artifact: the package carries no evaluation summary)"))

    def build(staging: str, record: Artifact) -> dict[str, Any]:
        top = f"{record.name}-v{record.version}"
        folder = os.path.join(staging, top)
        os.makedirs(folder)
        facts = package_facts(registry, record, model_art, metrics_art, dataset_art, run_id)
        s = cfg.serve
        metadata = build_package(folder, model_dir=model_art.location, facts=facts, max_points=s.max_points,
                                 example_points=s.example_points, example_seed=s.example_seed,
                                 latency_runs=s.latency_runs, aot_inductor=s.aot_inductor, onnx=s.onnx, say=say,
                                 evaluation_dir=metrics_art.location if metrics_art else None)
        write_model_card(folder, card_facts(registry, record, model_art, metrics_art, dataset_art, metadata,
                                            s.card_recall_floor, s.card_min_band_objects))
        manifest_sha256 = write_manifest(folder)
        # What is published passes the very check every consumer runs.
        verify_package(folder, manifest_sha256)
        tarball_sha256 = make_tarball(folder, os.path.join(staging, top + ".tar.gz"))
        pt2 = metadata.runtimes["pt2"]
        perf = metadata.performance
        return {"model": model_art.ref, "metrics": metrics_art.ref if metrics_art else None,
                "dataset": dataset_art.ref if dataset_art else None, "run_id": run_id,
                "folder": top, "tarball": top + ".tar.gz", "manifest_sha256": manifest_sha256,
                "tarball_sha256": tarball_sha256, "pt2_format": pt2["format"], "aoti_error": pt2["aoti_error"],
                "torchscript_p50_ms": perf["torchscript_latency_ms"]["p50"],
                "pt2_p50_ms": perf["pt2_latency_ms"]["p50"], "macs": perf["macs"]}

    parents = [model_art] + ([metrics_art] if metrics_art else [])
    art = registry.build("package", model_art.name, entry_point="serving.entry:run", config=key_config(cfg),
                         builder=build, parents=parents, force=cfg.force, say=say,
                         code_modules=code_modules(model_art.name))
    return summarize(art)


def package_paths(art: Artifact) -> tuple[str, str]:
    """(package folder, tarball) of a package artifact."""
    return os.path.join(art.location, art.meta["folder"]), os.path.join(art.location, art.meta["tarball"])


def summarize(art: Artifact) -> dict[str, Any]:
    """The stage result: reference, paths, and what was measured and checked."""
    folder, tarball = package_paths(art)
    metadata = PackageMetadata.load_from(folder)
    perf = metadata.performance
    runtimes = [[name, perf[f"{key}_latency_ms"]["p50"], perf[f"{key}_latency_ms"]["p99"], detail]
                for name, key, detail in (
                    ("eager (reference)", "eager", ""),
                    ("TorchScript model.ts", "torchscript",
                     f"max |diff| {metadata.agreement['torchscript_vs_eager']['max_abs_diff']:.2g}"),
                    (f"model.pt2 ({metadata.runtimes['pt2']['format']})", "pt2",
                     f"max |diff| {metadata.agreement['pt2_vs_eager']['max_abs_diff']:.2g}"))]
    title = f"{art.ref}" + (" (cache hit)" if art.cached else "") + \
        f": {perf['example_points']}-point example, {perf['threads']} threads, {perf['macs'] / 1e9:.2f} GMACs"
    tables = [(title, ["runtime", "p50 ms", "p99 ms", "agreement with eager"], runtimes)]
    result = {"ref": art.ref, "cached": art.cached, "model": metadata.model["ref"],
              "metrics": metadata.evaluation["metrics_ref"], "location": folder, "tarball": tarball,
              "manifest_sha256": art.meta["manifest_sha256"], "pt2_format": metadata.runtimes["pt2"]["format"],
              "tables": tables}
    if metadata.runtimes["pt2"].get("aoti_error"):
        result["aoti_error"] = metadata.runtimes["pt2"]["aoti_error"]
    return result
