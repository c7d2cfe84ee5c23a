"""Loading a verified package and running it on point clouds.

``load(path)`` accepts a package folder or its ``.tar.gz``. Nothing in the package is deserialised
before ``verify_package`` has passed; the TorchScript file is then loaded from the very bytes whose
checksum was checked (so a file swapped between the check and the load is caught too), and nothing
is ever unpickled (``metadata.json`` is JSON, the example files are raw arrays). ``metadata.json`` is
checked against the schema the runtime relies on (``check_metadata``: every field it reads, the example
files' sizes, ``input.max_points`` under ``MAX_POINTS_CAP``) before anything else is loaded.

``runtime="auto"`` picks, of the runtimes the package verified against eager (``choose_runtimes``), the
fastest on this host among those that also pass the packaged example here (timed on the example at
load); ``torchscript``, ``pt2`` and ``onnx`` name one.

``ServingModel.predict(points)`` takes ``(N, 4)`` float32 (x, y, z, intensity) and returns the class of
every point. Bad input raises ``InvalidInput`` with a message a client can act on; the HTTP server
turns it into a 4xx. ``replicas`` loads the runtime that many times, so that many forwards can run at
once (one per inference worker of the HTTP server).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import tempfile
import time
from typing import Any, Sequence

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

RUNTIMES = ("torchscript", "pt2", "int8", "onnx")
# The runtime ``load`` picks by default: the evaluation's chosen variant, else the fastest verified one here.
AUTO = "auto"
# Runtimes whose program takes a padded batch of clouds (points [B, N, 4], valid [B, N]); model.pt2 is
# exported for batch 1.
BATCHED_RUNTIMES = ("torchscript",)
# The most points a package may declare in input.max_points (and so the most a server could be asked to
# buffer per request); a package declaring more is refused on load.
MAX_POINTS_CAP = 5_000_000
# Timed calls of each candidate runtime when load(runtime="auto") picks the fastest on this host.
CHOICE_RUNS = 5
# Labels are sent as uint8.
MAX_CLASSES = 255
log = logging.getLogger(__name__)


class InvalidInput(ValueError):
    """A point cloud the model cannot take; ``status`` is the HTTP status that fits (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServingModel:
    """A verified package, ready to predict. Safe to share between threads (see ``forward``)."""

    def __init__(self, folder: str, metadata: PackageMetadata, forwards: Sequence[Any], runtime: str,
                 manifest_sha256: str, cleanup_dir: str | None = None, choice: dict[str, Any] | None = None):
        self.folder = folder
        self.metadata = metadata
        self.runtime = runtime
        self.manifest_sha256 = manifest_sha256
        self.max_points = int(metadata.input["max_points"])
        self.num_classes = int(metadata.example["num_classes"])
        self.replicas = len(forwards)
        self.batched = runtime in BATCHED_RUNTIMES
        # How the runtime was picked (runtime="auto": the candidates tried, fastest first, and why any was passed over).
        self.runtime_choice = choice or {"runtime": runtime, "how": "asked for"}
        # One forward per loaded replica, each used by one caller at a time: a TorchScript module or an
        # AOTInductor runner with a single model slot is not documented as safe to call concurrently, and
        # torch already spreads one forward over every core (intra-op threads), so by default there is one.
        self._forwards: queue.SimpleQueue = queue.SimpleQueue()
        for forward in forwards:
            self._forwards.put(forward)
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

    def forward(self, points: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Logits ``[B, N, K]`` of checked ``points [B, N, 4]`` float32 and ``valid [B, N]`` bool, on a free
        replica (waiting for one when every replica is busy)."""
        import torch

        forward = self._forwards.get()
        try:
            with torch.inference_mode():
                logits = forward(torch.from_numpy(points), torch.from_numpy(valid))
        finally:
            self._forwards.put(forward)
        return logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)

    def predict_logits(self, points: Any) -> np.ndarray:
        """Logits ``(N, K)`` float32 for one point cloud."""
        array = self.check_points(points)
        if len(array) == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return self.forward(array[None], np.ones((1, len(array)), dtype=bool))[0]

    def predict_batch(self, clouds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Logits of several checked, non-empty clouds: one forward over the padded batch (padding marked
        invalid, which the model ignores) when the runtime takes batches, else one forward each."""
        if len(clouds) == 1 or not self.batched:
            return [self.forward(c[None], np.ones((1, len(c)), dtype=bool))[0] for c in clouds]
        longest = max(len(c) for c in clouds)
        points = np.zeros((len(clouds), longest, 4), dtype=np.float32)
        valid = np.zeros((len(clouds), longest), dtype=bool)
        for i, cloud in enumerate(clouds):
            points[i, :len(cloud)] = cloud
            valid[i, :len(cloud)] = True
        logits = self.forward(points, valid)
        return [logits[i, :len(c)] for i, c in enumerate(clouds)]

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
        """Run the packaged example ``runs`` times on every replica (this also warms the runtime up:
        TorchScript optimises during its first calls) and compare with the expected logits; ``PackageError``
        if they disagree."""
        points, _classes = self.example()
        # A quantized program reproduces its own packaged logits, not the float model's.
        spec = (self.metadata.runtimes.get(self.runtime, {}).get("expected_logits")
                or self.metadata.example["expected_logits"])
        expected = np.fromfile(os.path.join(self.folder, spec["file"]), dtype="<f4").reshape(spec["shape"])
        for _ in range(max(1, runs) * self.replicas):
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


def labels(logits: np.ndarray) -> np.ndarray:
    """The class of every point as uint8 (what the HTTP server sends; ``check_metadata`` caps the classes)."""
    return logits.argmax(-1).astype(np.uint8)


# ----------------------------------------------------------------------------------------- metadata schema
# Every metadata.json field the runtime and the HTTP server read, with its type: checked on load, so a
# malformed file is a PackageError naming the field rather than a KeyError somewhere later.
METADATA_FIELDS: tuple[tuple[str, type], ...] = (
    ("package.ref", str), ("package.version", int), ("model.ref", str), ("input.max_points", int),
    ("example.num_classes", int), ("runtimes.pt2.format", str),
    *((f"example.{part}.{key}", kind) for part in ("input", "expected_classes", "expected_logits")
      for key, kind in (("file", str), ("shape", list))),
)
# The example files: metadata.json key, item size in bytes, the shape they must have (N points, K classes).
EXAMPLE_FILES = (("input", 4, ("N", 4)), ("expected_classes", 8, ("N",)), ("expected_logits", 4, ("N", "K")))


def metadata_field(data: dict[str, Any], path: str, kind: type) -> Any:
    """``data[a][b]...`` for ``path`` ``a.b...``, of type ``kind``; ``PackageError`` naming the field."""
    value: Any = data
    for depth, key in enumerate(path.split(".")):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(path.split(".")[:depth]) or "the top level"
            raise PackageError(f"{METADATA}: field {path!r} is missing ({where} has no {key!r})")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PackageError(f"{METADATA}: field {path!r} should be {kind.__name__}, found {type(value).__name__} "
                           f"{str(value)[:60]!r}")
    return value


def check_metadata(metadata: PackageMetadata, folder: str, files: dict[str, str],
                   max_points_cap: int = MAX_POINTS_CAP) -> None:
    """``PackageError`` unless ``metadata.json`` has every field the runtime reads, with sane values, and the
    example files it describes have the sizes their shapes give."""
    data = metadata.to_dict()
    for path, kind in METADATA_FIELDS:
        metadata_field(data, path, kind)
    max_points = metadata.input["max_points"]
    if not 2 <= max_points <= max_points_cap:
        raise PackageError(f"{METADATA}: field 'input.max_points' is {max_points}; this server accepts packages "
                           f"declaring 2 to {max_points_cap} points")
    num_classes = metadata.example["num_classes"]
    if not 1 <= num_classes <= MAX_CLASSES:
        raise PackageError(f"{METADATA}: field 'example.num_classes' is {num_classes}; expected 1 to {MAX_CLASSES}")
    sizes = {"K": num_classes}
    for part, itemsize, dims in EXAMPLE_FILES:
        spec = metadata.example[part]
        shape = spec["shape"]
        if len(shape) != len(dims) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                              for n in shape):
            raise PackageError(f"{METADATA}: field 'example.{part}.shape' is {str(shape)[:60]}; expected "
                               f"{list(dims)} with positive integers")
        for dim, n in zip(dims, shape):
            expected = dim if isinstance(dim, int) else sizes.setdefault(dim, n)
            if n != expected:
                raise PackageError(f"{METADATA}: field 'example.{part}.shape' is {shape}; dimension {dim} should be "
                                   f"{expected} like the other example files")
        name = spec["file"]
        if name not in files:
            raise PackageError(f"{METADATA}: field 'example.{part}.file' names {name[:80]!r}, not a file of the package")
        size = os.path.getsize(os.path.join(folder, *name.split("/")))
        if size != math.prod(shape) * itemsize:
            raise PackageError(f"{name}: {size} bytes, but example.{part}.shape {shape} in {METADATA} needs "
                               f"{math.prod(shape) * itemsize} (truncated or padded)")


# ----------------------------------------------------------------------------------------- loading
def _verified(metadata: PackageMetadata, runtime: str) -> bool:
    """Whether packaging checked ``runtime`` against eager on the example and it agreed."""
    if runtime == "onnx":
        onnx = metadata.runtimes.get("onnx")
        return isinstance(onnx, dict) and bool(onnx.get("file")) and bool((onnx.get("check") or {}).get("agrees"))
    agreement = metadata.agreement.get(f"{runtime}_vs_eager")
    return isinstance(agreement, dict) and bool(agreement.get("agrees"))


def choose_runtimes(metadata: PackageMetadata, batched: bool = False) -> list[str]:
    """The runtimes ``load(runtime="auto")`` considers: those the package verified against eager, fastest
    first by the p50 latency it recorded on the example (``batched``: only those taking a padded batch).
    This one function decides which runtimes may be served by default; ``_pick_fastest`` times them here."""
    ranked = []
    for order, name in enumerate(RUNTIMES):
        if _verified(metadata, name) and (name in BATCHED_RUNTIMES or not batched):
            p50 = (metadata.performance.get(f"{name}_latency_ms") or {}).get("p50")
            ranked.append((p50 if isinstance(p50, (int, float)) else math.inf, order, name))
    return [name for *_, name in sorted(ranked)]


def load(path: str, runtime: str = AUTO, expected_manifest_sha256: str | None = None, replicas: int = 1,
         batched: bool = False) -> ServingModel:
    """Verify and load a package folder or ``.tar.gz``; ``PackageError`` names the file when it is refused.

    ``runtime`` picks ``model.ts`` (TorchScript), ``model.pt2`` (AOTInductor, or the ExportedProgram
    fallback), ``model_int8.pt2`` (the int8 program, when the package carries it), ``model.onnx``
    (onnxruntime) or ``auto``, the default (``_auto_runtime``): the variant the evaluation chose
    (``runtimes.default``, what the C++ consumer runs too), or for a package without that choice the fastest
    here of the runtimes the package verified that also passes the packaged example here (``batched``
    restricts them to runtimes taking padded batches). ``expected_manifest_sha256`` (the registry's record)
    additionally pins the exact manifest. ``replicas`` forwards can run at once.
    """
    if runtime not in (*RUNTIMES, AUTO):
        raise PackageError(f"unknown runtime {runtime!r}; choose one of {', '.join((*RUNTIMES, AUTO))}")
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
        except RecursionError:
            raise PackageError(f"{METADATA}: nested too deeply to be package metadata") from None
        if metadata.format != FORMAT:
            raise PackageError(f"{METADATA}: format is {metadata.format!r}, not an avp serving package")
        check_metadata(metadata, folder, files)
        if runtime == AUTO:
            runtime, choice = _auto_runtime(folder, files, metadata, verified["manifest_sha256"], batched)
        else:
            choice = {"runtime": runtime, "how": "asked for"}
        forwards = [_load_runtime(folder, files, metadata, runtime) for _ in range(max(1, replicas))]
    except BaseException:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    return ServingModel(folder, metadata, forwards, runtime, verified["manifest_sha256"], cleanup, choice)


def _pick_fastest(folder: str, files: dict[str, str], metadata: PackageMetadata, manifest_sha256: str,
                  batched: bool) -> tuple[str, dict[str, Any]]:
    """Of ``choose_runtimes``, those that load and pass the packaged example on this host, timed here on
    the example (``CHOICE_RUNS`` interleaved calls each, after the self-check's warm-up): the fastest by
    p50, and a record of the choice (for /metadata). The latency the package recorded orders the
    candidates but does not decide: it was measured on the packaging host, under its load."""
    import torch

    from serving import artifacts

    candidates = choose_runtimes(metadata, batched)
    passed_over: dict[str, str] = {}
    forwards: dict[str, Any] = {}
    for name in candidates:
        try:
            forward = _load_runtime(folder, files, metadata, name)
            ServingModel(folder, metadata, [forward], name, manifest_sha256).self_check(runs=2)
        except Exception as exc:  # noqa: BLE001 - a runtime that fails here is passed over, with the reason
            passed_over[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            log.warning("runtime %s passed over: %s", name, passed_over[name])
            continue
        forwards[name] = forward
    if not forwards:
        raise PackageError(f"{METADATA}: no runtime passed the packaged example on this host "
                           f"(tried {', '.join(candidates) or 'none'}: {passed_over})")
    points = np.fromfile(os.path.join(folder, metadata.example["input"]["file"]), dtype="<f4").reshape(1, -1, 4)
    inputs = [(torch.from_numpy(points), torch.ones(points.shape[:2], dtype=torch.bool))]
    with torch.inference_mode():
        samples = artifacts.time_interleaved(forwards, inputs, CHOICE_RUNS, torch.device("cpu"))
    measured = {name: round(float(np.median(times)), 3) for name, times in samples.items()}
    fastest = min(measured, key=measured.get)
    return fastest, {"runtime": fastest, "how": "auto: the fastest on this host, timed on the packaged example, of "
                     "the runtimes the package verified that passed the example here", "candidates": candidates,
                     "measured_p50_ms": measured, "passed_over": passed_over,
                     "recorded_p50_ms": {n: (metadata.performance.get(f"{n}_latency_ms") or {}).get("p50")
                                         for n in candidates}}


def _auto_runtime(folder: str, files: dict[str, str], metadata: PackageMetadata, manifest_sha256: str,
                  batched: bool) -> tuple[str, dict[str, Any]]:
    """``runtime="auto"``: the variant the evaluation chose within its latency budget and accuracy limits
    (``runtimes.default``, recorded by ``serving.package.default_runtime``), as the C++ consumer runs it;
    a package without that choice (or a batched server whose choice takes no batch) serves the fastest
    verified runtime on this host (``_pick_fastest``)."""
    default = metadata.runtimes.get("default") or {}
    runtime = default.get("serve_runtime")
    if default.get("from_evaluation") and runtime in RUNTIMES and (runtime in BATCHED_RUNTIMES or not batched):
        return runtime, {"runtime": runtime, "how": "auto: the variant the evaluation chose (runtimes.default)",
                         "variant": default.get("variant"), "reason": default.get("reason")}
    return _pick_fastest(folder, files, metadata, manifest_sha256, batched)


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
    if runtime == "onnx":
        from serving.onnx_export import load_onnx

        onnx = metadata.runtimes.get("onnx") or {}
        if not _verified(metadata, "onnx"):
            raise PackageError(f"{METADATA}: the package has no verified model.onnx "
                               f"({onnx.get('error') or 'not exported'})")
        return load_onnx(read_verified(folder, onnx["file"], files), onnx["file"])
    name = INT8_PT2 if runtime == "int8" else PT2
    pt2_format = metadata.runtimes[runtime]["format"]
    # AOTInductor loads the package from a path (it extracts a shared library); the manifest check just
    # passed, and the read below re-checks the bytes right before handing the path over.
    read_verified(folder, name, files)
    try:
        return artifacts.load_pt2(os.path.join(folder, name), pt2_format)
    except ValueError as exc:
        raise PackageError(f"{METADATA}: runtimes.{runtime}.format: {exc}") from None
