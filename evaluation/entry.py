"""The ``evaluate`` stage: a trained model -> model, system and hardware metrics on the test split of its
dataset -> a registered ``metrics`` artifact with a report, and the blessing verdict on the model.

``run`` is what ``avp evaluate`` and the Airflow task call. Top to bottom:

1. **Resolve** the model (a reference, a bare version of ``train.model``, or its latest succeeded
   version), the dataset it was trained on (its parent) and that dataset's test split.
2. **Production**: ``registry.production(serve.namespace, <model name>)`` - a model, or a package whose
   parent is a model. None for the first model.
3. **Build** ``metrics:<model name>`` (parents: the model and the dataset; content-keyed on both, the
   evaluation code and ``cfg.evaluate``, and the production model, so an unchanged request is a cache
   hit). The builder reads every test frame once and
   - scores the candidate: point metrics, PR curves, objects, the planner, per scene (``scoring``);
   - measures eager / TorchScript / exported latency, memory, MACs and parameters (``hardware``);
   - scores the production model on the same frames, or reuses its stored metrics when it was
     evaluated on the same dataset with the same metric definitions;
   - decides the verdict (``blessing``) and picks the worst scenes;
   - writes ``metrics.json`` and ``report.html`` (``report``).
4. **Verdict** on the model: ``registry.set_blessing(model, blessed, reasons)``; the registry refuses to
   promote a model that is not blessed.
5. **Feedback**: the worst scenes and the train logs most like them go into
   ``<home>/feedback/sample_weights.json`` for the next ingest (``feedback``).
6. **Summary** tables for the terminal. An unblessed model is a result, not an error: the stage returns
   ``blessed: False`` with the reasons, and the DAG's ``serve`` task skips it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
from typing import Any, Callable

from evaluation import blessing, feedback, hardware, report, scoring, statistics, variants
from evaluation.frames import read_split
from pipeline.config import PipelineConfig, canonical_json, resolved
from pipeline.contracts import EvaluationMetrics, Manifest, verified_manifest
from pipeline.errors import UserError
from pipeline.registry import Artifact, Registry
from pipeline.stages import resolve_input
from serving import artifacts
from training.models.registry import model_modules


# ----------------------------------------------------------------------------------------- 1. resolve
def resolve_model(cfg: PipelineConfig, registry: Registry, model: str | None) -> Artifact:
    """The model to evaluate: a reference, a bare version of ``train.model``, or its latest."""
    return resolve_input(registry, "model", cfg.train.model, model,
                         hint="run `avp train` first or pass --model REF", purpose="evaluated")


def dataset_of(registry: Registry, model: Artifact) -> Artifact:
    """The dataset a model was trained on (its dataset parent)."""
    datasets = [p for p in registry.parents(model.id) if p.kind == "dataset"]
    if not datasets:
        raise UserError(f"{model.ref} has no dataset parent in the registry: cannot tell which test split to use")
    if datasets[0].state != "succeeded":
        raise UserError(f"the dataset of {model.ref}, {datasets[0].ref}, is {datasets[0].state}")
    return datasets[0]


# ----------------------------------------------------------------------------------------- 2. production
def production_model(cfg: PipelineConfig, registry: Registry, name: str) -> Artifact | None:
    """The model behind ``serve.namespace/<name>`` in production (a package's parent model), or None."""
    promotion = registry.production(cfg.serve.namespace, name)
    if promotion is None:
        return None
    art = registry.get(promotion.artifact_id)
    if art.kind == "package":
        models = [p for p in registry.parents(art.id) if p.kind == "model"]
        if not models:
            raise UserError(f"production {promotion.label} is {art.ref}, a package without a model parent")
        art = models[0]
    if art.kind != "model":
        raise UserError(f"production {promotion.label} is {art.ref}, neither a model nor a package")
    return art


def settings_key(settings: dict[str, Any]) -> str:
    """Hash of the metric definitions: stored metrics are comparable only under the same key."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]


def stored_metrics(registry: Registry, model: Artifact, dataset: Artifact, key: str,
                   split: str = "test") -> tuple[Artifact, dict] | None:
    """The newest metrics artifact of ``model`` on ``split`` of ``dataset`` made with the metric settings ``key``."""
    for art in sorted(registry.children(model.id), key=lambda a: a.id, reverse=True):
        if (art.kind == "metrics" and art.state == "succeeded" and art.meta.get("dataset") == dataset.ref
                and art.meta.get("settings_key") == key and art.meta.get("split", "test") == split):
            return art, EvaluationMetrics.load_from(art.location).candidate
    return None


# ----------------------------------------------------------------------------------------- the stage
def run(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None] = print, run_id: str = "",
        model: str | None = None, dataset: str | None = None) -> dict[str, Any]:
    """The evaluate stage; returns the metrics reference, the verdict, the report path and tables."""
    # 1. resolve
    candidate = resolve_model(cfg, registry, model)
    own = dataset_of(registry, candidate)
    data = own if dataset is None else resolve_input(
        registry, "dataset", own.name, dataset, hint="run `avp ingest` first", purpose="evaluated on")
    manifest = verified_manifest(data, say)  # every file checked before any reader opens one
    split = cfg.evaluate.split
    if not sum(info.frames for name, info in manifest.splits.items() if split in ("all", name)):
        raise UserError(f"{data.ref} has no {split} frames to evaluate {candidate.ref} on")
    # Only the model's own test split judges it: another dataset (or split) is a measurement, reported
    # with its verdict but neither recorded on the model nor fed back to ingest.
    judged = data.id == own.id and split == "test"
    try:
        settings = scoring.Settings.from_config(cfg.evaluate)
        statistics.check_settings(cfg.evaluate)
        device = hardware.pick_device(cfg.evaluate.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for path, value in (("evaluate.latency_runs", cfg.evaluate.latency_runs),
                        ("evaluate.latency_frames", cfg.evaluate.latency_frames)):
        if value < 1:
            raise UserError(f"config field {path}: {value} must be at least 1")

    # 2. production
    production = production_model(cfg, registry, candidate.name)
    if production is None:
        say(f"no production model at {cfg.serve.namespace}/{candidate.name}: the first model is judged on "
            "absolute thresholds only")
    else:
        say(f"production model: {production.ref}")
    say(f"evaluating {candidate.ref} on the {split} split of {data.ref} on {device.type}"
        + ("" if judged else f" (not its own test split, {own.ref} test: the verdict is not recorded)"))

    # 3. build the metrics artifact
    key = settings_key(settings.as_dict())
    key_config = {"evaluate": resolved(cfg.evaluate), "device": device.type, "split": split,
                  "production": production.ref if production else None, "namespace": cfg.serve.namespace,
                  "max_points": cfg.serve.max_points}

    def build(staging: str, record: Artifact) -> dict[str, Any]:
        metrics = evaluate_into(staging, cfg, registry, candidate, data, manifest, production, settings, key,
                                device, split, record, say)
        return {"model": candidate.ref, "dataset": data.ref, "split": split, "settings_key": key, "run_id": run_id,
                "blessed": metrics.verdict["blessed"], "reasons": metrics.verdict["reasons"],
                "miou": metrics.candidate["segmentation"]["miou"], "baseline": metrics.baseline_model}

    art = registry.build("metrics", candidate.name, entry_point="evaluation.entry:run", config=key_config,
                         builder=build, parents=[candidate, data], force=cfg.force, say=say,
                         code_modules=code_modules(candidate.name))
    metrics = EvaluationMetrics.load_from(art.location)

    if not judged:  # a measurement: no verdict on the model (None, so `avp evaluate` exits 0)
        return {**summarize(art, metrics), "blessed": None}
    # 4. verdict on the model
    verdict = metrics.verdict
    registry.set_blessing(candidate.id, verdict["blessed"], verdict["reasons"])
    registry.update_meta(candidate.id, metrics_ref=art.ref)
    say(f"{candidate.ref} is {'BLESSED' if verdict['blessed'] else 'NOT blessed'}")

    # 5. feedback to ingest
    weights = metrics.feedback["weights"]
    path, _merged = feedback.merge_sample_weights(registry.home.join(feedback.FEEDBACK_DIR), weights)
    say(f"up-weighted {len(weights)} logs (worst scenes and similar train logs) in {path}")

    # 6. summary
    return summarize(art, metrics)


def code_modules(model_name: str) -> tuple[str, ...]:
    """The code behind the metrics: this module and its imports, and the model's modules (which the model
    registry imports by discovery, out of sight of the import analysis)."""
    return ("evaluation.entry", *model_modules(model_name))


def evaluate_into(staging: str, cfg: PipelineConfig, registry: Registry, candidate: Artifact, data: Artifact,
                  manifest: Manifest, production: Artifact | None, settings: Any, key: str, device: Any,
                  split: str, record: Artifact, say: Callable[[str], None]) -> EvaluationMetrics:
    """The registry builder: every metric, the verdict, ``metrics.json`` and ``report.html`` in ``staging``."""
    ev = cfg.evaluate
    frames = sorted((f for name in manifest.splits if split in ("all", name)
                     for f in read_split(data.location, manifest, name)), key=lambda f: (f.log_id, f.frame_index))
    say(f"read {len(frames)} {split} frames ({sum(len(f.points) for f in frames):,} points)")

    # the candidate: model and system metrics, then hardware metrics on a spread of logged frames
    model, spec = artifacts.load_model(candidate.location, device)
    result = scoring.score_model(model, frames, settings, device, say)
    add_statistics(result, ev, say)
    picks = sorted({round(i * (len(frames) - 1) / max(1, ev.latency_frames - 1)) for i in range(ev.latency_frames)})
    result["hardware"], result["variants"] = measure_variants(cfg, data, manifest, candidate, model, frames, picks,
                                                              result["segmentation"], staging, device, say)

    # the production model on the same frames (or its stored metrics on the same dataset)
    baseline, baseline_source = None, None
    if production is not None and production.id == candidate.id:
        baseline, baseline_source = result, "the candidate is the production model"
    elif production is not None:
        stored = stored_metrics(registry, production, data, key, split)
        if stored is not None:
            baseline, baseline_source = stored[1], f"reused {stored[0].ref}"
        else:
            say(f"scoring production {production.ref} on the same {len(frames)} frames")
            production_net, _ = artifacts.load_model(production.location, device)
            baseline = scoring.score_model(production_net, frames, settings, device, say)
            baseline_source = "scored in this run"

    verdict = blessing.decide(result, ev, baseline, f"production {production.ref}" if production else "production")
    worst = scoring.worst_scenes(result["scenes"], ev.worst_scenes)
    weights = feedback.hard_scene_weights(worst, manifest, ev.hard_scene_weight, ev.similar_train_logs)
    metrics = EvaluationMetrics(
        model=candidate.ref, model_name=spec.model, dataset=data.ref, split=split,
        metrics_ref=record.ref, created_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        host=socket.gethostname(), code_version=record.meta.get("code_version", ""), settings_key=key,
        thresholds={k: getattr(ev, k) for k in ("min_miou", "min_class_recall", "latency_p99_budget_ms",
                                                "max_regression", "max_missed_brake_rate")},
        candidate=result,
        baseline_model=production.ref if production else None, baseline_source=baseline_source,
        baseline={k: v for k, v in baseline.items() if k != "hardware"} if baseline else None,
        verdict={"blessed": verdict.blessed, "reasons": verdict.reasons, "checks": verdict.checks,
                 "comparisons": verdict.comparisons,
                 "serve_variant": result["variants"]["choice"]["variant"]},
        worst_scenes=worst,
        feedback={"weights": weights, "file": os.path.join(feedback.FEEDBACK_DIR, feedback.WEIGHTS_FILE)},
    )
    # The report is rendered from what the file holds (strict JSON: NaN is null), like every later reader.
    metrics = EvaluationMetrics.load(metrics.save_to(staging))
    report.write_report(staging, metrics)
    return metrics


def add_statistics(result: dict[str, Any], ev: Any, say: Callable[[str], None]) -> None:
    """The bootstrap intervals of every metric per slice, the evidence behind them and the reliability
    diagram (``statistics.describe``) into ``result["statistics"]``."""
    result["statistics"] = statistics.describe(result["tallies"], ev)
    say(f"bootstrap: {ev.bootstrap_resamples} resamples of the test logs in "
        f"{len(result['statistics']['slices'])} slices")


def measure_variants(cfg: PipelineConfig, data: Artifact, manifest: Manifest, candidate: Artifact, model: Any,
                     frames: list, picks: list[int], eager_segmentation: dict[str, Any], staging: str, device: Any,
                     say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Hardware metrics of every inference variant on the ``picks`` test frames, timed together, and the
    variant table (accuracy change on the whole test split, matmul peak, the variant to serve); see
    ``evaluation.variants``. The compiled programs (``model.pt2``, ``int8/model.pt2``) stay with the
    metrics: the serve stage ships them instead of compiling again."""
    ev = cfg.evaluate
    compiled_dir = os.path.join(staging, artifacts.COMPILED_DIR)
    spec = artifacts.ExportSpec(cfg.serve.max_points)
    calibration = []
    if not variants.int8_obstacle(device, ev.aot_inductor, ev.int8, 1):
        val = read_split(data.location, manifest, "val")
        calibration = [val[i].points for i in variants.calibration_picks(ev.int8_calibration_frames, len(val))]
    built, not_built = variants.build(model, os.path.join(candidate.location, "model.ts"), calibration, spec,
                                      compiled_dir, device, aot_inductor=ev.aot_inductor, int8=ev.int8, say=say)
    latency_frames = [frames[i].points for i in picks]
    timed = hardware.measure(model, os.path.join(candidate.location, "model.ts"), latency_frames,
                             runs=ev.latency_runs, warmup=ev.latency_warmup, device=device,
                             aot_inductor=ev.aot_inductor, max_points=cfg.serve.max_points,
                             compiled_dir=compiled_dir, say=say, extra=built)
    limits = {"latency_budget_ms": ev.latency_p99_budget_ms, "max_miou_drop": ev.variant_max_miou_drop,
              "max_class_iou_drop": ev.variant_max_class_iou_drop}
    table = variants.evaluate(timed, built, not_built, frames, latency_frames, model, eager_segmentation,
                              compiled_dir, device, limits, say)
    say(table["choice"]["reason"])
    return timed, table


# ----------------------------------------------------------------------------------------- 6. summary
def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarize(art: Artifact, metrics: EvaluationMetrics) -> dict[str, Any]:
    """The stage result: references, the verdict, the report path and the terminal tables."""
    cand, base = metrics.candidate, metrics.baseline
    seg = cand["segmentation"]
    title = f"{metrics.model} on the {metrics.split} split of {metrics.dataset}" + (
        " (cache hit)" if art.cached else "")
    columns = ["class", "precision", "recall", "IoU", "AP", "points"] + (["production IoU"] if base else [])
    rows = []
    for name, m in seg["classes"].items():
        row = [name, _f(m["precision"]), _f(m["recall"]), _f(m["iou"]),
               _f(cand["pr_curves"][name]["average_precision"]), m["points"]]
        if base:
            row.append(_f(base["segmentation"]["classes"].get(name, {}).get("iou")))
        rows.append(row)
    rows.append(["mIoU", "", "", _f(seg["miou"]), "", seg["points"]] + ([_f(base["segmentation"]["miou"])] if base else []))
    tables = [(title, columns, rows)]

    objects = cand["objects"]
    bands = list(next(iter(objects.values()))["bands"]) if objects else []
    tables.append(("objects (BEV groups of predicted points matched to boxes)",
                   ["class", "precision", "recall", "predicted", "objects", *[f"recall {b} m" for b in bands]],
                   [[name, _f(o["precision"]), _f(o["recall"]), o["predicted"], o["objects"],
                     *[_f(o["bands"][b]["recall"]) for b in bands]] for name, o in objects.items()]))

    planner = cand["planner"]
    rows = [["candidate", planner["frames"], planner["truth_brakes"], planner["missed_brakes"], planner["false_brakes"],
             _f(planner["missed_brake_rate"]), _f(planner["false_brake_rate"])]]
    if base:
        bp = base["planner"]
        rows.append(["production", bp["frames"], bp["truth_brakes"], bp["missed_brakes"], bp["false_brakes"],
                     _f(bp["missed_brake_rate"]), _f(bp["false_brake_rate"])])
    tables.append(("system metrics (longitudinal planner on perception vs ground truth)",
                   ["model", "frames", "brakes needed", "missed", "false", "missed rate", "false rate"], rows))

    scenes = cand["scenes"]
    if metrics.worst_scenes:  # none with fewer than two scenes: nothing to single out
        tables.append(("worst scenes (up-weighted for the next ingest)", ["scene", "city", "mIoU", "missed", "false"],
                       [[log, scenes[log]["city"], _f(scenes[log]["miou"]), scenes[log]["missed_brakes"],
                         scenes[log]["false_brakes"]] for log in metrics.worst_scenes]))

    hw = cand.get("hardware")
    if hw:
        tables.append((f"latency on {hw['device']} ({hw['device_name']}), batch 1, {hw['frames']} logged frames; "
                       f"{hw['macs'] / 1e9:.2f} GMACs, {hw['parameters']:,} parameters",
                       ["variant", "p50 ms", "p90 ms", "p99 ms", "max ms", "jitter ms", "frames/s", "peak MB",
                        "GFLOP/s"],
                       [[name, _f(v["p50_ms"], 1), _f(v["p90_ms"], 1), _f(v["p99_ms"], 1), _f(v["max_ms"], 1),
                         _f(v["jitter_ms"], 1), _f(v["frames_per_s"], 1), _f(v["peak_memory_mb"], 0),
                         _f(v["achieved_gflops"], 1)] for name, v in hw["variants"].items()]))

    tables += comparison_tables(metrics)
    verdict = metrics.verdict
    failed = {c["text"] for c in verdict["checks"] if not c["passed"]}
    tables.append((f"verdict: {'BLESSED' if verdict['blessed'] else 'NOT BLESSED'}", ["", "reason"],
                   [["FAIL" if r in failed else ("ok" if any(c["text"] == r for c in verdict["checks"]) else "note"), r]
                    for r in verdict["reasons"]]))
    return {"ref": art.ref, "cached": art.cached, "model": metrics.model, "blessed": verdict["blessed"],
            "reasons": verdict["reasons"], "miou": seg["miou"],
            "report": os.path.join(art.location, "report.html"),
            "metrics": os.path.join(art.location, EvaluationMetrics.FILE), "tables": tables}


def comparison_tables(metrics: EvaluationMetrics) -> list[tuple[str, list[str], list[list[Any]]]]:
    """The headline intervals, and the comparisons against production that did not simply pass."""
    described = metrics.candidate.get("statistics")
    if not described:
        return []
    level = f"{100 * described['confidence_level']:g}%"
    everything = described["slices"][statistics.ALL]["metrics"]
    rows = [[statistics.metric_label(name), _f(m["value"]), f"{_f(m['low'])} - {_f(m['high'])}", m["evidence"]]
            for name, m in everything.items() if name == "miou" or not name.startswith(("recall/", "iou/"))]
    tables = [(f"headline metrics with {level} intervals (bootstrap over {described['slices']['all']['logs']} test logs)",
               ["metric", "value", f"{level} interval", "evidence"], rows)]
    shown = [c for c in metrics.verdict.get("comparisons", []) if c["outcome"] in ("fail", "undecided") or c["blocks"]]
    if shown:
        tables.append((f"paired regression test against {metrics.baseline_model}: not passed",
                       ["slice", "metric", "candidate", "production", "change", f"{level} interval", "outcome"],
                       [[c["slice"], statistics.metric_label(c["metric"]), _f(c["candidate"]), _f(c["production"]),
                         f"{c['change']:+.3f}", f"{_f(c['low'])} - {_f(c['high'])}",
                         c["outcome"] + (" (blocks)" if c["blocks"] and c["outcome"] != "fail" else "")]
                        for c in shown]))
    return tables
