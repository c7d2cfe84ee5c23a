"""Ingest: drive logs -> Petastorm train/test/val datasets, one row per frame, registered with lineage.

The flow, top to bottom:

1. **select**   list the source's logs, read each log's metadata (cheap), keep those recorded in
                ``[date_from, date_to)``; record every selected log as a ``log`` artifact (its checksum).
                A log whose files or metadata cannot be read, whose id is unsafe or taken by a different
                log is quarantined here (an identical copy is the same log).
2. **extract**  Spark, a few tasks per core, each processing whole logs (``spark_jobs.extract``): decode
                frames, run the quality checks, encode rows. A log failing any check is quarantined with
                its reason; the rest go on. The same task cuts the log's frames into row groups
                (``log_group_sizes``) and writes each as a Parquet file with one row group: rows never
                leave the Python worker.
3. **split**    give every log that passed its split (sticky and balanced; ``SplitPlanner`` and
                ``spark_jobs.split``): a quarantined log takes no slot.
4. **lay out**  the driver orders each split's files (``order_row_groups``, by renaming) so that
                Petastorm's sharding - row group ``i`` to rank ``i % reader_ranks`` - gives every rank the
                same number of rows (within one), then adds Petastorm's metadata and a ``manifest.json``
                (logs per split, counts, checksums, quarantined logs).

All of it runs inside ``Registry.build``: the dataset is written to a staging folder and only marked
succeeded once complete, and an unchanged selection (same logs, code and config) is a cache hit.
Runnable in-process (``avp ingest``) or with ``spark-submit spark_jobs/ingest.py [--set k=v ...]``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable

from pipeline.config import PipelineConfig, resolved
from pipeline.contracts import Manifest, SplitInfo, seal_dataset
from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.home import Home, UnsafeNameError, check_name
from pipeline.registry import Artifact, Registry
from spark_jobs import split as splitting
from spark_jobs.extract import EXTRACTED_DIR, LogTask, process_log
from spark_jobs.sources.registry import get_importer, list_importers

# IngestConfig fields that choose which logs are read, and from where and on which master, but not what is
# written: the selected logs are the dataset's parents (each with its checksum), so two windows selecting
# the same logs build the same bytes. Left out of the content key; the window is recorded in the meta.
SELECTION_ONLY = ("date_from", "date_to", "source_path", "spark_master")


# ----------------------------------------------------------------------------------------- select
def _day_ns(day: str, field: str) -> int:
    try:
        return int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp() * 1e9)
    except ValueError:
        raise UserError(f"config field {field}: {day!r} is not a date (YYYY-MM-DD)") from None


def log_digests(paths: Iterable[str]) -> tuple[str, str]:
    """sha256 over the files' bytes and names (a rename is a change: the log's checksum), and over their
    bytes alone (what tells an identical copy of a log from a different log with the same id)."""
    named, content = hashlib.sha256(), hashlib.sha256()
    for path in paths:
        named.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                named.update(block)
                content.update(block)
    return named.hexdigest(), content.hexdigest()


def source_root(cfg: PipelineConfig, home: Home) -> str:
    """The folder ingest reads: ``ingest.source_path``, or the home's logs for mcap."""
    ing = cfg.ingest
    root = ing.source_path or (home.logs if ing.source == "mcap" else "")
    if not root:
        raise UserError(f"ingest --source {ing.source} needs a PATH to the dataset")
    if not os.path.exists(root):
        raise UserError(f"no drive logs at {root}: run `avp simulate` first or pass --source KIND PATH")
    return root


def unmatched_inputs(cfg: PipelineConfig, home: Home, say: Callable[[str], None]) -> dict[str, list[str]]:
    """The importer's ``unmatched_inputs`` (files left out because their other half is missing), with a
    warning line per problem; recorded in the manifest as ``input_warnings``."""
    problems = get_importer(cfg.ingest.source).unmatched_inputs(source_root(cfg, home))
    for problem, items in sorted(problems.items()):
        say(f"warning: {len(items)} {problem.replace('_', ' ')} left out, e.g. {items[0]}")
    return problems


def select_logs(cfg: PipelineConfig, home: Home, say: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """(selected logs, logs quarantined at selection) for the configured source and date interval.

    A log is quarantined here, never fatal for the others, when its files or metadata cannot be read, its
    id is not a safe name (ids become file and registry names), or another log carries the same id with
    different content (both are; an identical copy is one log, with a warning). Each quarantined entry has
    ``log_id``, ``handle``, ``reason`` and the ``sha256`` of its files ("" when they cannot be read).
    """
    ing = cfg.ingest
    root = source_root(cfg, home)
    importer = get_importer(ing.source)
    lo = _day_ns(ing.date_from, "ingest.date_from") if ing.date_from else -math.inf
    hi = _day_ns(ing.date_to, "ingest.date_to") if ing.date_to else math.inf
    candidates, rejected = [], []
    handles = importer.list_logs(root)
    if not handles:
        raise UserError(f"no drive logs in {root}: run `avp simulate` first or pass --source KIND PATH")
    for handle in handles:
        name = os.path.splitext(os.path.basename(handle.rstrip("/")))[0]
        sha256 = content = problem = ""
        try:
            sha256, content = log_digests(importer.source_files(handle))
        except OSError as exc:  # permissions, vanished: this log's problem only
            problem = f"unreadable: {type(exc).__name__}: {exc}"
        if not problem:
            try:
                meta = importer.read_metadata(handle)
            except Exception as exc:  # corrupt header / missing files: quarantined, never fatal for the others
                problem = f"unreadable: {exc}"
        if not problem:
            name = meta.log_id
            try:
                check_name(meta.log_id, "log id")
            except UnsafeNameError as exc:
                problem = str(exc)
        if problem:
            rejected.append({"log_id": name, "handle": handle, "reason": problem, "sha256": sha256})
        elif lo <= meta.start_time_ns < hi:
            candidates.append({"meta": meta, "handle": handle, "sha256": sha256, "content": content})
    selected = _one_log_per_id(candidates, rejected, say)
    if not selected and not rejected:
        raise UserError(f"no drive logs in {root} between {ing.date_from or 'the beginning'} and "
                        f"{ing.date_to or 'now'}")
    say(f"selected {len(selected)} logs from {root}" + (f" ({len(rejected)} quarantined)" if rejected else ""))
    return selected, rejected


def _one_log_per_id(candidates: list[dict], rejected: list[dict], say: Callable[[str], None]) -> list[dict]:
    """Logs sharing an id: identical copies (same bytes) are one log, read from the file named after the id
    if there is one (so a stray copy does not change the log's record), else the first; with different
    content none can be told apart from the other, so every one of them goes to ``rejected``."""
    by_id: dict[str, list[dict]] = {}
    for log in candidates:
        by_id.setdefault(log["meta"].log_id, []).append(log)
    selected = []
    for log_id, logs in by_id.items():
        handles = ", ".join(log["handle"] for log in logs)
        if len({log["content"] for log in logs}) == 1:
            if len(logs) > 1:
                say(f"warning: log {log_id} is in {len(logs)} identical files ({handles}); ingesting it once")
            named = [log for log in logs if os.path.splitext(os.path.basename(log["handle"]))[0] == log_id]
            selected.append((named or logs)[0])
            continue
        rejected.extend({"log_id": log_id, "handle": log["handle"], "sha256": log["sha256"],
                         "reason": f"duplicate log id: {len(logs)} files with different content ({handles})"}
                        for log in logs)
    return selected


# ----------------------------------------------------------------------------------------- split
def _first_gps(source: str, handle: str) -> tuple[float, float]:
    try:
        _meta, frames = get_importer(source).read_log(handle)
        frame = next(iter(frames))
        return float(frame.gps[0]), float(frame.gps[1])
    except Exception:  # the log is quarantined by extraction; until then its cell is unknown
        return math.nan, math.nan


class SplitPlanner:
    """Each log's split, sticky in the registry ledger of the dataset name and split mode.

    Splits go only to logs that passed extraction (``assign``, inside the build): a quarantined log takes
    no slot, so the shares stay balanced over the good logs, and a log fixed later gets its slot then.
    The content key is computed before extraction from ``preview``: the splits the selected logs would
    get if all of them passed (the ledger untouched), which is exactly what ``assign`` gives when none is
    quarantined. (When one is, the next run's preview differs once, and rebuilds the same bytes.)
    """

    def __init__(self, cfg: PipelineConfig, registry: Registry, logs: list[dict]):
        ing = cfg.ingest
        self.registry = registry
        self.shares = {"train": ing.train_share, "test": ing.test_share, "val": ing.val_share}
        self.ledger = f"split:{ing.dataset_name}:{ing.split}"
        # GeoSplit: every log takes the split of the cell its first GPS fix falls in.
        self.cells = ({log["meta"].log_id: splitting.geo_cell(*_first_gps(ing.source, log["handle"]), ing.geo_cell_m)
                       for log in logs} if ing.split == "geo" else None)

    def preview(self, log_ids: list[str]) -> dict[str, str]:
        return self._splits(log_ids, record=False)

    def assign(self, log_ids: list[str]) -> dict[str, str]:
        return self._splits(log_ids, record=True)

    def _splits(self, log_ids: list[str], record: bool) -> dict[str, str]:
        if self.cells is None:
            return self._ledger(log_ids, lambda old, new: splitting.assign_balanced(old, new, self.shares), record)
        logs_per_cell: dict[str, int] = {}
        for log_id in log_ids:
            logs_per_cell[self.cells[log_id]] = logs_per_cell.get(self.cells[log_id], 0) + 1
        by_cell = self._ledger(sorted(logs_per_cell), lambda old, new: splitting.assign_balanced(
            old, new, self.shares, weights=logs_per_cell), record)
        return {log_id: by_cell[self.cells[log_id]] for log_id in log_ids}

    def _ledger(self, keys: list[str], decide: Callable[[dict[str, str], list[str]], dict[str, str]],
                record: bool) -> dict[str, str]:
        if record:
            return self.registry.sticky_assign(self.ledger, keys, decide)
        existing = self.registry.assignments(self.ledger)
        new = [k for k in dict.fromkeys(keys) if k not in existing]
        decided = decide(dict(existing), new) if new else {}
        return {k: existing[k] if k in existing else decided[k] for k in keys}


def assign_splits(cfg: PipelineConfig, registry: Registry, logs: list[dict]) -> dict[str, str]:
    """log id -> split for ``logs`` (all taken as good), recorded in the ledger (the plain benchmark)."""
    return SplitPlanner(cfg, registry, logs).assign([log["meta"].log_id for log in logs])


# ----------------------------------------------------------------------------------------- lay out
def order_row_groups(logs: list[list[tuple[str, int]]], ranks: int) -> list[str]:
    """File order for one split so that Petastorm's sharding (row group ``i`` -> rank ``i % ranks``) gives
    every rank the same number of rows and of row groups, each within one.

    ``logs`` holds each log's (name, rows) groups from ``log_group_sizes``. A log with at least ``ranks``
    frames has ``k * ranks`` groups: every rank gets ``k`` of them, so only the groups one row larger
    than the rest can unbalance the ranks. Those, and the one-frame groups of logs shorter than
    ``ranks``, are dealt round-robin from one shared pointer (the short logs' groups first, so the ranks
    with an extra group are the lowest-numbered ones, as the interleaving below needs).
    """
    per_rank: list[list[str]] = [[] for _ in range(ranks)]
    short = [name for groups in logs if len(groups) < ranks for name, _ in groups]
    for c, name in enumerate(short):
        per_rank[c % ranks].append(name)
    pointer = len(short)
    for groups in logs:
        if len(groups) < ranks:
            continue
        k = len(groups) // ranks
        sizes = {size for _, size in groups}
        larger = [name for name, size in groups if len(sizes) > 1 and size == max(sizes)]
        larger_names = set(larger)
        smaller = iter(name for name, _size in groups if name not in larger_names)
        room = [k] * ranks
        for name in larger:
            per_rank[pointer % ranks].append(name)
            room[pointer % ranks] -= 1
            pointer += 1
        for r in range(ranks):
            per_rank[r].extend(next(smaller) for _ in range(room[r]))
    total = sum(len(groups) for groups in logs)
    return [per_rank[i % ranks][i // ranks] for i in range(total)]


def arrange_split(out_dir: str, logs: list[dict], split: str, ranks: int) -> list[int]:
    """Rename one split's row-group files to ``part-00000.parquet``... in reader order and add Petastorm's
    metadata; returns the row-group sizes in that order."""
    per_log = [[tuple(g) for g in s["groups"]] for s in sorted(logs, key=lambda s: s["log_id"]) if s["split"] == split]
    sizes = {name: size for groups in per_log for name, size in groups}
    ordered = order_row_groups(per_log, ranks)
    final = [f"part-{index:05d}.parquet" for index in range(len(ordered))]
    for name, part in zip(ordered, final):
        os.rename(os.path.join(out_dir, name), os.path.join(out_dir, split, part))
    if final:
        write_petastorm_metadata(os.path.join(out_dir, split), final)
    return [sizes[name] for name in ordered]


def write_petastorm_metadata(split_dir: str, files: list[str] | None = None) -> None:
    """Petastorm's dataset metadata (``_common_metadata``: the pickled Unischema and the row groups per
    file), written directly: every file here holds exactly one row group, so there is nothing to scan.
    Petastorm's ``materialize_dataset`` finds the same by running a Spark task per file and reading every
    footer with pyarrow's legacy API - 15 s of a 30 s ingest."""
    import pickle

    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY

    from spark_jobs.rows import arrow_schema
    from spark_jobs.schema import FrameSchema

    if files is None:
        files = [f for f in os.listdir(split_dir) if f.endswith(".parquet")]
    metadata = {UNISCHEMA_KEY: pickle.dumps(FrameSchema),  # what petastorm itself stores (our own object)
                ROW_GROUPS_PER_FILE_KEY: json.dumps({name: 1 for name in sorted(files)}).encode()}
    with atomic_path(os.path.join(split_dir, "_common_metadata"), durable=False) as tmp:
        pq.write_metadata(arrow_schema().with_metadata(metadata), tmp)


# ----------------------------------------------------------------------------------------- entry point
def run(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None] = print,
        run_id: str = "") -> dict[str, Any]:
    """The ingest stage: select, split, extract and write; returns the dataset reference and a summary."""
    ing = cfg.ingest
    check_name(ing.dataset_name, "dataset name")
    home = registry.home
    selected, rejected = select_logs(cfg, home, say)
    input_warnings = unmatched_inputs(cfg, home, say)
    planner = SplitPlanner(cfg, registry, selected)
    log_ids = [s["meta"].log_id for s in selected]
    weights = _sample_weights(home, log_ids)
    importer = get_importer(ing.source).__name__  # the Spark workers import it by name

    log_artifacts = [
        registry.record("log", s["meta"].log_id, content_key=s["sha256"], location=s["handle"],
                        entry_point="spark_jobs.ingest:select_logs", meta={**asdict(s["meta"]), "sha256": s["sha256"]})
        for s in selected
    ] + [registry.record("log", r["log_id"], content_key=r["sha256"], location=r["handle"],
                         entry_point="spark_jobs.ingest:select_logs", meta={"sha256": r["sha256"]})
         for r in rejected if r["sha256"] and _safe_name(r["log_id"])]  # unsafe or unread: manifest only
    tasks = [LogTask(importer, s["handle"], s["meta"].log_id, s["meta"].city, weights.get(s["meta"].log_id, 1.0),
                     s["sha256"], tuple(importer_options(cfg).items())) for s in selected]

    def build(staging: str, record: Artifact) -> dict:
        return _extract_and_write(cfg, staging, tasks, rejected, input_warnings, planner.assign, record, say)

    art = registry.build("dataset", ing.dataset_name, entry_point="spark_jobs.ingest:run",
                         config=key_config(cfg, planner.preview(log_ids), weights), builder=build,
                         parents=log_artifacts, code_modules=code_modules(cfg), force=cfg.force, say=say)
    return summarize(art, Manifest.load_from(art.location))


def _safe_name(name: str) -> bool:
    try:
        check_name(name)
        return True
    except UnsafeNameError:
        return False


def code_modules(cfg: PipelineConfig) -> tuple[str, ...]:
    """The code that writes the dataset: this module and its imports (``spark_jobs.extract``, what the Spark
    workers run, among them) and the configured importer, which the registry and the workers load by name."""
    return ("spark_jobs.ingest", get_importer(cfg.ingest.source).__name__)


def importer_options(cfg: PipelineConfig) -> dict[str, Any]:
    """The configured importer's ``read_log`` keywords, from the ingest fields its ``OPTIONS`` names
    (``av2``: ``box_rule`` from ``ingest.av2_box_rule``); none for an importer without ``OPTIONS``."""
    options = getattr(get_importer(cfg.ingest.source), "OPTIONS", {})
    return {keyword: getattr(cfg.ingest, name) for keyword, name in options.items()}


def key_config(cfg: PipelineConfig, splits: dict[str, str], weights: dict[str, float]) -> dict[str, Any]:
    """What determines the dataset's bytes besides its parents (the logs) and its code: the ingest settings
    but ``SELECTION_ONLY`` and other importers' options, the configured importer's options, each log's
    split and the sample weights that are not 1.0."""
    option_fields = {name for source in list_importers()
                     for name in getattr(get_importer(source), "OPTIONS", {}).values()}
    options = importer_options(cfg)
    return {**{k: v for k, v in resolved(cfg.ingest).items() if k not in SELECTION_ONLY and k not in option_fields},
            **({"importer_options": options} if options else {}), "splits": splits, "sample_weights": weights}


def _sample_weights(home: Home, log_ids: list[str]) -> dict[str, float]:
    """Per-log sample weights written by evaluation (hard scenes up-weighted). A log not in the result
    has weight 1.0, and one listed at 1.0 is left out: its rows are the same either way."""
    path = home.join("feedback", "sample_weights.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        weights = json.load(fh)
    listed = {log_id: float(weights[log_id]) for log_id in log_ids if log_id in weights}
    return {log_id: weight for log_id, weight in listed.items() if weight != 1.0}


def _extract_and_write(cfg: PipelineConfig, staging: str, tasks: list[LogTask], rejected: list[dict],
                       input_warnings: dict[str, list[str]],
                       assign: Callable[[list[str]], dict[str, str]], record: Artifact,
                       say: Callable[[str], None]) -> dict:
    from spark_jobs.spark import get_session

    ing = cfg.ingest
    started = time.time()
    spark = get_session(ing.spark_master, Home.from_config(cfg.home), app_name=f"avp-ingest-{record.ref}")
    say(f"extracting {len(tasks)} logs with Spark ({ing.spark_master or 'spark-submit master'})")
    max_points, ranks, rows_per_group = ing.max_points, ing.reader_ranks, ing.rows_per_group
    # Each log is processed whole by one task, which writes the log's row groups into the staging folder
    # (a shared filesystem on a cluster) and returns a summary of a few hundred bytes: rows never travel
    # through the JVM.
    # A few slices per core, not one task per log: each Spark task costs ~60 ms of scheduling here.
    slices = max(1, min(len(tasks), 2 * spark.sparkContext.defaultParallelism))
    # A partial of a module function pickles by reference: workers import only ``spark_jobs.extract``.
    work = functools.partial(process_log, out_dir=staging, max_points=max_points, ranks=ranks,
                             rows_per_group=rows_per_group)
    summaries = spark.sparkContext.parallelize(tasks, slices).map(work).collect()
    quarantined = [s for s in summaries if "reason" in s] + [
        {k: r[k] for k in ("log_id", "handle", "reason")} for r in rejected]
    passed = sorted((s for s in summaries if "reason" not in s), key=lambda s: s["log_id"])
    splits = assign([s["log_id"] for s in passed])  # only now: a quarantined log takes no split slot
    logs = [{"log_id": s["log_id"], "split": splits[s["log_id"]], **s} for s in passed]
    for q in sorted(quarantined, key=lambda q: q["log_id"]):
        say(f"quarantined {q['log_id']}: {q['reason']}")
    row_groups = {}
    for split in splitting.SPLITS:
        os.makedirs(os.path.join(staging, split), exist_ok=True)
        row_groups[split] = arrange_split(staging, logs, split, ranks)
    if os.path.isdir(os.path.join(staging, EXTRACTED_DIR)):
        os.rmdir(os.path.join(staging, EXTRACTED_DIR))  # empty now: every file was moved into its split
    checksums = {t.log_id: t.sha256 for t in tasks}
    manifest = Manifest(
        dataset=record.ref, source=ing.source, split_mode=ing.split, date_from=ing.date_from, date_to=ing.date_to,
        shares={"train": ing.train_share, "test": ing.test_share, "val": ing.val_share},
        reader_ranks=ranks,
        splits={split: SplitInfo(
            logs=[s["log_id"] for s in logs if s["split"] == split],
            frames=sum(s["frames"] for s in logs if s["split"] == split),
            points=sum(s["points"] for s in logs if s["split"] == split),
            row_groups=row_groups[split],
            path=split,
        ) for split in splitting.SPLITS},
        logs={s["log_id"]: {**{k: v for k, v in s.items() if k != "groups"}, "sha256": checksums[s["log_id"]]}
              for s in logs},
        quarantined=sorted(quarantined, key=lambda q: q["log_id"]),
        input_warnings=input_warnings,
    )
    sealed = seal_dataset(staging, manifest)  # every file's checksum, and the manifest's for the registry
    elapsed = time.time() - started
    frames = sum(s["frames"] for s in logs)
    say(f"wrote {frames} frames from {len(logs)} logs in {elapsed:.1f} s ({frames / max(elapsed, 1e-9):.1f} frames/s)")
    return {**sealed, "frames": frames, "logs": len(logs), "quarantined": len(quarantined),
            "job_seconds": round(elapsed, 3),
            "spark_master": spark.sparkContext.master, "date_from": ing.date_from, "date_to": ing.date_to,
            "splits": {k: {"logs": len(v.logs), "frames": v.frames} for k, v in manifest.splits.items()}}


def summarize(art: Artifact, manifest: Manifest) -> dict[str, Any]:
    rows = [[split, len(s.logs), s.frames, len(s.row_groups)] for split, s in manifest.splits.items()]
    tables = [(f"{art.ref}" + (" (cache hit)" if art.cached else ""), ["split", "logs", "frames", "row groups"], rows)]
    if manifest.quarantined:
        tables.append(("quarantined logs", ["log", "reason"],
                       [[q["log_id"], q["reason"]] for q in manifest.quarantined]))
    return {"ref": art.ref, "cached": art.cached, "location": art.location, "tables": tables}


def main(argv: list[str] | None = None) -> int:
    """``spark-submit spark_jobs/ingest.py [--set section.field=value ...]``: the same stage, on the
    master spark-submit was given (unless ``--set ingest.spark_master=...``). The Airflow DAG passes
    ``--request`` (from ``pipeline.orchestration.spark_submit_request``) and reads the result file."""
    import argparse

    from pipeline import config, stages
    from pipeline.files import atomic_write_json

    parser = argparse.ArgumentParser(prog="spark_jobs/ingest.py")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--request", default="", help="JSON: {overrides: {...}, result_file: PATH}")
    args = parser.parse_args(argv)
    request = json.loads(args.request) if args.request else {}
    overrides = {"ingest.spark_master": "", **request.get("overrides", {}), **config.parse_assignments(args.set)}
    result = stages.invoke("ingest", config.load(overrides))
    summary = {k: v for k, v in result.items() if k != "tables"}
    if request.get("result_file"):
        atomic_write_json(request["result_file"], summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
