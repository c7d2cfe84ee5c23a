"""Split assignment: which of train/test/val a drive log belongs to, decided once and never changed.

Two modes, both sticky (kept in the registry's assignment ledger, so a log never changes split as data
grows) and both balanced (the log counts stay within one log of the 75/15/10 target):

* ``hash``: new logs are taken in the order of a stable hash of their id; each goes to the split that is
  furthest below its target share, ties broken by the split the hash itself points at. A pure hash
  bucket would also be stable, but with tens of logs its shares wander by several logs.
* ``geo`` (Uber's GeoSplit): logs are grouped into square cells of ``geo_cell_m`` metres from their
  first GPS fix; whole cells are assigned the same way, so no area straddles two splits.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

SPLITS = ("train", "test", "val")
EARTH_RADIUS_M = 6_371_000.0


def stable_unit(key: str) -> float:
    """A uniform number in [0, 1) from ``key`` that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def hash_bucket(key: str, shares: Mapping[str, float]) -> str:
    """The split a plain hash bucket would choose (used as the tie-breaker)."""
    u, edge = stable_unit(key), 0.0
    for split in SPLITS:
        edge += shares[split]
        if u < edge:
            return split
    return SPLITS[0]


def assign_balanced(existing: Mapping[str, str], new_keys: Sequence[str], shares: Mapping[str, float],
                    weights: Mapping[str, int] | None = None) -> dict[str, str]:
    """Assign ``new_keys`` (in stable-hash order) to the split with the largest deficit.

    ``weights`` counts how many logs a key stands for (GeoSplit cells); 1 per key by default. Starting
    from the counts of ``existing``, each split's count stays within one key of ``share * total``.
    """
    weights = weights or {}
    counts = {s: 0.0 for s in SPLITS}
    for key, split in existing.items():
        counts[split] += weights.get(key, 1)
    total = sum(counts.values())
    out: dict[str, str] = {}
    for key in sorted(new_keys, key=stable_unit):
        w = weights.get(key, 1)
        total += w
        preferred = hash_bucket(key, shares)
        split = max(SPLITS, key=lambda s: (shares[s] * total - counts[s], s == preferred, -SPLITS.index(s)))
        counts[split] += w
        out[key] = split
    return out


def geo_cell(latitude: float, longitude: float, cell_m: float) -> str:
    """The GeoSplit cell of a GPS fix: metres east/north of (0, 0) on an equirectangular grid."""
    if not (math.isfinite(latitude) and math.isfinite(longitude)):
        return "cell-unknown"
    north = math.radians(latitude) * EARTH_RADIUS_M
    east = math.radians(longitude) * EARTH_RADIUS_M * math.cos(math.radians(latitude))
    return f"cell_{math.floor(east / cell_m)}_{math.floor(north / cell_m)}"
