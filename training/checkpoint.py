"""Checkpoints written atomically, loaded safely, with a TorchScript model beside them.

* **Atomic.** A checkpoint is written to a hidden temporary file in the same folder, flushed to disk,
  then renamed over its final name (``os.replace``). A process killed mid-write leaves a ``.tmp`` file
  that ``latest`` never considers, never a half-written ``ckpt-*.pt``.
* **Safe to load.** Contents are restricted to tensors, dicts, lists, tuples, strings, numbers, booleans
  and None (``check_plain`` refuses anything else before writing), so every checkpoint loads with
  ``torch.load(..., weights_only=True)``: no pickled code runs on load. RNG states are stored as tensors.
* **Deployable.** ``save_torchscript`` scripts the model, checks it against eager on a real batch and
  writes ``model.ts`` with provenance (run, git SHA, diff hash, dataset, user, config) in
  ``_extra_files["metadata.json"]`` - Lyft's practice of proving deployability during training.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
from typing import Any

import numpy as np
import torch

from pipeline.files import TEMPORARY, atomic_file

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` written atomically."""
    with atomic_file(path) as fh:
        torch.save(obj, fh)


# ----------------------------------------------------------------------------------------- contents
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value that ``weights_only`` loading would refuse."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, dicts, lists, "
                    "strings and numbers so that they load with weights_only=True")


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as tensors (Python's and NumPy's global generators included, in case a
    model or augmentation uses them)."""
    py_version, py_state, _ = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": int(py_version),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng`` recorded."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


# ----------------------------------------------------------------------------------------- checkpoints
def checkpoint_path(folder: str, global_step: int) -> str:
    """``<folder>/ckpt-<global step, 8 digits>.pt``."""
    return os.path.join(folder, f"ckpt-{int(global_step):08d}.pt")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(global step, path)`` of the complete checkpoints in ``folder``, oldest first.

    Temporary files of an interrupted write (``.ckpt-*.pt.tmp-*``) do not match the name and are ignored.
    """
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def save(folder: str, state: dict[str, Any], global_step: int, keep: int = 3) -> str:
    """Write ``state`` as the checkpoint of ``global_step`` and keep only the newest ``keep``."""
    check_plain(state)
    path = checkpoint_path(folder, global_step)
    atomic_torch_save({"format": FORMAT_VERSION, **state}, path)
    for _step, old in list_checkpoints(folder)[:-max(1, keep)]:
        try:
            os.remove(old)
        except FileNotFoundError:
            pass
    remove_stale_temporaries(folder)
    return path


def remove_stale_temporaries(folder: str) -> None:
    """Delete temporary files left by writers that no longer run (a killed process's partial writes)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        match = TEMPORARY.match(name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (so its temporary files may still be in use)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; ``CheckpointError`` naming the file if that fails."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a format-{FORMAT_VERSION} training checkpoint")
    return state


def load_latest(folder: str, map_location: str | torch.device = "cpu",
                warn=lambda message: None) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads, as ``(path, state)``; None when there is none.

    A newest file that cannot be read (a disk that lied about fsync) is reported and skipped for the
    one before it, rather than failing the resume.
    """
    for _step, path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path, map_location)
        except CheckpointError as exc:
            warn(f"skipping unreadable checkpoint: {exc}")
    return None


# ----------------------------------------------------------------------------------------- TorchScript
def script_model(model: torch.nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of a CPU copy of ``model`` in eval mode (the training model is untouched)."""
    clone = copy.deepcopy(model).cpu().eval()
    try:
        return torch.jit.script(clone)
    except Exception as exc:
        raise CheckpointError(f"model {type(model).__name__} cannot be compiled with torch.jit.script, so it "
                              f"cannot be deployed: {type(exc).__name__}: {exc}") from exc


def check_against_eager(model: torch.nn.Module, scripted: torch.jit.ScriptModule, points: torch.Tensor,
                        valid: torch.Tensor) -> float:
    """Max absolute difference of the scripted and the eager model's logits on one batch; raises
    ``CheckpointError`` if they disagree. A model whose own output is not finite (a diverging run) is
    not compared: the NaN check of the training loop reports that."""
    eager = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        expected = eager(points.cpu(), valid.cpu())
        actual = scripted(points.cpu(), valid.cpu())
    if expected.shape != actual.shape:
        raise CheckpointError(f"TorchScript output shape {tuple(actual.shape)} != eager {tuple(expected.shape)}")
    if not torch.isfinite(expected).all():
        return float("nan")
    difference = float((expected - actual).abs().max()) if expected.numel() else 0.0
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
    if not difference <= tolerance:
        raise CheckpointError(f"TorchScript output differs from eager by {difference:.3g} (tolerance {tolerance:.3g})")
    return difference


def save_torchscript(model: torch.nn.Module, path: str, metadata: dict[str, Any],
                     example: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Script ``model``, check it against eager on ``example`` and write it atomically to ``path`` with
    ``metadata`` as ``_extra_files["metadata.json"]``. Returns what the check found."""
    scripted = script_model(model)
    difference = check_against_eager(model, scripted, *example)
    extra = {METADATA_FILE: json.dumps(metadata, sort_keys=True, default=str)}
    with atomic_file(path) as fh:
        torch.jit.save(scripted, fh, _extra_files=extra)
    return {"torchscript_max_abs_diff": difference}


def read_torchscript_metadata(path: str) -> dict[str, Any]:
    """The provenance stored in a ``model.ts``."""
    extra = {METADATA_FILE: ""}
    torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])
