"""The ``validate`` stage: statistics, a Great Expectations suite, drift against the last good version, and
the gate in front of training.

The flow, top to bottom:

1. **resolve**     the dataset to check (a reference, a bare version number, or the latest succeeded
                   version of ``ingest.dataset_name``) and read its manifest.
2. **statistics**  one Spark pass over its Petastorm files (``spark_jobs.dataset_stats``), published as a
                   ``statistics`` artifact (parent: the dataset). Content-keyed: re-validating the same
                   dataset with the same code reuses it.
3. **previous**    the newest lower version of the same dataset that passed validation, and its
                   statistics (reused, or computed once). The first version has none: the drift checks
                   are skipped, and the stage says so.
4. **suite**       the expectations (``spark_jobs.expectations``) run by GE over small tables built
                   from the statistics; thresholds come from ``cfg.validate``.
5. **report**      ``validation.json``, GE Data Docs made readable offline, ``class_distribution.png``
                   and a ``report.html`` tying them together (``spark_jobs.validation_report``), all in
                   a ``validation`` artifact (parents: dataset, statistics, previous statistics).
6. **gate**        the verdict is written on the dataset (``meta.validation = passed | failed`` and
                   ``meta.validation_ref``; training refuses anything but ``passed``). A failure raises
                   ``StageFailed`` with one line per failed expectation, unless ``validate.warn_only``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from pipeline.config import PipelineConfig, resolved
from pipeline.contracts import verified_manifest
from pipeline.errors import StageFailed, UserError
from pipeline.home import Home
from pipeline.registry import Artifact, NotFound, Registry, parse_ref
from spark_jobs import expectations as suite_mod
from spark_jobs import dataset_stats as stats_mod
from spark_jobs import validation_report as report_mod
from spark_jobs.split import SPLITS

CODE_MODULES = ("spark_jobs.validate",)  # the statistics builder lives here too


def run(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None] = print, run_id: str = "",
        dataset: str | None = None) -> dict[str, Any]:
    """Validate a dataset and record the verdict on it; see the module docstring for the steps."""
    vcfg = cfg.validate
    # 1. resolve
    data = resolve_dataset(registry, cfg, dataset)
    manifest = verified_manifest(data, say)  # every file checked before any reader opens one
    say(f"validating {data.ref}")

    # 2. statistics
    stats_art = statistics_artifact(cfg, registry, data, say)
    statistics = read_json(os.path.join(stats_art.location, stats_mod.STATISTICS_FILE), stats_art.ref)

    # 3. previous version
    previous = previous_dataset(registry, data)
    previous_stats_art, previous_statistics = None, None
    if previous is None:
        say(f"{data.ref} is the first version of {data.name} to be validated: no previous version to "
            f"compare with, so the drift checks (class_share_drift, class_kl_drift) are skipped")
    else:
        say(f"comparing class distributions with {previous.ref}, the last version that passed validation")
        previous_stats_art = statistics_artifact(cfg, registry, previous, say)
        previous_statistics = read_json(os.path.join(previous_stats_art.location, stats_mod.STATISTICS_FILE),
                                        previous_stats_art.ref)
        compared, skipped = suite_mod.city_drift_plan(statistics, previous_statistics, vcfg)
        if compared:
            say(f"per-city drift checks for {', '.join(compared)}")
        for city, why in skipped.items():
            say(f"no per-city drift check for {city}: {why} (it still counts in the whole-dataset check)")

    # 4 + 5. suite and report, inside the validation artifact (content-keyed like everything else)
    target_shares = manifest.shares

    def build(staging: str, record: Artifact) -> dict:
        inputs = suite_mod.SuiteInputs(statistics, manifest, previous_statistics, vcfg, target_shares)
        checks, tables = suite_mod.build_checks(inputs), suite_mod.build_tables(inputs)
        results = suite_mod.run_suite(tables, checks, os.path.join(staging, report_mod.DATA_DOCS), data.ref)
        summary = report_mod.write(staging, record=record, dataset=data, previous=previous,
                                   statistics=statistics, previous_statistics=previous_statistics,
                                   results=results, tables=tables, vcfg=vcfg)
        return {"verdict": summary["verdict"], "dataset": data.ref,
                "previous": previous.ref if previous else None,
                "failed_checks": sorted({r["name"] for r in summary["checks"] if not r["success"]})}

    key_config = {"validate": {k: v for k, v in resolved(vcfg).items() if k != "warn_only"},
                  "dataset": data.ref, "previous": previous.ref if previous else None,
                  "target_shares": target_shares, "report_format": report_mod.FORMAT}
    parents = [data, stats_art] + ([previous_stats_art] if previous_stats_art else [])
    validation = registry.build("validation", data.name, entry_point="spark_jobs.validate:run", config=key_config,
                                builder=build, parents=parents, code_modules=CODE_MODULES, force=cfg.force,
                                say=say)
    summary = read_json(os.path.join(validation.location, report_mod.RESULT_FILE), validation.ref)
    report = os.path.join(validation.location, report_mod.REPORT_FILE)

    # 6. gate
    verdict = summary["verdict"]
    registry.update_meta(data.id, validation=verdict, validation_ref=validation.ref)
    failures = [check["line"] for check in summary["checks"] if not check["success"]]
    for sentence in summary.get("movers", []):
        say(f"moved most: {sentence}")
    result = {"ref": validation.ref, "dataset": data.ref, "verdict": verdict,
              "previous": previous.ref if previous else None, "statistics": stats_art.ref,
              "report": report, "tables": cli_tables(validation, data, summary, statistics)}
    if verdict == "passed":
        say(f"{data.ref} passed validation ({len(summary['checks'])} expectations); report: {report}")
        return result
    message = "\n".join([f"{data.ref} failed validation: {len(failures)} expectation(s) failed",
                         *[f"  - {line}" for line in failures], f"report: {report}"])
    if vcfg.warn_only:
        say(message)
        say(f"--warn-only: not stopping; {data.ref} is marked as failed validation, so training will refuse it")
        return result
    raise StageFailed(message)


# ----------------------------------------------------------------------------------------- resolve
def resolve_dataset(registry: Registry, cfg: PipelineConfig, dataset: str | None) -> Artifact:
    """The dataset artifact a reference, a bare version number or None (latest succeeded) names."""
    name = cfg.ingest.dataset_name
    if dataset is None or str(dataset).strip() == "":
        ref = f"dataset:{name}"
    elif str(dataset).strip().lstrip("v").isdigit():
        ref = f"dataset:{name}@v{int(str(dataset).strip().lstrip('v'))}"
    else:
        ref = str(dataset).strip()
    try:
        kind, _, _ = parse_ref(ref)
        if kind not in (None, "dataset"):
            raise UserError(f"{ref} is not a dataset reference: validate checks datasets (dataset:NAME@vN)")
        art = registry.get(ref if kind else f"dataset:{ref}")
    except NotFound as exc:
        hint = " (run `avp ingest` first)" if dataset is None else ""
        raise UserError(f"{exc}{hint}") from None
    if art.state != "succeeded":
        raise UserError(f"{art.ref} is {art.state}; only a succeeded dataset can be validated")
    return art


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{what} has no {os.path.basename(path)} at {path}") from None


def previous_dataset(registry: Registry, data: Artifact) -> Artifact | None:
    """The newest succeeded lower version of the same dataset whose recorded verdict is ``passed``."""
    candidates = [a for a in registry.list("dataset", data.name, "succeeded")
                  if a.version < data.version and a.meta.get("validation") == "passed"]
    return max(candidates, key=lambda a: a.version) if candidates else None


# ----------------------------------------------------------------------------------------- statistics
def statistics_artifact(cfg: PipelineConfig, registry: Registry, data: Artifact,
                        say: Callable[[str], None]) -> Artifact:
    """The ``statistics`` artifact of ``data``: reused when its content key matches, else one Spark pass."""

    def build(staging: str, record: Artifact) -> dict:
        from spark_jobs.spark import get_session

        spark = get_session(cfg.ingest.spark_master, Home.from_config(cfg.home), app_name=f"avp-validate-{data.ref}")
        say(f"computing statistics of {data.ref} with Spark ({cfg.ingest.spark_master or 'spark-submit master'})")
        statistics = stats_mod.compute(spark, data.location)
        statistics["dataset"] = data.ref
        with open(os.path.join(staging, stats_mod.STATISTICS_FILE), "w") as fh:
            json.dump(statistics, fh, indent=2)
        frames = sum(s["frames"] for s in statistics["splits"].values())
        say(f"statistics of {frames} frames in {statistics['elapsed_s']:.1f} s")
        return {"dataset": data.ref, "frames": frames}

    # spark_master does not change the numbers, so it is not part of the key
    return registry.build("statistics", data.name, entry_point="spark_jobs.dataset_stats:compute",
                          config={"format": stats_mod.FORMAT, "dataset": data.ref}, builder=build,
                          parents=[data], code_modules=CODE_MODULES, force=cfg.force, say=say)


# ----------------------------------------------------------------------------------------- output
def cli_tables(validation: Artifact, data: Artifact, summary: dict, statistics: dict) -> list:
    """What ``avp validate`` prints: the checks, the class distribution and the splits."""
    checks: dict[str, list[dict]] = {}
    for check in summary["checks"]:
        checks.setdefault(check["name"], []).append(check)
    check_rows = []
    for name, group in checks.items():
        failed = [c for c in group if not c["success"]]
        detail = ("; ".join(p for c in failed for p in c["problems"][:3]) if failed
                  else group[0]["title"] + (f" (and {len(group) - 1} more like it)" if len(group) > 1 else ""))
        check_rows.append([name, "FAILED" if failed else "ok", detail])
    for name in summary.get("skipped", []):
        check_rows.append([name, "skipped", summary.get("skipped_reason", "")])
    title = f"{validation.ref}: {summary['verdict']} for {data.ref}" + (" (cache hit)" if validation.cached else "")
    dist_rows = [[row["class_name"], _pct(row.get("previous_share")), _pct(row["current_share"]),
                  "" if row.get("previous_share") is None else f"{100 * (row['current_share'] - row['previous_share']):+.1f} pp"]
                 for row in summary["distribution"]]
    split_rows = [[split, len(statistics["splits"][split]["logs"]), statistics["splits"][split]["frames"],
                   statistics["splits"][split]["points"]] for split in SPLITS]
    prev = summary.get("previous") or "no previous version"
    return [(title, ["expectation", "status", "details"], check_rows),
            (f"class distribution (all splits) vs {prev}", ["class", "previous", "current", "change"], dist_rows),
            ("splits", ["split", "logs", "frames", "points"], split_rows)]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"
