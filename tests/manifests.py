"""A ``Manifest`` for tests that write a dataset by hand: the fields ingest fills from its config get
plausible defaults, the ones a test is about are given."""

from __future__ import annotations

from typing import Any

from pipeline.contracts import Manifest, SplitInfo


def make_manifest(dataset: str, splits: dict[str, dict[str, Any]], logs: dict[str, dict[str, Any]],
                  reader_ranks: int = 1, **fields: Any) -> Manifest:
    """``splits`` maps a split to its ``SplitInfo`` fields (``path`` defaults to the split's name)."""
    defaults = {"source": "test", "split_mode": "hash", "date_from": "2024-01-01", "date_to": "2024-12-31",
                "shares": {"train": 0.75, "test": 0.15, "val": 0.10}, "quarantined": []}
    return Manifest(dataset=dataset, reader_ranks=reader_ranks, logs=logs,
                    splits={name: SplitInfo(**{"path": name, **info}) for name, info in splits.items()},
                    **{**defaults, **fields})
