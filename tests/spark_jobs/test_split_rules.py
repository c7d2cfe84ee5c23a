"""spark_jobs.split rules the balance tests alone do not pin: balancing counts the ledger's existing logs,
the hash bucket breaks ties, GeoSplit cells follow ``geo_cell_m`` on an equirectangular grid and a cell
weighs as many logs as it holds. Reference values are computed here from the documented rules."""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from spark_jobs import split as splitting

SHARES = {"train": 0.75, "test": 0.15, "val": 0.10}


def counts(assignment, weights=None):
    out = {s: 0 for s in splitting.SPLITS}
    for key, split in assignment.items():
        out[split] += (weights or {}).get(key, 1)
    return out


def test_stable_unit_is_the_first_eight_bytes_of_sha256():
    for key in ("log-0001", "cell_12_-3", ""):
        expected = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2.0**64
        assert splitting.stable_unit(key) == expected
        assert 0.0 <= expected < 1.0


def test_hash_bucket_cuts_the_unit_interval_at_the_cumulative_shares():
    keys = [f"log-{i}" for i in range(3000)]
    for key in keys:
        u = splitting.stable_unit(key)
        expected = "train" if u < 0.75 else "test" if u < 0.75 + 0.15 else "val"
        assert splitting.hash_bucket(key, SHARES) == expected, key
    got = counts({k: splitting.hash_bucket(k, SHARES) for k in keys})
    assert all(abs(got[s] / len(keys) - SHARES[s]) < 0.03 for s in splitting.SPLITS), got


def test_hash_bucket_falls_back_to_train_when_the_shares_leave_a_gap():
    shares = {"train": 0.25, "test": 0.25, "val": 0.25}  # covers [0, 0.75) only
    high = next(f"k{i}" for i in range(1000) if splitting.stable_unit(f"k{i}") >= 0.75)
    assert splitting.hash_bucket(high, shares) == "train"


def test_balancing_counts_the_logs_already_in_the_ledger():
    """Two logs a day for ten days must end near 15/3/2, not 20/0/0 (each day alone would say train, train)."""
    ledger: dict[str, str] = {}
    for day in range(10):
        new = [f"log-d{day}-{i}" for i in range(2)]
        ledger.update(splitting.assign_balanced(ledger, new, SHARES))
    got = counts(ledger)
    assert all(abs(got[s] - SHARES[s] * 20) < 1 for s in splitting.SPLITS), got


def test_an_existing_ledger_decides_where_the_next_log_goes():
    existing = {f"old-{i}": "train" for i in range(6)}  # train already far above 75 %
    assert splitting.assign_balanced(existing, ["new"], SHARES) == {"new": "test"}
    existing = {f"old-{i}": "test" for i in range(6)}
    assert splitting.assign_balanced(existing, ["new"], SHARES) == {"new": "train"}


def test_existing_cells_count_with_their_weight():
    # one train cell of 8 logs: the next cell (any weight) must go to test, the one after to val or test
    weights = {"big": 8, "a": 1, "b": 1}
    got = splitting.assign_balanced({"big": "train"}, ["a"], SHARES, weights)
    assert got == {"a": "test"}  # deficits with 9 logs: train 6.75-8 < 0, test 1.35, val 0.9


def reference_assign(existing, new_keys, shares, weights):
    """The documented rule, written out: stable-hash order, largest deficit, then the hash bucket, then the
    order train, test, val."""
    tally = {s: 0 for s in splitting.SPLITS}
    for key, split in existing.items():
        tally[split] += weights.get(key, 1)
    total, out = sum(tally.values()), {}
    for key in sorted(new_keys, key=splitting.stable_unit):
        total += weights.get(key, 1)
        deficits = {s: shares[s] * total - tally[s] for s in splitting.SPLITS}
        best = max(deficits.values())
        tied = [s for s in splitting.SPLITS if deficits[s] == best]
        bucket = splitting.hash_bucket(key, shares)
        choice = bucket if bucket in tied else tied[0]
        tally[choice] += weights.get(key, 1)
        out[key] = choice
    return out


@pytest.mark.parametrize("shares", [{"train": 0.5, "test": 0.25, "val": 0.25},
                                    {"train": 0.25, "test": 0.5, "val": 0.25},
                                    {"train": 0.25, "test": 0.25, "val": 0.5}])
def test_ties_go_to_the_hash_bucket_then_to_the_earlier_split(shares):
    """With these shares deficits tie often (exact binary fractions), so the tie-break decides."""
    rng = random.Random(7)
    ties_broken_by_bucket = ties_broken_by_order = 0
    for trial in range(150):
        keys = [f"t{trial}-{i}" for i in range(rng.randint(1, 9))]
        existing = {f"e{trial}-{i}": rng.choice(splitting.SPLITS) for i in range(rng.randint(0, 4))}
        expected = reference_assign(existing, keys, shares, {})
        assert splitting.assign_balanced(existing, keys, shares) == expected
        for key, split in expected.items():
            ties_broken_by_bucket += split == splitting.hash_bucket(key, shares)
            ties_broken_by_order += split != splitting.hash_bucket(key, shares)
    assert ties_broken_by_bucket and ties_broken_by_order


def test_a_single_log_with_equal_shares_goes_to_its_hash_bucket():
    thirds = {"train": 1 / 3, "test": 1 / 3, "val": 1 / 3}
    picked = {splitting.assign_balanced({}, [f"solo-{i}"], thirds)[f"solo-{i}"] for i in range(60)}
    for i in range(60):
        assert splitting.assign_balanced({}, [f"solo-{i}"], thirds) == {
            f"solo-{i}": splitting.hash_bucket(f"solo-{i}", thirds)}
    assert picked == set(splitting.SPLITS)


def test_two_tied_splits_neither_the_bucket_take_the_earlier_one():
    shares = {"train": 0.5, "test": 0.25, "val": 0.25}
    # after one train key, the second key sees deficits train 0, test 0.5, val 0.5
    first = next(f"a{i}" for i in range(1000) if splitting.hash_bucket(f"a{i}", shares) == "train")
    second = next(f"b{i}" for i in range(1000) if splitting.hash_bucket(f"b{i}", shares) == "train")
    assert splitting.assign_balanced({first: "train"}, [second], shares) == {second: "test"}
    third = next(f"c{i}" for i in range(1000) if splitting.hash_bucket(f"c{i}", shares) == "val")
    assert splitting.assign_balanced({first: "train"}, [third], shares) == {third: "val"}


@pytest.mark.parametrize("seed", range(5))
def test_weighted_cells_stay_within_one_cell_of_the_target(seed):
    rng = random.Random(seed)
    weights = {f"cell-{seed}-{i}": rng.choice([1, 1, 1, 2, 3, 5]) for i in range(40)}
    got = counts(splitting.assign_balanced({}, list(weights), SHARES, weights), weights)
    total = sum(weights.values())
    for split, share in SHARES.items():
        assert abs(got[split] - share * total) <= max(weights.values()), (got, total)
    assert got == counts(reference_assign({}, list(weights), SHARES, weights), weights)


def test_weights_not_counts_decide_the_balance():
    weights = {"heavy": 30, **{f"light-{i}": 1 for i in range(10)}}
    got = counts(splitting.assign_balanced({}, list(weights), SHARES, weights), weights)
    assert got == counts(reference_assign({}, list(weights), SHARES, weights), weights)
    assert got["train"] >= 30  # the heavy cell cannot go anywhere but the 75 % split


def equirectangular_cell(lat, lon, cell_m):
    north = lat * math.pi / 180 * 6_371_000.0
    east = lon * math.pi / 180 * 6_371_000.0 * math.cos(lat * math.pi / 180)
    return f"cell_{math.floor(east / cell_m)}_{math.floor(north / cell_m)}"


def test_geo_cell_follows_the_cell_size():
    rng = random.Random(3)
    for _ in range(300):
        lat, lon = rng.uniform(-70, 70), rng.uniform(-180, 180)
        for cell_m in (250.0, 2000.0, 5000.0):
            assert splitting.geo_cell(lat, lon, cell_m) == equirectangular_cell(lat, lon, cell_m)
    # two fixes ~300 m apart share a 2 km cell here but not a 100 m one
    assert splitting.geo_cell(0.0, 0.0005, 2000) == splitting.geo_cell(0.0, 0.003, 2000) == "cell_0_0"
    assert splitting.geo_cell(0.0, 0.0005, 100) != splitting.geo_cell(0.0, 0.003, 100)


def test_geo_cells_shrink_east_west_with_latitude():
    # at 60 degrees north a degree of longitude is half as long: 0.1 degree east is ~5.6 km, not ~11.1 km
    assert splitting.geo_cell(60.0, 0.1, 10_000) == "cell_0_667"
    assert splitting.geo_cell(0.0, 0.1, 10_000) == "cell_1_0"


def test_cells_below_zero_round_down_not_towards_zero():
    assert splitting.geo_cell(-0.001, -0.001, 2000) == "cell_-1_-1"
    assert splitting.geo_cell(0.001, 0.001, 2000) == "cell_0_0"


@pytest.mark.parametrize("lat, lon", [(math.nan, 0.0), (0.0, math.nan), (math.inf, 1.0), (1.0, -math.inf)])
def test_a_fix_that_is_not_finite_has_the_unknown_cell(lat, lon):
    assert splitting.geo_cell(lat, lon, 2000) == "cell-unknown"
