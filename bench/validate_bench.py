"""Validation benchmark: the time ``avp validate`` takes on a demo-sized dataset, against one plain Spark
count and one plain Spark scan of the same files, in the same run and the same warm Spark session.

    .venv/bin/python -m bench.validate_bench [--logs 24 --frames 20 --days 3]

The demo fleet is simulated and ingested twice: the first ``days - 1`` days (validated first, so it is the
"previous version") and then every day. The timed run validates the second version from scratch: one
Spark statistics pass over it (the previous version's statistics are reused, as in production), the GE
suite with the drift checks, Data Docs, the chart and the report. The baselines:

* ``count``: ``spark.read.parquet(files).count()``, which Spark answers from the Parquet footers;
* ``scan``: every row's ``points`` and ``labels`` bytes read into Python (what any Python pass over the
  frames pays before it decodes anything).

Baselines are the faster of two runs each; the validation runs once (a second run would be a cache hit).

Prints a markdown table row (and its header) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time

from pipeline import config, stages
from pipeline.registry import Registry


def _cfg(home: str, logs: int, frames: int, days: int, date_to: str = ""):
    overrides = {"home": home, "simulate.logs": logs, "simulate.frames": frames, "simulate.days": days,
                 "ingest.date_to": date_to}
    return config.load(overrides, env={})


def best_of(runs: int, job):
    """(result, fastest wall time) of ``runs`` runs: the first run of a job pays one-off JVM warm-up."""
    best, out = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = job()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logs", type=int, default=config.SimulateConfig.logs)
    parser.add_argument("--frames", type=int, default=config.SimulateConfig.frames)
    parser.add_argument("--days", type=int, default=config.SimulateConfig.days)
    parser.add_argument("--home", default="")
    args = parser.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="avp-bench-validate-")
    quiet = lambda _m: None  # noqa: E731

    full = _cfg(home, args.logs, args.frames, args.days)
    start = dt.date.fromisoformat(full.simulate.start_date)
    last_day = (start + dt.timedelta(days=max(1, args.days - 1))).isoformat()
    earlier = _cfg(home, args.logs, args.frames, args.days, date_to=last_day)

    t0 = time.perf_counter()
    stages.invoke("simulate", full, say=quiet)
    stages.invoke("ingest", earlier, say=quiet)
    stages.invoke("validate", earlier, say=quiet)  # the previous version (its statistics are reused below)
    stages.invoke("ingest", full, say=quiet)
    setup_s = time.perf_counter() - t0

    # The timed run: validate the new version (statistics pass + suite + drift + report), warm session.
    t0 = time.perf_counter()
    result = stages.invoke("validate", full, say=quiet, dataset=None)
    validate_s = time.perf_counter() - t0
    registry = Registry.open(full)
    statistics = json.load(open(os.path.join(registry.get(result["statistics"]).location, "statistics.json")))
    stats_s = statistics["elapsed_s"]
    frames = sum(s["frames"] for s in statistics["splits"].values())
    points = sum(s["points"] for s in statistics["splits"].values())

    from spark_jobs.spark import get_session
    from spark_jobs.dataset_stats import split_files

    spark = get_session(full.ingest.spark_master, registry.home)
    files = [f"file://{p}" for paths in split_files(registry.get(result["dataset"]).location).values() for p in paths]
    counted, count_s = best_of(2, lambda: spark.read.parquet(*files).count())
    scanned, scan_s = best_of(2, lambda: spark.read.parquet(*files).select("points", "labels").rdd
                              .map(lambda row: len(row.points) + len(row.labels)).sum())
    assert counted == frames, (counted, frames)

    print(f"setup (simulate {args.logs} logs x {args.frames} frames, 2 ingests, 1 validation): {setup_s:.1f} s; "
          f"verdict of {result['dataset']}: {result['verdict']} (previous: {result['previous']}); "
          f"{scanned / 1e6:.0f} MB of points+labels")
    print("| dataset | frames | points | validate s | of which statistics pass s | suite + drift + report s "
          "| Spark count s | Spark scan s | validate / count | statistics / scan |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.logs} logs x {args.frames} frames | {frames} | {points / 1e6:.1f} M | {validate_s:.1f} "
          f"| {stats_s:.1f} | {validate_s - stats_s:.1f} | {count_s:.2f} | {scan_s:.2f} "
          f"| {validate_s / count_s:.0f}x | {stats_s / scan_s:.1f}x |")


if __name__ == "__main__":
    main()
