"""A generator of corrupt drive logs: every way a log can be damaged that ingest must survive.

``write_corrupt_logs(folder, good_log)`` writes one (or, for duplicate ids, two) ``.mcap`` files per kind
into ``folder`` and returns a ``Corruption`` per kind: which log ids ingest must quarantine and a piece of
the reason it must give for each, and which ids it must still ingest (an identical copy of a good log is
one log, not a problem). Kinds cover the file's bytes (empty, truncated at several offsets, wrong magic,
garbage, flipped bytes in the data section, summary and footer, a cut-out middle, appended bytes), the
format's structure (missing channel or metadata, unsupported version, wrong frame counts, no frames), the
frames' values (repeated and decreasing timestamps, NaN/inf points, ego and boxes, too many points,
labels and box classes outside the taxonomy, non-positive box sizes) and the selection (unsafe ids,
duplicate ids, an unreadable file).

Every log is built from scratch with a fixed seed, so the same call writes the same bytes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.frames import Frame, LogMeta
from spark_jobs.sources import mcap_log

START_NS = 1_793_520_000_000_000_000  # 2026-11-01 08:00 UTC: inside every window the tests use
FRAMES = 3
POINTS = 300
# The harness runs ingest with ingest.max_points set to this, so a "too many points" frame stays small.
MAX_POINTS = 5000


@dataclass(frozen=True)
class Corruption:
    """One kind of damage: the log ids ingest must quarantine (id -> any of the reason fragments) and the
    ids it must still ingest."""

    kind: str
    quarantined: dict[str, tuple[str, ...]]
    ingested: tuple[str, ...] = field(default=())


def clean_frames(log_id: str, seed: int) -> tuple[LogMeta, list[Frame]]:
    """A small valid log: ``FRAMES`` frames of ``POINTS`` points, one box each, 10 Hz."""
    rng = np.random.default_rng(seed)
    meta = LogMeta(log_id, "veh-fuzz", "pittsburgh", START_NS, "fuzz", "sim")
    frames = []
    for i in range(FRAMES):
        points = rng.uniform(-20, 20, (POINTS, 4)).astype(np.float32)
        points[:, 3] = np.abs(points[:, 3]) / 20
        frames.append(Frame(log_id, i, START_NS + i * 100_000_000, points=points,
                            labels=rng.integers(1, 8, POINTS).astype(np.uint8),
                            boxes=np.array([[5, 1, 0.8, 4.5, 1.9, 1.6, 0.1, 5, 3]], np.float32),
                            ego=np.array([i, 0, 0, 0, 10, 0], np.float64),
                            gps=np.array([40.44, -79.99, 250.0])))
    return meta, frames


def write_raw(path: Path, meta: LogMeta, frames: list[Frame], metadata: dict[str, str] | None = None,
              channels: tuple[str, ...] = mcap_log.REQUIRED_CHANNELS) -> None:
    """Write a log with the format's own writer but none of ``write_log``'s checks (timestamps may repeat or
    go back, the metadata record may be anything or missing, channels may be left out)."""
    with open(path, "wb") as fh:
        writer = mcap_log._DriveLogWriter(fh, channels)
        for frame in frames:
            for topic, payload in mcap_log.encode_frame(frame).items():
                writer.add_message(topic, int(frame.frame_index), int(frame.timestamp_ns), payload)
        writer.finish(metadata)


def _valid_bytes(log_id: str, seed: int) -> bytes:
    path = Path(f"/dev/shm/avp-corrupt-{os.getpid()}-{log_id}.mcap")
    try:
        mcap_log.write_log(str(path), *clean_frames(log_id, seed))
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def _sections(data: bytes) -> tuple[int, int, int]:
    """(data section end, summary start, footer start) of a valid log's bytes."""
    footer_start = len(data) - len(mcap_log._MAGIC) - mcap_log._FOOTER.size
    _op, _len, summary_start, _offsets, _crc = mcap_log._FOOTER.unpack_from(data, footer_start)
    return summary_start - mcap_log._DATA_END.size, summary_start, footer_start


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def _zero(data: bytes, offset: int, length: int) -> bytes:
    return data[:offset] + bytes(length) + data[offset + length:]


# ---------------------------------------------------------------------------------- damage to the bytes
ByteDamage = Callable[[bytes], bytes]
TRUNCATED = ("truncated",)
BYTE_KINDS: dict[str, tuple[ByteDamage, tuple[str, ...]]] = {
    "empty": (lambda d: b"", TRUNCATED),
    "truncated-1pct": (lambda d: d[: len(d) // 100], TRUNCATED),
    "truncated-25pct": (lambda d: d[: len(d) // 4], TRUNCATED),
    "truncated-50pct": (lambda d: d[: len(d) // 2], TRUNCATED),
    "truncated-90pct": (lambda d: d[: len(d) * 9 // 10], TRUNCATED),
    "truncated-last-byte": (lambda d: d[:-1], TRUNCATED),
    "wrong-magic": (lambda d: b"\x89PNG\r\n\x1a\n" + d[8:], ("does not start with the MCAP magic",)),
    "garbage-after-magic": (lambda d: mcap_log._MAGIC + np.random.default_rng(7).bytes(4000), ("MCAP magic",)),
    "flipped-chunk-byte": (lambda d: _flip(d, _sections(d)[0] // 2), ("data section fails its CRC",)),
    "zeroed-chunk-block": (lambda d: _zero(d, _sections(d)[0] // 2, 512), ("data section fails its CRC",)),
    "flipped-summary-byte": (lambda d: _flip(d, (_sections(d)[1] + _sections(d)[2]) // 2),
                             ("summary section fails its CRC",)),
    "flipped-footer-opcode": (lambda d: _flip(d, _sections(d)[2]), ("footer record is damaged",)),
    "middle-cut-out": (lambda d: d[: len(d) // 3] + d[2 * len(d) // 3:],
                       ("footer points outside the file", "summary section fails its CRC", "DataEnd")),
    "appended-bytes": (lambda d: d + b"trailing junk", ("does not end with the MCAP magic",)),
}


# ---------------------------------------------------------------------------------- damage to the frames
def _set(array_name: str, index: tuple, value: float, frame: int = 1) -> Callable[[list[Frame]], None]:
    def damage(frames: list[Frame]) -> None:
        getattr(frames[frame], array_name)[index] = value
    return damage


def _repeat_timestamp(frames: list[Frame]) -> None:
    frames[2].timestamp_ns = frames[1].timestamp_ns


def _decreasing_timestamp(frames: list[Frame]) -> None:
    frames[1].timestamp_ns = frames[0].timestamp_ns - 50_000_000


def _too_many_points(frames: list[Frame]) -> None:
    rng = np.random.default_rng(3)
    frames[0].points = rng.uniform(-20, 20, (MAX_POINTS + 1, 4)).astype(np.float32)
    frames[0].points[:, 3] = 0.5
    frames[0].labels = np.ones(MAX_POINTS + 1, np.uint8)


def _box_class(frames: list[Frame]) -> None:
    frames[0].boxes[0, 7] = 200  # float32 box column: a class id no taxonomy has


ORDER = ("timestamps must strictly increase", "frame indexes must increase")
FRAME_KINDS: dict[str, tuple[Callable[[list[Frame]], None], tuple[str, ...]]] = {
    "repeated-timestamp": (_repeat_timestamp, ORDER),
    "decreasing-timestamp": (_decreasing_timestamp, ORDER),
    "nan-point": (_set("points", (7, 0), np.nan), ("NaN or inf coordinates",)),
    "inf-intensity": (_set("points", (3, 3), np.inf), ("NaN or inf coordinates",)),
    "nan-ego": (_set("ego", (4,), np.nan), ("ego state has NaN",)),
    "nan-box": (_set("boxes", (0, 0), np.nan), ("a box has NaN",)),
    "negative-box-size": (_set("boxes", (0, 3), -1.0), ("non-positive size",)),
    "label-outside-taxonomy": (_set("labels", (5,), 42), ("outside the taxonomy",)),
    "box-class-outside-taxonomy": (_box_class, ("box class id is outside the taxonomy",)),
    "too-many-points": (_too_many_points, (f"more than ingest.max_points={MAX_POINTS}",)),
}


# ---------------------------------------------------------------------------------- damage to the structure
def _metadata(meta: LogMeta, frames: int, **changes: str) -> dict[str, str]:
    return {**mcap_log.log_metadata(meta, frames), **changes}


STRUCTURE_KINDS: dict[str, tuple[Callable[[LogMeta, list[Frame]], dict], tuple[str, ...]]] = {
    "missing-channel": (lambda m, f: {"channels": mcap_log.REQUIRED_CHANNELS[:-1]}, ("missing required channel",)),
    "no-metadata-record": (lambda m, f: {"metadata": None}, ("missing the 'log' metadata record",)),
    "unsupported-version": (lambda m, f: {"metadata": _metadata(m, len(f), format_version="9")},
                            ("format version '9' is not supported",)),
    "non-integer-start-time": (lambda m, f: {"metadata": _metadata(m, len(f), start_time_ns="noon")},
                               ("are not integers",)),
    "huge-frame-count": (lambda m, f: {"metadata": _metadata(m, 10**15)}, ("messages but the log has",)),
    "short-frame-count": (lambda m, f: {"metadata": _metadata(m, len(f) - 1)}, ("messages but the log has",)),
    "no-frames": (lambda m, f: {"frames": [], "metadata": _metadata(m, 0)}, ("log has no frames",)),
}


def write_corrupt_logs(folder: Path, good_log: Path, unreadable: bool = True) -> list[Corruption]:
    """Write every kind into ``folder`` (an ingest source); ``good_log`` is a valid log of the same folder
    that the duplicate-id kinds copy. ``unreadable`` adds a file nobody may read (chmod 000: the caller
    must run ingest without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH when it is root)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Corruption] = []
    for seed, (kind, (damage, reasons)) in enumerate(sorted(BYTE_KINDS.items())):
        log_id = f"bad-{kind}"
        (folder / f"{log_id}.mcap").write_bytes(damage(_valid_bytes(log_id, seed)))
        out.append(Corruption(kind, {log_id: reasons}))
    for seed, (kind, (damage, reasons)) in enumerate(sorted(FRAME_KINDS.items()), start=100):
        log_id = f"bad-{kind}"
        meta, frames = clean_frames(log_id, seed)
        damage(frames)
        write_raw(folder / f"{log_id}.mcap", meta, frames, mcap_log.log_metadata(meta, len(frames)))
        out.append(Corruption(kind, {log_id: reasons}))
    for seed, (kind, (change, reasons)) in enumerate(sorted(STRUCTURE_KINDS.items()), start=200):
        log_id = f"bad-{kind}"
        meta, frames = clean_frames(log_id, seed)
        args = {"frames": frames, "metadata": mcap_log.log_metadata(meta, len(frames)), **change(meta, frames)}
        write_raw(folder / f"{log_id}.mcap", meta, args.pop("frames"), **args)
        out.append(Corruption(kind, {log_id: reasons}))
    # ids: unsafe (a path, a space), shared with different content, shared by an identical copy
    for kind, log_id in (("unsafe-id-path", "../../evil"), ("unsafe-id-space", "log with space")):
        meta, frames = clean_frames(log_id, 300)
        write_raw(folder / f"{kind}.mcap", meta, frames, mcap_log.log_metadata(meta, len(frames)))
        out.append(Corruption(kind, {log_id: ("is not allowed",)}))
    for seed, name in enumerate(("dup-a", "dup-b"), start=400):
        meta, frames = clean_frames("bad-duplicate-id", seed)
        mcap_log.write_log(str(folder / f"{name}.mcap"), meta, frames)
    out.append(Corruption("duplicate-id-different-content", {"bad-duplicate-id": ("duplicate log id",)}))
    shutil.copyfile(good_log, folder / f"copy-of-{good_log.name}")
    out.append(Corruption("duplicate-id-identical-copy", {}, ingested=(good_log.stem,)))
    if unreadable:
        path = folder / "bad-unreadable.mcap"
        path.write_bytes(_valid_bytes("bad-unreadable", 500))
        path.chmod(0)
        out.append(Corruption("unreadable", {"bad-unreadable": ("PermissionError",)}))
    return out


def read_capability_dropped() -> list[str]:
    """The command prefix that runs a process without the capabilities that let root read any file
    (``[]`` when not root: a chmod 000 file is unreadable already)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]

