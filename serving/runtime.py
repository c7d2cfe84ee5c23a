"""Loading a verified package and running it on one point cloud at a time.

``load(path)`` accepts a package folder or its ``.tar.gz``. Nothing in the package is deserialised
before ``verify_package`` has passed; the TorchScript file is then loaded from the very bytes whose
checksum was checked (so a file swapped between the check and the load is caught too), and nothing
is ever unpickled (``metadata.json`` is JSON, the example files are raw arrays).

``ServingModel.predict(points)`` takes ``(N, 4)`` float32 (x, y, z, intensity) and returns the class of
every point. Bad input raises ``InvalidInput`` with a message a client can act on; the HTTP server
turns it into a 4xx.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np

from pipeline.contracts import ContractError, PackageMetadata
from serving.package import (
    FORMAT,
    INT8_PT2,
    METADATA,
    PT2,
    TORCHSCRIPT,
    PackageError,
    compare_logits,
    extract_tarball,
    read_verified,
    verify_package,
)

RUNTIMES = ("torchscript", "pt2", "int8")
# The runtime ``load`` picks by default: the package's ``runtimes.default`` (the evaluation's choice).
AUTO = "auto"


class InvalidInput(ValueError):
    """A point cloud the model cannot take; ``status`` is the HTTP status that fits (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServingModel:
    """A verified package, ready to predict. Safe to share between threads (see ``predict``)."""

    def __init__(self, folder: str, metadata: PackageMetadata, forward: Any, runtime: str,
                 manifest_sha256: str, cleanup_dir: str | None = None):
        self.folder = folder
        self.metadata = metadata
        self.runtime = runtime
        self.manifest_sha256 = manifest_sha256
        self.max_points = int(metadata.input["max_points"])
        self.num_classes = int(metadata.example["num_classes"])
        self._forward = forward
        # One forward at a time: torch already spreads one forward over every core (intra-op threads),
        # so concurrent forwards would only oversubscribe them, and the lock keeps thread safety
        # independent of the runtime (TorchScript or an AOTInductor runner with a single model slot).
        self._lock = threading.Lock()
        self._cleanup_dir = cleanup_dir

    def __repr__(self) -> str:
        return f"ServingModel({self.ref}, runtime={self.runtime}, folder={self.folder!r})"

    @property
    def ref(self) -> str:
        """The registry reference of the package (``package:name@vN``)."""
        return self.metadata.package["ref"]

    def check_points(self, points: Any) -> np.ndarray:
        """``points`` as a C-contiguous float32 ``(N, 4)`` array, or ``InvalidInput`` saying what is wrong."""
        array = np.asarray(points)
        if array.dtype.kind not in "fiu":  # bool, str, object: not coordinates
            raise InvalidInput(f"points must be numbers (float32), got dtype {array.dtype}")
        if array.ndim != 2 or array.shape[1] != 4:
            raise InvalidInput(f"points must have shape (N, 4) - x, y, z, intensity per point - got {array.shape}")
        if array.shape[0] > self.max_points:
            raise InvalidInput(f"{array.shape[0]} points is more than this server's limit of {self.max_points}",
                               status=413)
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf, refused below
            array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # np.frombuffer over a request body; torch wants memory it may own
            array = array.copy()
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            first = int(np.argmin(finite))
            raise InvalidInput(f"{int((~finite).sum())} point(s) hold NaN or inf (the first is point {first}: "
                               f"{array[first].tolist()}); every value must be finite")
        return array

    def predict_logits(self, points: Any) -> np.ndarray:
        """Logits ``(N, K)`` float32 for one point cloud."""
        import torch

        array = self.check_points(points)
        if len(array) == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        tensor = torch.from_numpy(array).unsqueeze(0)
        valid = torch.ones(tensor.shape[:2], dtype=torch.bool)
        with self._lock, torch.inference_mode():
            logits = self._forward(tensor, valid)
        return logits[0].numpy().copy()

    def predict(self, points: Any) -> np.ndarray:
        """The class id ``(N,)`` int64 of every point (see ``metadata.class_map``)."""
        return self.predict_logits(points).argmax(-1).astype(np.int64)

    def timed_predict(self, points: Any) -> tuple[np.ndarray, float]:
        """``predict`` and the milliseconds it took."""
        started = time.perf_counter()
        classes = self.predict(points)
        return classes, (time.perf_counter() - started) * 1000.0

    def example(self) -> tuple[np.ndarray, np.ndarray]:
        """The packaged example input ``(N, 4)`` and its expected classes ``(N,)``."""
        spec = self.metadata.example
        points = np.fromfile(os.path.join(self.folder, spec["input"]["file"]), dtype="<f4").reshape(-1, 4)
        classes = np.fromfile(os.path.join(self.folder, spec["expected_classes"]["file"]), dtype="<i8")
        return points, classes

    def self_check(self, runs: int = 2) -> dict[str, Any]:
        """Run the packaged example ``runs`` times (this also warms the runtime up: TorchScript optimises
        during its first calls) and compare with the expected logits; ``PackageError`` if they disagree."""
        points, _classes = self.example()
        # A quantized program reproduces its own packaged logits, not the float model's.
        spec = (self.metadata.runtimes.get(self.runtime, {}).get("expected_logits")
                or self.metadata.example["expected_logits"])
        expected = np.fromfile(os.path.join(self.folder, spec["file"]), dtype="<f4").reshape(spec["shape"])
        for _ in range(max(1, runs)):
            logits = self.predict_logits(points)
        result = compare_logits(expected, logits)
        if not result["agrees"]:
            raise PackageError(f"{spec['file']}: the {self.runtime} runtime on this host gives logits "
                               f"{result['max_abs_diff']:.3g} away from the packaged ones (tolerance "
                               f"{result['tolerance']:.3g}; {result['real_mismatches']} points change class)")
        return result

    def close(self) -> None:
        """Remove the temporary folder a tarball was extracted into (nothing for a folder package)."""
        if self._cleanup_dir:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)
            self._cleanup_dir = None

    def __enter__(self) -> "ServingModel":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


def load(path: str, runtime: str = AUTO, expected_manifest_sha256: str | None = None) -> ServingModel:
    """Verify and load a package folder or ``.tar.gz``; ``PackageError`` names the file when it is refused.

    ``runtime`` picks ``model.ts`` (TorchScript), ``model.pt2`` (AOTInductor, or the ExportedProgram
    fallback) or ``model_int8.pt2`` (the int8 program, when the package carries it); ``auto``, the
    default, is the package's ``runtimes.default`` - the variant the evaluation chose - like the C++
    consumer's default (TorchScript for packages from before that choice). ``expected_manifest_sha256``
    (the registry's record) additionally pins the exact manifest.
    """
    if runtime not in (AUTO, *RUNTIMES):
        raise PackageError(f"unknown runtime {runtime!r}; choose one of {', '.join((AUTO, *RUNTIMES))}")
    path = os.path.abspath(os.path.expanduser(str(path)))
    cleanup = None
    if os.path.isfile(path) and path.endswith((".tar.gz", ".tgz")):
        cleanup = tempfile.mkdtemp(prefix="avp-package-")
        try:
            folder = extract_tarball(path, cleanup)
        except BaseException:
            shutil.rmtree(cleanup, ignore_errors=True)
            raise
    elif os.path.isdir(path):
        folder = path
    elif not os.path.exists(path):
        raise PackageError(f"{path}: no such package folder or tarball")
    else:
        raise PackageError(f"{path}: not a package folder or .tar.gz")
    try:
        verified = verify_package(folder, expected_manifest_sha256)
        files = verified["files"]
        try:
            metadata = PackageMetadata.parse(read_verified(folder, METADATA, files), METADATA)
        except ContractError as exc:
            raise PackageError(str(exc)) from None
        if metadata.format != FORMAT:
            raise PackageError(f"{METADATA}: format is {metadata.format!r}, not an avp serving package")
        runtime = default_runtime(metadata) if runtime == AUTO else runtime
        forward = _load_runtime(folder, files, metadata, runtime)
    except BaseException:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    return ServingModel(folder, metadata, forward, runtime, verified["manifest_sha256"], cleanup)


def default_runtime(metadata: PackageMetadata) -> str:
    """The runtime the package says to serve (``runtimes.default.serve_runtime``), else TorchScript."""
    return (metadata.runtimes.get("default") or {}).get("serve_runtime", "torchscript")


def _load_runtime(folder: str, files: dict[str, str], metadata: PackageMetadata, runtime: str) -> Any:
    """The model callable for ``runtime``, loaded only from verified files."""
    from serving import artifacts

    if runtime == "torchscript":
        data = read_verified(folder, TORCHSCRIPT, files)
        try:
            return artifacts.load_torchscript(data)
        except RuntimeError as exc:
            raise PackageError(f"{TORCHSCRIPT}: TorchScript could not load it ({str(exc).splitlines()[0]})") from None
    if runtime == "int8" and "int8" not in metadata.runtimes:
        raise PackageError(f"runtime int8: this package carries no {INT8_PT2} (the evaluation did not choose int8)")
    name = INT8_PT2 if runtime == "int8" else PT2
    pt2_format = metadata.runtimes[runtime]["format"]
    # AOTInductor loads the package from a path (it extracts a shared library); the manifest check just
    # passed, and the read below re-checks the bytes right before handing the path over.
    read_verified(folder, name, files)
    try:
        return artifacts.load_pt2(os.path.join(folder, name), pt2_format)
    except ValueError as exc:
        raise PackageError(f"{METADATA}: runtimes.{runtime}.format: {exc}") from None
