"""The native drive-log format (spark_jobs/sources/mcap_log.py): exact round trips, Foxglove schemas readable
by the plain mcap reader, atomic and deterministic writes, and a clear CorruptLogError for every kind of
damaged log."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time

import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_protobuf.decoder import DecoderFactory

from pipeline.frames import Frame, LogMeta
from spark_jobs.sources import mcap_log
from spark_jobs.sources.mcap_log import CorruptLogError

META = LogMeta(log_id="log-0042", vehicle_id="veh-7", city="pittsburgh", start_time_ns=1_700_000_000_123_456_789,
               software_version="2.3.1+abc", source="sim")
EXPECTED_SCHEMAS = {
    "/lidar/points": ("foxglove.PointCloud", "protobuf"),
    "/annotations/boxes": ("foxglove.SceneUpdate", "protobuf"),
    "/ego/pose": ("foxglove.FrameTransform", "protobuf"),
    "/ego/motion": ("avp.EgoMotion", "jsonschema"),
    "/gps": ("foxglove.LocationFix", "protobuf"),
    "/route": ("avp.Route", "jsonschema"),
}


def random_frames(n: int = 6, seed: int = 0, points: int = 500, boxes: int = 4) -> list[Frame]:
    """Frames with awkward content on purpose: uneven frame indexes and timestamps, a frame without boxes
    and one without points, NaN/inf values, out-of-taxonomy labels, negative box sizes, angles past pi."""
    rng = np.random.default_rng(seed)
    frames, t, index = [], META.start_time_ns, 3
    for i in range(n):
        count = 0 if i == 2 else points + i
        xyzi = rng.normal(0, 30, (count, 4)).astype(np.float32)
        labels = rng.integers(0, 256, count).astype(np.uint8)
        box_count = 0 if i == 1 else boxes
        box = rng.normal(0, 10, (box_count, 9)).astype(np.float32)
        if box_count:
            box[:, 7] = rng.integers(0, 8, box_count)  # class ids
            box[:, 8] = rng.integers(0, 1000, box_count)  # track ids
            box[0, 6] = 7.5  # yaw outside (-pi, pi]: must not be folded
            box[-1, 3] = -1.25  # negative length: the quality checks judge it, not the format
        ego = rng.normal(0, 100, 6)
        gps = np.array([40.44 + rng.normal(0, 1e-3), -79.99 + rng.normal(0, 1e-3), 250 + rng.normal()])
        route = rng.normal(0, 2, 3)
        if i == 3 and count:
            xyzi[0] = np.nan
            xyzi[1, 2] = np.inf
            ego[4] = np.nan
            route[2] = -np.inf
            gps[:] = np.nan
        frames.append(Frame(META.log_id, index, t, xyzi, labels, box, ego, gps, route))
        t += int(rng.integers(50_000_000, 150_000_000))
        index += int(rng.integers(1, 3))
    return frames


def assert_same_frame(got: Frame, want: Frame) -> None:
    assert (got.log_id, got.frame_index, got.timestamp_ns) == (want.log_id, want.frame_index, want.timestamp_ns)
    assert got.points.dtype == np.float32 and got.points.shape == want.points.shape
    assert got.points.tobytes() == want.points.tobytes()  # bit for bit, NaN payloads included
    assert got.labels.dtype == np.uint8
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.boxes.dtype == np.float32 and got.boxes.shape == (len(want.boxes), 9)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    for name in ("ego", "gps", "route"):
        assert getattr(got, name).dtype == np.float64
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def write(tmp_path, frames=None, name=None) -> str:
    path = str(tmp_path / (name or f"{META.log_id}.mcap"))
    mcap_log.write_log(path, META, random_frames() if frames is None else frames)
    return path


def write_custom(path, frames, channels=mcap_log.REQUIRED_CHANNELS, metadata=True, edit=None) -> str:
    """A log written with the module's own writer pieces but damaged on purpose: fewer channels, no
    metadata, or messages edited by ``edit(topic, frame_index, timestamp, payload) -> (index, t, payload)
    or None to drop``."""
    with open(path, "wb") as fh:
        writer = mcap_log._DriveLogWriter(fh, channels)
        for frame in frames:
            for topic, payload in mcap_log.encode_frame(frame).items():
                message = (frame.frame_index, frame.timestamp_ns, payload)
                if edit is not None:
                    message = edit(topic, *message)
                if message is not None:
                    writer.add_message(topic, *message)
        writer.finish(mcap_log.log_metadata(META, len(frames)) if metadata else None)
    return str(path)


def read_all(path: str) -> list[Frame]:
    _meta, frames = mcap_log.read_log(path)
    return list(frames)


# ----------------------------------------------------------------------------------------- round trip
def test_round_trip_is_exact(tmp_path):
    frames = random_frames()
    path = str(tmp_path / "log-0042.mcap")
    info = mcap_log.write_log(path, META, frames)
    assert info["frames"] == len(frames) and info["points"] == sum(len(f.points) for f in frames)
    with open(path, "rb") as fh:
        data = fh.read()
    assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()

    assert mcap_log.read_metadata(path) == META
    meta, decoded = mcap_log.read_log(path)
    assert meta == META
    decoded = list(decoded)
    assert len(decoded) == len(frames)
    for got, want in zip(decoded, frames):
        assert_same_frame(got, want)


def test_faulty_values_are_read_back_not_rejected(tmp_path):
    """NaN points, labels outside the taxonomy and negative box sizes are data problems for the ingest
    quality checks to quarantine, not format errors."""
    frames = random_frames(n=4)
    path = write(tmp_path, frames)
    got = read_all(path)[3]
    assert np.isnan(got.points[0]).all() and np.isinf(got.points[1, 2])
    assert got.labels.max() > 7
    assert (got.boxes[:, 3:6] < 0).any()
    assert np.isnan(got.ego[4]) and np.isnan(got.gps).all() and got.route[2] == -np.inf


def test_log_without_any_boxes_round_trips(tmp_path):
    frames = random_frames(n=3, boxes=0)
    path = write(tmp_path, frames)
    decoded = read_all(path)
    assert [f.boxes.shape for f in decoded] == [(0, 9)] * 3
    for got, want in zip(decoded, frames):
        assert_same_frame(got, want)


def test_empty_log_round_trips(tmp_path):
    path = write(tmp_path, [])
    meta, frames = mcap_log.read_log(path)
    assert meta == META and list(frames) == []


def test_large_frames_span_chunks_and_stay_exact(tmp_path):
    """30k-point frames are about half an MCAP chunk, so frames straddle chunk boundaries."""
    frames = random_frames(n=5, points=30_000, boxes=20)
    path = write(tmp_path, frames)
    with open(path, "rb") as fh:
        assert make_reader(fh).get_summary().statistics.chunk_count > 1
    for got, want in zip(read_all(path), frames, strict=True):
        assert_same_frame(got, want)


# ----------------------------------------------------------------------------------------- foxglove / plain mcap
def test_plain_mcap_reader_sees_foxglove_schemas(tmp_path):
    frames = random_frames(n=3)
    path = write(tmp_path, frames)
    with open(path, "rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        found = {ch.topic: (summary.schemas[ch.schema_id].name, summary.schemas[ch.schema_id].encoding)
                 for ch in summary.channels.values()}
        assert found == EXPECTED_SCHEMAS
        assert reader.get_header().library == mcap_log.WRITER_LIBRARY
        metadata = list(reader.iter_metadata())
        assert [m.name for m in metadata] == ["log"]
        assert metadata[0].metadata["log_id"] == META.log_id
        assert metadata[0].metadata["start_time_ns"] == str(META.start_time_ns)
        assert metadata[0].metadata["format_version"] == mcap_log.FORMAT_VERSION

        by_topic: dict[str, list] = {}
        for schema, channel, message in reader.iter_messages():
            by_topic.setdefault(channel.topic, []).append(message)
            assert message.log_time == message.publish_time
        assert {t: len(m) for t, m in by_topic.items()} == {t: 3 for t in EXPECTED_SCHEMAS}

    # Decode with the schemas stored in the file (what Foxglove does), not with our classes.
    with open(path, "rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        first = {}
        for _schema, channel, message, decoded in reader.iter_decoded_messages(
                topics=[t for t, (_, enc) in EXPECTED_SCHEMAS.items() if enc == "protobuf"]):
            first.setdefault(channel.topic, (message, decoded))
    message, cloud = first["/lidar/points"]
    assert message.sequence == frames[0].frame_index and message.log_time == frames[0].timestamp_ns
    assert cloud.frame_id == "lidar"
    assert [(f.name, f.offset, f.type) for f in cloud.fields] == [
        ("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("intensity", 12, 7), ("label", 16, 1)]  # FLOAT32=7, UINT8=1
    assert cloud.point_stride == 17 and len(cloud.data) == 17 * len(frames[0].points)
    assert cloud.timestamp.seconds * 10**9 + cloud.timestamp.nanos == frames[0].timestamp_ns
    _, update = first["/annotations/boxes"]
    assert len(update.entities) == len(frames[0].boxes)
    entity = update.entities[0]
    keys = {kv.key: kv.value for kv in entity.metadata}
    assert entity.id == keys["track_id"] == str(int(frames[0].boxes[0, 8]))
    assert keys["class_id"] == str(int(frames[0].boxes[0, 7]))
    assert entity.frame_id == "lidar" and len(entity.cubes) == 1
    assert entity.cubes[0].size.x == float(frames[0].boxes[0, 3])
    _, transform = first["/ego/pose"]
    assert (transform.parent_frame_id, transform.child_frame_id) == ("world", "lidar")
    assert transform.translation.x == frames[0].ego[0]
    _, fix = first["/gps"]
    assert (fix.latitude, fix.longitude, fix.altitude) == tuple(frames[0].gps)

    with open(path, "rb") as fh:
        motion = [json.loads(m.data) for _s, _c, m in make_reader(fh).iter_messages(topics=["/ego/motion"])]
    assert motion[0]["speed"] == frames[0].ego[4]
    assert motion[0]["timestamp"] == {"sec": frames[0].timestamp_ns // 10**9, "nsec": frames[0].timestamp_ns % 10**9}


# ----------------------------------------------------------------------------------------- atomic, deterministic
def test_write_is_atomic_when_the_frames_fail_midway(tmp_path):
    path = tmp_path / "log-0042.mcap"
    path.write_bytes(b"the previous version")

    def failing():
        yield from random_frames(n=2)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        mcap_log.write_log(str(path), META, failing())
    assert path.read_bytes() == b"the previous version"
    assert sorted(os.listdir(tmp_path)) == ["log-0042.mcap"]  # no temp file left behind

    fresh = tmp_path / "fresh.mcap"
    with pytest.raises(RuntimeError):
        mcap_log.write_log(str(fresh), META, failing())
    assert not fresh.exists() and sorted(os.listdir(tmp_path)) == ["log-0042.mcap"]


def test_write_rejects_frames_out_of_order(tmp_path):
    frames = random_frames(n=3)
    frames[2].timestamp_ns = frames[1].timestamp_ns
    with pytest.raises(ValueError, match="strictly increase"):
        write(tmp_path, frames)
    assert os.listdir(tmp_path) == []


def test_write_is_deterministic_and_independent_of_the_clock(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = mcap_log.write_log(str(tmp_path / "a" / "x.mcap"), META, random_frames(seed=3))
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    monkeypatch.setattr(time, "time_ns", lambda: 2_000_000_000 * 10**9)
    second = mcap_log.write_log(str(tmp_path / "b" / "x.mcap"), META, random_frames(seed=3))
    assert (tmp_path / "a" / "x.mcap").read_bytes() == (tmp_path / "b" / "x.mcap").read_bytes()
    assert first["sha256"] == second["sha256"]
    other = mcap_log.write_log(str(tmp_path / "b" / "y.mcap"), META, random_frames(seed=4))
    assert other["sha256"] != first["sha256"]


def test_list_logs_ignores_temp_and_other_files(tmp_path):
    for name in ("b.mcap", "a.mcap", ".b.mcap.tmp-123-abcdef12", "notes.txt", "c.mcap.tmp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.mcap").write_bytes(b"")
    assert mcap_log.list_logs(str(tmp_path)) == [str(tmp_path / "a.mcap"), str(tmp_path / "b.mcap")]
    assert mcap_log.list_logs(str(tmp_path / "missing")) == []


# ----------------------------------------------------------------------------------------- corruption
def assert_corrupt(path: str, *fragments: str, metadata_too: bool = True) -> CorruptLogError:
    """read_log (and read_metadata, for structural damage) raise CorruptLogError naming the file and each
    fragment."""
    if metadata_too:
        with pytest.raises(CorruptLogError) as meta_error:
            mcap_log.read_metadata(path)
        for fragment in fragments:
            assert fragment in str(meta_error.value)
    with pytest.raises(CorruptLogError) as error:
        read_all(path)
    message = str(error.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message, message
    return error.value


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.9, 0.999, 12, -1])
def test_truncated_file(tmp_path, keep):
    path = write(tmp_path)
    data = open(path, "rb").read()
    cut = len(data) - 1 if keep == -1 else (keep if isinstance(keep, int) else int(len(data) * keep))
    with open(path, "wb") as fh:
        fh.write(data[:cut])
    assert_corrupt(path, "truncated")


def test_garbage_file(tmp_path):
    path = tmp_path / "log-0042.mcap"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    assert_corrupt(str(path), "not an MCAP file")


def test_garbage_bytes_in_the_frame_data(tmp_path):
    path = write(tmp_path, random_frames(n=4, points=5000))
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 64] = np.random.default_rng(2).bytes(64)
    open(path, "wb").write(bytes(data))
    # Structure intact: the cheap metadata read still works; decoding the frames does not.
    assert mcap_log.read_metadata(path) == META
    assert_corrupt(path, "data section fails its CRC check", metadata_too=False)


def test_garbage_bytes_in_the_summary(tmp_path):
    path = write(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[-200:-120] = bytes(80)
    open(path, "wb").write(bytes(data))
    assert_corrupt(path, "summary section fails its CRC check")


@pytest.mark.parametrize("missing", ["/lidar/points", "/annotations/boxes", "/gps"])
def test_missing_required_channel(tmp_path, missing):
    channels = [t for t in mcap_log.REQUIRED_CHANNELS if t != missing]
    path = write_custom(tmp_path / "log-0042.mcap", random_frames(n=3), channels=channels)
    assert_corrupt(path, f"missing required channel {missing}")


def test_point_cloud_without_matching_boxes_message(tmp_path):
    """Frame 1's boxes carry frame 2's timestamp: message counts agree, the frames do not."""
    frames = random_frames(n=4)
    shifted = frames[2]

    def move_boxes(topic, index, t, payload):
        if topic == "/annotations/boxes" and index == frames[1].frame_index:
            return shifted.frame_index, shifted.timestamp_ns, mcap_log.encode_frame(shifted)[topic]
        return index, t, payload

    path = write_custom(tmp_path / "log-0042.mcap", frames, edit=move_boxes)
    assert mcap_log.read_metadata(path) == META
    error = assert_corrupt(path, "channels disagree", "none on /annotations/boxes",
                           f"frame {frames[1].frame_index}", metadata_too=False)
    assert error.frame_index == frames[1].frame_index
    assert [f.frame_index for f in _frames_until_error(path)] == [frames[0].frame_index]


def _frames_until_error(path):
    _meta, frames = mcap_log.read_log(path)
    out = []
    try:
        for frame in frames:
            out.append(frame)
    except CorruptLogError:
        pass
    return out


def test_dropped_boxes_message(tmp_path):
    frames = random_frames(n=4)
    drop = frames[2].frame_index
    path = write_custom(tmp_path / "log-0042.mcap", frames,
                        edit=lambda topic, i, t, p: None if (topic, i) == ("/annotations/boxes", drop) else (i, t, p))
    assert_corrupt(path, "channel /annotations/boxes", "3 messages but the log has 4 frames")


def test_undecodable_message(tmp_path):
    frames = random_frames(n=3)
    bad = frames[1].frame_index
    path = write_custom(tmp_path / "log-0042.mcap", frames,
                        edit=lambda topic, i, t, p: (i, t, b"\xff" * 40) if (topic, i) == ("/lidar/points", bad)
                        else (i, t, p))
    error = assert_corrupt(path, "channel /lidar/points", f"frame {bad}", "cannot be decoded", metadata_too=False)
    assert error.channel == "/lidar/points"


def test_message_timestamp_disagreeing_with_log_time(tmp_path):
    frames = random_frames(n=3)
    other = mcap_log.encode_frame(frames[0])["/gps"]
    path = write_custom(tmp_path / "log-0042.mcap", frames,
                        edit=lambda topic, i, t, p: (i, t, other) if (topic, i) == ("/gps", frames[2].frame_index)
                        else (i, t, p))
    assert_corrupt(path, "channel /gps", "disagrees with its log time", metadata_too=False)


def test_missing_log_metadata(tmp_path):
    path = write_custom(tmp_path / "log-0042.mcap", random_frames(n=2), metadata=False)
    assert_corrupt(path, "missing the 'log' metadata record")


def test_corrupt_log_error_survives_pickling():
    error = CorruptLogError("/x/log.mcap", "boom", channel="/gps", frame_index=3)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) == "/x/log.mcap: channel /gps, frame 3: boom"
    assert (again.channel, again.frame_index) == ("/gps", 3)
