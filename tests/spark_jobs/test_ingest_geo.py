"""End to end through the real Spark ingest: ``--split geo`` (GeoSplit) and feedback sample weights.

* GeoSplit: no cell of ``ingest.geo_cell_m`` (computed here from each log's stored GPS with the documented
  equirectangular grid) holds logs of two splits, cells do hold several logs, and the log counts stay
  within one cell's logs of the 75/15/10 target (and within validate's ``split_tolerance``).
* Weights: the per-log weights evaluation wrote (``feedback/sample_weights.json``) end up in the rows of
  exactly those logs, come out of the training reader, and scale those frames in ``PointLoss``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import feedback
from pipeline import stages
from pipeline.home import Home
from pipeline.registry import Registry
from spark_jobs.simulator import fleet_plan
from tests.spark_jobs.test_ingest import make_cfg
from tests.spark_jobs.test_split_rules import equirectangular_cell
from training.objectives import PointLoss

pytestmark = pytest.mark.slow
SHARES = {"train": 0.75, "test": 0.15, "val": 0.10}
CELL_M = 4000.0


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    home = tmp_path_factory.mktemp("geo") / "home"
    cfg = make_cfg(home, **{"ingest.split": "geo", "ingest.geo_cell_m": CELL_M, "simulate.logs": 24})
    stages.invoke("simulate", cfg, say=lambda m: None)
    logs = [meta.log_id for meta in fleet_plan(cfg.simulate)]
    weighted = {logs[0]: 2.0, logs[5]: 3.0}
    feedback.merge_sample_weights(Home.from_config(cfg.home).join(feedback.FEEDBACK_DIR), weighted)
    art = Registry.open(cfg).get(stages.invoke("ingest", cfg, say=lambda m: None)["ref"])
    manifest = json.loads(Path(art.location, "manifest.json").read_text())
    rows = {split: read_rows(art.location, split) for split in SHARES}
    return manifest, rows, weighted


def read_rows(location: str, split: str) -> list[dict]:
    from petastorm import make_reader

    with make_reader(f"file://{location}/{split}", reader_pool_type="dummy", num_epochs=1,
                     shuffle_row_groups=False) as reader:
        return [{"log_id": r.log_id, "frame_index": int(r.frame_index), "gps": np.array(r.gps),
                 "weight": float(r.sample_weight)} for r in reader]


def test_no_cell_straddles_two_splits_and_cells_hold_several_logs(geo):
    manifest, rows, _ = geo
    first_fix = {}
    for split, split_rows in rows.items():
        for row in sorted(split_rows, key=lambda r: r["frame_index"], reverse=True):
            first_fix[row["log_id"]] = (split, row["gps"])  # frame 0 is written last, so it stays
    splits_of_cell = defaultdict(set)
    logs_of_cell = defaultdict(set)
    for log_id, (split, gps) in first_fix.items():
        assert np.isfinite(gps[:2]).all(), log_id  # the simulator records a fix in every frame
        cell = equirectangular_cell(gps[0], gps[1], CELL_M)
        splits_of_cell[cell].add(split)
        logs_of_cell[cell].add(log_id)
    assert len(first_fix) == 24 and not manifest["quarantined"]
    assert {c: s for c, s in splits_of_cell.items() if len(s) > 1} == {}
    assert max(len(logs) for logs in logs_of_cell.values()) >= 2  # cells group logs, so the check above bites
    assert len(logs_of_cell) >= 3
    for split, info in manifest["splits"].items():
        assert set(info["logs"]) == {log for log, (s, _) in first_fix.items() if s == split}


def test_geosplit_stays_within_one_cell_of_the_target_shares(geo):
    manifest, rows, _ = geo
    total = sum(len(info["logs"]) for info in manifest["splits"].values())
    largest_cell = max(np.unique([equirectangular_cell(r["gps"][0], r["gps"][1], CELL_M)
                                  for split_rows in rows.values() for r in split_rows if r["frame_index"] == 0],
                                 return_counts=True)[1])
    for split, share in SHARES.items():
        count = len(manifest["splits"][split]["logs"])
        assert abs(count - share * total) <= largest_cell, (split, count, total, largest_cell)
        assert abs(count / total - share) <= 0.10 + 1e-9  # validate's default split_tolerance
    assert manifest["split_mode"] == "geo"


def test_feedback_weights_reach_the_rows_of_those_logs_only(geo):
    _, rows, weighted = geo
    for split_rows in rows.values():
        for row in split_rows:
            assert row["weight"] == weighted.get(row["log_id"], 1.0), row["log_id"]
    assert {r["log_id"] for split_rows in rows.values() for r in split_rows} >= set(weighted)


def test_a_weighted_frame_counts_that_many_times_in_the_loss(geo):
    """Two frames read back from the dataset, one of a weight-3 log: the batch loss equals the loss of a
    batch where that frame is present three times with weight 1 (an independent way to weigh it)."""
    _, rows, weighted = geo
    from training.data import Frame, collate

    location_rows = [r for split_rows in rows.values() for r in split_rows]
    heavy_log = next(log for log, w in weighted.items() if w == 3.0)
    heavy = next(r for r in location_rows if r["log_id"] == heavy_log)
    plain = next(r for r in location_rows if r["log_id"] not in weighted)
    rng = np.random.default_rng(0)
    points = {key: rng.normal(size=(50, 4)).astype(np.float32) for key in ("h", "p")}
    labels = {key: rng.integers(0, 8, 50).astype(np.uint8) for key in ("h", "p")}
    batch = collate([Frame(heavy["log_id"], 0, points["h"], labels["h"], heavy["weight"]),
                     Frame(plain["log_id"], 0, points["p"], labels["p"], plain["weight"])])
    assert batch.sample_weight.tolist() == [3.0, 1.0]
    repeated = collate([Frame("h", i, points["h"], labels["h"], 1.0) for i in range(3)]
                       + [Frame("p", 0, points["p"], labels["p"], 1.0)])
    loss = PointLoss(np.linspace(0.5, 2.0, 8))
    logits = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(1))
    expected = loss(torch.cat([logits[:1]] * 3 + [logits[1:]]), repeated.labels, repeated.sample_weight)
    assert torch.allclose(loss(logits, batch.labels, batch.sample_weight), expected)
