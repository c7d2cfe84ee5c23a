"""The serving package: what a blessed model becomes before anything outside Python runs it.

A package is one folder (and a reproducible ``.tar.gz`` of it) holding::

    model.ts               frozen TorchScript, provenance in _extra_files["metadata.json"] (C++ LibTorch, Python)
    model.pt2              torch.export -> AOTInductor package (C++ AOTIModelPackageLoader, Python);
                           an ExportedProgram saved with torch.export.save where AOTInductor cannot compile
    model.onnx             ONNX of the same torch.export program, checked with onnxruntime (optional: where it
                           cannot be exported or disagrees, metadata.json runtimes.onnx.error says why)
    metadata.json          model/dataset versions, git SHA, diff hash, run id, user, evaluation summary and
                           verdict, latency and MACs, class map, input spec and pre-processing parameters
    example_input.bin      float32 [N, 4] little-endian raw (x, y, z, intensity)
    expected_output.bin    int64 [N] little-endian raw: the class of every example point
    expected_logits.bin    float32 [N, K] little-endian raw: the eager model's logits on the example
    model_int8.pt2         only when the evaluation chose int8: its int8 PT2E AOTInductor program, with
    int8_expected_logits.bin   float32 [N, K]: that program's logits on the example
    MODEL_CARD.md          the model card (``serving.model_card``): use, data, evaluation, limitations, provenance
    MODEL_CARD.html        the same card as a self-contained HTML page
    MANIFEST.sha256        ``sha256sum`` format, one line per file above (``sha256sum -c`` checks it)

``build_package`` writes all of it from a model artifact folder and checks that eager, TorchScript and
the ``.pt2`` agree on the example. ``runtimes.default`` in ``metadata.json`` names the runtime consumers
run by default: the variant the evaluation chose (``evaluation.variants``) when the package carries it,
else TorchScript (``default_runtime``). Loading, scripting, exporting, compiling, timing and MAC counting are
``serving.artifacts``'s (shared with the evaluate stage, whose compiled ``model.pt2`` is shipped when it
was compiled for the same model and export spec). ``verify_package`` is the gate every consumer passes
first: every listed file has its checksum, no file is missing or unlisted, no name leaves the folder, nothing is a
link. It guards against corruption and accidental edits; authenticity comes from comparing the
manifest's own digest with the one the registry recorded (``manifest_sha256`` in the package record).

``python -m serving.package verify PATH`` runs the check from a shell.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import re
import stat
import sys
import tarfile
from typing import Any, Callable

import numpy as np

from pipeline.contracts import PackageMetadata
from pipeline.errors import UserError
from pipeline.files import atomic_file, sha256_file

FORMAT = "avp-serving-package"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.sha256"
METADATA = PackageMetadata.FILE
TORCHSCRIPT = "model.ts"
PT2 = "model.pt2"
EXAMPLE_INPUT = "example_input.bin"
EXPECTED_CLASSES = "expected_output.bin"
EXPECTED_LOGITS = "expected_logits.bin"
# Carried only when the evaluation chose the int8 variant: the program and its own logits on the example.
INT8_PT2 = "model_int8.pt2"
INT8_EXPECTED_LOGITS = "int8_expected_logits.bin"
MODEL_CARD = "MODEL_CARD.md"  # written by the serve stage (serving.model_card) beside build_package's files
MODEL_CARD_HTML = "MODEL_CARD.html"
REQUIRED_FILES = (METADATA, TORCHSCRIPT, PT2, EXAMPLE_INPUT, EXPECTED_CLASSES, EXPECTED_LOGITS, MODEL_CARD,
                  MODEL_CARD_HTML)
# Key under which model.ts carries its provenance (the training stage uses the same name).
TORCHSCRIPT_METADATA = "metadata.json"
# A manifest longer than this is not one of ours; refuse it before parsing megabytes of text.
MAX_MANIFEST_BYTES = 1 << 20
# One manifest line, as ``sha256sum`` writes it: 64 hex digits, two spaces (or " *" for binary mode), name.
_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
# Agreement tolerance between runtimes, relative to the logits' scale: float reassociation (fused
# kernels, other thread counts) moves logits by ~1e-6; a real export bug moves them by far more.
RELATIVE_TOLERANCE = 1e-4
# Untimed calls of each runtime before the package's latency is measured (TorchScript optimises during its
# first calls).
LATENCY_WARMUP = 2


class PackageError(UserError):
    """A package is malformed, incomplete or was modified; the message names the file."""


# ----------------------------------------------------------------------------------------- manifest
def check_member_name(name: str) -> str:
    """``name`` if it is a plain relative POSIX path that stays inside the package, else ``PackageError``."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts) or re.match(r"^[A-Za-z]:", name)):
        raise PackageError(f"manifest entry {name!r} is not a plain relative path inside the package "
                           "(absolute paths, '..', '.', backslashes and empty segments are refused)")
    return name


def write_manifest(folder: str) -> str:
    """Write ``MANIFEST.sha256`` over every file in ``folder``; returns the manifest's own SHA-256."""
    lines = [f"{sha256_file(os.path.join(folder, name))}  {name}" for name in _list_files(folder)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _list_files(folder: str) -> list[str]:
    """Every entry under ``folder`` except the manifest, as sorted POSIX paths; refuses links and
    anything that is not a regular file or a folder."""
    names = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for entry in sorted(dirs) + sorted(files):
            full = os.path.join(root, entry)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise PackageError(f"{rel}: is a symbolic link; a package holds only regular files")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise PackageError(f"{rel}: is not a regular file")
            if rel != MANIFEST:
                names.append(rel)
    return sorted(names)


def read_manifest(folder: str) -> tuple[dict[str, str], str]:
    """Parse ``MANIFEST.sha256`` into {name: sha256} and the manifest's own digest, checking every name."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path) or os.path.islink(path):
        raise PackageError(f"{MANIFEST}: missing from {folder}; it is not a serving package (or was truncated)")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{MANIFEST}: larger than {MAX_MANIFEST_BYTES} bytes; not a package manifest")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PackageError(f"{MANIFEST}: not UTF-8 text") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line)
        if not match:
            raise PackageError(f"{MANIFEST}: line {number} is not '<sha256>  <name>': {line[:120]!r}")
        digest, name = match.groups()
        check_member_name(name)
        if name == MANIFEST:
            raise PackageError(f"{MANIFEST}: line {number} lists the manifest itself")
        if name in entries:
            raise PackageError(f"{MANIFEST}: {name!r} is listed twice")
        entries[name] = digest
    return entries, hashlib.sha256(raw).hexdigest()


def verify_package(folder: str, expected_manifest_sha256: str | None = None) -> dict[str, Any]:
    """Check a package folder; returns ``{"files": {name: sha256}, "manifest_sha256": ...}``.

    Refuses (``PackageError`` naming the file): a missing manifest, a manifest entry that is not a plain
    relative path, a listed file that is missing, a link or not a regular file, a file that is present but
    not listed, a checksum mismatch, a required file absent from the manifest, and - when
    ``expected_manifest_sha256`` is given (the registry's record) - a manifest that is not that one.
    """
    if not os.path.isdir(folder):
        raise PackageError(f"{folder}: not a folder; pass the package folder or its .tar.gz")
    entries, manifest_digest = read_manifest(folder)
    if expected_manifest_sha256 and manifest_digest != expected_manifest_sha256:
        raise PackageError(f"{MANIFEST}: digest {manifest_digest[:16]}... differs from the registry's record "
                           f"{expected_manifest_sha256[:16]}...; the package was rewritten after it was published")
    root = os.path.realpath(folder)
    for name in entries:
        full = os.path.join(folder, *name.split("/"))
        # Belt and braces beside check_member_name: the resolved path must stay under the folder.
        if os.path.commonpath([root, os.path.realpath(full)]) != root:
            raise PackageError(f"{name}: resolves outside the package folder")
        try:
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            raise PackageError(f"{name}: listed in {MANIFEST} but missing from the package") from None
        if not stat.S_ISREG(mode):
            raise PackageError(f"{name}: is a link or not a regular file; a package holds only regular files")
    unexpected = sorted(set(_list_files(folder)) - set(entries))
    if unexpected:
        raise PackageError(f"{unexpected[0]}: present in the package but not listed in {MANIFEST}"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name in REQUIRED_FILES:
        if name not in entries:
            raise PackageError(f"{name}: required, but not listed in {MANIFEST}")
    for name, digest in entries.items():
        actual = sha256_file(os.path.join(folder, *name.split("/")))
        if actual != digest:
            raise PackageError(f"{name}: checksum mismatch (manifest {digest[:16]}..., file {actual[:16]}...): "
                               "the file was modified or corrupted")
    return {"files": entries, "manifest_sha256": manifest_digest}


def read_verified(folder: str, name: str, files: dict[str, str]) -> bytes:
    """The bytes of one package file, checked against its manifest digest *as read*, so what is used is
    exactly what was verified (no window between checking a file and loading it)."""
    with open(os.path.join(folder, *check_member_name(name).split("/")), "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != files.get(name):
        raise PackageError(f"{name}: changed while being loaded (checksum mismatch)")
    return data


# ----------------------------------------------------------------------------------------- tarball
def make_tarball(folder: str, tar_path: str) -> str:
    """A reproducible ``.tar.gz`` of ``folder`` (sorted names, zero mtimes and owners) under one top-level
    folder named like it; returns its SHA-256. Same files, same bytes."""
    top = os.path.basename(os.path.normpath(folder))
    with atomic_file(tar_path) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in [*_list_files(folder), MANIFEST]:
            info = tar.gettarinfo(os.path.join(folder, *name.split("/")), arcname=f"{top}/{name}")
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(os.path.join(folder, *name.split("/")), "rb") as fh:
                tar.addfile(info, fh)
    return sha256_file(tar_path)


def extract_tarball(tar_path: str, into: str) -> str:
    """Extract a package tarball safely into ``into``; returns the package folder inside it.

    Only regular files and folders are accepted; names are checked like manifest entries before anything
    is written (tarfile's ``data`` filter then refuses anything that slipped through)."""
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            members = tar.getmembers()
            tops = set()
            for member in members:
                check_member_name(member.name.rstrip("/"))
                if not (member.isfile() or member.isdir()):
                    raise PackageError(f"{member.name}: a link or special file in {os.path.basename(tar_path)}")
                tops.add(member.name.split("/")[0])
            if len(tops) != 1:
                raise PackageError(f"{tar_path}: expected one top-level package folder, found {sorted(tops)}")
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"{tar_path}: not a readable .tar.gz ({exc})") from None
    return os.path.join(into, tops.pop())


# ----------------------------------------------------------------------------------------- building
def synthetic_scan(num_points: int, seed: int, x_range: tuple[float, float],
                   y_range: tuple[float, float]) -> np.ndarray:
    """A deterministic, LiDAR-like example cloud [N, 4] float32 in the sensor frame.

    Mostly ground (denser near the sensor, like a spinning LiDAR), some box-shaped objects, some walls
    and poles, and a few points beyond the grid, so the example exercises every path of the model
    (in-grid scatter/gather and the out-of-grid branch). Intensity is in [0, 1] like ingested data.
    """
    rng = np.random.default_rng(seed)
    reach = 0.95 * min(abs(x_range[0]), abs(x_range[1]), abs(y_range[0]), abs(y_range[1]))
    counts = np.round(np.array([0.62, 0.2, 0.12, 0.02]) * num_points).astype(int)
    counts[0] += num_points - counts.sum()
    ground_n, objects_n, walls_n, outside_n = counts
    # Ground: ranges skewed towards the sensor (beam spacing grows with range).
    radius = 2.0 + (reach - 2.0) * rng.random(ground_n) ** 1.7
    angle = rng.uniform(-np.pi, np.pi, ground_n)
    ground = np.stack([radius * np.cos(angle), radius * np.sin(angle),
                       -1.7 + rng.normal(0, 0.03, ground_n), rng.uniform(0.05, 0.35, ground_n)], axis=1)
    # Objects: a few boxes (vehicles, pedestrians) with points on their volume.
    centres = rng.uniform(-0.6 * reach, 0.6 * reach, (8, 2))
    sizes = rng.choice([[4.5, 1.9, 1.6], [0.6, 0.6, 1.8], [1.8, 0.6, 1.7]], 8)
    which = rng.integers(0, 8, objects_n)
    local = (rng.random((objects_n, 3)) - 0.5) * sizes[which]
    objects = np.stack([centres[which, 0] + local[:, 0], centres[which, 1] + local[:, 1],
                        -1.7 + sizes[which, 2] / 2 + local[:, 2], rng.uniform(0.3, 0.95, objects_n)], axis=1)
    # Walls and poles: vertical structure near the edge of the grid.
    wall_angle = rng.uniform(-np.pi, np.pi, walls_n)
    wall_radius = rng.uniform(0.7 * reach, reach, walls_n)
    walls = np.stack([wall_radius * np.cos(wall_angle), wall_radius * np.sin(wall_angle),
                      rng.uniform(-1.7, 6.0, walls_n), rng.uniform(0.1, 0.7, walls_n)], axis=1)
    # Beyond the grid: the model must still classify these (its out-of-grid branch).
    far = rng.uniform(1.1, 1.5, outside_n) * max(abs(v) for v in (*x_range, *y_range))
    far_angle = rng.uniform(-np.pi, np.pi, outside_n)
    outside = np.stack([far * np.cos(far_angle), far * np.sin(far_angle),
                        rng.uniform(-1.7, 3.0, outside_n), rng.uniform(0.0, 0.5, outside_n)], axis=1)
    cloud = np.concatenate([ground, objects, walls, outside]).astype(np.float32)
    return cloud[rng.permutation(len(cloud))]


def compare_logits(reference: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    """How far ``actual`` logits are from ``reference``: max abs diff, class match rate, and the points
    whose class differs although the reference's top-2 margin is above the tolerance (real mismatches,
    as opposed to near-ties that any float reordering may flip)."""
    tolerance = tolerance_for(reference)
    diff = float(np.abs(reference - actual).max()) if reference.size else 0.0
    ref_classes, act_classes = reference.argmax(-1), actual.argmax(-1)
    top2 = np.sort(reference, axis=-1)[..., -2:] if reference.size else np.zeros((0, 2))
    margin = top2[..., 1] - top2[..., 0]
    differs = ref_classes != act_classes
    return {"max_abs_diff": diff, "tolerance": tolerance,
            "class_match_rate": float(1.0 - differs.mean()) if differs.size else 1.0,
            "real_mismatches": int((differs & (margin > 2 * tolerance)).sum()),
            "agrees": bool(diff <= tolerance and not (differs & (margin > 2 * tolerance)).any())}


def tolerance_for(logits: np.ndarray) -> float:
    """The allowed max abs logit difference between runtimes for these reference logits."""
    scale = float(np.abs(logits).max()) if logits.size else 1.0
    return RELATIVE_TOLERANCE * max(1.0, scale)


def _write_raw(path: str, array: np.ndarray, dtype: str) -> None:
    """Little-endian raw bytes of ``array`` as ``dtype`` (e.g. ``<f4``), readable from C++ with fread."""
    np.ascontiguousarray(array, dtype=np.dtype(dtype)).tofile(path)


def build_package(folder: str, *, model_dir: str, facts: dict[str, Any], max_points: int, example_points: int,
                  example_seed: int, latency_runs: int, aot_inductor: bool, evaluation_dir: str | None = None,
                  onnx: bool = True, say: Callable[[str], None] = lambda _m: None) -> PackageMetadata:
    """Write a complete package into ``folder`` (which must exist and be empty); returns its metadata.

    ``facts`` carries what the registry knows (package/model/dataset/metrics references, provenance,
    evaluation summary and verdict); everything measured on the model is added here. ``evaluation_dir``
    is the evaluate stage's metrics artifact folder: the AOTInductor ``model.pt2`` it compiled
    (``serving.artifacts.COMPILED_DIR``) is shipped when it was compiled for this model, export spec,
    torch and host (checked, SHA-256 of the copy included); otherwise the model is compiled here.
    With ``onnx``, ``model.onnx`` is exported from the same ``torch.export`` program and checked in
    onnxruntime (``serving.onnx_export``); a failure is recorded and the package is built without it.
    """
    import torch

    from pipeline.taxonomy import CLASSES
    from serving import artifacts
    from training.models import config_to_dict, count_parameters

    model, spec = artifacts.load_model(model_dir)
    model_config = config_to_dict(model.config)
    x_range = tuple(model_config.get("x_range_m", (-50.0, 50.0)))
    y_range = tuple(model_config.get("y_range_m", (-50.0, 50.0)))
    cloud = synthetic_scan(example_points, example_seed, x_range, y_range)
    points, valid = artifacts.frame_inputs(cloud)
    with torch.inference_mode():
        eager_logits = model(points, valid)[0].numpy()
    if not np.isfinite(eager_logits).all():
        raise PackageError("the model's logits on the example are not finite; refusing to package it")

    provenance = {"package": facts["package"]["ref"], "model": facts["model"]["ref"],
                  "dataset": (facts.get("dataset") or {}).get("ref") or "", **facts["provenance"]}

    # TorchScript, saved with its provenance and read back from the file so what is checked is what ships.
    say("scripting the model (TorchScript)")
    scripted = artifacts.save_torchscript(model, os.path.join(folder, TORCHSCRIPT),
                                          {TORCHSCRIPT_METADATA: json.dumps(provenance, sort_keys=True)})
    with torch.inference_mode():
        ts_logits = scripted(points, valid)[0].numpy()

    export_spec = artifacts.ExportSpec(max_points)
    pt2_path = os.path.join(folder, PT2)
    record = artifacts.compiled_record(model, export_spec, "cpu")
    compiled_dir = os.path.join(evaluation_dir, artifacts.COMPILED_DIR) if evaluation_dir else None
    pt2_info, why = artifacts.reuse_compiled(compiled_dir, record, pt2_path) if aot_inductor else (None, "")
    exported = None
    if pt2_info is not None:
        say(why)
        pt2_info["compiled_by"] = "evaluate"
    else:
        say(f"exporting with torch.export (dynamic point count 1..{max_points})"
            + (f", then AOTInductor ({why})" if aot_inductor else ""))
        exported = artifacts.export_program(model, (points, valid), export_spec)
        pt2_info = {**artifacts.compile_pt2(exported, pt2_path, aot_inductor, "serve.aot_inductor", record, say),
                    "compiled_by": "serve"}
    pt2_model = artifacts.load_pt2(pt2_path, pt2_info["format"])
    with torch.inference_mode():
        pt2_logits = pt2_model(points, valid)[0].numpy()

    choice = evaluation_choice(evaluation_dir)
    int8_runtime, int8_run, why_not_int8 = (
        package_int8(folder, evaluation_dir, record, (points, valid))
        if evaluation_dir and choice and choice["runtime"] == "int8" else (None, None, ""))
    runtimes_built = {"torchscript": True, "pt2": pt2_info["format"] == "aoti", "int8": int8_runtime is not None}
    default = default_runtime(choice, runtimes_built, why_not_int8)
    say(f"default runtime: {default['serve_runtime']} ({default['reason']})")

    agreement = {"torchscript_vs_eager": compare_logits(eager_logits, ts_logits),
                 "pt2_vs_eager": compare_logits(eager_logits, pt2_logits),
                 "pt2_vs_torchscript": compare_logits(ts_logits, pt2_logits)}
    if int8_run is not None:  # not required to agree: its accuracy cost was judged on the test split
        with torch.inference_mode():
            agreement["int8_vs_eager"] = compare_logits(eager_logits, int8_run(points, valid)[0].numpy())
    for pair, result in agreement.items():
        if not result["agrees"] and pair != "int8_vs_eager":
            raise PackageError(f"{pair.replace('_', ' ')}: logits differ by {result['max_abs_diff']:.3g} "
                               f"(tolerance {result['tolerance']:.3g}), {result['real_mismatches']} points change "
                               "class; the exported model does not match the trained one")

    say(f"measuring latency over {latency_runs} interleaved runs on the {example_points}-point example")
    runners = {"torchscript": scripted, "pt2": pt2_model, "eager": model, **({"int8": int8_run} if int8_run else {})}
    onnx_info = {"file": None, "error": "skipped: serve.onnx is false"}
    if onnx:
        from serving.onnx_export import ONNX, export_onnx, load_onnx

        say("exporting model.onnx (torch.onnx, dynamo) and checking it with onnxruntime")
        exported = exported or artifacts.export_program(model, (points, valid), export_spec)
        onnx_info = export_onnx(exported, os.path.join(folder, ONNX), (points, valid), eager_logits, say)
        if onnx_info["file"]:
            with open(os.path.join(folder, ONNX), "rb") as fh:
                runners["onnx"] = load_onnx(fh.read(), ONNX)
    for run in runners.values():
        artifacts.warm_up(run, [(points, valid)], LATENCY_WARMUP)
    samples = artifacts.time_interleaved(runners, [(points, valid)], latency_runs, torch.device("cpu"))
    performance: dict[str, Any] = {"threads": torch.get_num_threads(), "example_points": example_points}
    for name, times in samples.items():
        stats = artifacts.latency_stats(times, example_points)
        performance[f"{name}_latency_ms"] = {"p50": round(stats["p50_ms"], 3), "p99": round(stats["p99_ms"], 3),
                                             "mean": round(stats["mean_ms"], 3), "runs": stats["runs"]}
    performance["macs"] = artifacts.count_flops(model, (points, valid))["macs"]
    performance["parameters"] = count_parameters(model)
    performance["macs_per_point"] = round(performance["macs"] / max(1, example_points), 1)

    classes = eager_logits.argmax(-1)
    _write_raw(os.path.join(folder, EXAMPLE_INPUT), cloud, "<f4")
    _write_raw(os.path.join(folder, EXPECTED_CLASSES), classes, "<i8")
    _write_raw(os.path.join(folder, EXPECTED_LOGITS), eager_logits, "<f4")
    num_classes = int(eager_logits.shape[-1])
    metadata = PackageMetadata.from_dict({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **facts,
        "model": {**facts["model"], "config": model_config, "spec": spec.to_dict()},
        "classes": list(CLASSES)[:num_classes], "class_map": {str(i): c for i, c in enumerate(CLASSES[:num_classes])},
        "input": {
            "points": {"dtype": "float32", "byte_order": "little", "shape": ["N", 4],
                       "columns": ["x", "y", "z", "intensity"]},
            "max_points": max_points,
            "model_call": "forward(points [1, N, 4] float32, valid [1, N] bool) -> logits [1, N, K]; the runtime "
                          "adds the batch axis and marks every point valid",
        },
        "output": {"classes": {"dtype": "int64", "shape": ["N"], "meaning": "argmax of the logits, see class_map"},
                   "logits": {"dtype": "float32", "shape": ["N", num_classes]}},
        "preprocessing": {
            "coordinate_frame": "LiDAR sensor frame: x forward, y left, z up, metres (right-handed)",
            "intensity": "return intensity normalised to [0, 1]",
            "non_finite_points": "rejected (NaN or inf anywhere in a point)",
            "bev_grid": {"x_range_m": model_config.get("x_range_m"), "y_range_m": model_config.get("y_range_m"),
                         "cell_size_m": model_config.get("cell_size_m"),
                         "height_scale_m": model_config.get("height_scale_m")},
            "out_of_grid_points": "classified from their own point features (no BEV context)",
            "normalisation": "done inside the model (x, y by the grid half-extent, z by height_scale_m)",
        },
        "example": {
            "source": f"synthetic LiDAR-like scan, numpy seed {example_seed}",
            "num_points": int(len(cloud)), "num_classes": num_classes,
            "input": {"file": EXAMPLE_INPUT, "dtype": "float32", "byte_order": "little", "shape": [len(cloud), 4]},
            "expected_classes": {"file": EXPECTED_CLASSES, "dtype": "int64", "byte_order": "little",
                                 "shape": [len(cloud)]},
            "expected_logits": {"file": EXPECTED_LOGITS, "dtype": "float32", "byte_order": "little",
                                "shape": [len(cloud), num_classes]},
            "logits_tolerance": tolerance_for(eager_logits),
            "class_histogram": {CLASSES[i]: int(n) for i, n in enumerate(np.bincount(classes, minlength=num_classes))},
        },
        "runtimes": {
            "torchscript": {"file": TORCHSCRIPT, "torch_version": torch.__version__,
                            "provenance_extra_file": TORCHSCRIPT_METADATA},
            "pt2": {"file": PT2, **pt2_info, "dynamic_shapes": {"num_points": export_spec.as_dict()["num_points"]},
                    "batch": export_spec.as_dict()["batch"]},
            **({"int8": int8_runtime} if int8_runtime else {}),
            "default": default,
            "onnx": onnx_info,
        },
        "agreement": agreement,
        "performance": performance,
    }, METADATA)
    metadata.save_to(folder)
    return metadata


def evaluation_choice(evaluation_dir: str | None) -> dict[str, Any] | None:
    """The variant the evaluation chose to serve (``metrics.json``: ``candidate.variants.choice``), or None
    (no evaluation, or one from before variants were chosen)."""
    from pipeline.contracts import EvaluationMetrics

    if not evaluation_dir or not os.path.isfile(os.path.join(evaluation_dir, EvaluationMetrics.FILE)):
        return None
    return (EvaluationMetrics.load_from(evaluation_dir).candidate.get("variants") or {}).get("choice")


def package_int8(folder: str, evaluation_dir: str, record: dict[str, Any], inputs: Any) -> tuple[Any, Any, str]:
    """Ship the evaluation's int8 program as ``model_int8.pt2`` when its record matches (checked like
    ``model.pt2``, see ``serving.artifacts.reuse_compiled``), with its own logits on the example
    (``int8_expected_logits.bin``: what a consumer of this program must reproduce). Returns (the
    ``runtimes.int8`` entry, the loaded program, "") or (None, None, why not)."""
    import torch

    from serving import artifacts

    source = os.path.join(evaluation_dir, artifacts.COMPILED_DIR, artifacts.COMPILED_INT8_DIR)
    info, why = artifacts.reuse_compiled(source, record, os.path.join(folder, INT8_PT2))
    if info is None:
        return None, None, why.replace("model.pt2", "int8 model.pt2")
    run = artifacts.load_pt2(os.path.join(folder, INT8_PT2), "aoti")
    with torch.inference_mode():
        logits = run(*inputs)[0].numpy()
    _write_raw(os.path.join(folder, INT8_EXPECTED_LOGITS), logits, "<f4")
    entry = {"file": INT8_PT2, **info, "compiled_by": "evaluate",
             "quantization": "int8 static PT2E (torchao X86InductorQuantizer defaults), x86 CPU",
             "expected_logits": {"file": INT8_EXPECTED_LOGITS, "dtype": "float32", "byte_order": "little",
                                 "shape": list(logits.shape)},
             "logits_tolerance": tolerance_for(logits)}
    return entry, run, ""


def default_runtime(choice: dict[str, Any] | None, built: dict[str, bool], why_not_int8: str) -> dict[str, Any]:
    """``runtimes.default``: what ``serving.load`` (runtime ``auto``), ``avp serve-http`` and the C++
    consumer run unless told otherwise - the evaluation's chosen variant when the package carries it,
    else the reference TorchScript ``model.ts``, saying why."""
    files = {"torchscript": TORCHSCRIPT, "pt2": PT2, "int8": INT8_PT2}
    if choice is None:
        runtime, reason = "torchscript", "no evaluation choice: the reference TorchScript"
    elif built.get(choice["runtime"]):
        runtime, reason = choice["runtime"], f"chosen by the evaluation: {choice['reason']}"
    else:
        why = why_not_int8 if choice["runtime"] == "int8" else f"this package's {files[choice['runtime']]} is not " \
                                                               "an AOTInductor program"
        runtime = "torchscript"
        reason = f"the evaluation chose {choice['variant']}, but {why}: the reference TorchScript"
    from_evaluation = bool(choice) and runtime == choice["runtime"]
    return {"variant": choice["variant"] if from_evaluation else "torchscript_frozen",
            "serve_runtime": runtime, "file": files[runtime], "reason": reason, "from_evaluation": from_evaluation}


# ----------------------------------------------------------------------------------------- shell entry
def main(argv: list[str] | None = None) -> int:
    """``python -m serving.package verify PATH [--manifest-sha256 HEX]``: exit 0 if intact, 2 if not."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m serving.package")
    parser.add_argument("action", choices=["verify"])
    parser.add_argument("path", help="package folder")
    parser.add_argument("--manifest-sha256", default=None, help="the digest the registry recorded")
    args = parser.parse_args(argv)
    try:
        result = verify_package(args.path, args.manifest_sha256)
    except PackageError as exc:
        print(f"package refused: {exc}", file=sys.stderr)
        return 2
    print(f"ok: {len(result['files'])} files verified, manifest sha256 {result['manifest_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
