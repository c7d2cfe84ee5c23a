"""One log's extraction, the unit of work of the ingest Spark job (a Spark task, or a loop iteration in
the plain benchmark): decode, check, encode and write the log's row groups.

Spark Python workers import this module, so it imports only what a worker needs (numpy, pyarrow, the log
readers); the driver side of ingest (selection, registry, Petastorm metadata) lives in
``spark_jobs.ingest``.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from spark_jobs.rows import encode_frame, write_row_group

# Where a task writes a log's row groups, inside the dataset's staging folder, until the driver has
# given the log its split and moved them (the folder is removed then).
EXTRACTED_DIR = "_extracted"


@dataclass(frozen=True)
class LogTask:
    """What a Spark task needs to extract one log (plain data, cheap to ship to workers)."""

    importer: str  # the importer's module (``spark_jobs.sources.registry``), imported by name on the worker
    handle: str
    log_id: str
    city: str
    sample_weight: float
    sha256: str
    options: tuple[tuple[str, Any], ...] = ()  # the importer's read_log keywords (its OPTIONS, from the config)


def extract_log(task: LogTask, max_points: int) -> tuple[dict, list[dict]]:
    """Decode, check and encode one log: (summary, encoded rows in frame order).

    If anything about the log is wrong the summary has a ``reason`` and there are no rows: the whole
    log is quarantined (a truncated or corrupt file, a missing channel, a bad frame).
    """
    from spark_jobs.quality import frame_problem, normalise

    def quarantine(reason: str) -> tuple[dict, list]:
        return {"log_id": task.log_id, "handle": task.handle, "reason": reason}, []

    rows, indexes, stamps, points, class_points = [], [], [], 0, {}
    try:
        _meta, frames = importlib.import_module(task.importer).read_log(task.handle, **dict(task.options))
        for frame in frames:
            frame = normalise(frame)
            problem = frame_problem(frame, max_points)
            if problem is None and frame.log_id != task.log_id:
                problem = f"frame {frame.frame_index}: belongs to log {frame.log_id!r}"
            if problem is not None:
                return quarantine(problem)
            rows.append(encode_frame(frame, task.city, task.sample_weight))
            indexes.append(int(frame.frame_index))
            stamps.append(int(frame.timestamp_ns))
            points += len(frame.points)
            for label, count in zip(*np.unique(frame.labels, return_counts=True)):
                class_points[int(label)] = class_points.get(int(label), 0) + int(count)
    except Exception as exc:  # truncated/corrupt file, missing channel: the log's fault, not the job's
        return quarantine(f"{type(exc).__name__}: {exc}")
    if not rows:
        return quarantine("log has no frames")
    if len(set(indexes)) != len(indexes):
        return quarantine("duplicate frame indexes")
    order = sorted(range(len(rows)), key=indexes.__getitem__)
    # docs/drive-log-format.md: timestamps strictly increase with the frame index (a reader may yield
    # frames in timestamp order, so a repeated or decreasing one shows up only in frame-index order).
    for previous, current in zip(order, order[1:]):
        if stamps[current] <= stamps[previous]:
            return quarantine(f"frame {indexes[current]}: timestamp {stamps[current]} ns is not after frame "
                              f"{indexes[previous]}'s ({stamps[previous]} ns): timestamps must strictly increase")
    summary = {"log_id": task.log_id, "city": task.city, "frames": len(rows), "points": points,
               "class_points": class_points}
    return summary, [rows[i] for i in order]


def log_group_sizes(frames: int, ranks: int, rows_per_group: int) -> list[int]:
    """How one log's frames are cut into row groups: about ``rows_per_group`` rows each, sizes differing
    by at most one (larger first), and - when the log has at least ``ranks`` frames - a multiple of
    ``ranks`` groups, so the log spreads evenly over the data-parallel readers."""
    if frames < ranks:
        return [1] * frames
    groups = math.ceil(frames / (ranks * max(1, rows_per_group))) * ranks
    groups = min(groups, frames - frames % ranks)  # never an empty group
    base, extra = divmod(frames, groups)
    return [base + 1] * extra + [base] * (groups - extra)


def process_log(task: LogTask, out_dir: str, max_points: int, ranks: int, rows_per_group: int) -> dict:
    """The per-log unit of work (a Spark task, or a loop iteration in the plain benchmark): extract the
    log and write its row groups as ``_extracted/log-<log id>-<g>.parquet`` (the split is decided once
    the log has passed: the driver moves them). Only the small summary comes back to the driver; the rows
    never leave this process."""
    summary, encoded = extract_log(task, max_points)
    if "reason" in summary:
        return summary
    groups, start = [], 0
    os.makedirs(os.path.join(out_dir, EXTRACTED_DIR), exist_ok=True)
    for g, size in enumerate(log_group_sizes(len(encoded), ranks, rows_per_group)):
        name = f"{EXTRACTED_DIR}/log-{task.log_id}-{g:04d}.parquet"
        write_row_group(os.path.join(out_dir, name), encoded[start:start + size])
        groups.append((name, size))
        start += size
    return {**summary, "groups": groups}
