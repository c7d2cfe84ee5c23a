"""``avp serve-http``: a verified package behind FastAPI + uvicorn, on 127.0.0.1 unless told otherwise.

Endpoints::

    GET  /healthz       {"status": "ok", "package": ..., "runtime": ..., "manifest_sha256": ...}
    GET  /metadata      the package's metadata.json
    POST /v1/segment    a point cloud -> the class of every point

``/v1/segment`` takes either ``Content-Type: application/octet-stream`` with N x 4 little-endian float32
(x, y, z, intensity; 16 bytes a point) or ``application/json`` with ``{"points": [[x, y, z, i], ...]}``.
It answers JSON ``{"classes": [...], "num_points": N, ...}``, or with ``?format=binary`` (or
``Accept: application/octet-stream``) N raw uint8 class ids. Bad input gets a 4xx with a ``detail``
saying what is wrong: 400 (shape, length not a multiple of 16, NaN/inf, empty, malformed JSON),
413 (more than ``serve.max_points`` points), 415 (another content type). The body is read with a size
cap, so an oversized upload is refused before it is buffered.

Requests are served concurrently; decoding runs in worker threads and the model runs one forward at a
time behind ``ServingModel``'s lock (torch already uses every core inside one forward).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable

import numpy as np
# Module level, not inside create_app: FastAPI resolves the endpoints' (string) annotations in this
# module's globals, and a Request it cannot resolve would be taken for a query parameter.
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from serving.package import PackageError
from serving.runtime import InvalidInput, ServingModel, load

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# JSON needs more bytes per point than binary; this allows ~128 characters a point.
JSON_BYTES_PER_POINT = 128


# ----------------------------------------------------------------------------------------- decoding
def decode_binary(body: bytes, max_points: int) -> np.ndarray:
    """N x 4 little-endian float32 -> ``(N, 4)`` array, or ``InvalidInput``."""
    if len(body) % 16:
        raise InvalidInput(f"binary body is {len(body)} bytes, not a multiple of 16: send N points x 4 "
                           "little-endian float32 (x, y, z, intensity)")
    if len(body) // 16 > max_points:
        raise InvalidInput(f"{len(body) // 16} points is more than this server's limit of {max_points}", 413)
    return np.frombuffer(body, dtype="<f4").reshape(-1, 4)


def decode_json(body: bytes, max_points: int) -> np.ndarray:
    """``{"points": [[x, y, z, intensity], ...]}`` -> ``(N, 4)`` float array, or ``InvalidInput``."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    if not isinstance(document, dict) or "points" not in document:
        raise InvalidInput('JSON body must be an object {"points": [[x, y, z, intensity], ...]}')
    points = document["points"]
    if not isinstance(points, list):
        raise InvalidInput(f'"points" must be a list of [x, y, z, intensity] lists, got {type(points).__name__}')
    if len(points) > max_points:
        raise InvalidInput(f"{len(points)} points is more than this server's limit of {max_points}", 413)
    for index, point in enumerate(points):
        # A cheap structural pass first: numpy would turn ragged or nested input into an object array
        # with a less helpful message.
        if not isinstance(point, list) or len(point) != 4:
            raise InvalidInput(f"point {index} must be a list of 4 numbers [x, y, z, intensity], got "
                               f"{json.dumps(point)[:80]}")
    try:
        array = np.array(points) if points else np.zeros((0, 4))
    except (ValueError, OverflowError):  # nested lists inside a point
        array = np.array([], dtype=object)
    if array.dtype.kind not in "fi":  # strings, booleans, nulls, nested lists, integers beyond 64 bits
        bad = next((i for i, p in enumerate(points)
                    if not all(type(v) in (int, float) and abs(v) < 2**63 for v in p)), 0)
        raise InvalidInput(f"point {bad} holds something that is not a number: {json.dumps(points[bad])[:80]}")
    return array


def decode_request(body: bytes, content_type: str, max_points: int) -> np.ndarray:
    """The point cloud in a request body, by content type; empty bodies and clouds are refused."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in ("application/octet-stream", "application/json"):
        raise InvalidInput(f"Content-Type {content_type or '(none)'!r} is not supported: send "
                           "application/octet-stream (N x 4 float32) or application/json", 415)
    if not body:
        raise InvalidInput("empty body: send at least one point")
    points = decode_binary(body, max_points) if media == "application/octet-stream" else decode_json(body, max_points)
    if len(points) == 0:
        raise InvalidInput("no points: send at least one point")
    return points


# ----------------------------------------------------------------------------------------- the app
def create_app(model: ServingModel, max_points: int | None = None):
    """The FastAPI app serving ``model``; ``max_points`` (default: the package's limit) caps a request."""
    limit = min(max_points or model.max_points, model.max_points)
    app = FastAPI(title="avp LiDAR segmentation", version=str(model.metadata.package["version"]),
                  description=f"{model.ref}: per-point semantic segmentation of one LiDAR sweep")
    app.state.model = model

    async def read_capped(request: Request, cap: int) -> bytes:
        """The request body, refusing (413) as soon as it exceeds ``cap`` bytes."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise HTTPException(400, f"bad Content-Length {declared!r}")
            if int(declared) > cap:
                raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {cap} bytes "
                                         f"({limit} points)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise HTTPException(413, f"body exceeds the limit of {cap} bytes ({limit} points)")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {"status": "ok", "package": model.ref, "model": model.metadata.model["ref"],
                "runtime": model.runtime, "manifest_sha256": model.manifest_sha256, "max_points": limit}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        """The package's metadata.json: provenance, evaluation, class map, input spec."""
        return model.metadata.to_dict()

    @app.post("/v1/segment")
    async def segment(request: Request, format: str | None = None):  # noqa: A002 - the query parameter's name
        """One point cloud in (binary or JSON), the class of every point out (JSON or binary)."""
        accept = request.headers.get("accept", "")
        wanted = format or ("binary" if "application/octet-stream" in accept and "json" not in accept else "json")
        if wanted not in ("json", "binary"):
            raise HTTPException(400, f"format must be json or binary, got {format!r}")
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        cap = limit * (JSON_BYTES_PER_POINT if media == "application/json" else 16) + 4096
        body = await read_capped(request, cap)
        started = time.perf_counter()
        try:
            points = await run_in_threadpool(decode_request, body, content_type, limit)
            classes = await run_in_threadpool(model.predict, points)
        except InvalidInput as exc:
            raise HTTPException(exc.status, str(exc)) from None
        elapsed_ms = round((time.perf_counter() - started) * 1000.0, 3)
        if wanted == "binary":
            return Response(classes.astype(np.uint8).tobytes(), media_type="application/octet-stream",
                            headers={"X-Num-Points": str(len(classes)), "X-Package": model.ref,
                                     "X-Inference-Ms": str(elapsed_ms)})
        return JSONResponse({"classes": classes.tolist(), "num_points": int(len(classes)), "package": model.ref,
                             "model": model.metadata.model["ref"], "inference_ms": elapsed_ms})

    return app


# ----------------------------------------------------------------------------------------- running
def open_package(package: str, registry: Any = None, runtime: str = "auto") -> ServingModel:
    """Load ``package``: a folder or ``.tar.gz``; ``package:NAME@vN`` (or ``package:NAME``, the latest);
    or ``NAMESPACE/NAME``, the production package of that promotion. Registry packages are also checked
    against the manifest digest the registry recorded when they were published."""
    if os.path.exists(package):
        return load(package, runtime=runtime)
    if registry is None:
        raise PackageError(f"{package}: no such package folder or tarball")
    from serving.entry import package_paths

    if package.startswith("package:"):
        art = registry.get(package)
    elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", package):
        namespace, name = package.split("/")
        promotion = registry.production(namespace, name)
        if promotion is None:
            raise PackageError(f"{package}: no such folder, and no production version of {namespace}/{name} "
                               "in the registry (avp registry promote package:NAME@vN)")
        art = registry.get(promotion.artifact_id)
    else:
        raise PackageError(f"{package}: no such package folder or tarball, and not a registry reference "
                           "(package:NAME@vN or NAMESPACE/NAME)")
    if art.kind != "package" or art.state != "succeeded":
        raise PackageError(f"{art.ref} is a {art.state} {art.kind}, not a succeeded package; build one with "
                           "`avp serve` and promote the package")
    folder, _tarball = package_paths(art)
    return load(folder, runtime=runtime, expected_manifest_sha256=art.meta.get("manifest_sha256"))


def serve(cfg: Any, package: str, host: str | None = None, port: int | None = None,
          say: Callable[[str], None] = print) -> int:
    """Verify and load ``package`` and serve it with uvicorn until interrupted; returns an exit code."""
    import torch
    import uvicorn

    from pipeline.registry import Registry

    registry = None if os.path.exists(package) else Registry.open(cfg)
    if cfg.serve.threads > 0:
        torch.set_num_threads(cfg.serve.threads)
    model = open_package(package, registry, runtime=cfg.serve.runtime)
    # The packaged example must still give the packaged answer on this host and runtime; running it also
    # warms the runtime up, so the first client does not pay for TorchScript's optimisation passes.
    check = model.self_check()
    say(f"self-check on the packaged example: max |logit diff| {check['max_abs_diff']:.2g}, "
        f"class match {check['class_match_rate']:.4f}")
    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else int(port)
    if host not in LOOPBACK:
        say(f"warning: binding {host}, not loopback: anyone who can reach this host can use the model; "
            "there is no authentication")
    say(f"serving {model.ref} ({model.metadata.model['ref']}, {model.runtime}, manifest "
        f"{model.manifest_sha256[:12]}) on http://{host}:{port}  (POST /v1/segment, GET /healthz, GET /metadata)")
    app = create_app(model, cfg.serve.max_points)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", workers=1)
    finally:
        model.close()
    return 0
