"""The Parquet row format of a frame, as the extraction workers write it.

This module is what a Spark Python worker imports to encode and write rows, so it stays light: numpy and
pyarrow only. Petastorm (with pandas behind it, ~0.5 s to import in every worker) is needed only on the
driver, where ``spark_jobs.schema`` builds the Petastorm Unischema from the same ``COLUMNS``; a test
checks that ``encode_frame`` gives exactly the bytes of Petastorm's ``NdarrayCodec`` and that the Arrow
schema here is the Unischema's.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np

from pipeline.files import atomic_path
from pipeline.frames import BOX_COLUMNS, EGO_COLUMNS, GPS_COLUMNS, ROUTE_COLUMNS


class Column(NamedTuple):
    name: str
    dtype: type
    shape: tuple  # () for a scalar; None for a free dimension
    array: bool   # stored as np.save bytes (Petastorm's NdarrayCodec) rather than as a Parquet scalar


COLUMNS = (
    Column("log_id", np.str_, (), False),
    Column("frame_index", np.int32, (), False),
    Column("timestamp_ns", np.int64, (), False),
    Column("city", np.str_, (), False),
    Column("num_points", np.int32, (), False),
    Column("sample_weight", np.float32, (), False),
    Column("points", np.float32, (None, 4), True),
    Column("labels", np.uint8, (None,), True),
    Column("boxes", np.float32, (None, len(BOX_COLUMNS)), True),
    Column("ego", np.float64, (len(EGO_COLUMNS),), True),
    Column("gps", np.float64, (len(GPS_COLUMNS),), True),
    Column("route", np.float64, (len(ROUTE_COLUMNS),), True),
)

# Parquet column compression: the big array columns get zstd (level 1: fast, ~deterministic by version);
# small scalar columns are left uncompressed.
COMPRESSION = {"points": "zstd", "labels": "zstd", "boxes": "zstd"}
COMPRESSION_LEVEL = 1


def arrow_schema():
    import pyarrow as pa

    scalar = {np.str_: pa.string(), np.int32: pa.int32(), np.int64: pa.int64(), np.float32: pa.float32()}
    return pa.schema([pa.field(c.name, pa.binary() if c.array else scalar[c.dtype], nullable=False)
                      for c in COLUMNS])


def encode_array(column: Column, value) -> bytes:
    """``value`` as Petastorm's ``NdarrayCodec`` stores it (``np.save`` bytes), with the same checks."""
    if not isinstance(value, np.ndarray) or value.dtype != np.dtype(column.dtype):
        got = getattr(value, "dtype", type(value).__name__)
        raise ValueError(f"Unexpected type of {column.name} feature: expected {np.dtype(column.dtype)}, got {got}")
    if len(value.shape) != len(column.shape) or any(
            want is not None and want != have for want, have in zip(column.shape, value.shape)):
        raise ValueError(f"Unexpected dimensions of {column.name} feature: expected {column.shape}, "
                         f"got {value.shape}")
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


def encode_frame(frame, city: str, sample_weight: float) -> dict:
    """A ``Frame`` as a dict of encoded column values (what one Parquet row holds)."""
    values = {
        "log_id": str(frame.log_id), "frame_index": int(frame.frame_index),
        "timestamp_ns": int(frame.timestamp_ns), "city": str(city),
        "num_points": len(frame.points), "sample_weight": float(np.float32(sample_weight)),
        "points": frame.points, "labels": frame.labels, "boxes": frame.boxes,
        "ego": frame.ego, "gps": frame.gps, "route": frame.route,
    }
    return {c.name: encode_array(c, values[c.name]) if c.array else values[c.name] for c in COLUMNS}


def write_row_group(path: str, rows: list[dict]) -> int:
    """Write rows (already encoded) as one Parquet file holding exactly one row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    table = pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)
    compression = {f.name: COMPRESSION.get(f.name, "none") for f in schema}
    levels = {name: COMPRESSION_LEVEL for name in COMPRESSION}
    # Not fsynced: the file is inside a staging folder that the registry publishes as a whole.
    with atomic_path(path, durable=False) as tmp:
        pq.write_table(table, tmp, row_group_size=max(1, len(rows)), compression=compression,
                       compression_level=levels, write_statistics=False)
    return len(rows)
