"""training.data: shard sizes and steps, class weights, deterministic sampling/shuffling, and real
Petastorm shards of a tiny dataset written the way ingest writes it (one row group per file)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.taxonomy import IGNORE, NUM_CLASSES
from tests.manifests import make_manifest
from training import data

# ----------------------------------------------------------------------------------------- tiny datasets
# Train row groups of uneven sizes: rank 0 of 2 gets 4+3+3 = 10 rows, rank 1 gets 4+3 = 7.
TRAIN_GROUPS = (4, 4, 3, 3, 3)
VAL_GROUPS = (2, 2)
TEST_GROUPS = (2, 2)


def synthetic_frame(log_id: str, frame_index: int, seed: int):
    """A frame whose two classes sit in different regions (ground for x < 0, building for x >= 0),
    so a model can visibly learn; 150-300 points, so frames differ in size."""
    from pipeline.frames import Frame

    rng = np.random.default_rng([seed, frame_index, sum(map(ord, log_id))])
    n = int(rng.integers(150, 300))
    xy = rng.uniform(-12.0, 12.0, size=(n, 2))
    labels = np.where(xy[:, 0] < 0, 1, 2).astype(np.uint8)
    z = np.where(labels == 1, -1.6, 1.0) + rng.normal(0, 0.3, n)
    points = np.column_stack([xy, z, rng.uniform(0, 1, n)]).astype(np.float32)
    labels[rng.random(n) < 0.03] = IGNORE  # some unlabelled points, as real data has
    return Frame(log_id=log_id, frame_index=frame_index, timestamp_ns=1_800_000_000_000_000_000 + frame_index * 10**8,
                 points=points, labels=labels)


def write_dataset(location: str, layout: dict[str, tuple[int, ...]], seed: int = 0,
                  sample_weights: dict[str, float] | None = None) -> dict:
    """Write ``{split: row group sizes}`` as ingest does (ordered frames cut into row groups, one Parquet
    file each, Petastorm metadata, ``manifest.json``); returns the manifest."""
    from spark_jobs.ingest import write_petastorm_metadata
    from spark_jobs.rows import encode_frame, write_row_group

    splits, logs_info = {}, {}
    for split, groups in layout.items():
        frames_total = sum(groups)
        logs = [f"{split}-log-{i:02d}" for i in range((frames_total + 2) // 3)]
        keys = [(logs[i // 3], i % 3) for i in range(frames_total)]
        os.makedirs(os.path.join(location, split), exist_ok=True)
        start = 0
        for g, size in enumerate(groups):
            rows = []
            for log_id, index in keys[start:start + size]:
                frame = synthetic_frame(log_id, index, seed)
                weight = (sample_weights or {}).get(log_id, 1.0)
                rows.append(encode_frame(frame, "testcity", weight))
                info = logs_info.setdefault(log_id, {"log_id": log_id, "split": split, "city": "testcity",
                                                            "frames": 0, "points": 0, "class_points": {}})
                info["frames"] += 1
                info["points"] += len(frame.points)
                for label, count in zip(*np.unique(frame.labels, return_counts=True)):
                    info["class_points"][str(int(label))] = info["class_points"].get(str(int(label)), 0) + int(count)
            name = f"{split}/part-{g:05d}.parquet"
            write_row_group(os.path.join(location, name), rows)
            start += size
        write_petastorm_metadata(os.path.join(location, split))
        splits[split] = {"logs": logs, "frames": frames_total, "points": sum(logs_info[log]["points"] for log in logs),
                         "row_groups": list(groups)}
    manifest = make_manifest("test", splits, logs_info, reader_ranks=2)
    manifest.save_to(location)
    return manifest


def register_dataset(registry, name: str = "fleet-lidar", validation: str | None = "passed",
                     layout: dict | None = None, seed: int = 0, sample_weights: dict | None = None):
    """A dataset artifact in ``registry`` (built through ``Registry.build``), marked validated."""
    layout = layout or {"train": TRAIN_GROUPS, "val": VAL_GROUPS, "test": TEST_GROUPS}
    art = registry.build("dataset", name, entry_point="tests.training.test_data:register_dataset",
                         config={"layout": layout, "seed": seed, "weights": sample_weights or {}},
                         builder=lambda staging, _rec: write_dataset(staging, layout, seed, sample_weights)
                         and None)
    if validation is not None:
        art = registry.update_meta(art.id, validation=validation)
    return art


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    location = str(tmp_path_factory.mktemp("tiny-dataset"))
    manifest = write_dataset(location, {"train": TRAIN_GROUPS, "val": VAL_GROUPS})
    return location, manifest


def plan_for(location, manifest, rank=0, world=2, **overrides):
    args = dict(location=location, manifest=manifest, rank=rank, world=world, batch_size=2, max_points=200,
                seed=0, shuffle_buffer=4)
    args.update(overrides)
    return data.ShardPlan(**args)


# ----------------------------------------------------------------------------------------- pure functions
def test_rows_and_steps_follow_petastorm_sharding():
    assert data.rows_per_rank([4, 4, 3, 3, 3], 2) == [10, 7]
    assert data.steps_per_epoch([4, 4, 3, 3, 3], 2, 2) == 3  # the smaller shard decides
    assert data.steps_per_epoch([4, 4, 3, 3, 3], 1, 2) == 8
    assert data.steps_per_epoch([1], 2, 1) == 0  # rank 1 would have nothing


def test_class_weights_favour_rare_classes_and_skip_ignore():
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    counts[[IGNORE, 1, 2, 5]] = [500, 9000, 900, 100]
    weights = data.class_weights(counts)
    assert weights[IGNORE] == 0 and weights[3] == 0  # ignore and absent classes
    assert weights[5] > weights[2] > weights[1] > 0
    assert np.isclose(weights[[1, 2, 5]].mean(), 1.0)
    assert weights[5] / weights[1] < 60  # bounded, unlike plain inverse frequency (90x)


def test_point_sampling_depends_only_on_seed_epoch_and_frame():
    points = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    labels = np.arange(1000) % 8
    pick = lambda *key: data.sample_points(points, labels, 100, data.train_point_rng(*key))[0]
    assert np.array_equal(pick(0, 1, "log-a", 3), pick(0, 1, "log-a", 3))
    assert not np.array_equal(pick(0, 1, "log-a", 3), pick(0, 2, "log-a", 3))  # a new draw each epoch
    assert not np.array_equal(pick(0, 1, "log-a", 3), pick(0, 1, "log-b", 3))
    small, _ = data.sample_points(points[:50], labels[:50], 100, data.train_point_rng(0, 0, "x", 0))
    assert len(small) == 50  # fewer points than the cap: all of them


def test_shuffle_buffer_is_a_deterministic_permutation():
    first = list(data.shuffled(range(50), 8, np.random.default_rng(3)))
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first == list(data.shuffled(range(50), 8, np.random.default_rng(3)))


def test_collate_pads_with_ignore_and_marks_valid():
    frames = [data.Frame("a", 0, np.ones((3, 4), np.float32), np.array([1, 2, 1], np.uint8), 1.0),
              data.Frame("b", 1, np.ones((5, 4), np.float32), np.full(5, 2, np.uint8), 2.0)]
    batch = data.collate(frames)
    assert batch.points.shape == (2, 5, 4) and batch.points.dtype == torch.float32
    assert batch.valid.tolist()[0] == [True, True, True, False, False]
    assert batch.labels[0, 3:].tolist() == [IGNORE, IGNORE] and batch.labels.dtype == torch.int64
    assert batch.sample_weight.tolist() == [1.0, 2.0] and batch.keys == [("a", 0), ("b", 1)]


def test_prefetcher_measures_waiting_and_passes_errors_on():
    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i
        raise ValueError("broken row")

    stream = data.Prefetcher(slow(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="broken row"):
        next(stream)
    assert stream.wait_s > 0.05
    stream.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


# ----------------------------------------------------------------------------------------- real shards
@pytest.mark.slow
def test_each_rank_reads_its_manifest_share_and_runs_the_same_steps(tiny):
    location, manifest = tiny
    steps = data.steps_per_epoch(TRAIN_GROUPS, 2, 2)
    seen = []
    for rank in range(2):
        plan = plan_for(location, manifest, rank=rank)
        rows = list(data._read_shard(plan.url("train"), rank, 2, None, len(TRAIN_GROUPS)))
        assert len(rows) == data.rows_per_rank(TRAIN_GROUPS, 2)[rank]  # row group i -> rank i % 2
        batches = list(data.train_batches(plan, epoch=0))
        assert len(batches) == steps  # 3 steps on both ranks though shards hold 10 and 7 rows
        seen.append({key for b in batches for key in b.keys})
        for b in batches:
            assert b.points.shape[0] == 2 and b.points.shape[1] <= 200
            assert (b.labels[~b.valid] == IGNORE).all()
    assert not (seen[0] & seen[1])  # shards are disjoint


@pytest.mark.slow
def test_batches_are_reproducible_reshuffled_per_epoch_and_resumable(tiny):
    location, manifest = tiny
    plan = plan_for(location, manifest, rank=0)
    keys = lambda batches: [b.keys for b in batches]
    epoch0 = list(data.train_batches(plan, 0))
    again = list(data.train_batches(plan, 0))
    assert keys(epoch0) == keys(again)
    assert all(torch.equal(a.points, b.points) for a, b in zip(epoch0, again))
    orders = {tuple(map(tuple, keys(data.train_batches(plan, e)))) for e in range(4)}
    assert len(orders) > 1  # the order changes with the epoch
    resumed = list(data.train_batches(plan, 0, skip=1))  # a run resumed after step 1
    assert keys(resumed) == keys(epoch0)[1:]
    assert all(torch.equal(a.points, b.points) for a, b in zip(resumed, epoch0[1:]))


@pytest.mark.slow
def test_a_frame_gets_the_same_points_whichever_rank_reads_it(tiny):
    location, manifest = tiny
    by_key = {}
    for world in (1, 2):
        for rank in range(world):
            for batch in data.train_batches(plan_for(location, manifest, rank=rank, world=world), 1):
                for i, key in enumerate(batch.keys):
                    n = int(batch.valid[i].sum())
                    by_key.setdefault(key, []).append(batch.points[i, :n].clone())
    shared = [v for v in by_key.values() if len(v) == 2]
    assert shared and all(torch.equal(a, b) for a, b in shared)


@pytest.mark.slow
def test_validation_reads_every_row_once_even_with_more_ranks_than_row_groups(tiny):
    location, manifest = tiny
    total = 0
    for rank in range(3):  # 2 val row groups, 3 ranks: rank 2 reads nothing
        total += sum(len(b) for b in data.val_batches(plan_for(location, manifest, rank=rank, world=3)))
    assert total == sum(VAL_GROUPS)
