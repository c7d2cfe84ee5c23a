"""The native drive-log format: one MCAP file per drive log, Foxglove protobuf schemas, openable in
Foxglove Studio and readable with any MCAP library. The full specification (every channel, field, unit
and frame) is ``docs/drive-log-format.md``; this module is the reference writer and reader.

Each ``Frame`` is one message on each of the ``REQUIRED_CHANNELS``, all stamped with the frame's
timestamp as MCAP ``log_time``/``publish_time`` and its frame index as MCAP ``sequence``:

* ``/lidar/points``       ``foxglove.PointCloud``: x, y, z, intensity (float32) and label (uint8) per point
* ``/annotations/boxes``  ``foxglove.SceneUpdate``: one cube entity per 3D box (class, track id in metadata)
* ``/ego/pose``           ``foxglove.FrameTransform`` world -> lidar: ego x, y, z and heading
* ``/ego/motion``         ``avp.EgoMotion`` (JSON): heading, speed, acceleration (the exact values)
* ``/gps``                ``foxglove.LocationFix``: latitude, longitude, altitude
* ``/route``              ``avp.Route`` (JSON): lane offset, lane heading, speed limit

plus one MCAP Metadata record named ``log`` with the ``LogMeta`` fields, the frame count and the format
version. Files are written atomically and byte-for-byte deterministically; reading is streaming (one
MCAP chunk, about two frames, in memory at a time) and checks everything it relies on, raising
``CorruptLogError`` with the file, channel and frame at fault. Values are never "repaired": NaN
points, out-of-taxonomy labels or negative box sizes come back as written (the ingest job's quality
checks judge them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np
from foxglove_schemas_protobuf.Color_pb2 import Color
from foxglove_schemas_protobuf.CubePrimitive_pb2 import CubePrimitive
from foxglove_schemas_protobuf.FrameTransform_pb2 import FrameTransform
from foxglove_schemas_protobuf.KeyValuePair_pb2 import KeyValuePair
from foxglove_schemas_protobuf.LocationFix_pb2 import LocationFix
from foxglove_schemas_protobuf.PackedElementField_pb2 import PackedElementField
from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud
from foxglove_schemas_protobuf.Pose_pb2 import Pose
from foxglove_schemas_protobuf.Quaternion_pb2 import Quaternion
from foxglove_schemas_protobuf.SceneEntity_pb2 import SceneEntity
from foxglove_schemas_protobuf.SceneEntityDeletion_pb2 import SceneEntityDeletion
from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate
from foxglove_schemas_protobuf.Vector3_pb2 import Vector3
from google.protobuf.timestamp_pb2 import Timestamp
from mcap.reader import SeekingReader
from mcap.records import Metadata
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType, Writer
from mcap_protobuf.schema import build_file_descriptor_set

from pipeline.files import atomic_file
from pipeline.frames import BOX_COLUMNS, EGO_COLUMNS, GPS_COLUMNS, ROUTE_COLUMNS, Frame, LogMeta
from pipeline.taxonomy import CLASSES
from spark_jobs.sources.registry import register_importer

SOURCE = "mcap"
FORMAT_NAME = "avp-drive-log"
FORMAT_VERSION = "1"
# Written into the MCAP header instead of the mcap library's own "mcap-python/<version>" so that the
# file bytes depend only on the data, not on which library release wrote them.
WRITER_LIBRARY = f"avp-drive-log/{FORMAT_VERSION}"
METADATA_NAME = "log"
EXTENSION = ".mcap"

POINTS_CHANNEL = "/lidar/points"
BOXES_CHANNEL = "/annotations/boxes"
POSE_CHANNEL = "/ego/pose"
MOTION_CHANNEL = "/ego/motion"
GPS_CHANNEL = "/gps"
ROUTE_CHANNEL = "/route"
REQUIRED_CHANNELS = (POINTS_CHANNEL, BOXES_CHANNEL, POSE_CHANNEL, MOTION_CHANNEL, GPS_CHANNEL, ROUTE_CHANNEL)

LIDAR_FRAME = "lidar"  # coordinate frame of points and boxes (x forward, y left, z up, metres)
WORLD_FRAME = "world"  # coordinate frame of the ego pose
GPS_FRAME = "gps"

# MCAP chunks of ~1 MiB (zstd): a 30k-point frame is ~0.5 MiB raw, so the reader holds about two frames.
CHUNK_SIZE = 1 << 20

# One point = 17 bytes, little-endian, no padding: x, y, z, intensity float32 then the label uint8.
# Labels ride in the point cloud itself (not a separate channel) so they stay aligned point for point by
# construction, and Foxglove can colour the cloud by "label".
POINT_FIELDS = (("x", 0, PackedElementField.FLOAT32), ("y", 4, PackedElementField.FLOAT32),
                ("z", 8, PackedElementField.FLOAT32), ("intensity", 12, PackedElementField.FLOAT32),
                ("label", 16, PackedElementField.UINT8))
POINT_STRIDE = 17
_NUMPY_TYPE = {PackedElementField.UINT8: "u1", PackedElementField.INT8: "i1",
               PackedElementField.UINT16: "<u2", PackedElementField.INT16: "<i2",
               PackedElementField.UINT32: "<u4", PackedElementField.INT32: "<i4",
               PackedElementField.FLOAT32: "<f4", PackedElementField.FLOAT64: "<f8"}
_REQUIRED_POINT_TYPES = {name: kind for name, _offset, kind in POINT_FIELDS}

# Box metadata keys on each SceneEntity. yaw is repeated here although the cube's quaternion holds it:
# yaw -> quaternion -> yaw is not bit-exact and folds angles into (-pi, pi], the string is exact.
BOX_KEYS = ("class_id", "class", "track_id", "yaw")
_BOX_COLORS = {"vehicle": (0.2, 0.6, 1.0, 0.6), "pedestrian": (1.0, 0.3, 0.3, 0.6),
               "cyclist": (0.3, 0.9, 0.3, 0.6)}
_OTHER_BOX_COLOR = (0.8, 0.8, 0.8, 0.6)

# Non-finite numbers in the JSON channels: JSON has no NaN/Infinity, so they are written as these strings.
_NON_FINITE = ("NaN", "Infinity", "-Infinity")
_JSON_NUMBER = {"oneOf": [{"type": "number"}, {"type": "string", "enum": list(_NON_FINITE)}]}
_JSON_TIME = {"type": "object", "title": "time",
              "properties": {"sec": {"type": "integer", "minimum": 0},
                             "nsec": {"type": "integer", "minimum": 0, "maximum": 999999999}},
              "required": ["sec", "nsec"]}


def _json_schema(title: str, description: str, fields: dict[str, str]) -> dict:
    properties: dict[str, Any] = {"timestamp": {**_JSON_TIME, "description": "the frame's timestamp (UTC)"}}
    properties.update({name: {**_JSON_NUMBER, "description": text} for name, text in fields.items()})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
            "description": description, "type": "object", "properties": properties,
            "required": list(properties)}


MOTION_FIELDS = {"heading": "ego heading, rad, counter-clockwise about +z from the world x axis",
                 "speed": "ego speed, m/s", "acceleration": "ego longitudinal acceleration, m/s^2"}
ROUTE_FIELDS = {"lane_offset": "signed distance from the lane centre, m",
                "lane_heading": "lane direction relative to the ego heading, rad",
                "speed_limit": "speed limit of the lane, m/s"}
MOTION_SCHEMA = _json_schema("avp.EgoMotion", "Ego motion of one frame (the exact heading behind /ego/pose).",
                             MOTION_FIELDS)
ROUTE_SCHEMA = _json_schema("avp.Route", "Lane/route state of one frame.", ROUTE_FIELDS)


@dataclass(frozen=True)
class ChannelSpec:
    """What a channel must be: its topic, schema (name + encoding) and message encoding."""

    topic: str
    schema_name: str
    schema_encoding: str
    message_encoding: str
    schema_data: bytes


def _protobuf_channel(topic: str, message_class: Any) -> ChannelSpec:
    fds = build_file_descriptor_set(message_class).SerializeToString(deterministic=True)
    return ChannelSpec(topic, message_class.DESCRIPTOR.full_name, "protobuf", "protobuf", fds)


def _json_channel(topic: str, schema: dict) -> ChannelSpec:
    return ChannelSpec(topic, schema["title"], "jsonschema", "json",
                       json.dumps(schema, separators=(",", ":")).encode())


CHANNELS: dict[str, ChannelSpec] = {spec.topic: spec for spec in (
    _protobuf_channel(POINTS_CHANNEL, PointCloud),
    _protobuf_channel(BOXES_CHANNEL, SceneUpdate),
    _protobuf_channel(POSE_CHANNEL, FrameTransform),
    _json_channel(MOTION_CHANNEL, MOTION_SCHEMA),
    _protobuf_channel(GPS_CHANNEL, LocationFix),
    _json_channel(ROUTE_CHANNEL, ROUTE_SCHEMA),
)}

_MAGIC = b"\x89MCAP0\r\n"
_FOOTER = struct.Struct("<BQQQI")  # opcode, record length (20), summary start, summary offset start, CRC
_DATA_END = struct.Struct("<BQI")  # opcode, record length (4), data section CRC
_OPCODE_FOOTER, _OPCODE_DATA_END = 0x02, 0x0F


class CorruptLogError(Exception):
    """A drive log that cannot be read as this format: truncated, damaged, or missing something.

    The message names the file and, where it applies, the channel and frame index at fault.
    """

    def __init__(self, path: str, reason: str, channel: str | None = None, frame_index: int | None = None):
        where = ", ".join(part for part in (f"channel {channel}" if channel else "",
                                            f"frame {frame_index}" if frame_index is not None else "") if part)
        super().__init__(f"{path}: {where + ': ' if where else ''}{reason}")
        self.path, self.reason, self.channel, self.frame_index = path, reason, channel, frame_index

    def __reduce__(self):  # picklable (Spark ships exceptions between processes)
        return (type(self), (self.path, self.reason, self.channel, self.frame_index))


# ----------------------------------------------------------------------------------------------- write
def write_log(path: str, meta: LogMeta, frames: Iterable[Frame]) -> dict:
    """Write one drive log to ``path`` (conventionally ``<log_id>.mcap``) and return a summary:
    ``{"path", "frames", "points", "bytes", "sha256"}`` (sha256 of the file's bytes).

    Atomic: the file is written to a hidden temp file in the same folder and moved into place with
    ``os.replace`` once complete, so ``path`` never holds a partial log, even if ``frames`` raises midway.
    Deterministic: the same ``meta`` and frames always give the same bytes (no wall-clock time is written).
    Frames must have strictly increasing timestamps and frame indexes; arrays are stored as float32
    points/boxes, uint8 labels and float64 ego/gps/route (``ValueError`` for what cannot be stored).
    """
    with atomic_file(path) as fh:
        hashing = _HashingStream(fh)
        writer = _DriveLogWriter(hashing)
        count, points, previous = 0, 0, None
        for frame in frames:
            if frame.log_id != meta.log_id:
                raise ValueError(f"frame {frame.frame_index} belongs to log {frame.log_id!r}, "
                                 f"not {meta.log_id!r}")
            if previous is not None and (frame.timestamp_ns <= previous.timestamp_ns
                                         or frame.frame_index <= previous.frame_index):
                raise ValueError(f"frame {frame.frame_index} (t={frame.timestamp_ns} ns) does not come "
                                 f"after frame {previous.frame_index} (t={previous.timestamp_ns} ns): "
                                 "timestamps and frame indexes must strictly increase")
            for topic, payload in encode_frame(frame).items():
                writer.add_message(topic, int(frame.frame_index), int(frame.timestamp_ns), payload)
            count += 1
            points += len(frame.points)
            previous = frame
        writer.finish(log_metadata(meta, count))
    return {"path": path, "frames": count, "points": points, "bytes": hashing.size,
            "sha256": hashing.digest.hexdigest()}


def log_metadata(meta: LogMeta, frame_count: int) -> dict[str, str]:
    """The ``log`` metadata record (MCAP metadata values are strings)."""
    start = meta.start_time_ns
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise ValueError(f"start_time_ns must be an integer, got {start!r}")
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "log_id": str(meta.log_id),
            "vehicle_id": str(meta.vehicle_id), "city": str(meta.city), "start_time_ns": str(int(start)),
            "software_version": str(meta.software_version), "source": str(meta.source),
            "frame_count": str(frame_count)}


class _HashingStream:
    """A write-only stream that hashes and counts what goes through (what the MCAP writer needs)."""

    def __init__(self, fh: IO[bytes]):
        self._fh, self.digest, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()


class _DriveLogWriter:
    """An MCAP writer set up for this format: fixed header, the channels registered up front (so even an
    empty log has them all), data-section CRC on, zstd chunks."""

    def __init__(self, stream: Any, channels: Iterable[str] = REQUIRED_CHANNELS):
        self._mcap = Writer(stream, chunk_size=CHUNK_SIZE, compression=CompressionType.ZSTD,
                            enable_crcs=True, enable_data_crcs=True)
        self._mcap.start(profile="", library=WRITER_LIBRARY)
        self._channel_ids: dict[str, int] = {}
        for topic in channels:
            spec = CHANNELS[topic]
            schema_id = self._mcap.register_schema(spec.schema_name, spec.schema_encoding, spec.schema_data)
            self._channel_ids[topic] = self._mcap.register_channel(topic, spec.message_encoding, schema_id)

    def add_message(self, topic: str, frame_index: int, timestamp_ns: int, payload: bytes) -> None:
        """One frame's message on ``topic``; dropped if the topic was not registered (how the tests build
        logs that lack a channel)."""
        if topic not in self._channel_ids:
            return
        self._mcap.add_message(self._channel_ids[topic], log_time=timestamp_ns, data=payload,
                               publish_time=timestamp_ns, sequence=frame_index)

    def finish(self, metadata: dict[str, str] | None) -> None:
        if metadata is not None:
            self._mcap.add_metadata(METADATA_NAME, metadata)
        self._mcap.finish()


def _timestamp(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _yaw_quaternion(yaw: float) -> Quaternion:
    return Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2))


def _exact(value: float) -> str:
    """A float as text that parses back to the same value: integers plainly ("5"), the rest by repr."""
    value = float(value)
    if value.is_integer() and math.copysign(1.0, value) > 0:
        return str(int(value))
    return repr(value)


def _json_float(value: float) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _vector(name: str, values: Any, size: int, frame_index: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (size,):
        raise ValueError(f"frame {frame_index}: {name} has shape {array.shape}, expected ({size},)")
    return array


def encode_frame(frame: Frame) -> dict[str, bytes]:
    """One frame as the serialized message of each channel, in ``REQUIRED_CHANNELS`` order."""
    index, ns = frame.frame_index, frame.timestamp_ns
    if not 0 <= int(index) < 2**32:
        raise ValueError(f"frame index {index} does not fit the MCAP sequence field (0..2^32-1)")
    if not 0 <= int(ns) < 2**64:
        raise ValueError(f"frame {index}: timestamp {ns} ns is not a valid MCAP log time (0..2^64-1)")
    stamp = _timestamp(int(ns))
    return {
        POINTS_CHANNEL: _encode_points(frame, stamp),
        BOXES_CHANNEL: _encode_boxes(frame, stamp),
        POSE_CHANNEL: _encode_pose(frame, stamp),
        MOTION_CHANNEL: _encode_json(frame, MOTION_FIELDS, _vector("ego", frame.ego, len(EGO_COLUMNS), index)[3:]),
        GPS_CHANNEL: _encode_gps(frame, stamp),
        ROUTE_CHANNEL: _encode_json(frame, ROUTE_FIELDS, _vector("route", frame.route, len(ROUTE_COLUMNS), index)),
    }


def _encode_points(frame: Frame, stamp: Timestamp) -> bytes:
    points = np.asarray(frame.points)
    if points.ndim != 2 or points.shape[1] != 4:
        raise ValueError(f"frame {frame.frame_index}: points have shape {points.shape}, expected (N, 4)")
    labels = np.asarray(frame.labels)
    if labels.shape != (len(points),):
        raise ValueError(f"frame {frame.frame_index}: labels have shape {labels.shape}, "
                         f"expected ({len(points)},)")
    if labels.dtype != np.uint8:
        if labels.size and (labels.dtype.kind not in "iub" or labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"frame {frame.frame_index}: labels must be integers in 0..255 (stored as uint8)")
    packed = np.empty((len(points), POINT_STRIDE), np.uint8)
    packed[:, :16] = np.ascontiguousarray(points, dtype="<f4").view(np.uint8).reshape(len(points), 16)
    packed[:, 16] = labels
    cloud = PointCloud(timestamp=stamp, frame_id=LIDAR_FRAME,
                       pose=Pose(position=Vector3(x=0.0, y=0.0, z=0.0), orientation=Quaternion(w=1.0)),
                       point_stride=POINT_STRIDE,
                       fields=[PackedElementField(name=n, offset=o, type=t) for n, o, t in POINT_FIELDS],
                       data=packed.tobytes())
    return cloud.SerializeToString(deterministic=True)


def _class_name(class_id: float) -> str:
    if math.isfinite(class_id) and class_id.is_integer() and 0 <= class_id < len(CLASSES):
        return CLASSES[int(class_id)]
    return "unknown"


def _encode_boxes(frame: Frame, stamp: Timestamp) -> bytes:
    boxes = np.asarray(frame.boxes, dtype=np.float32)
    if boxes.size == 0:
        boxes = boxes.reshape(0, len(BOX_COLUMNS))
    if boxes.ndim != 2 or boxes.shape[1] != len(BOX_COLUMNS):
        raise ValueError(f"frame {frame.frame_index}: boxes have shape {boxes.shape}, "
                         f"expected (M, {len(BOX_COLUMNS)})")
    # Drop every entity of the previous frame first so that Foxglove shows only this frame's boxes (an
    # update with no boxes still carries this deletion). Deletion applies to entities older than stamp.
    update = SceneUpdate(deletions=[SceneEntityDeletion(timestamp=stamp, type=SceneEntityDeletion.ALL)])
    seen_ids: set[str] = set()
    for i, (cx, cy, cz, length, width, height, yaw, class_id, track_id) in enumerate(boxes.tolist()):
        entity_id = _exact(track_id)
        if entity_id in seen_ids:  # Foxglove keeps one entity per id: keep repeated track ids visible
            entity_id = f"{entity_id}#{i}"
        seen_ids.add(entity_id)
        name = _class_name(class_id)
        r, g, b, a = _BOX_COLORS.get(name, _OTHER_BOX_COLOR)
        cube = CubePrimitive(pose=Pose(position=Vector3(x=cx, y=cy, z=cz), orientation=_yaw_quaternion(yaw)),
                             size=Vector3(x=length, y=width, z=height), color=Color(r=r, g=g, b=b, a=a))
        values = {"class_id": _exact(class_id), "class": name, "track_id": _exact(track_id), "yaw": repr(yaw)}
        update.entities.append(SceneEntity(
            timestamp=stamp, frame_id=LIDAR_FRAME, id=entity_id, frame_locked=False, cubes=[cube],
            metadata=[KeyValuePair(key=key, value=values[key]) for key in BOX_KEYS]))
    return update.SerializeToString(deterministic=True)


def _encode_pose(frame: Frame, stamp: Timestamp) -> bytes:
    x, y, z, heading, _speed, _acceleration = _vector("ego", frame.ego, len(EGO_COLUMNS), frame.frame_index)
    transform = FrameTransform(timestamp=stamp, parent_frame_id=WORLD_FRAME, child_frame_id=LIDAR_FRAME,
                               translation=Vector3(x=x, y=y, z=z), rotation=_yaw_quaternion(heading))
    return transform.SerializeToString(deterministic=True)


def _encode_gps(frame: Frame, stamp: Timestamp) -> bytes:
    latitude, longitude, altitude = _vector("gps", frame.gps, len(GPS_COLUMNS), frame.frame_index)
    fix = LocationFix(timestamp=stamp, frame_id=GPS_FRAME, latitude=latitude, longitude=longitude,
                      altitude=altitude, position_covariance=[0.0] * 9,
                      position_covariance_type=LocationFix.UNKNOWN)
    return fix.SerializeToString(deterministic=True)


def _encode_json(frame: Frame, fields: dict[str, str], values: np.ndarray) -> bytes:
    ns = int(frame.timestamp_ns)
    message: dict[str, Any] = {"timestamp": {"sec": ns // 1_000_000_000, "nsec": ns % 1_000_000_000}}
    message.update({name: _json_float(value) for name, value in zip(fields, values.tolist())})
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


# ----------------------------------------------------------------------------------------------- read
def list_logs(root: str) -> list[str]:
    """The drive logs (``*.mcap``) directly in ``root``, sorted; hidden and temporary files are skipped.
    ``root`` may also be a single ``.mcap`` file."""
    if os.path.isfile(root) and root.endswith(EXTENSION):
        return [root]
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if name.endswith(EXTENSION) and not name.startswith(".")
                  and os.path.isfile(os.path.join(root, name)))


def source_files(path: str) -> list[str]:
    """The files a log is made of (the ingest job checksums them): the ``.mcap`` file itself."""
    return [path] if os.path.isfile(path) else []


@dataclass(frozen=True)
class _LogLayout:
    """What the cheap structural check learned about a log file."""

    meta: LogMeta
    frame_count: int
    data_end_offset: int  # where the DataEnd record starts = length of the data section
    data_crc: int  # 0 = not recorded


def read_metadata(path: str) -> LogMeta:
    """The log's ``LogMeta`` without decoding any frame: reads the header magic, footer, summary and the
    ``log`` metadata record only. Checks the file's structure (complete, not cut short, summary intact,
    every required channel with the right schema, consistent message counts); frame data is checked by
    ``read_log``."""
    with open(path, "rb") as fh:
        return _inspect(path, fh).meta


def read_log(path: str) -> tuple[LogMeta, Iterator[Frame]]:
    """The log's metadata (checked eagerly, like ``read_metadata``) and a lazy iterator over its frames
    in timestamp order. The iterator opens the file itself, verifies the data-section CRC, then decodes
    one frame at a time; anything wrong raises ``CorruptLogError`` naming the channel and frame."""
    with open(path, "rb") as fh:
        layout = _inspect(path, fh)
    return layout.meta, _iter_frames(path, layout)


def _inspect(path: str, fh: IO[bytes]) -> _LogLayout:
    """Validate the MCAP envelope (magic, footer, summary CRC, data end) and the summary; read the metadata."""
    size = os.fstat(fh.fileno()).st_size
    if size < 2 * len(_MAGIC) + _FOOTER.size:
        raise CorruptLogError(path, f"only {size} bytes: truncated, or not an MCAP file")
    if fh.read(len(_MAGIC)) != _MAGIC:
        raise CorruptLogError(path, "does not start with the MCAP magic bytes: not an MCAP file (garbage or "
                                    "another format)")
    fh.seek(size - len(_MAGIC))
    if fh.read(len(_MAGIC)) != _MAGIC:
        raise CorruptLogError(path, "does not end with the MCAP magic bytes: truncated (cut short or an "
                                    "unfinished write) or damaged at the end")
    footer_start = size - len(_MAGIC) - _FOOTER.size
    fh.seek(footer_start)
    footer = fh.read(_FOOTER.size)
    opcode, length, summary_start, _summary_offsets, summary_crc = _FOOTER.unpack(footer)
    if opcode != _OPCODE_FOOTER or length != _FOOTER.size - 9:
        raise CorruptLogError(path, "the footer record is damaged: truncated or garbage at the end")
    if summary_start == 0:
        raise CorruptLogError(path, "has no summary section (index): this format requires one")
    if not len(_MAGIC) + _DATA_END.size <= summary_start <= footer_start:
        raise CorruptLogError(path, f"the footer points outside the file (summary at {summary_start}, "
                                    f"file is {size} bytes): damaged")
    fh.seek(summary_start)
    summary_bytes = fh.read(footer_start - summary_start)
    if summary_crc and zlib.crc32(footer[:-4], zlib.crc32(summary_bytes)) != summary_crc:
        raise CorruptLogError(path, "the summary section fails its CRC check: damaged (garbage bytes)")
    data_end_offset = summary_start - _DATA_END.size
    fh.seek(data_end_offset)
    opcode, length, data_crc = _DATA_END.unpack(fh.read(_DATA_END.size))
    if opcode != _OPCODE_DATA_END or length != 4:
        raise CorruptLogError(path, "no DataEnd record before the summary: damaged")

    try:
        fh.seek(0)
        summary = SeekingReader(fh).get_summary()
    except Exception as exc:  # the CRC passed but a record will not parse: still the file's fault
        raise CorruptLogError(path, f"the summary section cannot be parsed ({type(exc).__name__}: {exc})") from exc
    if summary is None:
        raise CorruptLogError(path, "has no summary section (index): this format requires one")

    by_topic: dict[str, Any] = {}
    for channel in summary.channels.values():
        if channel.topic in by_topic and channel.topic in CHANNELS:
            raise CorruptLogError(path, "more than one channel with this topic", channel=channel.topic)
        by_topic[channel.topic] = channel
    present = ", ".join(sorted(by_topic)) or "none"
    for topic in REQUIRED_CHANNELS:
        spec, channel = CHANNELS[topic], by_topic.get(topic)
        if channel is None:
            raise CorruptLogError(path, f"missing required channel {topic} (channels present: {present})")
        schema = summary.schemas.get(channel.schema_id)
        found = (schema.name, schema.encoding) if schema is not None else ("no schema", "")
        if found != (spec.schema_name, spec.schema_encoding) or channel.message_encoding != spec.message_encoding:
            raise CorruptLogError(path, f"schema {found[0]!r} ({found[1] or '-'}, messages "
                                        f"{channel.message_encoding!r}), expected {spec.schema_name!r} "
                                        f"({spec.schema_encoding}, messages {spec.message_encoding!r})",
                                  channel=topic)

    indexes = [index for index in summary.metadata_indexes if index.name == METADATA_NAME]
    if not indexes:
        raise CorruptLogError(path, f"missing the {METADATA_NAME!r} metadata record (log id, vehicle, city, "
                                    "start time...)")
    if len(indexes) > 1:
        raise CorruptLogError(path, f"{len(indexes)} {METADATA_NAME!r} metadata records, expected one")
    try:
        fh.seek(indexes[0].offset)
        record = next(StreamReader(fh, skip_magic=True).records)
    except Exception as exc:
        raise CorruptLogError(path, f"the {METADATA_NAME!r} metadata record cannot be read "
                                    f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(record, Metadata) or record.name != METADATA_NAME:
        raise CorruptLogError(path, f"the {METADATA_NAME!r} metadata index points at a "
                                    f"{type(record).__name__} record: damaged")
    meta, frame_count = _parse_metadata(path, record.metadata)

    if summary.statistics is not None:  # written by this writer; optional in MCAP, so only checked if there
        counts = summary.statistics.channel_message_counts
        for topic in REQUIRED_CHANNELS:
            messages = counts.get(by_topic[topic].id, 0)
            if messages != frame_count:
                raise CorruptLogError(path, f"{messages} messages but the log has {frame_count} frames "
                                            "(every frame has one message on every channel)", channel=topic)
    return _LogLayout(meta, frame_count, data_end_offset, data_crc)


def _parse_metadata(path: str, values: dict[str, str]) -> tuple[LogMeta, int]:
    missing = [key for key in ("format_version", "log_id", "vehicle_id", "city", "start_time_ns",
                               "software_version", "source", "frame_count") if key not in values]
    if missing:
        raise CorruptLogError(path, f"the {METADATA_NAME!r} metadata record lacks {', '.join(missing)}")
    if values["format_version"].split(".")[0] != FORMAT_VERSION:
        raise CorruptLogError(path, f"format version {values['format_version']!r} is not supported "
                                    f"(this reader reads version {FORMAT_VERSION})")
    try:
        start_time_ns, frame_count = int(values["start_time_ns"]), int(values["frame_count"])
    except ValueError:
        raise CorruptLogError(path, f"metadata start_time_ns={values['start_time_ns']!r} / frame_count="
                                    f"{values['frame_count']!r} are not integers") from None
    meta = LogMeta(log_id=values["log_id"], vehicle_id=values["vehicle_id"], city=values["city"],
                   start_time_ns=start_time_ns, software_version=values["software_version"],
                   source=values["source"])
    return meta, frame_count


def _check_data_crc(path: str, fh: IO[bytes], layout: _LogLayout) -> None:
    """Catch garbage anywhere in the data section (chunks, indexes, metadata) before decoding anything."""
    if not layout.data_crc:
        return
    fh.seek(0)
    crc, remaining = 0, layout.data_end_offset
    while remaining:
        block = fh.read(min(remaining, 1 << 22))
        if not block:
            raise CorruptLogError(path, "the data section ends early: truncated")
        crc = zlib.crc32(block, crc)
        remaining -= len(block)
    if crc != layout.data_crc:
        raise CorruptLogError(path, "the data section fails its CRC check: damaged (garbage bytes or a "
                                    "partial overwrite)")


def _iter_frames(path: str, layout: _LogLayout) -> Iterator[Frame]:
    """Frames in timestamp order, each assembled from its messages (same log time and sequence)."""
    with open(path, "rb") as fh:
        _check_data_crc(path, fh, layout)
        fh.seek(0)
        reader = SeekingReader(fh, validate_crcs=True)
        produced = 0
        for key, gathered in _group_by_frame(path, reader.iter_messages(topics=list(REQUIRED_CHANNELS))):
            yield _assemble(path, layout.meta.log_id, key, gathered)
            produced += 1
        if produced != layout.frame_count:
            raise CorruptLogError(path, f"{produced} frames decoded but the metadata says {layout.frame_count}")


def _group_by_frame(path: str, messages: Iterator[Any]) -> Iterator[tuple[tuple[int, int], dict[str, bytes]]]:
    """Group log-time-ordered messages into frames: ((timestamp ns, frame index), {topic: payload}).
    Holds one frame's payloads at a time."""
    key: tuple[int, int] | None = None
    gathered: dict[str, bytes] = {}
    while True:
        try:
            item = next(messages, None)
        except Exception as exc:  # chunk CRC, decompression, record parsing
            raise CorruptLogError(path, f"cannot read the messages after this frame ({type(exc).__name__}: "
                                        f"{exc})", frame_index=key[1] if key else None) from exc
        if item is None:
            break
        _schema, channel, message = item
        message_key = (message.log_time, message.sequence)
        if key is not None and message_key != key:
            if message_key < key:  # same log time, lower sequence: indexes out of order
                raise CorruptLogError(path, f"comes after frame {key[1]} with the same timestamp "
                                            f"({key[0]} ns): frame indexes must increase",
                                      channel=channel.topic, frame_index=message_key[1])
            yield key, gathered
            gathered = {}
        if channel.topic in gathered:
            raise CorruptLogError(path, "two messages for the same frame", channel=channel.topic,
                                  frame_index=message_key[1])
        key = message_key
        gathered[channel.topic] = message.data
    if key is not None:
        yield key, gathered


def _assemble(path: str, log_id: str, key: tuple[int, int], gathered: dict[str, bytes]) -> Frame:
    timestamp_ns, frame_index = key
    missing = [topic for topic in REQUIRED_CHANNELS if topic not in gathered]
    if missing:
        raise CorruptLogError(path, f"the channels disagree: at t={timestamp_ns} ns there are messages on "
                                    f"{', '.join(sorted(gathered))} but none on {', '.join(missing)} with the "
                                    "same timestamp and frame index", frame_index=frame_index)
    decoded = {}
    for topic, decode in _DECODERS.items():
        try:
            decoded[topic] = decode(gathered[topic], timestamp_ns)
        except CorruptLogError:
            raise
        except _FormatProblem as problem:
            raise CorruptLogError(path, str(problem), channel=topic, frame_index=frame_index) from None
        except Exception as exc:  # protobuf/JSON parse errors
            raise CorruptLogError(path, f"message cannot be decoded ({type(exc).__name__}: {exc})",
                                  channel=topic, frame_index=frame_index) from exc
    points, labels = decoded[POINTS_CHANNEL]
    x, y, z = decoded[POSE_CHANNEL]
    heading, speed, acceleration = decoded[MOTION_CHANNEL]
    return Frame(log_id=log_id, frame_index=frame_index, timestamp_ns=timestamp_ns, points=points,
                 labels=labels, boxes=decoded[BOXES_CHANNEL],
                 ego=np.array([x, y, z, heading, speed, acceleration], np.float64),
                 gps=np.array(decoded[GPS_CHANNEL], np.float64),
                 route=np.array(decoded[ROUTE_CHANNEL], np.float64))


class _FormatProblem(ValueError):
    """A message that parses but does not follow the format (turned into CorruptLogError with context)."""


def _check_stamp(stamp: Timestamp, timestamp_ns: int, what: str = "message") -> None:
    ns = stamp.seconds * 1_000_000_000 + stamp.nanos
    if ns != timestamp_ns:
        raise _FormatProblem(f"{what} timestamp {ns} ns disagrees with its log time {timestamp_ns} ns")


def _decode_points(data: bytes, timestamp_ns: int) -> tuple[np.ndarray, np.ndarray]:
    cloud = PointCloud.FromString(data)
    _check_stamp(cloud.timestamp, timestamp_ns)
    stride = cloud.point_stride
    fields = {field.name: field for field in cloud.fields}
    for name, kind in _REQUIRED_POINT_TYPES.items():
        field = fields.get(name)
        if field is None or field.type != kind:
            found = PackedElementField.NumericType.Name(field.type) if field is not None else "missing"
            raise _FormatProblem(f"point field {name!r} is {found}, expected "
                                 f"{PackedElementField.NumericType.Name(kind)}")
        if field.offset + np.dtype(_NUMPY_TYPE[kind]).itemsize > stride:
            raise _FormatProblem(f"point field {name!r} at offset {field.offset} overruns the stride {stride}")
    if stride == 0 or len(cloud.data) % stride:
        raise _FormatProblem(f"{len(cloud.data)} bytes of point data is not a whole number of "
                             f"{stride}-byte points")
    # One structured view over the packed bytes (any stride/offsets, not just ours); fields copied out
    # column by column, vectorised.
    layout = np.dtype({"names": list(_REQUIRED_POINT_TYPES),
                       "formats": [_NUMPY_TYPE[kind] for kind in _REQUIRED_POINT_TYPES.values()],
                       "offsets": [fields[name].offset for name in _REQUIRED_POINT_TYPES],
                       "itemsize": stride})
    packed = np.frombuffer(cloud.data, dtype=layout)
    points = np.empty((len(packed), 4), np.float32)
    for column, name in enumerate(("x", "y", "z", "intensity")):
        points[:, column] = packed[name]
    return points, packed["label"].copy()


def _decode_boxes(data: bytes, timestamp_ns: int) -> np.ndarray:
    update = SceneUpdate.FromString(data)
    rows = []
    for i, entity in enumerate(update.entities):
        _check_stamp(entity.timestamp, timestamp_ns, f"box {i}")
        if len(entity.cubes) != 1:
            raise _FormatProblem(f"box {i} (entity {entity.id!r}) has {len(entity.cubes)} cubes, expected 1")
        values = {pair.key: pair.value for pair in entity.metadata}
        missing = [key for key in ("class_id", "track_id", "yaw") if key not in values]
        if missing:
            raise _FormatProblem(f"box {i} (entity {entity.id!r}) lacks metadata {', '.join(missing)}")
        try:
            class_id, track_id, yaw = (float(values[key]) for key in ("class_id", "track_id", "yaw"))
        except ValueError:
            raise _FormatProblem(f"box {i} (entity {entity.id!r}) has non-numeric class_id/track_id/yaw "
                                 "metadata") from None
        cube = entity.cubes[0]
        position, size = cube.pose.position, cube.size
        rows.append((position.x, position.y, position.z, size.x, size.y, size.z, yaw, class_id, track_id))
    # Every value was a float32 widened to float64 on the way in, so narrowing back is exact.
    return np.array(rows, dtype=np.float64).astype(np.float32).reshape(-1, len(BOX_COLUMNS))


def _decode_pose(data: bytes, timestamp_ns: int) -> tuple[float, float, float]:
    transform = FrameTransform.FromString(data)
    _check_stamp(transform.timestamp, timestamp_ns)
    return transform.translation.x, transform.translation.y, transform.translation.z


def _decode_gps(data: bytes, timestamp_ns: int) -> tuple[float, float, float]:
    fix = LocationFix.FromString(data)
    _check_stamp(fix.timestamp, timestamp_ns)
    return fix.latitude, fix.longitude, fix.altitude


def _json_decoder(fields: dict[str, str]):
    def decode(data: bytes, timestamp_ns: int) -> tuple[float, ...]:
        message = json.loads(data)
        stamp = message.get("timestamp") if isinstance(message, dict) else None
        if not isinstance(stamp, dict) or not {"sec", "nsec"} <= set(stamp):
            raise _FormatProblem("message has no timestamp {sec, nsec}")
        _check_stamp(Timestamp(seconds=int(stamp["sec"]), nanos=int(stamp["nsec"])), timestamp_ns)
        values = []
        for name in fields:
            value = message.get(name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) or value in _NON_FINITE):
                raise _FormatProblem(f"field {name!r} is {value!r}, expected a number or one of {_NON_FINITE}")
            values.append(float(value))
        return tuple(values)

    return decode


_DECODERS = {POINTS_CHANNEL: _decode_points, BOXES_CHANNEL: _decode_boxes, POSE_CHANNEL: _decode_pose,
             MOTION_CHANNEL: _json_decoder(MOTION_FIELDS), GPS_CHANNEL: _decode_gps,
             ROUTE_CHANNEL: _json_decoder(ROUTE_FIELDS)}


def unmatched_inputs(root: str) -> dict[str, list[str]]:
    """An MCAP log is one self-contained file: nothing can be left unpaired."""
    return {}


register_importer(sys.modules[__name__])
