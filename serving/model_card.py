"""The model card: ``MODEL_CARD.md`` and its HTML rendering ``MODEL_CARD.html`` in every serving package.

Written by the serve stage after the package's files and before its manifest, so both are covered by
``MANIFEST.sha256``. Everything on it comes from the registry (the lineage package <- model <- dataset <-
logs, who built what and when, with which code) and the files those artifacts hold (the dataset manifest,
the evaluation's ``metrics.json``, the package's ``metadata.json``); nothing is typed by hand:

* what the model is for and not for (its input spec and BEV grid);
* training data: dataset version, logs, cities, date range, class shares, sources (simulated or real);
* evaluation: per-class and per-distance figures, the planner's system metrics, latency on the evaluating
  hardware and on the packaging host;
* the comparison with the production model the evaluation held it to;
* known limitations: classes under a recall floor (``serve.card_recall_floor``), distance bands with few
  test objects (``serve.card_min_band_objects``), simulated data;
* provenance: git SHA, diff hash, configs, who and when, run ids.

The approval request of the DAG's ``approve_promotion`` task shows the same Markdown.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from typing import Any

from pipeline.contracts import EvaluationMetrics, Manifest, PackageMetadata
from pipeline.registry import Artifact, Registry
from pipeline.taxonomy import CLASSES
from serving.package import MODEL_CARD, MODEL_CARD_HTML

# Log sources that are simulated drives (pipeline.frames.LogMeta.source); every other source is recorded data.
SIMULATED_SOURCES = ("sim",)


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return out


def _day(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).date().isoformat()


# ----------------------------------------------------------------------------------------- facts
def training_data(registry: Registry, dataset: Artifact | None) -> dict[str, Any]:
    """The dataset behind the model: version, logs, cities, days, sources and class shares."""
    if dataset is None:
        return {}
    logs = [p for p in registry.parents(dataset.id) if p.kind == "log"]
    manifest = Manifest.load_from(dataset.location) if os.path.exists(
        os.path.join(dataset.location, Manifest.FILE)) else None
    class_points: dict[str, int] = {}
    for entry in (manifest.logs.values() if manifest else []):
        for label, count in (entry.get("class_points") or {}).items():
            name = CLASSES[int(label)] if str(label).isdigit() and int(label) < len(CLASSES) else str(label)
            class_points[name] = class_points.get(name, 0) + int(count)
    class_points = dict(sorted(class_points.items(), key=lambda kv: (CLASSES.index(kv[0]) if kv[0] in CLASSES
                                                                     else len(CLASSES), kv[0])))
    total = sum(class_points.values())
    starts = [int(a.meta["start_time_ns"]) for a in logs if "start_time_ns" in a.meta]
    return {
        "ref": dataset.ref, "content_key": dataset.content_key, "created_by": dataset.created_by,
        "created_at": dataset.created_at.isoformat(timespec="seconds"),
        "logs": len(manifest.logs) if manifest else len(logs),
        "cities": sorted({str(a.meta["city"]) for a in logs if "city" in a.meta}
                         | {str(e.get("city")) for e in (manifest.logs.values() if manifest else []) if e.get("city")}),
        "date_range": [_day(min(starts)), _day(max(starts))] if starts else None,
        "window": [dataset.meta.get("date_from") or "", dataset.meta.get("date_to") or ""],
        "sources": sorted({str(a.meta.get("source", "unknown")) for a in logs}),
        "simulated_logs": sum(1 for a in logs if a.meta.get("source") in SIMULATED_SOURCES),
        "source_logs": len(logs),
        "splits": {name: {"logs": len(s.logs), "frames": s.frames, "points": s.points}
                   for name, s in manifest.splits.items()} if manifest else {},
        "class_shares": {name: round(n / total, 4) for name, n in class_points.items()} if total else {},
        "quarantined": len(manifest.quarantined) if manifest else 0,
        "validation": dataset.meta.get("validation"),
    }


def card_facts(registry: Registry, package: Artifact, model: Artifact, metrics: Artifact | None,
               dataset: Artifact | None, metadata: PackageMetadata, recall_floor: float,
               min_band_objects: int) -> dict[str, Any]:
    """Everything the card says, as data (the card is a rendering of this)."""
    evaluation = EvaluationMetrics.load_from(metrics.location) if metrics else None
    candidate = evaluation.candidate if evaluation else {}
    baseline = (evaluation.baseline or {}) if evaluation else {}
    classes = (candidate.get("segmentation") or {}).get("classes") or {}
    base_classes = (baseline.get("segmentation") or {}).get("classes") or {}
    objects = candidate.get("objects") or {}
    low_recall = [[name, _f(m.get("recall"))] for name, m in classes.items()
                  if isinstance(m, dict) and m.get("recall") is not None and m["recall"] < recall_floor]
    thin_bands = [[name, band, b.get("objects", 0)] for name, o in objects.items()
                  for band, b in (o.get("bands") or {}).items() if b.get("objects", 0) < min_band_objects]
    return {
        "package": metadata.package, "model": metadata.model, "provenance": metadata.provenance,
        "created_at": metadata.created_at, "classes": metadata.classes, "input": metadata.input,
        "grid": metadata.preprocessing.get("bev_grid", {}), "performance": metadata.performance,
        "blessed": bool(model.blessed), "verdict_reasons": list(model.meta.get("blessing_reasons") or []),
        "metrics_ref": metrics.ref if metrics else None,
        "training_config": model.config,
        "data": training_data(registry, dataset),
        "evaluation": {
            "dataset": evaluation.dataset if evaluation else None, "split": evaluation.split if evaluation else None,
            "host": evaluation.host if evaluation else None,
            "thresholds": evaluation.thresholds if evaluation else {},
            "segmentation": candidate.get("segmentation") or {}, "objects": objects,
            "planner": candidate.get("planner") or {}, "hardware": candidate.get("hardware") or {},
        },
        "production": {
            "model": evaluation.baseline_model if evaluation else None,
            "source": evaluation.baseline_source if evaluation else None,
            "miou": (baseline.get("segmentation") or {}).get("miou"),
            "class_iou": {name: m.get("iou") for name, m in base_classes.items() if isinstance(m, dict)},
            "planner": baseline.get("planner") or {},
        },
        "limitations": {"recall_floor": recall_floor, "low_recall_classes": low_recall,
                        "min_band_objects": min_band_objects, "thin_bands": thin_bands},
    }


# ----------------------------------------------------------------------------------------- rendering
def render_markdown(facts: dict[str, Any]) -> str:
    """The card as Markdown (GitHub/CommonMark tables)."""
    pkg, model, prov = facts["package"], facts["model"], facts["provenance"]
    data, ev = facts["data"], facts["evaluation"]
    grid, seg, prod, lim = facts["grid"], ev["segmentation"], facts["production"], facts["limitations"]
    lines = [f"# Model card: {model['name']} v{model['version']} ({pkg['ref']})", "",
             f"Evaluation verdict: **{'blessed' if facts['blessed'] else 'not blessed'}**"
             + (f" ({'; '.join(facts['verdict_reasons'])})" if facts["verdict_reasons"] else "") + ".", ""]

    lines += ["## Intended use", "",
              f"* **For**: per-point semantic segmentation of one LiDAR sweep into {', '.join(facts['classes'])}, "
              f"as input to the longitudinal planner; up to {facts['input'].get('max_points')} points per sweep, "
              "in the LiDAR sensor frame (x forward, y left, z up, metres), intensity in [0, 1].",
              f"* **Best within** the bird's-eye-view grid x {grid.get('x_range_m')} m, y {grid.get('y_range_m')} m "
              f"(cell {grid.get('cell_size_m')} m); points beyond it are classified from their own features only.",
              "* **Not for**: other sensors or mounting heights than the training logs', classes outside the "
              "taxonomy (they come out as the nearest known class), object detection or tracking, or any decision "
              "without the planner's own checks.", ""]

    lines += ["## Training data", ""]
    if data:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in data["class_shares"].items())
        window = data["window"]
        lines += [f"* Dataset **{data['ref']}** (content key `{data['content_key'][:12]}`), built by "
                  f"{data['created_by']} at {data['created_at']} UTC; validation: {data['validation'] or 'n/a'}.",
                  f"* {data['logs']} logs ({data['quarantined']} quarantined) from {len(data['cities'])} cities: "
                  f"{', '.join(data['cities']) or 'n/a'}.",
                  "* Drives recorded " + (f"from {data['date_range'][0]} to {data['date_range'][1]}"
                                          if data["date_range"] else "on unknown dates")
                  + (f"; selection window {window[0] or 'start'} .. {window[1]} (exclusive)" if window[1] else "")
                  + ".",
                  f"* Sources: {', '.join(data['sources']) or 'n/a'} ({data['simulated_logs']} of "
                  f"{data['source_logs']} logs simulated).",
                  f"* Class shares (points): {shares or 'n/a'}.", ""]
        lines += _table(["split", "logs", "frames", "points"],
                        [[name, s["logs"], s["frames"], s["points"]] for name, s in data["splits"].items()]) + [""]
    else:
        lines += ["No dataset is recorded as the model's parent.", ""]

    lines += ["## Evaluation", ""]
    if facts["metrics_ref"]:
        lines += [f"{facts['metrics_ref']}: the {ev['split']} split of {ev['dataset']}, on host {ev['host']}.", "",
                  f"mIoU **{_f(seg.get('miou'))}**, point accuracy {_f(seg.get('accuracy'))}, "
                  f"{seg.get('frames', 'n/a')} frames.", ""]
        lines += _table(["class", "precision", "recall", "IoU", "points"],
                        [[name, _f(m.get("precision")), _f(m.get("recall")), _f(m.get("iou")), m.get("points", "")]
                         for name, m in (seg.get("classes") or {}).items()]) + [""]
        bands = list(next(iter(ev["objects"].values())).get("bands", {})) if ev["objects"] else []
        if bands:
            lines += ["Object recall by distance (found / visible objects):", ""]
            lines += _table(["class", *[f"{b} m" for b in bands]],
                            [[name, *[f"{_f(o['bands'][b].get('recall'))} ({o['bands'][b].get('objects', 0)})"
                                      for b in bands]] for name, o in ev["objects"].items()]) + [""]
        planner = ev["planner"]
        if planner:
            figures = [f"{k.replace('_', ' ')} {_f(v) if isinstance(v, float) else v}"
                       for k, v in planner.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            lines += ["System metrics (the planner on perceived vs true classes): " + ", ".join(figures) + ".", ""]
        hw = ev["hardware"]
        if hw:
            lines += [f"Latency on the evaluating hardware ({hw.get('device', '?')}, {hw.get('device_name', '?')}), "
                      "batch 1, logged test frames:", ""]
            lines += _table(["variant", "p50 ms", "p99 ms"],
                            [[name, _f(v.get("p50_ms"), 1), _f(v.get("p99_ms"), 1)]
                             for name, v in (hw.get("variants") or {}).items()]) + [""]
    else:
        lines += ["No evaluation report is recorded for this model.", ""]
    perf = facts["performance"]
    lines += [f"Packaging host: TorchScript p50 {perf['torchscript_latency_ms']['p50']} ms, model.pt2 p50 "
              f"{perf['pt2_latency_ms']['p50']} ms on the {perf['example_points']}-point example "
              f"({perf['threads']} threads); {perf['macs'] / 1e9:.2f} GMACs, {perf['parameters']:,} parameters.", ""]

    lines += ["## Comparison with production", ""]
    if prod["model"]:
        lines += [f"Held to production {prod['model']} ({prod['source']}).", ""]
        names = list((seg.get("classes") or {}))
        rows = [[name, _f((seg["classes"][name] or {}).get("iou")), _f(prod["class_iou"].get(name)),
                 _f(None if prod["class_iou"].get(name) is None or seg["classes"][name].get("iou") is None
                    else seg["classes"][name]["iou"] - prod["class_iou"][name])] for name in names]
        rows.append(["mIoU", _f(seg.get("miou")), _f(prod["miou"]),
                     _f(None if prod["miou"] is None or seg.get("miou") is None else seg["miou"] - prod["miou"])])
        lines += _table(["", "candidate IoU", "production IoU", "change"], rows) + [""]
    else:
        lines += ["There was no production model to compare with: this is the first candidate.", ""]

    lines += ["## Known limitations", ""]
    low = ", ".join(f"{name} ({recall})" for name, recall in lim["low_recall_classes"])
    lines.append(f"* Classes with test point recall under {lim['recall_floor']:g}: {low or 'none'}.")
    thin = ", ".join(f"{name} {band} m ({n} objects)" for name, band, n in lim["thin_bands"])
    lines.append(f"* Distance bands with fewer than {lim['min_band_objects']} test objects (their recall is "
                 f"uncertain): {thin or 'none'}.")
    if data:
        if data["simulated_logs"] == data["source_logs"] and data["source_logs"]:
            lines.append("* Trained and evaluated on **simulated** drives only: performance on real sensor data is "
                         "not established.")
        elif data["simulated_logs"]:
            lines.append(f"* {data['simulated_logs']} of {data['source_logs']} training logs are simulated.")
        if len(data["cities"]) < 2:
            lines.append("* One city only: other cities' streets and traffic are untested.")
    lines.append("")

    lines += ["## Provenance", "",
              f"* Package {pkg['ref']} (content key `{pkg['content_key'][:12]}`), built {facts['created_at']} by "
              f"{prov.get('user')} on {prov.get('host')}, run `{prov.get('run_id')}`"
              + (f", Airflow {prov['airflow_dag_id']} / {prov.get('airflow_run_id')}" if prov.get("airflow_dag_id")
                 else "") + ".",
              f"* Code: git `{prov.get('git_sha')}`" + (f" + uncommitted changes `{prov['diff_hash'][:12]}`"
                                                          if prov.get("diff_hash") else "") + ".",
              f"* Model {model['ref']} (content key `{model['content_key'][:12]}`), trained by "
              f"{model.get('created_by')} at {model.get('created_at')} UTC, training run "
              f"`{model.get('training_run_id')}`, code `{model.get('git_sha')}`.",
              "* Training config:", "", "```json", json.dumps(facts["training_config"], indent=1, sort_keys=True),
              "```", ""]
    return "\n".join(lines)


def render_html(markdown_text: str, title: str) -> str:
    """A self-contained HTML page of the Markdown card (no external CSS or scripts: it opens offline)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px;text-align:left}"
             "pre{background:#f4f4f4;padding:8px;overflow:auto}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


def write_model_card(folder: str, facts: dict[str, Any]) -> str:
    """Write ``MODEL_CARD.md`` and ``MODEL_CARD.html`` into the package ``folder``; returns the Markdown."""
    text = render_markdown(facts)
    with open(os.path.join(folder, MODEL_CARD), "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    with open(os.path.join(folder, MODEL_CARD_HTML), "w", encoding="utf-8", newline="\n") as fh:
        fh.write(render_html(text, f"Model card {facts['package']['ref']}"))
    return text
