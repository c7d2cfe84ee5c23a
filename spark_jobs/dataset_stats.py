"""Dataset statistics in one Spark pass: what the validation suite checks and the drift checks compare.

Spark reads the Parquet files of every split of a Petastorm dataset (the Petastorm metadata files start
with ``_`` and are skipped by Spark); each partition decodes the labels, boxes and arrays with the
Unischema's own codecs and folds its frames into a small partial summary, and the driver merges the
partials. Nothing per point ever leaves an executor, so the result is a few kilobytes whatever the size
of the dataset.

Per split the summary holds:

* ``frames``, ``points``
* ``logs``: ``{log_id: {"frames": n, "city": city}}`` (frames per log)
* ``class_points``: points per label id (every id seen, including ids outside the taxonomy)
* ``box_classes``: boxes per box class id (``-1`` for a class id that is NaN or not an integer)
* ``cities``: ``{city: {"frames": n, "class_points": {...}}}`` (frames per city, and the per-city class
  distribution the drift checks compare)
* ``missing``: per column, frames whose value is null or cannot be decoded
* ``non_finite``: per column, frames with at least one NaN or infinite value

Ids are JSON object keys, hence strings (``"6"``); ``class_points_of`` turns them back into ints.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

from spark_jobs.split import SPLITS

STATISTICS_FILE = "statistics.json"
FORMAT = 1  # bump when the layout of statistics.json changes (it is part of the content key)

# Columns whose values are numbers or arrays of numbers, so can hold NaN/inf, and how to read them.
_DECODED_COLUMNS = ("points", "labels", "boxes", "ego", "gps", "route")
_SCALAR_FLOAT_COLUMNS = ("sample_weight",)


def _empty_split() -> dict[str, Any]:
    return {"frames": 0, "points": 0, "logs": {}, "class_points": {}, "box_classes": {}, "cities": {},
            "missing": {}, "non_finite": {}}


def _add(counter: dict, key: Any, amount: int = 1) -> None:
    key = str(key)
    counter[key] = counter.get(key, 0) + int(amount)


def summarize_partition(rows: Iterable[Any]) -> Iterator[dict[str, dict[str, Any]]]:
    """Fold one Spark partition of frame rows (with a ``split`` column) into ``{split: summary}``.

    Runs on the executors: imports are local so the function pickles small.
    """
    import numpy as np

    from spark_jobs.schema import FrameSchema

    fields = FrameSchema.fields
    columns = list(fields)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        values = row.asDict()
        stats = out.setdefault(values["split"], _empty_split())
        stats["frames"] += 1
        for column in columns:  # every column is listed, so a clean dataset shows explicit zeros
            stats["missing"].setdefault(column, 0)
            stats["non_finite"].setdefault(column, 0)
        decoded: dict[str, Any] = {}
        for column in columns:
            value = values.get(column)
            if value is None:
                _add(stats["missing"], column)
                continue
            if column in _DECODED_COLUMNS:
                try:
                    value = fields[column].codec.decode(fields[column], value)
                except Exception:  # a corrupt cell is as useless as a missing one
                    _add(stats["missing"], column)
                    continue
                decoded[column] = value
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    _add(stats["non_finite"], column)
            elif column in _SCALAR_FLOAT_COLUMNS and not np.isfinite(value):
                _add(stats["non_finite"], column)

        log_id, city = values.get("log_id"), values.get("city")
        if log_id is not None:
            log = stats["logs"].setdefault(log_id, {"frames": 0, "city": city})
            log["frames"] += 1
        city_stats = stats["cities"].setdefault(str(city), {"frames": 0, "class_points": {}})
        city_stats["frames"] += 1
        labels = decoded.get("labels")
        if labels is not None:
            stats["points"] += int(labels.size)
            counts = np.bincount(labels.astype(np.int64).ravel())
            for class_id in np.nonzero(counts)[0]:
                _add(stats["class_points"], int(class_id), counts[class_id])
                _add(city_stats["class_points"], int(class_id), counts[class_id])
        boxes = decoded.get("boxes")
        if boxes is not None and boxes.ndim == 2 and boxes.shape[0] and boxes.shape[1] > 7:
            ids = boxes[:, 7].astype(np.float64)
            valid = np.isfinite(ids) & (ids == np.round(ids))
            for class_id, count in zip(*np.unique(ids[valid].astype(np.int64), return_counts=True)):
                _add(stats["box_classes"], int(class_id), count)
            if (~valid).any():
                _add(stats["box_classes"], -1, int((~valid).sum()))
    yield out


def merge(into: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge one partition's ``{split: summary}`` into ``into`` (counts add up, logs and cities join)."""
    for split, stats in part.items():
        target = into.setdefault(split, _empty_split())
        target["frames"] += stats["frames"]
        target["points"] += stats["points"]
        for key in ("class_points", "box_classes", "missing", "non_finite"):
            for k, v in stats[key].items():
                _add(target[key], k, v)
        for log_id, log in stats["logs"].items():
            # a log's frames may sit in several row groups, hence several partitions
            target["logs"].setdefault(log_id, {"frames": 0, "city": log["city"]})["frames"] += log["frames"]
        for city, c in stats["cities"].items():
            tc = target["cities"].setdefault(city, {"frames": 0, "class_points": {}})
            tc["frames"] += c["frames"]
            for k, v in c["class_points"].items():
                _add(tc["class_points"], k, v)
    return into


def _spark_path(path: str) -> str:
    return path if "://" in path else f"file://{path}"


def split_files(location: str) -> dict[str, list[str]]:
    """The Parquet files of each split of a dataset folder (splits without files are left out)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    out = {}
    for split in SPLITS:
        files = sorted(p for p in fs.glob(f"{root.rstrip('/')}/{split}/*.parquet")
                       if not p.rsplit("/", 1)[-1].startswith(("_", ".")))
        if files:
            protocol = location.split("://", 1)[0] + "://" if "://" in location else ""
            out[split] = [protocol + f if protocol else f for f in files]
    return out


def compute(spark, location: str) -> dict[str, Any]:
    """Statistics of the dataset at ``location`` in one Spark job (see the module docstring)."""
    from pyspark.sql import functions as F

    from spark_jobs.schema import FrameSchema

    started = time.time()
    files = split_files(location)
    schema = FrameSchema.as_spark_schema()
    frames = None
    for split, paths in files.items():
        df = spark.read.schema(schema).parquet(*[_spark_path(p) for p in paths]).withColumn("split", F.lit(split))
        frames = df if frames is None else frames.unionByName(df)
    merged: dict[str, dict[str, Any]] = {}
    if frames is not None:
        for part in frames.rdd.mapPartitions(summarize_partition).collect():
            merge(merged, part)
    splits = {split: merged.get(split, _empty_split()) for split in SPLITS}
    for stats in splits.values():  # stable key order: statistics.json is content, diffs should be readable
        for key in ("class_points", "box_classes", "missing", "non_finite"):
            stats[key] = dict(sorted(stats[key].items(), key=lambda kv: _sort_key(kv[0])))
        stats["logs"] = dict(sorted(stats["logs"].items()))
        stats["cities"] = {c: {"frames": v["frames"],
                               "class_points": dict(sorted(v["class_points"].items(), key=lambda kv: _sort_key(kv[0])))}
                           for c, v in sorted(stats["cities"].items())}
    return {"format": FORMAT, "location": location, "splits": splits,
            "files": {split: len(paths) for split, paths in files.items()},
            "elapsed_s": round(time.time() - started, 3)}


def _sort_key(key: str) -> tuple:
    try:
        return (0, int(key), "")
    except ValueError:
        return (1, 0, key)


# ----------------------------------------------------------------------------------------- readers
def class_points_of(counter: dict[str, int]) -> dict[int, int]:
    """``{"6": n}`` -> ``{6: n}``."""
    return {int(k): int(v) for k, v in counter.items()}


def total_class_points(statistics: dict[str, Any], city: str | None = None) -> dict[int, int]:
    """Points per class id over all splits (of one city when ``city`` is given)."""
    total: dict[int, int] = {}
    for stats in statistics["splits"].values():
        counter = stats["class_points"] if city is None else stats["cities"].get(city, {}).get("class_points", {})
        for class_id, n in class_points_of(counter).items():
            total[class_id] = total.get(class_id, 0) + n
    return total


def logs_per_city(statistics: dict[str, Any]) -> dict[str, int]:
    """How many logs each city has, over all splits."""
    out: dict[str, int] = {}
    for stats in statistics["splits"].values():
        for log in stats["logs"].values():
            out[str(log["city"])] = out.get(str(log["city"]), 0) + 1
    return out


def cities(statistics: dict[str, Any]) -> list[str]:
    """Every city with frames in any split."""
    return sorted({c for stats in statistics["splits"].values() for c in stats["cities"]})
