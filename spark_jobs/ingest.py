"""Ingest: drive logs -> Petastorm train/test/val datasets, one row per frame, registered with lineage.

The flow, top to bottom:

1. **select**   list the source's logs, read each log's metadata (cheap), keep those recorded in
                ``[date_from, date_to)``; record every selected log as a ``log`` artifact (its checksum).
2. **split**    give every log its split (sticky and balanced; see ``spark_jobs.split``).
3. **extract**  Spark, one task per log: decode frames, run the quality checks, encode rows with the
                Unischema. A log failing any check is quarantined with its reason; the rest go on.
4. **lay out**  per split, cut the frames (ordered by log and frame index) into row groups whose sizes
                differ by at most one row, in a number that is a multiple of ``reader_ranks``: Petastorm
                gives row group ``i`` to rank ``i % ranks``, so every rank gets the same number of rows
                (within one).
5. **write**    Spark, one task per row group: one Parquet file with one row group, then Petastorm's
                metadata; a ``manifest.json`` lists logs per split, counts, checksums and quarantined logs.

All of it runs inside ``Registry.build``: the dataset is written to a staging folder and only marked
succeeded once complete, and an unchanged selection (same logs, code and config) is a cache hit.
Runnable in-process (``avp ingest``) or with ``spark-submit spark_jobs/ingest.py [--set k=v ...]``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from pipeline.config import PipelineConfig, resolved
from pipeline.errors import UserError
from pipeline.home import Home, check_name
from pipeline.registry import Artifact, Registry
from spark_jobs import split as splitting

SOURCE_MODULES = {
    "mcap": "spark_jobs.sources.mcap_log",
    "kitti": "spark_jobs.sources.kitti",
    "semantickitti": "spark_jobs.sources.semantickitti",
    "av2": "spark_jobs.sources.av2",
}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LogTask:
    """What a Spark task needs to extract one log (plain data, cheap to ship to workers)."""

    source: str
    handle: str
    log_id: str
    city: str
    split: str
    sample_weight: float
    sha256: str


def source_module(source: str):
    return importlib.import_module(SOURCE_MODULES[source])


# ----------------------------------------------------------------------------------------- select
def _day_ns(day: str, field: str) -> int:
    try:
        return int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp() * 1e9)
    except ValueError:
        raise UserError(f"config field {field}: {day!r} is not a date (YYYY-MM-DD)") from None


def _files_of(handle: str) -> list[str]:
    if os.path.isdir(handle):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(handle) for f in fs)
    return [handle] if os.path.isfile(handle) else []


def checksum(paths: Iterable[str]) -> str:
    """sha256 over the files' bytes (and names, so a rename is a change)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def select_logs(cfg: PipelineConfig, home: Home, say: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """(selected logs, logs whose metadata cannot be read) for the configured source and date interval."""
    ing = cfg.ingest
    root = ing.source_path or (home.logs if ing.source == "mcap" else "")
    if not root:
        raise UserError(f"ingest --source {ing.source} needs a PATH to the dataset")
    if not os.path.exists(root):
        raise UserError(f"no drive logs at {root}: run `avp simulate` first or pass --source KIND PATH")
    module = source_module(ing.source)
    lo = _day_ns(ing.date_from, "ingest.date_from") if ing.date_from else -math.inf
    hi = _day_ns(ing.date_to, "ingest.date_to") if ing.date_to else math.inf
    selected, unreadable = [], []
    handles = module.list_logs(root)
    if not handles:
        raise UserError(f"no drive logs in {root}: run `avp simulate` first or pass --source KIND PATH")
    for handle in handles:
        files = getattr(module, "source_files", _files_of)(handle)
        try:
            meta = module.read_metadata(handle) if hasattr(module, "read_metadata") else module.read_log(handle)[0]
        except Exception as exc:  # corrupt header / missing files: quarantined, never fatal for the others
            name = os.path.splitext(os.path.basename(handle.rstrip("/")))[0]
            unreadable.append({"log_id": name, "handle": handle, "reason": f"unreadable: {exc}",
                               "sha256": checksum(files)})
            continue
        if lo <= meta.start_time_ns < hi:
            selected.append({"meta": meta, "handle": handle, "sha256": checksum(files)})
    if not selected and not unreadable:
        raise UserError(f"no drive logs in {root} between {ing.date_from or 'the beginning'} and "
                        f"{ing.date_to or 'now'}")
    say(f"selected {len(selected)} logs from {root}" + (f" ({len(unreadable)} unreadable)" if unreadable else ""))
    return selected, unreadable


# ----------------------------------------------------------------------------------------- split
def _first_gps(source: str, handle: str) -> tuple[float, float]:
    _meta, frames = source_module(source).read_log(handle)
    try:
        frame = next(iter(frames))
        return float(frame.gps[0]), float(frame.gps[1])
    except Exception:
        return math.nan, math.nan


def assign_splits(cfg: PipelineConfig, registry: Registry, logs: list[dict]) -> dict[str, str]:
    """log id -> split, sticky in the registry ledger of this dataset name and split mode."""
    ing = cfg.ingest
    shares = {"train": ing.train_share, "test": ing.test_share, "val": ing.val_share}
    ledger = f"split:{ing.dataset_name}:{ing.split}"
    ids = [log["meta"].log_id for log in logs]
    if ing.split == "hash":
        return registry.sticky_assign(ledger, ids, lambda old, new: splitting.assign_balanced(old, new, shares))
    # GeoSplit: every log takes the split of the cell its first GPS fix falls in.
    cells = {log["meta"].log_id: splitting.geo_cell(*_first_gps(ing.source, log["handle"]), ing.geo_cell_m)
             for log in logs}
    logs_per_cell: dict[str, int] = {}
    for cell in cells.values():
        logs_per_cell[cell] = logs_per_cell.get(cell, 0) + 1
    by_cell = registry.sticky_assign(
        ledger, sorted(logs_per_cell),
        lambda old, new: splitting.assign_balanced(old, new, shares, weights=logs_per_cell))
    return {log_id: by_cell[cell] for log_id, cell in cells.items()}


# ----------------------------------------------------------------------------------------- extract
def extract_log(task: LogTask, max_points: int) -> list[tuple[str, Any]]:
    """Decode, check and encode one log. Returns ``("row", ...)`` items and one ``("log", summary)``,
    or a single ``("quarantine", {...})`` if anything about the log is wrong."""
    from spark_jobs.quality import frame_problem, normalise
    from spark_jobs.schema import encode_frame

    rows, points, class_points = [], 0, {}
    try:
        _meta, frames = source_module(task.source).read_log(task.handle)
        for frame in frames:
            frame = normalise(frame)
            problem = frame_problem(frame, max_points)
            if problem is None and frame.log_id != task.log_id:
                problem = f"frame {frame.frame_index}: belongs to log {frame.log_id!r}"
            if problem is not None:
                return [("quarantine", {"log_id": task.log_id, "handle": task.handle, "reason": problem})]
            rows.append(("row", (task.split, task.log_id, int(frame.frame_index),
                                 encode_frame(frame, task.city, task.sample_weight))))
            points += len(frame.points)
            for label, count in zip(*_unique(frame.labels)):
                class_points[int(label)] = class_points.get(int(label), 0) + int(count)
    except Exception as exc:  # truncated/corrupt file, missing channel: the log's fault, not the job's
        return [("quarantine", {"log_id": task.log_id, "handle": task.handle,
                                "reason": f"{type(exc).__name__}: {exc}"})]
    if not rows:
        return [("quarantine", {"log_id": task.log_id, "handle": task.handle, "reason": "log has no frames"})]
    indexes = sorted(r[1][2] for r in rows)
    if len(set(indexes)) != len(indexes):
        return [("quarantine", {"log_id": task.log_id, "handle": task.handle, "reason": "duplicate frame indexes"})]
    summary = {"log_id": task.log_id, "split": task.split, "city": task.city, "frames": len(rows),
               "points": points, "class_points": class_points, "frame_indexes": indexes}
    return [*rows, ("log", summary)]


def _unique(labels):
    import numpy as np

    return np.unique(labels, return_counts=True)


# ----------------------------------------------------------------------------------------- lay out
def plan_row_groups(frames: list[tuple[str, int]], rows_per_group: int, ranks: int) -> list[list[tuple[str, int]]]:
    """Cut ordered frames into row groups for ``ranks`` data-parallel readers.

    The group count is a multiple of ``ranks`` (when there are enough rows) and sizes differ by at most
    one; the larger groups come first, so with ``group % ranks`` sharding the rank totals differ by at
    most one row.
    """
    n = len(frames)
    if n == 0:
        return []
    groups = math.ceil(math.ceil(n / max(1, rows_per_group)) / ranks) * ranks
    # every group needs a row: at most the largest multiple of ranks <= n (or n itself when n < ranks)
    groups = min(groups, n - n % ranks) if n >= ranks else n
    base, extra = divmod(n, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(frames[start:start + size])
        start += size
    return out


# ----------------------------------------------------------------------------------------- write
def write_row_group(path: str, rows: list[dict]) -> int:
    """Write rows (already encoded) as one Parquet file holding exactly one row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spark_jobs.schema import COMPRESSION, COMPRESSION_LEVEL, arrow_schema

    schema = arrow_schema()
    table = pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)
    tmp = f"{path}.tmp"
    compression = {f.name: COMPRESSION.get(f.name, "none") for f in schema}
    levels = {name: COMPRESSION_LEVEL for name in COMPRESSION}
    pq.write_table(table, tmp, row_group_size=max(1, len(rows)), compression=compression,
                   compression_level=levels, write_statistics=False)
    os.replace(tmp, path)
    return len(rows)


def _write_partition(index: int, items: Iterable[tuple[int, tuple]], out_dir: str,
                     group_names: dict[int, str]) -> list[tuple[str, int]]:
    rows = sorted((r for _key, r in items), key=lambda r: (r[1], r[2]))
    if not rows:
        return []
    path = os.path.join(out_dir, group_names[index])
    return [(group_names[index], write_row_group(path, [r[3] for r in rows]))]


def materialize(spark, split_dir: str) -> None:
    """Add Petastorm's metadata (pickled Unischema, row groups per file) to a folder of Parquet files."""
    from petastorm.etl.dataset_metadata import materialize_dataset

    from spark_jobs.schema import FrameSchema

    with warnings.catch_warnings():  # petastorm's legacy pyarrow calls warn on every step
        warnings.simplefilter("ignore", FutureWarning)
        with materialize_dataset(spark, f"file://{split_dir}", FrameSchema):
            pass


# ----------------------------------------------------------------------------------------- entry point
def run(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None] = print, run_id: str = "",
        **_: Any) -> dict[str, Any]:
    """The ingest stage: select, split, extract and write; returns the dataset reference and a summary."""
    ing = cfg.ingest
    check_name(ing.dataset_name, "dataset name")
    home = registry.home
    selected, unreadable = select_logs(cfg, home, say)
    splits = assign_splits(cfg, registry, selected) if selected else {}
    weights = _sample_weights(home, [s["meta"].log_id for s in selected])

    log_artifacts = [
        registry.record("log", check_name(s["meta"].log_id, "log id"), content_key=s["sha256"],
                        location=s["handle"], entry_point="spark_jobs.ingest:select_logs",
                        meta={**asdict(s["meta"]), "sha256": s["sha256"]})
        for s in selected
    ] + [registry.record("log", check_name(u["log_id"], "log id"), content_key=u["sha256"], location=u["handle"],
                         entry_point="spark_jobs.ingest:select_logs", meta={"sha256": u["sha256"]})
         for u in unreadable]
    tasks = [LogTask(ing.source, s["handle"], s["meta"].log_id, s["meta"].city, splits[s["meta"].log_id],
                     weights.get(s["meta"].log_id, 1.0), s["sha256"]) for s in selected]
    # What determines the bytes: the logs (parents), the code, and these settings. spark_master does not.
    key_config = {**{k: v for k, v in resolved(ing).items() if k not in ("spark_master",)},
                  "splits": splits, "sample_weights": weights}

    def build(staging: str, record: Artifact) -> dict:
        return _extract_and_write(cfg, staging, tasks, unreadable, record, say)

    art = registry.build("dataset", ing.dataset_name, entry_point="spark_jobs.ingest:run", config=key_config,
                         builder=build, parents=log_artifacts, code_packages=("spark_jobs", "pipeline"),
                         force=cfg.force, say=say)
    manifest = json.loads(open(os.path.join(art.location, MANIFEST)).read())
    return summarize(art, manifest)


def _sample_weights(home: Home, log_ids: list[str]) -> dict[str, float]:
    """Per-log sample weights written by evaluation (hard scenes up-weighted); 1.0 for everything else."""
    path = home.join("feedback", "sample_weights.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        weights = json.load(fh)
    return {log_id: float(weights[log_id]) for log_id in log_ids if log_id in weights}


def _extract_and_write(cfg: PipelineConfig, staging: str, tasks: list[LogTask], unreadable: list[dict],
                       record: Artifact, say: Callable[[str], None]) -> dict:
    from pyspark import StorageLevel

    from spark_jobs.spark import get_session

    ing = cfg.ingest
    started = time.time()
    spark = get_session(ing.spark_master, Home.from_config(cfg.home), app_name=f"avp-ingest-{record.ref}")
    sc = spark.sparkContext
    max_points = ing.max_points
    results = sc.parallelize(tasks, max(1, len(tasks))).flatMap(lambda t: extract_log(t, max_points))
    results.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        say(f"extracting {len(tasks)} logs with Spark ({ing.spark_master or 'spark-submit master'})")
        summaries = results.filter(lambda item: item[0] != "row").map(lambda item: item[1:]).collect()
        quarantined = [s[0] for s in summaries if "reason" in s[0]] + [
            {k: u[k] for k in ("log_id", "handle", "reason")} for u in unreadable]
        logs = sorted((s[0] for s in summaries if "reason" not in s[0]), key=lambda s: s["log_id"])
        for q in sorted(quarantined, key=lambda q: q["log_id"]):
            say(f"quarantined {q['log_id']}: {q['reason']}")

        # Lay out row groups: global partition index -> file name, frame key -> partition index.
        layout: dict[tuple[str, int], int] = {}
        names: dict[int, str] = {}
        groups_per_split: dict[str, list[int]] = {}
        for split in splitting.SPLITS:
            frames = [(s["log_id"], i) for s in logs if s["split"] == split for i in s["frame_indexes"]]
            groups_per_split[split] = []
            for g, group in enumerate(plan_row_groups(frames, ing.rows_per_group, ing.reader_ranks)):
                part = len(names)
                names[part] = f"{split}/part-{g:05d}.parquet"
                groups_per_split[split].append(len(group))
                layout.update({frame: part for frame in group})
        for split in splitting.SPLITS:
            os.makedirs(os.path.join(staging, split), exist_ok=True)
        bc_target, bc_names = sc.broadcast(layout), sc.broadcast(names)
        written = []
        if names:
            written = (results.filter(lambda item: item[0] == "row")
                       .map(lambda item: (bc_target.value[(item[1][1], item[1][2])], item[1]))
                       .partitionBy(len(names), lambda part: part)
                       .mapPartitionsWithIndex(lambda i, items: _write_partition(i, items, staging, bc_names.value))
                       .collect())
        for split in splitting.SPLITS:
            if groups_per_split[split]:
                materialize(spark, os.path.join(staging, split))
    finally:
        results.unpersist()
    checksums = {t.log_id: t.sha256 for t in tasks}
    manifest = {
        "dataset": record.ref, "source": ing.source, "split_mode": ing.split,
        "date_from": ing.date_from, "date_to": ing.date_to,
        "shares": {"train": ing.train_share, "test": ing.test_share, "val": ing.val_share},
        "reader_ranks": ing.reader_ranks,
        "splits": {split: {
            "logs": [s["log_id"] for s in logs if s["split"] == split],
            "frames": sum(s["frames"] for s in logs if s["split"] == split),
            "points": sum(s["points"] for s in logs if s["split"] == split),
            "row_groups": groups_per_split[split],
            "path": split,
        } for split in splitting.SPLITS},
        "logs": {s["log_id"]: {**{k: v for k, v in s.items() if k != "frame_indexes"},
                               "sha256": checksums[s["log_id"]]} for s in logs},
        "quarantined": sorted(quarantined, key=lambda q: q["log_id"]),
        "files": sorted(f for f, _n in written),
    }
    with open(os.path.join(staging, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    elapsed = time.time() - started
    frames = sum(s["frames"] for s in logs)
    say(f"wrote {frames} frames from {len(logs)} logs in {elapsed:.1f} s ({frames / max(elapsed, 1e-9):.1f} frames/s)")
    return {"frames": frames, "logs": len(logs), "quarantined": len(quarantined),
            "splits": {k: {"logs": len(v["logs"]), "frames": v["frames"]} for k, v in manifest["splits"].items()}}


def summarize(art: Artifact, manifest: dict) -> dict[str, Any]:
    rows = [[split, len(s["logs"]), s["frames"], len(s["row_groups"])] for split, s in manifest["splits"].items()]
    tables = [(f"{art.ref}" + (" (cache hit)" if art.cached else ""), ["split", "logs", "frames", "row groups"], rows)]
    if manifest["quarantined"]:
        tables.append(("quarantined logs", ["log", "reason"],
                       [[q["log_id"], q["reason"]] for q in manifest["quarantined"]]))
    return {"ref": art.ref, "cached": art.cached, "location": art.location, "tables": tables}


def main(argv: list[str] | None = None) -> int:
    """``spark-submit spark_jobs/ingest.py [--set section.field=value ...]``: the same stage, on the
    master spark-submit was given (unless ``--set ingest.spark_master=...``)."""
    import argparse

    from pipeline import config, stages

    parser = argparse.ArgumentParser(prog="spark_jobs/ingest.py")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    overrides = {"ingest.spark_master": "", **config.parse_assignments(args.set)}
    result = stages.invoke("ingest", config.load(overrides))
    print(json.dumps({k: v for k, v in result.items() if k != "tables"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
