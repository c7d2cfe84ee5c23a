import numpy as np
import pytest

from pipeline.frames import Frame
from spark_jobs.quality import frame_problem, normalise
from spark_jobs.rows import encode_frame
from spark_jobs.schema import FrameSchema


def frame(n=100, boxes=None):
    rng = np.random.default_rng(0)
    return Frame(log_id="log-a", frame_index=3, timestamp_ns=10**18, points=rng.normal(size=(n, 4)).astype(np.float32),
                 labels=rng.integers(0, 8, n).astype(np.uint8),
                 boxes=np.array([[1, 2, 0.5, 4, 2, 1.5, 0.3, 5, 7]], np.float32) if boxes is None else boxes)


def test_clean_frame_passes():
    assert frame_problem(frame(), 1000) is None


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.points.__setitem__((5, 1), np.nan), "1 points with NaN or inf"),
    (lambda f: f.points.__setitem__((5, 3), np.inf), "NaN or inf"),
    (lambda f: f.labels.__setitem__(0, 9), "label id 9 is outside the taxonomy"),
    (lambda f: f.boxes.__setitem__((0, 4), -2.0), "box 0 has a non-positive size"),
    (lambda f: f.boxes.__setitem__((0, 7), 11), "box class id is outside the taxonomy"),
    (lambda f: setattr(f, "labels", f.labels[:-1]), "99 labels for 100 points"),
    (lambda f: setattr(f, "points", f.points[:0]), "no LiDAR points"),
])
def test_each_problem_is_named_with_its_frame(mutate, message):
    f = frame()
    mutate(f)
    problem = frame_problem(f, 1000)
    assert problem is not None and problem.startswith("frame 3:") and message in problem


def test_too_many_points():
    assert "more than ingest.max_points=50" in frame_problem(frame(), 50)


def test_normalise_keeps_out_of_range_labels_detectable():
    f = frame()
    f.labels = np.array([-1] + [1] * 99)
    assert "outside the taxonomy" in frame_problem(normalise(f), 1000)


def test_codec_round_trip_is_exact_and_deterministic():
    f = normalise(frame())
    a, b = encode_frame(f, "pittsburgh", 2.0), encode_frame(f, "pittsburgh", 2.0)
    assert a == b  # same bytes every time (Petastorm's zip codec would embed the wall clock)
    for name in ("points", "labels", "boxes"):
        field = FrameSchema.fields[name]
        np.testing.assert_array_equal(field.codec.decode(field, a[name]), getattr(f, name))
    with pytest.raises(ValueError, match="Unexpected type of points feature"):
        encode_frame(Frame("l", 0, 0, f.points.astype(np.float64), f.labels), "x", 1.0)


def test_light_row_encoder_matches_petastorm_codecs_byte_for_byte():
    """Workers encode with ``spark_jobs.rows`` (no petastorm import); readers decode with the Unischema."""
    f = normalise(frame())
    ours = encode_frame(f, "pittsburgh", 2.0)
    values = {"log_id": f.log_id, "frame_index": np.int32(f.frame_index), "timestamp_ns": np.int64(f.timestamp_ns),
              "city": "pittsburgh", "num_points": np.int32(len(f.points)), "sample_weight": np.float32(2.0),
              "points": f.points, "labels": f.labels, "boxes": f.boxes, "ego": f.ego, "gps": f.gps, "route": f.route}
    assert list(ours) == list(FrameSchema.fields)
    for name, field in FrameSchema.fields.items():
        theirs = field.codec.encode(field, values[name])
        assert ours[name] == (bytes(theirs) if isinstance(theirs, bytearray) else theirs), name
        assert type(ours[name]) is type(bytes(theirs) if isinstance(theirs, bytearray) else theirs), name


def test_arrow_schema_is_the_unischema_spark_schema():
    from spark_jobs.rows import arrow_schema

    spark_schema = FrameSchema.as_spark_schema()
    arrow = arrow_schema()
    assert arrow.names == [f.name for f in spark_schema.fields]
    kinds = {"StringType": "string", "IntegerType": "int32", "LongType": "int64", "FloatType": "float",
             "BinaryType": "binary"}
    assert [str(t) for t in arrow.types] == [kinds[type(f.dataType).__name__] for f in spark_schema.fields]


def test_spark_workers_do_not_import_petastorm_pandas_or_the_registry():
    """What a Spark Python worker imports to run an extraction task (its start-up cost on every job)."""
    import subprocess
    import sys

    code = ("import sys, spark_jobs.extract, spark_jobs.sources.mcap_log, spark_jobs.quality, pyarrow.parquet; "
            "print(sorted({m.split('.')[0] for m in sys.modules} | set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("petastorm", "pandas", "sqlalchemy", "torch", "pipeline.registry"):
        assert f"'{heavy}'" not in loaded, heavy
