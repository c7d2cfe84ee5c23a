"""The evaluation's page for people, ``report.html`` (``metrics.json``, everything machine-readable, is
``pipeline.contracts.EvaluationMetrics``): one self-contained page for people: the verdict first, then tables and plots; images are embedded as base64
PNGs so the file works offline, attached to a ticket or opened from the artifact store)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from evaluation import statistics
from pipeline.contracts import EvaluationMetrics
from pipeline.taxonomy import CLASSES, IGNORE

REPORT_FILE = "report.html"
COLOURS = {"ground": "#8c6d31", "building": "#7f7f7f", "vegetation": "#2ca02c", "pole": "#9467bd",
           "vehicle": "#1f77b4", "pedestrian": "#d62728", "cyclist": "#ff7f0e"}


# ----------------------------------------------------------------------------------------- plots
def _png(fig) -> str:
    """A matplotlib figure as an ``<img>`` tag with the PNG inline."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plot_pr_curves(curves: dict[str, Any]) -> str:
    fig, ax = _figure(6.5, 4.5)
    for name, curve in curves.items():
        pairs = [(r, p) for r, p in zip(curve["recall"], curve["precision"]) if r is not None and p is not None]
        if not pairs or not curve["points"]:
            continue
        recall, precision = zip(*pairs)
        ap = curve["average_precision"]
        ax.plot(recall, precision, marker=".", markersize=3, color=COLOURS.get(name),
                label=f"{name} (AP {ap:.2f})" if ap is not None else name)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title="Point precision-recall over softmax score thresholds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def plot_confusion(confusion: Sequence[Sequence[int]]) -> str:
    matrix = np.asarray(confusion, np.float64)
    keep = [c for c in range(len(CLASSES)) if c != IGNORE]
    # Columns keep 'ignore' when the model predicted it for labelled points: those misses must show.
    columns = list(range(len(CLASSES))) if matrix[:, IGNORE].sum() > 0 else keep
    matrix = matrix[np.ix_(keep, columns)]
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = _figure(6.5, 5.5)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), [CLASSES[c] for c in columns], rotation=40, ha="right")
    ax.set_yticks(range(len(keep)), [CLASSES[c] for c in keep])
    for i in range(len(keep)):
        for j in range(len(columns)):
            if matrix[i, j] > 0:
                ax.text(j, i, f"{100 * shares[i, j]:.0f}%\n{int(matrix[i, j])}", ha="center", va="center",
                        fontsize=6.5, color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="ground truth", title="Confusion matrix (row share, point count)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def plot_recall_by_distance(objects: dict[str, Any]) -> str:
    fig, ax = _figure(6.5, 4.0)
    names = [name for name, o in objects.items() if o["objects"] > 0]  # a class never seen has no bars
    bands = list(next(iter(objects.values()))["bands"]) if objects else []
    width = 0.8 / max(1, len(names))
    labelled: set[str] = set()
    for k, name in enumerate(names):
        for b, band in enumerate(bands):
            block = objects[name]["bands"][band]
            x = b + (k - (len(names) - 1) / 2) * width
            if block["recall"] is None:  # no visible object of this class in this band
                ax.text(x, 0.02, "-", ha="center", fontsize=8, color=COLOURS.get(name))
                continue
            ax.bar(x, block["recall"], width, color=COLOURS.get(name), label=None if name in labelled else name)
            labelled.add(name)
            ax.text(x, block["recall"] + 0.02, f"{block['matched_objects']}/{block['objects']}", ha="center",
                    fontsize=7)
    if not names:
        ax.text(0.5, 0.5, "no visible objects in the test split", ha="center", transform=ax.transAxes)
    ax.set_xticks(range(len(bands)), [f"{b} m" for b in bands])
    ax.set(ylim=(0, 1.15), ylabel="object recall", title="Object recall by distance (found / visible objects)")
    if labelled:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_latency(hardware: dict[str, Any], budget_ms: float) -> str:
    fig, ax = _figure(6.5, 4.0)
    variants = hardware["variants"]
    everything = [s for v in variants.values() for s in v["samples_ms"]]
    bins = np.linspace(min(everything) * 0.95, max(everything) * 1.05, 30)
    for name, v in variants.items():
        ax.hist(v["samples_ms"], bins=bins, alpha=0.55, label=f"{name} (p50 {v['p50_ms']:.1f}, p99 {v['p99_ms']:.1f} ms)")
    if budget_ms <= max(everything) * 1.5:
        ax.axvline(budget_ms, color="red", linestyle="--", label=f"p99 budget {budget_ms:.0f} ms")
    ax.set(xlabel="latency per frame (ms)", ylabel="calls",
           title=f"Latency on {hardware['device']} ({hardware['frames']} logged test frames, batch 1)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_variant_tradeoff(table: dict[str, Any]) -> str:
    """p50 latency against the mIoU change of every scored variant; the served one is marked."""
    fig, ax = _figure(6.5, 4.0)
    rows = {n: r for n, r in table["rows"].items() if r.get("miou_change_pts") is not None}
    chosen = table["choice"]["variant"]
    for name, row in rows.items():
        ax.scatter(row["p50_ms"], row["miou_change_pts"], s=90 if name == chosen else 40,
                   marker="*" if name == chosen else "o", zorder=3)
        ax.annotate(name + (" (served)" if name == chosen else ""), (row["p50_ms"], row["miou_change_pts"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(-table["limits"]["max_miou_drop"], color="red", linestyle="--", label="largest mIoU loss allowed")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="p50 latency per frame (ms)", ylabel="mIoU change vs eager (IoU points)",
           title="Inference variants: speed against accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def variants_section(table: dict[str, Any]) -> str:
    """The variant table (latency, compute, memory, accuracy change), what was not built, and the choice."""
    rows = [[name + (" (served)" if name == table["choice"]["variant"] else ""), r["p50_ms"], r["p99_ms"],
             r["achieved_gflops"], None if r["peak_share"] is None else f"{100 * r['peak_share']:.0f}%",
             r["peak_memory_mb"], r.get("miou"), r.get("miou_change_pts"),
             min((r.get("class_iou_change_pts") or {}).values(), default=None),
             "yes" if r["servable"] else "no", "; ".join(table["choice"]["excluded"].get(name, []))]
            for name, r in table["rows"].items()]
    not_built = "".join(f"<li>{html.escape(n)}: not built ({html.escape(why)})</li>"
                        for n, why in table["not_built"].items())
    limits = table["limits"]
    frozen = table.get("frozen_vs_unfrozen")
    frozen_note = (f"Frozen TorchScript p50 {frozen['frozen_p50_ms']:.1f} ms against {frozen['unfrozen_p50_ms']:.1f} ms "
                   f"unfrozen ({frozen['speedup_p50']:.2f}x). " if frozen else "")
    return ("<h2>Inference variants</h2>"
            + f"<p><b>{html.escape(table['choice']['reason'])}</b></p>"
            + _table(["variant", "p50 ms", "p99 ms", "GFLOP/s", "of mm peak", "peak MB", "mIoU", "mIoU change pts",
                      "worst class change pts", "packaged", "not eligible because"], rows)
            + f"<p class='note'>{frozen_note}float32 torch.mm peak measured in this run: {table['matmul_peak_gflops']:.1f} GFLOP/s. "
              f"Accuracy on all {table['test_frames']} test frames; limits: p99 within "
              f"{limits['latency_budget_ms']:.1f} ms, mIoU loss at most {limits['max_miou_drop']:.2f} points, any "
              f"class at most {limits['max_class_iou_drop']:.2f} points.</p><ul class='note'>{not_built}</ul>"
            + f"<div class='row'><div>{plot_variant_tradeoff(table)}</div><div></div></div>")


def plot_scenes(scenes: dict[str, Any], worst: Sequence[str], baseline: dict[str, Any] | None) -> str:
    logs = sorted((log for log in scenes if scenes[log]["miou"] is not None), key=lambda log: scenes[log]["miou"])
    fig, ax = _figure(6.5, 0.9 + 0.32 * max(1, len(logs)))
    values = [scenes[log]["miou"] for log in logs]
    ax.barh(range(len(logs)), values, color=["#d62728" if log in worst else "#1f77b4" for log in logs])
    if baseline:
        marks = [(i, baseline["scenes"].get(log, {}).get("miou")) for i, log in enumerate(logs)]
        marks = [(i, v) for i, v in marks if v is not None]
        if marks:
            ax.scatter([v for _, v in marks], [i for i, _ in marks], marker="|", s=200, color="black",
                       label="production", zorder=3)
            ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(range(len(logs)), logs, fontsize=7)
    ax.set(xlim=(0, 1), xlabel="scene mIoU", title="Scenes by mIoU (worst in red)")
    ax.invert_yaxis()
    return _png(fig)


def plot_reliability(reliability: dict[str, Any], ece: float | None) -> str:
    """Accuracy against mean confidence per confidence bin (the diagonal is perfect calibration), with
    each bin's share of the points underneath."""
    fig, ax = _figure(6.5, 4.5)
    edges = np.asarray(reliability["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    accuracy = [a if a is not None else 0.0 for a in reliability["accuracy"]]
    points = np.asarray(reliability["points"], np.float64)
    ax.bar(centres, accuracy, width * 0.9, color="#1f77b4", alpha=0.8, label="accuracy of the bin's points")
    confidence = [(c, conf) for c, conf in zip(centres, reliability["confidence"]) if conf is not None]
    if confidence:
        ax.scatter([c for c, _ in confidence], [conf for _, conf in confidence], color="black", marker="_", s=120,
                   zorder=3, label="mean confidence of the bin")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    share = points / max(points.sum(), 1)
    ax.bar(centres, share * 0.25, width * 0.9, bottom=-0.3, color="#ff7f0e", alpha=0.7,
           label="share of points (x0.25, below 0)")
    title = "Reliability of the per-point softmax" + (f" (ECE {ece:.3f})" if ece is not None else "")
    ax.set(xlabel="confidence (top softmax score)", ylabel="accuracy", xlim=(0, 1), ylim=(-0.32, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


# ----------------------------------------------------------------------------------------- HTML
def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _interval(metric: dict[str, Any] | None) -> str:
    """``0.512 [0.480, 0.551]`` (value and interval) of a described metric; n/a when there is none."""
    if not metric:
        return "n/a"
    if metric["low"] is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1280px;
       color: #222; line-height: 1.4; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; font-size: 13px; }
.verdict { padding: 12px 16px; border-radius: 6px; margin: 16px 0; font-size: 15px; }
.blessed { background: #e6f4ea; border: 1px solid #34a853; } .rejected { background: #fce8e6; border: 1px solid #d93025; }
.verdict ul { margin: 6px 0 0 0; }
.fail { color: #b00020; font-weight: 600; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f5f5f5; } td:first-child, th:first-child { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.row > div { flex: 1 1 560px; }
img { max-width: 100%; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.card b { display: block; font-size: 20px; }
p.note, ul.note { color: #555; font-size: 13px; max-width: 1000px; }
pre { white-space: pre-wrap; font-size: 12px; }
"""


def render(metrics: EvaluationMetrics) -> str:
    """The whole report page as a string (from strict metrics: missing numbers are None, as in metrics.json)."""
    cand = metrics.candidate
    base = metrics.baseline
    seg, hw, planner = cand["segmentation"], cand.get("hardware"), cand["planner"]
    verdict = metrics.verdict
    blessed = verdict["blessed"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation of {html.escape(metrics.model)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Evaluation of {html.escape(metrics.model)}</h1>",
             f"<div class='sub'>{html.escape(metrics.split)} split of {html.escape(metrics.dataset)} &middot; "
             f"{seg['frames']} frames, {seg['points']:,} labelled points, {len(cand['scenes'])} scenes &middot; "
             f"{html.escape(metrics.created_at)} &middot; code {html.escape(metrics.code_version[:16])}</div>"]
    failed = [c["text"] for c in verdict["checks"] if not c["passed"]]
    reasons = "".join(f"<li class='{'fail' if r in failed else ''}'>{html.escape(r)}</li>" for r in verdict["reasons"])
    parts.append(f"<div class='verdict {'blessed' if blessed else 'rejected'}'><b>{'BLESSED' if blessed else 'NOT BLESSED'}"
                 f"</b> &mdash; {'may be promoted' if blessed else 'cannot be promoted'}"
                 f"{' (baseline: ' + html.escape(metrics.baseline_model) + ')' if metrics.baseline_model else ''}"
                 f"<ul>{reasons}</ul></div>")

    gated = None
    if hw:
        for name in ("torchscript", "eager"):
            if name in hw["variants"]:
                gated = (name, hw["variants"][name])
                break
    cards = [("mIoU", _cell(seg["miou"])), ("point accuracy", _cell(seg["accuracy"])),
             ("missed brakes", f"{planner['missed_brakes']} / {planner['truth_brakes']}"),
             ("false brakes", f"{planner['false_brakes']} / {planner['frames'] - planner['truth_brakes']}")]
    if gated:
        cards.append((f"{gated[0]} p99", f"{gated[1]['p99_ms']:.1f} ms"))
    if hw:
        cards.append(("MACs / frame", f"{hw['macs'] / 1e9:.2f} G"))
        cards.append(("parameters", f"{hw['parameters']:,}"))
    parts.append("<div class='cards'>" + "".join(f"<div class='card'>{html.escape(k)}<b>{v}</b></div>"
                                                  for k, v in cards) + "</div>")

    # --- model metrics
    parts.append("<h2>Model metrics: points</h2>")
    described = cand.get("statistics")
    overall = described["slices"]["all"]["metrics"] if described else {}
    level = f"{100 * described['confidence_level']:g}%" if described else ""
    columns = ["class", "precision", "recall", "IoU", "AP", "points"]
    if described:
        columns[2:4] = [f"recall [{level} CI]", f"IoU [{level} CI]"]
    if base:
        columns += ["production IoU", "change"]
    rows = []
    for name, m in seg["classes"].items():
        recall, iou = m["recall"], m["iou"]
        if described:
            recall, iou = _interval(overall.get(f"recall/{name}")), _interval(overall.get(f"iou/{name}"))
        row = [name, m["precision"], recall, iou, cand["pr_curves"][name]["average_precision"], m["points"]]
        if base:
            theirs = base["segmentation"]["classes"].get(name, {}).get("iou")
            row += [theirs, None if theirs is None or m["iou"] is None else m["iou"] - theirs]
        rows.append(row)
    rows.append(["mIoU", "", "", _interval(overall.get("miou")) if described else seg["miou"], "", seg["points"]]
                + ([base["segmentation"]["miou"], None if base["segmentation"]["miou"] is None or seg["miou"] is None
                    else seg["miou"] - base["segmentation"]["miou"]] if base else []))
    parts.append(_table(columns, rows))
    parts.append("<p class='note'>Points labelled <i>ignore</i> are left out. A prediction is the argmax of the "
                 "logits; AP is the area under the point precision-recall curve over softmax score thresholds. "
                 "mIoU averages the classes present in the test split.</p>")
    parts.append(f"<div class='row'><div>{plot_pr_curves(cand['pr_curves'])}</div>"
                 f"<div>{plot_confusion(seg['confusion'])}</div></div>")

    # --- objects
    settings = cand["settings"]["objects"]
    parts.append("<h2>Model metrics: objects</h2>")
    objects = cand["objects"]
    bands = list(next(iter(objects.values()))["bands"]) if objects else []
    rows = [[name, o["precision"], o["recall"], o["predicted"], o["objects"],
             *[o["bands"][b]["recall"] for b in bands]] for name, o in objects.items()]
    parts.append(_table(["class", "precision", "recall", "predicted", "visible objects",
                         *[f"recall {b} m" for b in bands]], rows))
    parts.append(f"<p class='note'>Predicted points of a class are grouped in bird's-eye view (single linkage at "
                 f"{settings['radius']} m; groups under {settings['min_points']} points dropped). A group matches a "
                 f"ground-truth box of its class holding at least {100 * settings['min_share']:.0f}% of its points "
                 f"(box grown by {settings['margin']} m); boxes with fewer than {settings['min_points']} points of "
                 f"their class were not seen by the sensor and are not counted.</p>")
    if objects:
        parts.append(f"<div class='row'><div>{plot_recall_by_distance(objects)}</div><div></div></div>")

    # --- system
    ps = planner["settings"]
    parts.append("<h2>System metrics: longitudinal planner</h2>")
    parts.append(f"<p class='note'>Per frame, a planner brakes when an obstacle (points of vehicle, pedestrian or "
                 f"cyclist, grouped as above) is in the ego corridor (|y| &lt; {ps['lane_width'] / 2:g} m, "
                 f"0 &lt; x &lt; {ps['horizon']:g} m) and distance / ego speed &lt; {ps['ttc_threshold']:g} s "
                 f"(obstacles assumed standing still). It runs on the predictions and on the ground truth; a "
                 f"<b>missed brake</b> (safety) is ground truth braking alone, a <b>false brake</b> (comfort) "
                 f"perception braking alone. See docs/evaluation.md for what this planner is not.</p>")
    rows = [["candidate, all scenes" if base else "all scenes", planner["frames"], planner["truth_brakes"], planner["perceived_brakes"],
             planner["missed_brakes"], planner["false_brakes"], planner["missed_brake_rate"],
             planner["false_brake_rate"], planner["distance_error_m"]]]
    rows += [[log, s["frames"], s["truth_brakes"], s["perceived_brakes"], s["missed_brakes"], s["false_brakes"],
              s["missed_brake_rate"], s["false_brake_rate"], s["distance_error_m"]]
             for log, s in planner["scenes"].items()]
    columns = ["scene", "frames", "brakes (truth)", "brakes (perceived)", "missed", "false", "missed rate",
               "false rate", "distance error (m)"]
    if base:
        bp = base["planner"]
        rows.insert(1, ["production, all scenes", bp["frames"], bp["truth_brakes"], bp["perceived_brakes"],
                        bp["missed_brakes"], bp["false_brakes"], bp["missed_brake_rate"], bp["false_brake_rate"],
                        bp["distance_error_m"]])
    parts.append(_table(columns, rows))
    if planner["events"]:
        rows = [[e["log_id"], e["frame_index"], e["event"], e["speed"], e["truth_distance"], e["perceived_distance"]]
                for e in planner["events"]]
        total = planner["events_total"]
        shown = f" (first {len(rows)} of {total})" if total > len(rows) else f" ({total})"
        parts.append(f"<details><summary>frames where the decisions differ{shown}</summary>"
                     + _table(["scene", "frame", "event", "speed (m/s)", "truth distance (m)",
                               "perceived distance (m)"], rows) + "</details>")

    # --- statistics
    if described:
        parts.append(statistics_section(metrics, described))

    # --- hardware
    if hw:
        parts.append("<h2>Hardware metrics</h2>")
        rows = [[name, v["p50_ms"], v["p90_ms"], v["p99_ms"], v["max_ms"], v["std_ms"], v["jitter_ms"],
                 v["frames_per_s"], v["peak_memory_mb"], v["achieved_gflops"], v["speedup_vs_eager"],
                 f"{v['max_abs_diff_vs_eager']:.1e}"] for name, v in hw["variants"].items()]
        parts.append(_table(["variant", "p50 ms", "p90 ms", "p99 ms", "max ms", "std ms", "p99-p50 ms", "frames/s",
                             "peak MB", "GFLOP/s", "vs eager", "max |diff| vs eager"], rows))
        stages = ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in hw["macs_per_stage"].items())
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in
                        [f"{name}: {v['note']}" for name, v in hw["variants"].items()] + hw["notes"])
        parts.append(f"<p class='note'>{html.escape(hw['device_name'])} ({hw['device']}, {hw['threads']} threads, torch "
                     f"{html.escape(hw['torch'])}); {hw['frames']} logged test frames of "
                     f"{min(hw['points_per_frame']):,}-{max(hw['points_per_frame']):,} points, batch 1. "
                     f"MACs {hw['macs'] / 1e9:.3f} G on a {hw['flop_frame_points']:,}-point frame by "
                     f"torch.utils.flop_counter (counts {html.escape(', '.join(hw['counted_ops']))} only): {html.escape(stages)}. "
                     f"Peak memory: {html.escape(hw['memory_method'])}.</p><ul class='note'>{notes}</ul>")
        parts.append(f"<div class='row'><div>{plot_latency(hw, metrics.thresholds['latency_p99_budget_ms'])}</div>"
                     "<div></div></div>")

    if cand.get("variants"):
        parts.append(variants_section(cand["variants"]))

    # --- scenes
    parts.append("<h2>Scenes</h2>")
    worst = metrics.worst_scenes
    rows = []
    for log in sorted(cand["scenes"], key=lambda k: (cand["scenes"][k]["miou"] is None, cand["scenes"][k]["miou"] or 0)):
        s = cand["scenes"][log]
        present = [(iou, name) for name, iou in s["iou"].items() if iou is not None]
        weakest = min(present) if present else None
        row = [log + (" (worst)" if log in worst else ""), s["city"], s["frames"], s["miou"], s["accuracy"],
               f"{weakest[1]} ({weakest[0]:.2f})" if weakest else None, s["missed_brakes"], s["false_brakes"]]
        if base:
            row.append(base["scenes"].get(log, {}).get("miou"))
        rows.append(row)
    parts.append(_table(["scene", "city", "frames", "mIoU", "accuracy", "weakest class (IoU)", "missed brakes",
                         "false brakes"]
                        + (["production mIoU"] if base else []), rows))
    parts.append(f"<div class='row'><div>{plot_scenes(cand['scenes'], worst, base)}</div><div>")
    feedback = metrics.feedback
    if feedback.get("weights"):
        parts.append("<p class='note'>Written to the ingest feedback file (worst scenes and the train logs of their "
                     "city with the closest class mix are up-weighted the next time ingest runs):</p>"
                     + _table(["log", "sample weight"], sorted(feedback["weights"].items())))
    parts.append("</div></div>")

    parts.append("<h2>Settings</h2><details><summary>blessing thresholds and metric definitions</summary><pre>"
                 + html.escape(json.dumps({"thresholds": metrics.thresholds, "metrics": cand["settings"]}))
                 + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def statistics_section(metrics: EvaluationMetrics, described: dict[str, Any]) -> str:
    """Intervals and evidence of the headline metrics, every slice, the paired comparisons against
    production and the reliability diagram."""
    level = f"{100 * described['confidence_level']:g}%"
    overall = described["slices"]["all"]
    parts = [f"<h2>How sure: intervals, slices, calibration</h2><p class='note'>Every interval is a {level} "
             f"percentile bootstrap over test <b>logs</b> ({described['resamples']} resamples, seed "
             f"{described['seed']}): the logs, not points or frames, are the independent evidence; this split has "
             f"{overall['logs']}. A slice with fewer than {described['min_slice_logs']} logs, or a metric resting on "
             f"fewer than {described['min_slice_count']} points / objects / needed brakes, is marked too small and "
             f"not judged. See docs/evaluation.md.</p>"]
    names = [n for n in overall["metrics"] if not n.startswith(("iou/", "recall/"))]
    parts.append(_table(["metric", f"value [{level} CI]", "evidence (points, objects or brakes)", "judgeable"],
                        [[statistics.metric_label(n), _interval(overall["metrics"][n]),
                          overall["metrics"][n]["evidence"], not overall["metrics"][n]["too_small"]] for n in names]))
    bands = [(name, s) for name, s in described["slices"].items() if s["dimension"] == "distance"]
    if bands:
        objects = [n for n in names if n.startswith("object_recall/")]
        parts.append("<p class='note'>Object recall per class and distance band:</p>" + _table(
            ["class", *[f"{s['group']} m" for _n, s in bands]],
            [[statistics.metric_label(n)] + [_interval(s["metrics"].get(n)) for _name, s in bands] for n in objects]))
    rows = []
    for name, s in described["slices"].items():
        m = s["metrics"]
        rows.append([name, s["logs"], s["frames"], s["points"], s["objects"], s.get("needed_brakes"),
                     _interval(m.get("miou")), _interval(m.get("object_recall/pedestrian")),
                     _interval(m.get("missed_brake_rate")), _interval(m.get("ece")),
                     s["too_small"] and f"too small: {s['too_small']}" or "judged"])
    parts.append(f"<p class='note'>Slices (<code>evaluate.slices</code>), {level} intervals; logs, frames, points, "
                 f"objects and needed brakes are the evidence each rests on:</p>"
                 + _table(["slice", "logs", "frames", "points", "objects", "needed brakes", "mIoU",
                           "pedestrian object recall", "missed-brake rate", "ECE", "status"], rows))
    comparisons = metrics.verdict.get("comparisons") or []
    if comparisons:
        rows = [[c["slice"], statistics.metric_label(c["metric"]), c["candidate"], c["production"],
                 f"{c['change']:+.3f}", "n/a" if c["low"] is None else f"[{c['low']:+.3f}, {c['high']:+.3f}]",
                 c["evidence"]["logs"], c["evidence"]["count"],
                 {"fail": "FAIL: regression", "undecided": "not enough evidence", "too_small": "too small",
                  "pass": "pass"}[c["outcome"]] + (" (blocks)" if c["outcome"] != "fail" and c["blocks"] else "")]
                for c in comparisons]
        shown = [r for r, c in zip(rows, comparisons) if c["outcome"] in ("fail", "undecided") or c["blocks"]]
        parts.append(f"<h3>Paired regression test against {html.escape(metrics.baseline_model or 'production')}</h3>"
                     f"<p class='note'>Both models on the same logs; each resample draws the same logs for both. "
                     f"A change (candidate - production) whose {level} interval lies entirely beyond the allowed "
                     f"{metrics.thresholds.get('max_regression', 0):.3f} fails; one that straddles it is not enough "
                     f"evidence. {len(shown)} of {len(comparisons)} comparisons did not pass:</p>"
                     + (_table(["slice", "metric", "candidate", "production", "change", f"{level} CI", "logs",
                                "evidence", "outcome"], shown) if shown else "")
                     + f"<details><summary>all {len(comparisons)} comparisons</summary>"
                     + _table(["slice", "metric", "candidate", "production", "change", f"{level} CI", "logs",
                               "evidence", "outcome"], rows) + "</details>")
    ece = overall["metrics"].get("ece")
    parts.append(f"<div class='row'><div>{plot_reliability(described['reliability'], ece and ece['value'])}</div>"
                 "<div><p class='note'>Expected calibration error: points binned by their top softmax score; ECE is "
                 "the point-weighted mean gap between each bin's accuracy and its mean confidence (0: the scores "
                 "mean what they say). The planner's thresholds and an operator comparing models both rely on "
                 "it.</p></div></div>")
    return "\n".join(parts)


def write_report(folder: str, metrics: EvaluationMetrics) -> str:
    path = os.path.join(folder, REPORT_FILE)
    with open(path, "w") as fh:
        fh.write(render(metrics))
    return path
