"""The validation report: ``validation.json``, offline Data Docs, a class-distribution chart, ``report.html``.

Everything is written into the validation artifact's folder:

* ``validation.json``          the verdict, every check with its outcome in words, the class distribution
                               against the previous version and the sentences naming what moved most.
* ``data_docs/``               the Great Expectations Data Docs site, post-processed (``make_offline``) so
                               that it renders without network: GE's pages load Bootstrap, jQuery,
                               bootstrap-table, Font Awesome and Vega from CDNs; we drop those, inline a
                               small stylesheet covering the classes the pages use, render the index
                               tables (normally filled by bootstrap-table) and the Vega charts (as tables)
                               into plain HTML, and point the logo at the copy in ``static/``.
* ``class_distribution.png``   current vs previous class shares (whole dataset, and the city that moved
                               most), with the biggest moves named in words.
* ``report.html``              one self-contained page: verdict, failures, the chart, all checks, links
                               into the Data Docs.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import json
import os
import re
from typing import Any

from pipeline.taxonomy import CLASSES, NUM_CLASSES
from spark_jobs import dataset_stats as stats_mod
from spark_jobs import expectations as suite_mod

FORMAT = 1  # bump when the report's layout changes (part of the validation artifact's content key)
RESULT_FILE = "validation.json"
REPORT_FILE = "report.html"
CHART_FILE = "class_distribution.png"
DATA_DOCS = "data_docs"
DRIFT_CHECKS = ("class_share_drift", "class_kl_drift")
MOVERS = 3  # how many of the largest class-share moves are named in words
MIN_MOVE = 0.005  # smaller moves than half a percentage point are not worth a sentence


def write(folder: str, *, record, dataset, previous, statistics: dict, previous_statistics: dict | None,
          results: list, tables: dict, vcfg) -> dict[str, Any]:
    """Write every report file into ``folder`` and return the summary stored as ``validation.json``.
    ``vcfg`` is the ``validate`` config section the checks ran with."""
    verdict = "passed" if all(r.success for r in results) else "failed"
    movers = moved_most(tables.get("class_drift"))
    distribution = class_distribution(statistics, previous_statistics)
    compared, skipped = (suite_mod.city_drift_plan(statistics, previous_statistics, vcfg)
                         if previous_statistics is not None else ([], {}))
    draw_chart(os.path.join(folder, CHART_FILE), dataset.ref, previous.ref if previous else None, statistics,
               previous_statistics, tables.get("class_drift"), movers)
    docs = os.path.join(folder, DATA_DOCS)
    make_offline(docs)
    summary = {
        "format": FORMAT, "validation": record.ref, "dataset": dataset.ref,
        "previous": previous.ref if previous else None, "verdict": verdict,
        "checks": [{**_plain(vars(r)), "line": r.line()} for r in results],
        "skipped": [] if previous_statistics is not None else list(DRIFT_CHECKS),
        "skipped_reason": "" if previous_statistics is not None else
        f"{dataset.ref} is the first validated version: nothing to compare with",
        "distribution": distribution, "movers": movers, "thresholds": dataclasses.asdict(vcfg),
        "city_drift": {"compared": compared, "skipped": skipped},
        "files": {"report": REPORT_FILE, "chart": CHART_FILE, "data_docs": f"{DATA_DOCS}/index.html",
                  "validation_pages": _validation_pages(docs)},
    }
    with open(os.path.join(folder, RESULT_FILE), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    with open(os.path.join(folder, REPORT_FILE), "w") as fh:
        fh.write(report_html(summary))
    return summary


def _plain(value: Any) -> Any:
    """numpy scalars and other oddities from GE results -> JSON-ready values."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# ----------------------------------------------------------------------------------------- words
def class_distribution(statistics: dict, previous: dict | None) -> list[dict[str, Any]]:
    """Share of points per class over all splits, now and (when there is one) in the previous version."""
    now = suite_mod.shares(stats_mod.total_class_points(statistics))
    before = suite_mod.shares(stats_mod.total_class_points(previous)) if previous is not None else None
    return [{"class_name": CLASSES[c], "current_share": now[c], "previous_share": before[c] if before else None}
            for c in range(NUM_CLASSES)]


def moved_most(drift) -> list[str]:
    """Sentences for the largest class-share moves (any scope): "pedestrian share rose from 2.1% to 9.8%
    in city boston"."""
    if drift is None or drift.empty:
        return []
    rows = drift.sort_values(["abs_change", "key"], ascending=[False, True])
    out = []
    for row in rows.to_dict("records"):
        if len(out) == MOVERS or row["abs_change"] < MIN_MOVE:
            break
        where = "over the whole dataset" if row["scope"] == suite_mod.SCOPE_ALL else f"in {suite_mod.scope_words(row['scope'])}"
        direction = "rose" if row["current_share"] > row["previous_share"] else "fell"
        out.append(f"{row['class_name']} share {direction} from {100 * row['previous_share']:.1f}% to "
                   f"{100 * row['current_share']:.1f}% {where}")
    return out


# ----------------------------------------------------------------------------------------- chart
def draw_chart(path: str, dataset_ref: str, previous_ref: str | None, statistics: dict,
               previous_statistics: dict | None, drift, movers: list[str]) -> None:
    """Grouped bars of class shares, current vs previous, for the whole dataset and for the city whose
    distribution moved most; the moves are written under the bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on pipeline workers
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("whole dataset", None)]
    if drift is not None and not drift.empty:
        cities = drift[drift["scope"] != suite_mod.SCOPE_ALL]
        if not cities.empty:
            worst = cities.sort_values(["abs_change", "key"], ascending=[False, True]).iloc[0]["scope"]
            panels.append((suite_mod.scope_words(worst), worst.split(":", 1)[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    x = np.arange(NUM_CLASSES)
    for ax, (label, city) in zip(axes[0], panels):
        now = suite_mod.shares(stats_mod.total_class_points(statistics, city))
        offset = 0.2 if previous_statistics is not None else 0.0  # side by side only when there are two
        ax.bar(x + offset, [100 * now[c] for c in x], 0.4, label=dataset_ref, color="#1f77b4")
        if previous_statistics is not None:
            before = suite_mod.shares(stats_mod.total_class_points(previous_statistics, city))
            ax.bar(x - 0.2, [100 * before[c] for c in x], 0.4, label=previous_ref, color="#aaaaaa")
        ax.set_xticks(x, CLASSES, rotation=35, ha="right")
        ax.set_ylabel("share of points (%)")
        ax.set_title(f"class distribution: {label}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    words = movers or (["first validated version: no previous version to compare with"]
                       if previous_statistics is None else ["no class share moved by half a point or more"])
    fig.text(0.01, 0.01, "\n".join(words), fontsize=10, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.05 + 0.035 * len(words), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- report.html
_REPORT_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.verdict{display:inline-block;padding:.2em .7em;border-radius:4px;color:#fff;font-weight:bold}
.passed{background:#2e7d32}.failed{background:#c62828}.skipped{background:#777}
table{border-collapse:collapse;width:100%;font-size:.92em}td,th{border:1px solid #ddd;padding:.35em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}tr.fail td{background:#fdecea}
img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 .2em}
"""


def report_html(summary: dict) -> str:
    """One page, no external resources: verdict, failed checks, the chart, every check, links to Data Docs."""
    e = html.escape
    verdict = summary["verdict"]
    failed = [c for c in summary["checks"] if not c["success"]]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(summary['validation'])}: {verdict}</title>",
             f"<style>{_REPORT_CSS}</style></head><body>",
             f"<h1>{e(summary['dataset'])} <span class='verdict {verdict}'>{verdict}</span></h1>",
             f"<p>{e(summary['validation'])}; compared with "
             f"{e(summary['previous'] or 'nothing (first validated version: drift checks skipped)')}.</p>"]
    if failed:
        parts.append("<h2>Failed expectations</h2><ul>")
        parts += [f"<li><code>{e(c['name'])}</code>: {e('; '.join(c['problems']) or c['title'])}</li>" for c in failed]
        parts.append("</ul>")
    skipped_cities = summary.get("city_drift", {}).get("skipped", {})
    if skipped_cities:
        parts.append("<p>Cities without a drift check of their own (they still count in the whole-dataset check): "
                     + "; ".join(f"{e(c)} ({e(why)})" for c, why in skipped_cities.items()) + "</p>")
    if summary["movers"]:
        parts.append("<h2>What moved most</h2><ul>" + "".join(f"<li>{e(m)}</li>" for m in summary["movers"]) + "</ul>")
    parts.append(f"<h2>Class distribution</h2><img src='{CHART_FILE}' alt='class distribution chart'>")
    parts.append("<h2>Expectations</h2><table><tr><th>expectation</th><th>status</th><th>what</th><th>details</th></tr>")
    for c in summary["checks"]:
        status = "passed" if c["success"] else "failed"
        parts.append(f"<tr class='{'fail' if not c['success'] else ''}'><td><code>{e(c['name'])}</code></td>"
                     f"<td><span class='verdict {status}'>{status}</span></td><td>{e(c['title'])}</td>"
                     f"<td>{e('; '.join(c['problems']))}</td></tr>")
    for name in summary["skipped"]:
        parts.append(f"<tr><td><code>{e(name)}</code></td><td><span class='verdict skipped'>skipped</span></td>"
                     f"<td colspan=2>{e(summary['skipped_reason'])}</td></tr>")
    parts.append("</table><h2>Great Expectations Data Docs</h2><ul>"
                 f"<li><a href='{DATA_DOCS}/index.html'>index of all validation results and suites</a></li>")
    parts += [f"<li><a href='{e(page)}'>{e(page.split('/')[2])}</a></li>" for page in summary["files"]["validation_pages"]]
    parts.append("</ul><h2>Thresholds (validate.*)</h2><table>")
    parts += [f"<tr><td><code>{e(k)}</code></td><td>{e(str(v))}</td></tr>" for k, v in summary["thresholds"].items()]
    parts.append("</table></body></html>")
    return "\n".join(parts)


def _validation_pages(docs: str) -> list[str]:
    out = []
    for folder, _dirs, files in os.walk(os.path.join(docs, "validations")):
        out += [os.path.relpath(os.path.join(folder, f), os.path.dirname(docs)) for f in files if f.endswith(".html")]
    return sorted(out)


# ----------------------------------------------------------------------------------------- offline Data Docs
# The subset of Bootstrap 4 the Data Docs templates use, enough for a readable page without the CDN.
OFFLINE_CSS = """
*,::after,::before{box-sizing:border-box}
body{margin:0;font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;font-size:15px;line-height:1.5;
color:#212529;background:#fff}
a{color:#007bff;text-decoration:none}a:hover{text-decoration:underline}
h1,h2,h3,h4,h5,h6{margin:.4em 0 .5em;font-weight:500;line-height:1.2}h3{font-size:1.5rem}h4{font-size:1.3rem}
h5{font-size:1.1rem}h6{font-size:1rem}
.navbar{display:flex;align-items:center;padding:.5rem 1rem;background:#fff}
.sticky-top{position:sticky;top:0;z-index:1020}.border-bottom{border-bottom:1px solid #dee2e6}
.container-fluid{width:100%;padding-right:15px;padding-left:15px;margin:0 auto}
.row{display:flex;flex-wrap:wrap;margin-right:-15px;margin-left:-15px}
[class*=col-]{position:relative;width:100%;padding-right:15px;padding-left:15px}
.col-12{flex:0 0 100%;max-width:100%}
@media (min-width:768px){.col-md-2{flex:0 0 16.66%;max-width:16.66%}.col-md-10{flex:0 0 83.33%;max-width:83.33%}
.col-md-6{flex:0 0 50%;max-width:50%}.col-md-4{flex:0 0 33.33%;max-width:33.33%}
.col-md-8{flex:0 0 66.66%;max-width:66.66%}.col-md-3{flex:0 0 25%;max-width:25%}.col-md-9{flex:0 0 75%;max-width:75%}}
.card{position:relative;display:flex;flex-direction:column;border:1px solid rgba(0,0,0,.125);border-radius:.25rem;
margin-bottom:1rem;background:#fff}
.card-header{padding:.6rem 1rem;background:rgba(0,0,0,.03);border-bottom:1px solid rgba(0,0,0,.125)}
.card-body{padding:1rem}
.alert{padding:.6rem 1rem;margin-bottom:1rem;border:1px solid transparent;border-radius:.25rem}
.alert-secondary{color:#383d41;background:#e2e3e5;border-color:#d6d8db}
.table,table{width:100%;margin-bottom:1rem;border-collapse:collapse}
.table td,.table th,table td,table th{padding:.4rem .6rem;vertical-align:top;border-top:1px solid #dee2e6;text-align:left}
.table thead th,table thead th{border-bottom:2px solid #dee2e6;background:#f8f9fa}
.table-sm td,.table-sm th{padding:.3rem}
.table-striped tbody tr:nth-of-type(odd){background:rgba(0,0,0,.03)}
.badge{display:inline-block;padding:.25em .4em;font-size:75%;font-weight:700;border-radius:.25rem;background:#e9ecef}
.badge-info{background:#17a2b8;color:#fff}.badge-secondary{background:#6c757d;color:#fff}
.text-danger{color:#dc3545!important}.text-success{color:#28a745!important}.text-muted{color:#6c757d!important}
.text-info{color:#17a2b8}.text-warning{color:#b8860b}
.btn{display:inline-block;padding:.25rem .5rem;border:1px solid #6c757d;border-radius:.2rem;font-size:.875rem;
background:#fff;color:#333}
.nav{display:flex;flex-wrap:wrap;padding-left:0;margin-bottom:0;list-style:none}
.nav-tabs{display:flex;list-style:none;padding-left:0;border-bottom:1px solid #dee2e6;margin-bottom:1rem}
.nav-link{display:block;padding:.5rem 1rem}.nav-tabs .nav-link.active{border:1px solid #dee2e6;border-bottom-color:#fff;
border-radius:.25rem .25rem 0 0}
.tab-pane{display:block;margin-bottom:2rem}
.list-group{padding-left:0;margin-bottom:0}.list-group-item{display:block;padding:.4rem .8rem;
border:1px solid rgba(0,0,0,.125);margin-bottom:-1px}
.d-none{display:none!important}.d-flex{display:flex!important}.float-left{float:left}.float-right{float:right}
.m-0{margin:0!important}.p-0{padding:0!important}.mb-1{margin-bottom:.25rem}.mb-2{margin-bottom:.5rem}
.mb-4{margin-bottom:1.5rem}.mt-1{margin-top:.25rem}.mt-2{margin-top:.5rem}.ml-1{margin-left:.25rem}
.pt-4{padding-top:1.5rem}.pb-4{padding-bottom:1.5rem}.pl-5{padding-left:3rem}.pr-5{padding-right:3rem}
.px-0{padding-left:0;padding-right:0}.mr-auto{margin-right:auto}.align-items-center{align-items:center}
.show-scrollbars{overflow-x:auto}
.ge-offline-note{font-size:.85em;color:#6c757d}
[id$=-body-table-toolbar]{display:none}
.fas,.far,.fa{font-style:normal;display:inline-block;min-width:1em}
.fa-check-circle::before,.fa-check::before{content:"\\2714";color:#28a745}
.fa-times::before,.fa-times-circle::before{content:"\\2718";color:#dc3545}
.fa-exclamation-triangle::before{content:"\\26A0"}.fa-info-circle::before{content:"\\2139"}
.fa-question-circle::before{content:"?"}.fa-home::before{content:"\\2302"}
.fa-clipboard-check::before,.fa-external-link-alt::before,.fa-list-alt::before,.fa-copy::before{content:"\\2022"}
footer{padding:1rem 3rem;color:#6c757d;font-size:.85em}
"""

_REMOTE_CSS = re.compile(r"<link\b[^>]*\bhref=\"https?://[^\"]*\"[^>]*>\s*", re.I)
_REMOTE_JS = re.compile(r"<script\b[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>\s*", re.I)
_REMOTE_CSS_URL = re.compile(r"url\(\s*['\"]?https?://[^)]*\)")
_REMOTE_LOGO = re.compile(r"src=\"https?://great-expectations-web-assets[^\"]*?/([\w.-]+?\.(?:png|svg))[^\"]*\"")
_TABLE_SCRIPT = re.compile(
    r"<table\s+id=\"(?P<id>[^\"]+)\"(?P<attrs>[^>]*)>\s*</table>(?P<between>.*?)<script>\s*\$\('#(?P=id)'\)"
    r"\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*columns:\s*(?P<columns>\[.*?\]),\s*data:\s*(?P<data>\[.*?\]),"
    r"\s*toolbar:.*?</script>", re.S)
_GRAPH_SCRIPT = re.compile(r"<script>\s*//[^\n]*\n\s*vlSpec\s*=\s*(?P<spec>\{.*?\});\s*//.*?vegaEmbed\(.*?</script>", re.S)
_JQUERY_SCRIPT = re.compile(r"<script>(?:(?!</script>).)*?\$\((?:(?!</script>).)*</script>\s*", re.S)


def make_offline(docs: str) -> None:
    """Rewrite every page of the Data Docs site at ``docs`` so it renders with no network at all."""
    for folder, _dirs, files in os.walk(docs):
        for name in files:
            if name.endswith(".html"):
                path = os.path.join(folder, name)
                depth = os.path.relpath(docs, folder)
                with open(path, encoding="utf-8") as fh:
                    page = fh.read()
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(offline_page(page, "" if depth == "." else depth + "/"))


def offline_page(page: str, to_root: str) -> str:
    """One Data Docs page without CDN resources: tables and charts pre-rendered, a local stylesheet."""
    page = _REMOTE_CSS.sub("", page)
    page = _REMOTE_JS.sub("", page)
    page = _REMOTE_LOGO.sub(lambda m: f"src=\"{to_root}static/images/{m.group(1)}\"", page)
    page = _REMOTE_CSS_URL.sub("none", page)
    page = _TABLE_SCRIPT.sub(_static_table, page)
    page = _GRAPH_SCRIPT.sub(_static_graph, page)
    page = _JQUERY_SCRIPT.sub("", page)  # what is left needs jQuery/Bootstrap JS: modals, tooltips, row clicks
    return page.replace("</head>", f"<style>{OFFLINE_CSS}</style>\n</head>", 1)


def _static_table(match: re.Match) -> str:
    """A bootstrap-table the page would fill from JS, rendered as a plain HTML table (links kept)."""
    try:
        columns = ast.literal_eval(match.group("columns"))
        rows = ast.literal_eval(match.group("data"))
    except (ValueError, SyntaxError):
        return match.group(0)
    head = "".join(f"<th>{html.escape(str(c.get('title', c['field'])))}</th>" for c in columns)
    body = []
    for row in rows:
        link = row.get("_table_row_link_path")
        cells = []
        for i, c in enumerate(columns):
            value = str(row.get(c["field"], ""))  # already HTML, rendered by GE
            if i == 0 and link and "<a " not in value:
                value = f"<a href=\"{html.escape(link)}\">{value}</a>"
            cells.append(f"<td>{value}</td>")
        if link and len(columns) > 1:
            cells.append(f"<td><a href=\"{html.escape(link)}\">open</a></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if rows and any(r.get("_table_row_link_path") for r in rows) and len(columns) > 1:
        head += "<th></th>"
    return (f"<table id=\"{match.group('id')}\" class=\"table table-sm\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _static_graph(match: re.Match) -> str:
    """A Vega-Lite chart (Vega comes from a CDN) drawn as inline SVG bars, or as a table of its values."""
    text = match.group("spec")
    try:
        spec = json.loads(text)
    except ValueError:
        try:
            spec = ast.literal_eval(text)  # GE writes the spec as a Python dict repr
        except (ValueError, SyntaxError):
            spec = None
    values = _spec_values(spec) if spec else []
    if not values:
        return "<p class=\"ge-offline-note\">(chart omitted: it needs Vega from the network)</p>"
    encoding = spec.get("encoding", {}) if isinstance(spec, dict) else {}
    x, y = encoding.get("x", {}).get("field"), encoding.get("y", {}).get("field")
    if x and y and all(isinstance(v.get(y), (int, float)) for v in values):
        return _svg_bars([(str(v.get(x)), float(v[y])) for v in values], y)
    fields = list(dict.fromkeys(k for v in values for k in v))
    head = "".join(f"<th>{html.escape(f)}</th>" for f in fields)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v.get(f)))}</td>" for f in fields) + "</tr>"
                   for v in values)
    return f"<table class=\"table table-sm\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg_bars(bars: list[tuple[str, float]], measure: str) -> str:
    """Horizontal bars as inline SVG: label, bar, value; no script, no network."""
    top = max([abs(v) for _, v in bars] + [1e-12])
    row, label_w, bar_w = 18, 110, 150
    rows = []
    for i, (label, value) in enumerate(bars):
        y = i * row
        width = bar_w * abs(value) / top
        rows.append(f"<text x='{label_w - 6}' y='{y + 13}' text-anchor='end'>{html.escape(label)}</text>"
                    f"<rect x='{label_w}' y='{y + 3}' width='{width:.1f}' height='{row - 6}' fill='#4c78a8'/>"
                    f"<text x='{label_w + width + 4:.1f}' y='{y + 13}'>{html.escape(_fmt(value))}</text>")
    return (f"<svg class='ge-offline-chart' width='{label_w + bar_w + 60}' height='{row * len(bars)}' "
            f"font-size='11' role='img' aria-label='{html.escape(measure)}'>{''.join(rows)}</svg>")


def _spec_values(spec: Any) -> list[dict]:
    if isinstance(spec, dict):
        data = spec.get("data")
        if isinstance(data, dict) and isinstance(data.get("values"), list):
            return [v for v in data["values"] if isinstance(v, dict)]
        if isinstance(spec.get("datasets"), dict):
            return [v for vs in spec["datasets"].values() for v in vs if isinstance(v, dict)]
        for key in ("layer", "vconcat", "hconcat"):
            for sub in spec.get(key, []) or []:
                found = _spec_values(sub)
                if found:
                    return found
    return []


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
