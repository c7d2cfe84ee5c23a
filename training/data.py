"""Reading a dataset's Petastorm shards into padded, deterministic training batches.

What a rank sees is a pure function of (dataset, seed, epoch, rank, world size): never of the backend,
the timing of threads, or whether the run was resumed.

* **Sharding.** Rank ``r`` of ``R`` reads row groups ``r, r+R, r+2R, ...`` of a split (Petastorm's
  ``cur_shard``/``shard_count``). Shards can be uneven, so the number of steps per epoch is computed up
  front from the manifest's row group sizes as the minimum over ranks: every rank runs the same number
  of steps, no rank waits in an allreduce for one that has run out of data.
* **Order.** Per epoch, Petastorm reads the shard's row groups in an order shuffled with a seed derived
  from (seed, epoch) (single-threaded ``dummy`` pool, so the order is exactly reproducible), and a
  shuffle buffer seeded from (seed, epoch, rank) mixes rows across neighbouring row groups (a row group
  holds consecutive frames of one log).
* **Points.** A frame with more than ``max_points`` points is subsampled with a generator seeded from
  (seed, epoch, log id, frame index), so a frame gets the same points whichever rank reads it.
  Frames are padded into ``points [B, N, 4]`` + ``valid [B, N]``; padding is labelled ``IGNORE``.
* **Prefetch.** A background thread decodes and collates ahead of the training loop (``Prefetcher``),
  so the loop's wait for data stays small; the wait is measured and reported.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipeline.contracts import Manifest
from pipeline.taxonomy import IGNORE, NUM_CLASSES

# Only what training needs: decoding boxes, ego pose, GPS and route would cost time for nothing.
TRAIN_FIELDS = ("log_id", "frame_index", "sample_weight", "points", "labels")
# Seed-stream tags: the train and validation streams must never share random numbers.
_TRAIN_POINTS, _VAL_POINTS, _ROW_GROUP_ORDER, _SHUFFLE_BUFFER = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------- the dataset
def split_url(location: str, manifest: Manifest, split: str) -> str:
    """``file://`` URL of one split's Petastorm folder."""
    return "file://" + os.path.abspath(os.path.join(location, manifest.splits[split].path))


def rows_per_rank(row_groups: Sequence[int], world: int) -> list[int]:
    """Rows each rank reads when rank ``r`` gets row groups ``r, r+world, ...`` (Petastorm's sharding)."""
    return [sum(row_groups[rank::world]) for rank in range(world)]


def steps_per_epoch(row_groups: Sequence[int], world: int, batch_size: int) -> int:
    """Full batches every rank can fill: the minimum over ranks, so no rank stalls the others."""
    return min(rows // batch_size for rows in rows_per_rank(row_groups, world))


def class_points(manifest: Manifest, split: str = "train") -> np.ndarray:
    """Points per taxonomy class over the logs of one split (from the manifest's per-log statistics)."""
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for log_id in manifest.splits[split].logs:
        for label, count in manifest.logs[log_id].get("class_points", {}).items():
            if 0 <= int(label) < NUM_CLASSES:
                counts[int(label)] += int(count)
    return counts


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Class-balanced loss weights, ``1 / ln(1.02 + share)`` (ENet), normalised to mean 1 over the
    classes that occur; ``IGNORE`` and classes without points get 0.

    The logarithm keeps a rare class's weight bounded (at most ~50x a dominant one) where plain
    inverse frequency would let a handful of points dominate the loss.
    """
    counts = np.asarray(counts, dtype=np.float64).copy()
    counts[IGNORE] = 0
    weights = np.zeros_like(counts)
    present = counts > 0
    if not present.any():
        return weights.astype(np.float32)
    share = counts[present] / counts[present].sum()
    weights[present] = 1.0 / np.log(1.02 + share)
    weights[present] /= weights[present].mean()
    return weights.astype(np.float32)


# ----------------------------------------------------------------------------------------- seeds
def _seed_state(*parts: int) -> int:
    """A 32-bit seed mixed from integer parts (Petastorm's shufflers take a 32-bit seed)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _generator(*parts: int) -> np.random.Generator:
    """A NumPy generator seeded from integer parts (order matters)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def _log_key(log_id: str) -> int:
    """A stable integer for a log id (Python's ``hash`` of a string changes between processes)."""
    return zlib.crc32(log_id.encode())


def sample_points(points: np.ndarray, labels: np.ndarray, max_points: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a frame, drawn without replacement, kept in scan order."""
    if len(points) <= max_points:
        return points, labels
    keep = np.sort(rng.choice(len(points), size=max_points, replace=False))
    return points[keep], labels[keep]


def train_point_rng(seed: int, epoch: int, log_id: str, frame_index: int) -> np.random.Generator:
    """The generator that picks a training frame's points: the same on every rank and backend."""
    return _generator(seed, _TRAIN_POINTS, epoch, _log_key(log_id), frame_index)


def val_point_rng(seed: int, log_id: str, frame_index: int) -> np.random.Generator:
    """Validation frames are subsampled the same way every epoch, so epochs are comparable."""
    return _generator(seed, _VAL_POINTS, _log_key(log_id), frame_index)


# ----------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Padded frames: ``points [B, N, 4]`` float32, ``valid [B, N]`` bool, ``labels [B, N]`` int64
    (``IGNORE`` on padding), ``sample_weight [B]`` float32 and the (log id, frame index) of each row."""

    points: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor
    sample_weight: torch.Tensor
    keys: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device) -> "Batch":
        """The same batch on ``device`` (a no-op on CPU)."""
        if device.type == "cpu":
            return self
        return Batch(self.points.to(device, non_blocking=True), self.valid.to(device, non_blocking=True),
                     self.labels.to(device, non_blocking=True), self.sample_weight.to(device, non_blocking=True),
                     self.keys)


@dataclass
class Frame:
    """One decoded, subsampled frame on its way into a batch."""

    log_id: str
    frame_index: int
    points: np.ndarray
    labels: np.ndarray
    sample_weight: float


def collate(frames: Sequence[Frame]) -> Batch:
    """Pad frames to the batch's largest point count (not to ``max_points``: no work on empty slots)."""
    size = max(1, max(len(f.points) for f in frames))
    points = np.zeros((len(frames), size, 4), dtype=np.float32)
    valid = np.zeros((len(frames), size), dtype=bool)
    labels = np.full((len(frames), size), IGNORE, dtype=np.int64)
    for i, frame in enumerate(frames):
        n = len(frame.points)
        points[i, :n] = frame.points
        valid[i, :n] = True
        labels[i, :n] = frame.labels
    weights = np.array([f.sample_weight for f in frames], dtype=np.float32)
    return Batch(torch.from_numpy(points), torch.from_numpy(valid), torch.from_numpy(labels),
                 torch.from_numpy(weights), [(f.log_id, f.frame_index) for f in frames])


def _read_shard(url: str, rank: int, world: int, order_seed: int | None, row_groups: int) -> Iterator[Any]:
    """Rows of one rank's shard of a split, in an exactly reproducible order.

    ``order_seed`` None reads the row groups in file order; otherwise Petastorm shuffles their order
    with it. The ``dummy`` pool decodes in this thread, so nothing races.
    """
    from petastorm import make_reader

    # Petastorm refuses more shards than row groups even for the ranks that would get one; with
    # ``min(world, row_groups)`` shards rank r still gets row groups r, r+world, ... (the others get none).
    world = min(world, row_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyarrow's legacy-API FutureWarnings from Petastorm
        reader = make_reader(url, schema_fields=list(TRAIN_FIELDS), reader_pool_type="dummy",
                             shuffle_row_groups=order_seed is not None, seed=order_seed,
                             shuffle_rows=False, num_epochs=1, cur_shard=rank, shard_count=world)
    with reader:
        yield from reader


def shuffled(rows: Iterable[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A deterministic shuffle buffer: once ``buffer_size`` rows are held, emit a random one per new row."""
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        pick = int(rng.integers(len(buffer)))
        buffer[pick], row = row, buffer[pick]
        yield row
    while buffer:
        pick = int(rng.integers(len(buffer)))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        yield buffer.pop()


@dataclass(frozen=True)
class ShardPlan:
    """Everything a rank needs to produce its batches (plain data, built once per run)."""

    location: str
    manifest: Manifest
    rank: int
    world: int
    batch_size: int
    max_points: int
    seed: int
    shuffle_buffer: int

    def url(self, split: str) -> str:
        """The split's Petastorm URL."""
        return split_url(self.location, self.manifest, split)

    def steps_per_epoch(self) -> int:
        """Steps every rank runs per epoch (the same on all ranks)."""
        return steps_per_epoch(self.manifest.splits["train"].row_groups, self.world, self.batch_size)

    def rows(self, split: str) -> int:
        """Rows this rank's shard of ``split`` holds."""
        groups = self.manifest.splits[split].row_groups
        return rows_per_rank(groups, self.world)[self.rank] if groups else 0


def train_batches(plan: ShardPlan, epoch: int, skip: int = 0) -> Iterator[Batch]:
    """Exactly ``steps_per_epoch`` batches of one epoch for this rank, minus the first ``skip``.

    Skipped batches are still read (the shuffle needs every row it has seen) but not subsampled or
    padded; that is how a resumed run picks up at the step its checkpoint recorded.
    """
    steps = plan.steps_per_epoch()
    if skip >= steps:
        return
    order_seed = _seed_state(plan.seed, _ROW_GROUP_ORDER, epoch)
    groups = len(plan.manifest.splits["train"].row_groups)
    rows = shuffled(_read_shard(plan.url("train"), plan.rank, plan.world, order_seed, groups),
                    max(1, plan.shuffle_buffer), _generator(plan.seed, _SHUFFLE_BUFFER, epoch, plan.rank))
    for step in range(steps):
        chunk = [row for _, row in zip(range(plan.batch_size), rows)]
        if len(chunk) < plan.batch_size:
            raise RuntimeError(f"rank {plan.rank}: the train shard ran out of rows at step {step} of {steps}; "
                               f"the dataset's manifest does not match its files ({plan.location})")
        if step < skip:
            continue
        frames = []
        for row in chunk:
            log_id = str(row.log_id)
            points, labels = sample_points(row.points, row.labels, plan.max_points,
                                           train_point_rng(plan.seed, epoch, log_id, int(row.frame_index)))
            frames.append(Frame(log_id, int(row.frame_index), points, labels, float(row.sample_weight)))
        yield collate(frames)
    rows.close()  # stop reading the rows left over on a longer shard


def val_batches(plan: ShardPlan, split: str = "val") -> Iterator[Batch]:
    """This rank's shard of ``split`` in file order, every row once, the last batch possibly short."""
    if plan.rows(split) == 0:
        return
    frames: list[Frame] = []
    groups = len(plan.manifest.splits[split].row_groups)
    for row in _read_shard(plan.url(split), plan.rank, plan.world, None, groups):
        log_id = str(row.log_id)
        points, labels = sample_points(row.points, row.labels, plan.max_points,
                                       val_point_rng(plan.seed, log_id, int(row.frame_index)))
        frames.append(Frame(log_id, int(row.frame_index), points, labels, float(row.sample_weight)))
        if len(frames) == plan.batch_size:
            yield collate(frames)
            frames = []
    if frames:
        yield collate(frames)


def train_stream(plan: ShardPlan, start_epoch: int, epochs: int, skip: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """``(epoch, step, batch)`` from ``(start_epoch, skip)`` to the end of training, epochs back to back
    (so a prefetcher runs straight on into the next epoch while the loop validates)."""
    for epoch in range(start_epoch, epochs):
        first = skip if epoch == start_epoch else 0
        for step, batch in enumerate(train_batches(plan, epoch, first), start=first):
            yield epoch, step, batch


# ----------------------------------------------------------------------------------------- prefetch
class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead; ``wait_s`` adds up the time the
    consumer spent blocked waiting for an item (the data-wait share of step time)."""

    _DONE = object()

    def __init__(self, items: Iterable[Any], depth: int = 4, name: str = "prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, args=(iter(items),), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless asked to stop; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        """The producer thread: items, then an end marker (or the exception that ended it)."""
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it where it can be seen
            self._put(exc)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - started
        if item is self._DONE:
            self._queue.put(self._DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the producer and let its thread end."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
