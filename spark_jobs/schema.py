"""The Petastorm Unischema of a frame row (driver side; workers write rows with ``spark_jobs.rows``).

Arrays use Petastorm's own ``NdarrayCodec`` (``np.save`` bytes): Petastorm unpickles the Unischema stored
in the dataset with a whitelist of modules, so a codec class of ours could not be read back, and its
``CompressedNdarrayCodec`` writes zip entries stamped with the wall clock (the same frame would give
different bytes on every run). Points and labels are compressed by Parquet instead (zstd, see
``rows.COMPRESSION``): deterministic and transparent to every reader.
"""

from __future__ import annotations

import numpy as np
from petastorm.codecs import NdarrayCodec, ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql.types import FloatType, IntegerType, LongType, StringType

from spark_jobs.rows import COLUMNS

_SPARK_TYPES = {np.str_: StringType, np.int32: IntegerType, np.int64: LongType, np.float32: FloatType}

FrameSchema = Unischema("FrameSchema", [
    UnischemaField(c.name, c.dtype, c.shape, NdarrayCodec() if c.array else ScalarCodec(_SPARK_TYPES[c.dtype]()),
                   False)
    for c in COLUMNS
])
