"""The Petastorm Unischema of a frame row.

Arrays use Petastorm's own ``NdarrayCodec`` (``np.save`` bytes): Petastorm unpickles the Unischema stored
in the dataset with a whitelist of modules, so a codec class of ours could not be read back, and its
``CompressedNdarrayCodec`` writes zip entries stamped with the wall clock (the same frame would give
different bytes on every run). Points and labels are compressed by Parquet instead (zstd, see
``COMPRESSION``): deterministic and transparent to every reader.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from petastorm.codecs import NdarrayCodec, ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql.types import FloatType, IntegerType, LongType, StringType

from spark_jobs.frames import BOX_COLUMNS, EGO_COLUMNS, GPS_COLUMNS, ROUTE_COLUMNS

# Parquet column compression: the big array columns get zstd (level 1: fast, ~deterministic by version);
# small scalar columns are left uncompressed.
COMPRESSION = {"points": "zstd", "labels": "zstd", "boxes": "zstd"}
COMPRESSION_LEVEL = 1


FrameSchema = Unischema("FrameSchema", [
    UnischemaField("log_id", np.str_, (), ScalarCodec(StringType()), False),
    UnischemaField("frame_index", np.int32, (), ScalarCodec(IntegerType()), False),
    UnischemaField("timestamp_ns", np.int64, (), ScalarCodec(LongType()), False),
    UnischemaField("city", np.str_, (), ScalarCodec(StringType()), False),
    UnischemaField("num_points", np.int32, (), ScalarCodec(IntegerType()), False),
    UnischemaField("sample_weight", np.float32, (), ScalarCodec(FloatType()), False),
    UnischemaField("points", np.float32, (None, 4), NdarrayCodec(), False),
    UnischemaField("labels", np.uint8, (None,), NdarrayCodec(), False),
    UnischemaField("boxes", np.float32, (None, len(BOX_COLUMNS)), NdarrayCodec(), False),
    UnischemaField("ego", np.float64, (len(EGO_COLUMNS),), NdarrayCodec(), False),
    UnischemaField("gps", np.float64, (len(GPS_COLUMNS),), NdarrayCodec(), False),
    UnischemaField("route", np.float64, (len(ROUTE_COLUMNS),), NdarrayCodec(), False),
])

# The Parquet (Arrow) types the rows are written with; must match FrameSchema.as_spark_schema().
_ARROW_TYPES = {StringType: pa.string(), IntegerType: pa.int32(), LongType: pa.int64(), FloatType: pa.float32()}


def arrow_schema() -> pa.Schema:
    fields = []
    for f in FrameSchema.fields.values():
        spark_type = type(f.codec.spark_dtype())
        fields.append(pa.field(f.name, _ARROW_TYPES.get(spark_type, pa.binary()), nullable=False))
    return pa.schema(fields)


def encode_frame(frame, city: str, sample_weight: float) -> dict:
    """A ``Frame`` as a dict of encoded column values (what one Parquet row holds)."""
    values = {
        "log_id": frame.log_id, "frame_index": np.int32(frame.frame_index),
        "timestamp_ns": np.int64(frame.timestamp_ns), "city": city,
        "num_points": np.int32(len(frame.points)), "sample_weight": np.float32(sample_weight),
        "points": frame.points, "labels": frame.labels, "boxes": frame.boxes,
        "ego": frame.ego, "gps": frame.gps, "route": frame.route,
    }
    out = {}
    for name, field in FrameSchema.fields.items():
        encoded = field.codec.encode(field, values[name])
        out[name] = bytes(encoded) if isinstance(encoded, bytearray) else encoded
    return out
