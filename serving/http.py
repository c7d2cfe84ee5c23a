"""``avp serve-http``: a verified package behind FastAPI + uvicorn, on 127.0.0.1 unless told otherwise.

Endpoints::

    GET  /healthz       {"status": "ok", "package": ..., "runtime": ..., "manifest_sha256": ...}
    GET  /metadata      the package's metadata.json (user and host left out) and how it is being served
    GET  /metrics       Prometheus text format
    POST /v1/segment    a point cloud -> the class of every point

``/v1/segment`` takes either ``Content-Type: application/octet-stream`` with N x 4 little-endian float32
(x, y, z, intensity; 16 bytes a point) or ``application/json`` with ``{"points": [[x, y, z, i], ...]}``.
It answers JSON ``{"classes": [...], "num_points": N, ...}``, or with ``?format=binary`` (or
``Accept: application/octet-stream``) N raw uint8 class ids; ``?logits=true`` adds the float32 logits.
Every response carries ``X-Model-Version`` (the package that answered). Bad input gets a 4xx with a
``detail`` saying what is wrong: 400 (shape, length not a multiple of 16, NaN/inf, empty, malformed,
nested or huge-number JSON), 408 (body not received within ``serve.body_timeout_s``), 413 (more than
``serve.max_points`` points; the body is read with a size cap, so an oversized upload is refused before
it is buffered), 415 (another content type).

Load (``InferencePool``): decoded requests wait in a bounded queue (``serve.queue_size``) for one of
``serve.workers`` inference threads, each running its own replica of the model; a full queue is 429
with ``Retry-After``, a request not answered within ``serve.deadline_ms`` is 504 (and dropped from the
queue if it has not started). With ``serve.max_batch`` > 1 a worker runs the requests waiting for it
(up to ``max_batch``, waiting at most ``max_batch_wait_ms`` for more) as one padded batch.

Connections (``guarded_protocol``): at most ``serve.max_connections`` (more are closed on accept), the
request headers within ``serve.header_timeout_s``; a client that disconnects mid-request is counted,
not logged with a traceback. SIGTERM (or SIGINT) stops accepting, lets in-flight requests finish
(``serve.drain_s``) and exits 0.

``--production NAMESPACE/NAME`` (``ProductionWatcher``) serves the registry's production package and
polls the alias every ``serve.poll_s``: a new production package (promotion or rollback) is verified
against the registry's manifest digest, loaded and self-checked in the background, then swapped in
atomically (a request finishes on the model it started on); one that fails is not swapped in, and the
failure is logged and counted (``avp_model_swaps_failed_total``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import queue
import re
import signal
import threading
import time
from typing import Any, Callable

import numpy as np

# Module level, not inside create_app: FastAPI resolves the endpoints' (string) annotations in this
# module's globals, and a Request it cannot resolve would be taken for a query parameter.
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from pipeline.errors import UserError
from serving.package import PackageError
from serving.runtime import InvalidInput, ServingModel, labels, load

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# JSON needs more bytes per point than binary; this allows ~128 characters a point.
JSON_BYTES_PER_POINT = 128
# The request body {"points": [[x, y, z, i], ...]} is 3 levels deep; anything nested deeper than this is
# refused before it is parsed (json.loads recurses once per level).
MAX_JSON_DEPTH = 16
# More digits than any float32 coordinate needs; longer integers are refused without converting them.
MAX_INT_DIGITS = 40
# The routes metrics are labelled with (anything else is "other", so hostile paths cannot grow the labels).
ROUTES = ("/v1/segment", "/healthz", "/metadata", "/metrics")
# Status for a request whose client went away before the answer (nginx's convention; never sent).
CLIENT_CLOSED = 499
# metadata.json fields /metadata leaves out: who built the package and where.
PRIVATE_FIELDS = (("provenance", "user"), ("provenance", "host"), ("model", "created_by"))
log = logging.getLogger("avp.serve")


# ----------------------------------------------------------------------------------------- decoding
def decode_binary(body: bytes, max_points: int) -> np.ndarray:
    """N x 4 little-endian float32 -> ``(N, 4)`` array, or ``InvalidInput``."""
    if len(body) % 16:
        raise InvalidInput(f"binary body is {len(body)} bytes, not a multiple of 16: send N points x 4 "
                           "little-endian float32 (x, y, z, intensity)")
    if len(body) // 16 > max_points:
        raise InvalidInput(f"{len(body) // 16} points is more than this server's limit of {max_points}", 413)
    return np.frombuffer(body, dtype="<f4").reshape(-1, 4)


def json_depth(body: bytes) -> int:
    """The deepest bracket nesting in ``body`` (brackets inside strings counted too: a points body has no
    strings but its key), computed without parsing, so a hostile depth costs one vectorised pass."""
    raw = np.frombuffer(body, dtype=np.uint8)
    step = ((raw == ord("[")) | (raw == ord("{"))).astype(np.int32) - ((raw == ord("]")) | (raw == ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _bounded_int(text: str) -> int:
    """``json.loads``'s integer parser, refusing integers longer than any coordinate could need (Python
    refuses over 4,300 digits with a ValueError; much shorter ones already cost time)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidInput(f"an integer of {len(text.lstrip('-'))} digits is not a coordinate (at most "
                           f"{MAX_INT_DIGITS} digits)")
    return int(text)


def decode_json(body: bytes, max_points: int) -> np.ndarray:
    """``{"points": [[x, y, z, intensity], ...]}`` -> ``(N, 4)`` float array, or ``InvalidInput``."""
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(f"JSON nested {depth} levels deep; a points body is 3 (at most {MAX_JSON_DEPTH} accepted)")
    try:
        document = json.loads(body, parse_int=_bounded_int)
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
        raise InvalidInput(f"Content-Type {content_type[:80] or '(none)'!r} is not supported: send "
                           "application/octet-stream (N x 4 float32) or application/json", 415)
    if not body:
        raise InvalidInput("empty body: send at least one point")
    points = decode_binary(body, max_points) if media == "application/octet-stream" else decode_json(body, max_points)
    if len(points) == 0:
        raise InvalidInput("no points: send at least one point")
    return points


# ----------------------------------------------------------------------------------------- metrics
class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("avp_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("avp_http_request_duration_seconds", "Time from request to response, by route",
                                 ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.queue_depth = Gauge("avp_inference_queue_depth", "Requests waiting for an inference worker",
                                 registry=r)
        self.forward = Histogram("avp_model_forward_seconds", "Time of one model forward (a batch counts once)",
                                 registry=r, buckets=(.005, .01, .02, .035, .05, .075, .1, .2, .5, 1, 5))
        self.batch_size = Histogram("avp_inference_batch_size", "Requests per model forward", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32))
        self.serving = Info("avp_serving", "The package being served", registry=r)
        self.swaps = Counter("avp_model_swaps", "Packages swapped in while serving", registry=r)
        self.failed_swaps = Counter("avp_model_swaps_failed", "New production packages refused (verification, "
                                    "loading or self-check failed); the old one kept serving", registry=r)

    def set_serving(self, model: ServingModel, production: str | None) -> None:
        self.serving.info({"package": model.ref, "version": str(model.metadata.package["version"]),
                           "runtime": model.runtime, "manifest_sha256": model.manifest_sha256,
                           "production": production or ""})

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ----------------------------------------------------------------------------------------- the model slot
class ServedModel:
    """The model being served and what it is (a package reference, its production label); ``swap``
    replaces all of it in one assignment, so a reader sees the old state or the new, never a mix."""

    def __init__(self, model: ServingModel, artifact_id: int | None = None, production: str | None = None):
        self.state = (model, artifact_id, production)

    @property
    def model(self) -> ServingModel:
        return self.state[0]

    def swap(self, model: ServingModel, artifact_id: int | None, production: str | None) -> ServingModel:
        """Serve ``model`` from now on; returns the one it replaces (requests holding it finish on it)."""
        old = self.state[0]
        self.state = (model, artifact_id, production)
        return old


# ----------------------------------------------------------------------------------------- inference
class QueueFull(Exception):
    """Every worker is busy and the queue is full."""


@dataclasses.dataclass(eq=False)
class Job:
    """One decoded request waiting for (or in) a forward."""

    model: ServingModel
    points: np.ndarray
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    abandoned: bool = False  # the client was answered 504 (or left): skip it

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        def deliver() -> None:
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)
        self.loop.call_soon_threadsafe(deliver)


class InferencePool:
    """A bounded queue in front of ``workers`` inference threads (see the module docstring)."""

    _STOP = object()

    def __init__(self, workers: int, queue_size: int, max_batch: int, max_batch_wait_ms: float, metrics: Metrics):
        self.max_batch = max(1, max_batch)
        self.max_batch_wait_s = max(0.0, max_batch_wait_ms) / 1000.0
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        metrics.queue_depth.set_function(self._queue.qsize)
        self._threads = [threading.Thread(target=self._work, name=f"avp-inference-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    async def infer(self, model: ServingModel, points: np.ndarray, deadline: float) -> np.ndarray:
        """The logits of ``points`` on ``model``; ``QueueFull`` at once when the queue is full,
        ``TimeoutError`` at ``deadline``."""
        loop = asyncio.get_running_loop()
        job = Job(model, points, deadline, loop, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:  # the deadline, or the client left (the task is cancelled): nobody waits for it
            job.abandoned = True
            raise

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: the queue's worth of forwards at the recent forward time."""
        samples = self.metrics.forward.collect()[0].samples
        count = next((s.value for s in samples if s.name.endswith("_count")), 0.0)
        total = next((s.value for s in samples if s.name.endswith("_sum")), 0.0)
        mean = total / count if count else 0.1
        return max(1, math.ceil(self._queue.maxsize * mean / len(self._threads)))

    def _take_batch(self, first: Job) -> list[Job]:
        """``first`` and up to ``max_batch - 1`` more waiting jobs, waiting at most ``max_batch_wait_s``."""
        batch = [first]
        until = time.monotonic() + self.max_batch_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            if job is self._STOP:
                self._queue.put(job)  # this worker's own mark: it stops after this batch
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is self._STOP:
                return
            batch = self._take_batch(job) if self.max_batch > 1 and job.model.batched else [job]
            now = time.monotonic()
            live = [j for j in batch if not j.abandoned and j.deadline > now]
            for j in batch:
                if j not in live:
                    j.finish(error=TimeoutError())
            # During a swap a batch may hold jobs for two models: one forward per model.
            for model in dict.fromkeys(j.model for j in live):
                group = [j for j in live if j.model is model]
                started = time.perf_counter()
                try:
                    results = model.predict_batch([j.points for j in group])
                except Exception as exc:  # noqa: BLE001 - delivered to the request, which answers 500
                    for j in group:
                        j.finish(error=exc)
                    continue
                self.metrics.forward.observe(time.perf_counter() - started)
                self.metrics.batch_size.observe(len(group))
                for j, logits in zip(group, results):
                    j.finish(logits)

    def close(self) -> None:
        """Let the workers finish what is queued, then stop them (one stop mark each)."""
        for _ in self._threads:
            self._queue.put(self._STOP)
        for thread in self._threads:
            thread.join(timeout=60)


# ----------------------------------------------------------------------------------------- the app
def public_metadata(model: ServingModel, served: ServedModel) -> dict[str, Any]:
    """``/metadata``: the package's metadata.json less ``PRIVATE_FIELDS``, plus how it is served."""
    data = model.metadata.to_dict()
    for section, key in PRIVATE_FIELDS:
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    _, artifact_id, production = served.state
    data["serving"] = {"package": model.ref, "version": model.metadata.package["version"], "runtime": model.runtime,
                       "runtime_choice": model.runtime_choice, "replicas": model.replicas,
                       "manifest_sha256": model.manifest_sha256, "production": production}
    return data


def create_app(model: ServingModel | ServedModel, max_points: int | None = None, settings: Any = None):
    """The FastAPI app serving ``model`` (or the ``ServedModel`` a ``ProductionWatcher`` swaps);
    ``max_points`` (default: the package's limit) caps a request; ``settings`` is a ``ServeConfig``
    (its defaults when None). ``app.state`` holds ``served``, ``metrics`` and ``pool``."""
    from contextlib import asynccontextmanager

    from pipeline.config import ServeConfig

    s = settings or ServeConfig()
    served = model if isinstance(model, ServedModel) else ServedModel(model)
    metrics = Metrics()
    metrics.set_serving(served.model, served.state[2])

    def limit() -> int:
        return min(max_points or served.model.max_points, served.model.max_points)

    pool = InferencePool(s.workers, s.queue_size, s.max_batch, s.max_batch_wait_ms, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(pool.close)  # after uvicorn's drain: finish what is queued, stop the workers

    docs = {} if s.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="avp LiDAR segmentation", lifespan=lifespan, **docs,
                  description="per-point semantic segmentation of one LiDAR sweep")
    app.state.served, app.state.metrics, app.state.pool = served, metrics, pool

    async def read_capped(request: Request, cap: int) -> bytes:
        """The request body, refusing (413) as soon as it exceeds ``cap`` bytes, and (408) when it has not
        all arrived within ``serve.body_timeout_s``."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit() or len(declared) > 18:
                raise HTTPException(400, f"bad Content-Length {declared[:40]!r}")
            if int(declared) > cap:
                raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {cap} bytes "
                                         f"({limit()} points)")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(s.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise HTTPException(413, f"body exceeds the limit of {cap} bytes ({limit()} points)")
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within {s.body_timeout_s:g} s "
                                     f"({size} bytes received)", headers={"Connection": "close"}) from None
        return b"".join(chunks)

    @app.exception_handler(ClientDisconnect)
    async def client_left(_request: Request, _exc: ClientDisconnect) -> Response:
        """The client went away mid-request: nothing to answer, nothing worth a traceback."""
        log.info("client disconnected before its request was complete")
        return Response(status_code=CLIENT_CLOSED)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness and what is loaded."""
        current, _, production = served.state
        return {"status": "ok", "package": current.ref, "model": current.metadata.model["ref"],
                "runtime": current.runtime, "manifest_sha256": current.manifest_sha256, "max_points": limit(),
                "production": production}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        """The package's metadata.json (without who built it where) and how it is being served."""
        return public_metadata(served.model, served)

    @app.get("/metrics")
    def prometheus() -> Response:
        """Prometheus text exposition of ``Metrics``."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/segment")
    async def segment(request: Request, format: str | None = None,  # noqa: A002 - the query parameter's name
                      logits: bool = False):
        """One point cloud in (binary or JSON), the class of every point out (JSON or binary)."""
        started = time.perf_counter()
        deadline = time.monotonic() + s.deadline_ms / 1000.0
        accept = request.headers.get("accept", "")
        wanted = format or ("binary" if "application/octet-stream" in accept and "json" not in accept else "json")
        if wanted not in ("json", "binary"):
            raise HTTPException(400, f"format must be json or binary, got {str(format)[:40]!r}")
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        current = served.model  # this request finishes on this model, whatever is swapped in meanwhile
        cap = limit() * (JSON_BYTES_PER_POINT if media == "application/json" else 16) + 4096
        body = await read_capped(request, cap)
        def decode() -> np.ndarray:
            return current.check_points(decode_request(body, content_type, limit()))

        try:
            # A binary body is decoded and checked in well under a millisecond (one pass over the array):
            # on the event loop, which saves a thread hand-off; JSON parsing takes longer and goes to a thread.
            points = decode() if media == "application/octet-stream" else await run_in_threadpool(decode)
            result = await pool.infer(current, points, deadline)
        except InvalidInput as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except QueueFull:
            retry = pool.retry_after_s()
            raise HTTPException(429, f"the server is busy ({s.queue_size} requests waiting); retry in {retry} s",
                                headers={"Retry-After": str(retry)}) from None
        except TimeoutError:
            raise HTTPException(504, f"no answer within the deadline of {s.deadline_ms} ms "
                                     "(serve.deadline_ms)") from None
        classes = labels(result)
        elapsed_ms = round((time.perf_counter() - started) * 1000.0, 3)
        headers = {"X-Num-Points": str(len(classes)), "X-Package": current.ref, "X-Model-Version": current.ref,
                   "X-Inference-Ms": str(elapsed_ms)}
        if wanted == "binary":
            body = classes.tobytes()
            if logits:  # uint8 labels, then the float32 logits [N, K]
                headers.update({"X-Num-Classes": str(result.shape[-1]), "X-Logits-Offset": str(len(classes))})
                body += np.ascontiguousarray(result, dtype="<f4").tobytes()
            return Response(body, media_type="application/octet-stream", headers=headers)
        answer = {"classes": classes.tolist(), "num_points": int(len(classes)), "package": current.ref,
                  "model": current.metadata.model["ref"], "inference_ms": elapsed_ms}
        if logits:
            answer["logits"] = result.tolist()
        return JSONResponse(answer, headers=headers)

    return Instrumented(app, served, metrics)


class Instrumented:
    """ASGI wrapper around the app: counts and times every request by route and status, and stamps the
    serving version on every response that does not carry one (``/v1/segment`` sets its own: the model
    that answered). Exposes the wrapped app's ``state``."""

    def __init__(self, app: FastAPI, served: ServedModel, metrics: Metrics):
        self.app, self.served, self.metrics = app, served, metrics
        self.state = app.state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = message.setdefault("headers", [])
                if not any(name.lower() == b"x-model-version" for name, _ in headers):
                    message["headers"] = [*headers, (b"x-model-version", self.served.model.ref.encode())]
            await send(message)

        try:
            await self.app(scope, receive, stamped)
        finally:
            route = scope.get("path") if scope.get("path") in ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


# ----------------------------------------------------------------------------------------- connections
def guarded_protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's httptools protocol with a connection limit (connections beyond ``max_connections`` are
    closed as soon as they are accepted) and a header timeout (a connection whose request headers have
    not all arrived ``header_timeout_s`` after it opened or its previous request ended is closed), so
    slow clients cannot hold the server's connections."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer = None
            if len(self.connections) > max_connections:
                log.warning("connection refused: %d open connections (serve.max_connections)", len(self.connections) - 1)
                transport.close()
                return
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            log.info("closing a connection whose request headers did not arrive within %g s", header_timeout_s)
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request's headers are due within the timeout too

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return GuardedProtocol


# ----------------------------------------------------------------------------------------- the production alias
class ProductionWatcher:
    """Follows ``namespace/name``'s production alias for a ``ServedModel`` (see the module docstring)."""

    def __init__(self, registry: Any, namespace: str, name: str, served: ServedModel,
                 open_model: Callable[[Any], ServingModel], poll_s: float, metrics: Metrics | None = None):
        self.registry, self.namespace, self.name = registry, namespace, name
        self.served, self.open_model, self.poll_s = served, open_model, poll_s
        self.metrics = metrics
        self.refused: set[int] = set()  # artifact ids that failed: not retried until production moves on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="avp-production-watcher", daemon=True)

    def start(self) -> "ProductionWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def check(self) -> str:
        """Read the alias once; load, self-check and swap in a new production package. Returns what happened:
        ``unchanged``, ``swapped``, ``refused`` or ``no production``."""
        promotion = self.registry.production(self.namespace, self.name)
        if promotion is None:
            return "no production"
        _model, artifact_id, _label = self.served.state
        if promotion.artifact_id == artifact_id:
            self.refused.clear()
            return "unchanged"
        if promotion.artifact_id in self.refused:
            return "refused"
        try:
            art = self.registry.get(promotion.artifact_id)
            model = self.open_model(art)
            check = model.self_check()
        except Exception as exc:  # noqa: BLE001 - whatever fails, the old package keeps serving
            self.refused.add(promotion.artifact_id)
            if self.metrics:
                self.metrics.failed_swaps.inc()
            log.error("production %s now points at artifact %s, which was NOT swapped in (%s: %s); still serving %s",
                      promotion.label, promotion.artifact_id, type(exc).__name__,
                      (str(exc).splitlines() or [""])[0][:300], self.served.model.ref)
            return "refused"
        old = self.served.swap(model, promotion.artifact_id, promotion.label)
        if self.metrics:
            self.metrics.swaps.inc()
            self.metrics.set_serving(model, promotion.label)
        log.info("production %s: swapped %s -> %s (%s, self-check max |logit diff| %.2g)", promotion.label,
                    old.ref, model.ref, model.runtime, check["max_abs_diff"])
        return "swapped"

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - e.g. the registry is briefly unreachable: try again later
                log.error("reading production %s/%s failed: %s: %s", self.namespace, self.name, type(exc).__name__,
                          (str(exc).splitlines() or [""])[0][:300])


# ----------------------------------------------------------------------------------------- running
PRODUCTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def open_artifact(art: Any, runtime: str, replicas: int = 1, batched: bool = False) -> ServingModel:
    """Load a registry package artifact, checking its manifest against the digest the registry recorded."""
    from serving.entry import package_paths

    if art.kind != "package" or art.state != "succeeded":
        raise PackageError(f"{art.ref} is a {art.state} {art.kind}, not a succeeded package; build one with "
                           "`avp serve` and promote the package")
    folder, _tarball = package_paths(art)
    return load(folder, runtime=runtime, expected_manifest_sha256=art.meta.get("manifest_sha256"),
                replicas=replicas, batched=batched)


def production_artifact(registry: Any, alias: str) -> tuple[Any, Any]:
    """(promotion, package artifact) of ``NAMESPACE/NAME``'s production version, or ``PackageError``."""
    namespace, name = alias.split("/")
    promotion = registry.production(namespace, name)
    if promotion is None:
        raise PackageError(f"{alias}: no such folder, and no production version of {namespace}/{name} "
                           "in the registry (avp registry promote package:NAME@vN)")
    return promotion, registry.get(promotion.artifact_id)


def open_package(package: str, registry: Any = None, runtime: str = "torchscript", replicas: int = 1,
                 batched: bool = False) -> ServingModel:
    """Load ``package``: a folder or ``.tar.gz``; ``package:NAME@vN`` (or ``package:NAME``, the latest);
    or ``NAMESPACE/NAME``, the production package of that promotion. Registry packages are also checked
    against the manifest digest the registry recorded when they were published."""
    if os.path.exists(package):
        return load(package, runtime=runtime, replicas=replicas, batched=batched)
    if registry is None:
        raise PackageError(f"{package}: no such package folder or tarball")
    if package.startswith("package:"):
        art = registry.get(package)
    elif PRODUCTION_NAME.fullmatch(package):
        _promotion, art = production_artifact(registry, package)
    else:
        raise PackageError(f"{package}: no such package folder or tarball, and not a registry reference "
                           "(package:NAME@vN or NAMESPACE/NAME)")
    return open_artifact(art, runtime, replicas, batched)


def serve(cfg: Any, package: str | None = None, production: str | None = None, host: str | None = None,
          port: int | None = None, say: Callable[[str], None] = print) -> int:
    """Verify and load ``package`` (or follow ``production``) and serve it until SIGTERM/SIGINT; returns
    an exit code (0 after a graceful drain)."""
    import torch
    import uvicorn

    from pipeline.registry import Registry

    s = cfg.serve  # its ranges are checked where the fields are declared (config.BOUNDS)
    if not log.handlers:  # the server's own notices (swaps, dropped connections) beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     avp: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if bool(package) == bool(production):
        raise UserError("serve-http needs exactly one of --package PATH|REF (one fixed package) or "
                        "--production NAMESPACE/NAME (follow the production alias)")
    if production and not PRODUCTION_NAME.fullmatch(production):
        raise UserError(f"--production {production!r}: expected NAMESPACE/NAME, e.g. {s.namespace}/bev_segnet")
    registry = None if package and os.path.exists(package) else Registry.open(cfg)
    # The cores are shared by the workers: each forward gets its share unless serve.threads says otherwise.
    threads = s.threads or (max(1, (os.cpu_count() or 1) // s.workers) if s.workers > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    batched = s.max_batch > 1
    promotion = None
    if production:
        promotion, art = production_artifact(registry, production)
        model = open_artifact(art, s.runtime, s.workers, batched)
    else:
        model = open_package(package, registry, runtime=s.runtime, replicas=s.workers, batched=batched)
    # The packaged example must still give the packaged answer on this host and runtime; running it also
    # warms the runtime up, so the first client does not pay for TorchScript's optimisation passes.
    check = model.self_check()
    say(f"self-check on the packaged example: max |logit diff| {check['max_abs_diff']:.2g}, "
        f"class match {check['class_match_rate']:.4f} ({model.runtime}: {model.runtime_choice['how']})")
    host = host or s.host
    port = s.port if port is None else int(port)
    if host not in LOOPBACK:
        say(f"warning: binding {host}, not loopback: anyone who can reach this host can use the model; "
            "there is no authentication")
    served = ServedModel(model, promotion.artifact_id if promotion else None, promotion.label if promotion else None)
    app = create_app(served, s.max_points, s)
    watcher = None
    if production:
        namespace, name = production.split("/")
        watcher = ProductionWatcher(registry, namespace, name, served,
                                    lambda art: open_artifact(art, s.runtime, s.workers, batched), s.poll_s,
                                    app.state.metrics).start()
    say(f"serving {model.ref} ({model.metadata.model['ref']}, {model.runtime} x{model.replicas}, manifest "
        f"{model.manifest_sha256[:12]}) on http://{host}:{port}  (POST /v1/segment, GET /healthz, /metadata, "
        "/metrics)" + (f"; following production {production} every {s.poll_s:g} s" if watcher else ""))
    config = uvicorn.Config(app, host=host, port=port, log_level="info", workers=1, lifespan="on",
                            http=guarded_protocol(s.header_timeout_s, s.max_connections),
                            timeout_keep_alive=5, timeout_graceful_shutdown=s.drain_s)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down (so the default handler would end
    # the process with 128 + signal); these handlers make a graceful stop an ordinary exit 0.
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, _frame: stopped_by.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if watcher:
            watcher.stop()
        served.model.close()
    if not server.started:
        say("the server could not start (see above)")
        return 1
    say("stopped" + (f" on {signal.Signals(stopped_by[0]).name}" if stopped_by else "") + "; in-flight requests drained")
    return 0
