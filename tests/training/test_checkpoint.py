"""training.checkpoint: atomic writes, the newest complete checkpoint, weights_only loading, RNG state
round trips and the TorchScript export with provenance."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from training import checkpoint as ckpt


class TinyNet(nn.Module):
    """Scriptable, with the model contract's signature."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 8)

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.linear(points) * valid.unsqueeze(-1).to(points.dtype)


def training_state(step: int) -> dict:
    torch.manual_seed(step)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "position": {"epoch": 0, "step": step, "global_step": step, "history": [{"loss": 1.5, "iou": None}]},
            "rng": [ckpt.capture_rng()]}


def test_latest_is_the_newest_complete_checkpoint_and_old_ones_are_pruned(tmp_path):
    folder = str(tmp_path)
    for step in (2, 4, 6, 8):
        ckpt.save(folder, training_state(step), step, keep=3)
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [4, 6, 8]
    path, state = ckpt.load_latest(folder)
    assert path.endswith("ckpt-00000008.pt") and state["position"]["global_step"] == 8


def test_a_partial_temporary_file_is_never_taken_for_the_latest(tmp_path):
    folder = str(tmp_path)
    ckpt.save(folder, training_state(3), 3)
    # What a writer killed mid-write leaves behind: a truncated temporary file with a later step.
    with open(os.path.join(folder, ".ckpt-00000009.pt.tmp-999999-0badf00d"), "wb") as fh:
        fh.write(b"PK\x03\x04 truncated")
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [3]
    assert ckpt.load_latest(folder)[0].endswith("ckpt-00000003.pt")
    ckpt.save(folder, training_state(4), 4)  # the next save clears a dead writer's leftovers
    assert not [n for n in os.listdir(folder) if ".tmp-" in n]


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = str(tmp_path)
    ckpt.save(folder, training_state(1), 1)

    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(folder, training_state(2), 2)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["ckpt-00000001.pt"]
    assert ckpt.load_latest(folder)[1]["position"]["global_step"] == 1


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    folder = str(tmp_path)
    ckpt.save(folder, training_state(1), 1)
    ckpt.save(folder, training_state(2), 2)
    with open(ckpt.checkpoint_path(folder, 2), "r+b") as fh:
        fh.truncate(100)
    warnings = []
    path, _ = ckpt.load_latest(folder, warn=warnings.append)
    assert path.endswith("ckpt-00000001.pt") and "ckpt-00000002.pt" in warnings[0]


def test_checkpoints_load_with_weights_only_and_refuse_code(tmp_path):
    path = ckpt.save(str(tmp_path), training_state(5), 5)
    raw = torch.load(path, weights_only=True)  # no pickled code needed
    assert raw["format"] == ckpt.FORMAT_VERSION and isinstance(raw["rng"][0]["torch"], torch.Tensor)
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a TinyNet"):
        ckpt.save(str(tmp_path), {**training_state(6), "extra": TinyNet()}, 6)
    # A file holding pickled objects (not written by us) is refused by the loader, with its name.
    evil = tmp_path / "ckpt-00000007.pt"
    torch.save({"format": 1, "model": TinyNet()}, evil)
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000007.pt"):
        ckpt.load(str(evil))


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    state = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = ckpt.save(str(tmp_path), {"rng": [state]}, 1)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.restore_rng(ckpt.load(path)["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_torchscript_export_is_checked_and_carries_metadata(tmp_path):
    model = TinyNet()
    example = (torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.bool))
    path = str(tmp_path / "model.ts")
    check = ckpt.save_torchscript(model, path, {"run_id": "r1", "git_sha": "abc"}, example)
    assert check["torchscript_max_abs_diff"] == 0.0
    assert ckpt.read_torchscript_metadata(path) == {"run_id": "r1", "git_sha": "abc"}
    assert model.training  # the training model is left as it was


def test_a_model_torchscript_cannot_compile_is_reported(tmp_path):
    class Unscriptable(TinyNet):
        def forward(self, points, valid):
            return self.linear(points) if isinstance(points, list) is False else {**points}

    with pytest.raises(ckpt.CheckpointError, match="cannot be compiled with torch.jit.script"):
        ckpt.save_torchscript(Unscriptable(), str(tmp_path / "m.ts"), {},
                              (torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)))
