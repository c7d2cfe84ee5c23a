"""End to end: simulated MCAP logs -> real Spark session -> Petastorm splits -> registry."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import config, stages
from pipeline.errors import UserError
from pipeline.frames import Frame
from pipeline.registry import Registry

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def make_cfg(home, **overrides):
    base = {"home": str(home), "simulate.frames": "3", "simulate.logs": "20", "simulate.days": "2",
            "simulate.azimuth_steps": "256", "simulate.beams": "16", "ingest.rows_per_group": "4"}
    base.update({k: str(v) for k, v in overrides.items()})
    return config.load(base, env={})


def read_split(location, split, **reader_args):
    from petastorm import make_reader

    path = os.path.join(location, split)
    with make_reader(f"file://{path}", reader_pool_type="dummy", num_epochs=1, shuffle_row_groups=False,
                     **reader_args) as reader:
        return [(row.log_id, int(row.frame_index), row.points.shape, row.labels.shape, float(row.sample_weight))
                for row in reader]


def tree_digest(location):
    digest = {}
    for dirpath, _dirs, files in os.walk(location):
        for name in files:
            path = os.path.join(dirpath, name)
            if name != "manifest.json":
                digest[os.path.relpath(path, location)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("ingest") / "home"
    cfg = make_cfg(home)
    stages.invoke("simulate", cfg, say=lambda m: None)
    result = stages.invoke("ingest", cfg, say=lambda m: None)
    return cfg, result


def test_three_splits_balanced_disjoint_and_readable(demo):
    cfg, result = demo
    registry = Registry.open(cfg)
    art = registry.get(result["ref"])
    manifest = json.loads(Path(art.location, "manifest.json").read_text())
    logs = {s: set(manifest["splits"][s]["logs"]) for s in ("train", "test", "val")}
    n = sum(len(v) for v in logs.values())
    assert n == 20 and not manifest["quarantined"]
    for split, share in (("train", 0.75), ("test", 0.15), ("val", 0.10)):
        assert abs(len(logs[split]) - share * n) <= 1
    assert not (logs["train"] & logs["test"]) and not (logs["train"] & logs["val"]) and not (logs["test"] & logs["val"])
    for split in logs:
        rows = read_split(art.location, split)
        assert len(rows) == manifest["splits"][split]["frames"] == 3 * len(logs[split])
        assert {r[0] for r in rows} == logs[split]
        assert all(shape[1] == 4 and lab[0] == shape[0] for _l, _i, shape, lab, _w in rows)


def test_every_rank_reads_its_own_equal_shard(demo):
    cfg, result = demo
    art = Registry.open(cfg).get(result["ref"])
    everything = read_split(art.location, "train")
    shards = [read_split(art.location, "train", cur_shard=r, shard_count=2) for r in range(2)]
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    keys = [set((r[0], r[1]) for r in s) for s in shards]
    assert not (keys[0] & keys[1]) and keys[0] | keys[1] == {(r[0], r[1]) for r in everything}


def test_lineage_and_cache_hit(demo):
    cfg, result = demo
    registry = Registry.open(cfg)
    art = registry.get(result["ref"])
    parents = registry.parents(art.id)
    assert len(parents) == 20 and all(p.kind == "log" for p in parents)
    again = stages.invoke("ingest", cfg, say=lambda m: None)
    assert again["cached"] and again["ref"] == result["ref"]


def test_growing_data_never_moves_a_log(tmp_path):
    home = tmp_path / "home"
    cfg = make_cfg(home, **{"simulate.days": 3, "simulate.logs": 18})
    stages.invoke("simulate", cfg, say=lambda m: None)
    first_day = make_cfg(home, **{"ingest.date_to": "2026-11-02"})
    small = Registry.open(first_day).get(stages.invoke("ingest", first_day, say=lambda m: None)["ref"])
    grown_cfg = make_cfg(home, **{"simulate.days": 3, "simulate.logs": 30})
    stages.invoke("simulate", grown_cfg, say=lambda m: None)  # more logs arrive
    big = Registry.open(grown_cfg).get(stages.invoke("ingest", grown_cfg, say=lambda m: None)["ref"])

    def split_of(art):
        manifest = json.loads(Path(art.location, "manifest.json").read_text())
        return {log: s for s, info in manifest["splits"].items() for log in info["logs"]}

    before, after = split_of(small), split_of(big)
    assert 0 < len(before) < len(after)
    assert all(after[log] == split for log, split in before.items())
    for split, share in (("train", 0.75), ("test", 0.15), ("val", 0.10)):
        assert abs(list(after.values()).count(split) - share * len(after)) <= 1


def test_same_inputs_give_the_same_dataset_bytes(tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    digests = []
    for home in homes:
        cfg = make_cfg(home, **{"simulate.logs": 6})
        stages.invoke("simulate", cfg, say=lambda m: None)
        art = Registry.open(cfg).get(stages.invoke("ingest", cfg, say=lambda m: None)["ref"])
        digests.append(tree_digest(art.location))
    assert digests[0] == digests[1] and any(k.endswith(".parquet") for k in digests[0])


def _write_bad_log(path, log_id, mutate):
    from pipeline.frames import LogMeta
    from spark_jobs.sources.mcap_log import write_log

    rng = np.random.default_rng(1)
    meta = LogMeta(log_id, "veh-x", "pittsburgh", 1_793_491_200_000_000_000, "test", "sim")  # 2026-11-01
    frames = []
    for i in range(3):
        f = Frame(log_id, i, meta.start_time_ns + i * 100_000_000,
                  points=rng.uniform(-20, 20, (500, 4)).astype(np.float32),
                  labels=rng.integers(1, 8, 500).astype(np.uint8),
                  boxes=np.array([[5, 1, 0.8, 4.5, 1.9, 1.6, 0.1, 5, 3]], np.float32))
        f.points[:, 3] = np.abs(f.points[:, 3]) / 20
        frames.append(mutate(f, i))
    write_log(str(path), meta, frames)


def test_corrupt_logs_are_quarantined_and_the_rest_ingested(tmp_path):
    home = tmp_path / "home"
    cfg = make_cfg(home, **{"simulate.logs": 8, "simulate.days": 1})
    stages.invoke("simulate", cfg, say=lambda m: None)
    logs = Path(cfg.home) / "logs"
    good = sorted(logs.glob("*.mcap"))
    # truncated: the first half of a real log
    data = good[0].read_bytes()
    (logs / "zz-truncated.mcap").write_bytes(data[: len(data) // 2])
    (logs / "zz-garbage.mcap").write_bytes(b"\x89MCAP0\r\n" + os.urandom(4000))

    def nan_points(f, i):
        if i == 1:
            f.points[7, 0] = np.nan
        return f

    def bad_label(f, i):
        f.labels[3] = 42
        return f

    def negative_box(f, i):
        f.boxes[0, 3] = -1.0
        return f

    _write_bad_log(logs / "zz-nan.mcap", "zz-nan", nan_points)
    _write_bad_log(logs / "zz-label.mcap", "zz-label", bad_label)
    _write_bad_log(logs / "zz-box.mcap", "zz-box", negative_box)
    messages = []
    result = stages.invoke("ingest", cfg, say=messages.append)
    art = Registry.open(cfg).get(result["ref"])
    manifest = json.loads(Path(art.location, "manifest.json").read_text())
    reasons = {q["log_id"]: q["reason"] for q in manifest["quarantined"]}
    assert set(reasons) == {"zz-truncated", "zz-garbage", "zz-nan", "zz-label", "zz-box"}
    assert "frame 1: 1 points with NaN" in reasons["zz-nan"]
    assert "label id 42 is outside the taxonomy" in reasons["zz-label"]
    assert "non-positive size" in reasons["zz-box"]
    assert sum(len(s["logs"]) for s in manifest["splits"].values()) == len(good)
    assert any("quarantined zz-nan" in m for m in messages)
    assert result["tables"][-1][0] == "quarantined logs"


def test_missing_source_is_a_clear_user_error(tmp_path):
    cfg = make_cfg(tmp_path / "empty")
    with pytest.raises(UserError, match="run `avp simulate` first"):
        stages.invoke("ingest", cfg, say=lambda m: None)


def test_killed_ingest_is_never_marked_succeeded_and_rerun_recovers(tmp_path):
    home = tmp_path / "home"
    cfg = make_cfg(home, **{"simulate.logs": 6, "simulate.days": 1})
    stages.invoke("simulate", cfg, say=lambda m: None)
    env = {**os.environ, "AVP_HOME": str(home), "AVP_INGEST__ROWS_PER_GROUP": "4", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ingest", "--spark-master", "local[1]"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "extracting" in line:  # inside the build: the record is 'building'
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    registry = Registry.open(cfg)
    [victim] = registry.list("dataset")
    assert victim.state == "building" and not os.path.exists(victim.location)
    result = stages.invoke("ingest", cfg, say=lambda m: None)
    assert registry.get(victim.id).state == "aborted"
    assert registry.get(result["ref"]).state == "succeeded"
    staging = [p for p in Path(victim.location).parent.iterdir() if p.name.startswith(".staging")]
    assert staging == []
