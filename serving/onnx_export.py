"""``model.onnx``: the package's ONNX form (the usual road to TensorRT on a car), checked with onnxruntime.

``export_onnx`` converts the same ``torch.export`` program the package's ``model.pt2`` comes from (same
``ExportSpec``: batch 1, a dynamic point count) with ``torch.onnx.export(..., dynamo=True)``, then runs it
in onnxruntime on the packaged example and compares the logits with eager at the tolerance the other
runtimes are held to (``serving.package.compare_logits``). Whatever happens is recorded for
``metadata.json`` (``runtimes.onnx``): the file, opset and check; or, when an operator cannot be
exported or the check fails, no file and the reason (naming the operator where the exporter does),
and the package stays valid without ONNX.

``load_onnx`` opens an onnxruntime session from bytes the caller has verified (no path is re-read).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
import warnings
from typing import Any, Callable, Iterator

import numpy as np

ONNX = "model.onnx"
OPSET = 18
INPUT_NAMES = ("points", "valid")
OUTPUT_NAME = "logits"


def _first_error_line(exc: BaseException) -> str:
    """The exception's type and the line of its message that names the failing operator, if one does."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    naming = [line for line in lines if re.search(r"\b(aten|prims|torch\.ops)[.:]", line)]
    return f"{type(exc).__name__}: {(naming or lines or [''])[0][:500]}"


def export_onnx(exported: Any, path: str, example: tuple[Any, Any], reference: np.ndarray,
                say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Write ``path`` from the ``torch.export`` program ``exported`` and check it in onnxruntime against the
    eager ``reference`` logits ``[N, K]`` on ``example`` (points, valid). Returns the ``runtimes.onnx``
    record: ``{file, opset, check, export_seconds, error}`` with ``file`` None (and no file left behind)
    when the export or the check failed."""
    import torch

    from serving.package import compare_logits

    info: dict[str, Any] = {"file": None, "opset": OPSET, "onnxruntime": None, "check": None, "error": None}
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(exported, args=tuple(example), dynamo=True, opset_version=OPSET,
                                        input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], verbose=False)
            program.save(path)
        with open(path, "rb") as fh:
            session = load_onnx(fh.read(), ONNX)
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        logits = session(*example)[0].numpy()
    except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure: no ONNX, and why
        info["error"] = "export failed: " + _first_error_line(exc)
        say(f"ONNX export failed ({info['error']}); the package carries no model.onnx")
        if os.path.exists(path):
            os.remove(path)
        return info
    info["export_seconds"] = round(time.perf_counter() - started, 1)
    info["check"] = compare_logits(reference, logits)
    if not info["check"]["agrees"]:
        info["error"] = (f"onnxruntime logits differ from eager by {info['check']['max_abs_diff']:.3g} (tolerance "
                         f"{info['check']['tolerance']:.3g}); model.onnx left out")
        say(info["error"])
        os.remove(path)
        return info
    info["file"] = ONNX
    return info


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and its logger's notices (torchvision ops it skips)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def load_onnx(data: bytes, name: str) -> Callable[[Any, Any], Any]:
    """A callable ``(points, valid) -> logits`` (torch tensors in and out) over an onnxruntime session made
    from ``data``; ``PackageError`` naming ``name`` when onnxruntime refuses it."""
    import onnxruntime
    import torch

    from serving.package import PackageError

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    threads = torch.get_num_threads()  # follow torch's intra-op setting (serve.threads)
    options.intra_op_num_threads = threads
    # onnxruntime's threads otherwise spin for a while after each run, taking the cores from whatever runs
    # next (another runtime being timed, another inference worker): measured here, TorchScript run right
    # after an onnxruntime call took 4x longer with spinning on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise PackageError(f"{name}: onnxruntime could not load it ({_first_error_line(exc)})") from None

    def run(points: Any, valid: Any) -> Any:
        outputs = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: np.asarray(points), INPUT_NAMES[1]: np.asarray(valid)})
        return torch.from_numpy(outputs[0])

    return run
