"""HTTP fuzz run: over 1,000 seeded hostile requests against a real ``avp serve-http`` process.

Probes: random bytes, wrong JSON types, truncated bodies, NaN/inf, deep nesting, huge numbers,
oversized bodies, bad query strings, paths and methods, content types, lying Content-Length, malformed
request heads, slow bodies and floods of concurrent requests. Passing means: no 5xx ever, no request
left hanging (every one is answered or its connection closed by the server), the server still answers
a valid request correctly afterwards, and its RSS is back near the baseline measured before the run.
The counts per probe (tried / passed) are printed; docs/serving.md records them.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx
import numpy as np
import pytest

from serving.runtime import load
from tests.serving.conftest import register_model, serve_config
from tests.serving.live import LiveServer, one_thread_env, segment

SEED = 20261130
MAX_POINTS = 5000
BINARY = "application/octet-stream"


def valid_cloud(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.column_stack([rng.uniform(-12, 12, (n, 3)), rng.uniform(0, 1, n)]).astype("<f4")


# ----------------------------------------------------------------------------------------- probes
# Each probe returns (content type, body bytes, query params) for one request.
Probe = Callable[[np.random.Generator], tuple[str, bytes, dict]]


def random_bytes(rng):
    kind = [BINARY, "application/json", "application/json; charset=latin-1"][rng.integers(3)]
    return kind, rng.bytes(int(rng.integers(1, 5000))), {}


def wrong_types(rng):
    values = ["x", None, True, {}, [], [[]], {"a": 1}, 1e308, -0.0, "NaN", [1, 2, 3, 4, 5], [[1, 2, 3, 4]]]
    pick = values[rng.integers(len(values))]
    shapes = [{"points": pick}, {"points": [pick] * int(rng.integers(1, 5))}, {"points": [[pick, 1, 2, 3]]},
              [pick], pick, {"pts": [[1, 2, 3, 4]]}, {"points": [[1, 2, 3, 4]], "extra": pick}]
    return "application/json", json.dumps(shapes[rng.integers(len(shapes))]).encode(), {}


def truncated(rng):
    cloud = valid_cloud(rng, int(rng.integers(1, 300)))
    if rng.random() < 0.5:
        body = cloud.tobytes()
        return BINARY, body[:int(rng.integers(0, len(body)))], {}
    body = json.dumps({"points": cloud.tolist()}).encode()
    return "application/json", body[:int(rng.integers(0, len(body)))], {}


def non_finite(rng):
    cloud = valid_cloud(rng, int(rng.integers(1, 200)))
    row, col = int(rng.integers(len(cloud))), int(rng.integers(4))
    value = [np.nan, np.inf, -np.inf][rng.integers(3)]
    if rng.random() < 0.5:
        cloud[row, col] = value
        return BINARY, cloud.tobytes(), {}
    text = json.dumps({"points": cloud.tolist()})
    literal = {np.nan: "NaN", np.inf: "Infinity", -np.inf: "-Infinity"}.get(value, "NaN")
    return "application/json", text.replace(repr(float(cloud[row, col])), literal, 1).encode(), {}


def nesting(rng):
    depth = int(rng.choice([4, 17, 100, 1000, 5000, 100_000, 300_000]))
    opener, closer = ("[", "]") if rng.random() < 0.7 else ('{"a":', "}")
    inner = opener * depth + "1" + closer * depth
    body = inner if rng.random() < 0.5 else '{"points": ' + inner + "}"
    return "application/json", body.encode(), {}


def huge_numbers(rng):
    digits = int(rng.choice([30, 41, 400, 4301, 20_000, 200_000]))
    number = [("9" * digits), "-" + "1" * digits, "1e" + "9" * min(digits, 400), "0." + "3" * digits,
              "1" + "0" * digits + ".5"][rng.integers(5)]
    return "application/json", ('{"points": [[' + number + ", 1, 2, 3]]}").encode(), {}


def oversized(rng):
    points = MAX_POINTS + int(rng.integers(1, 3 * MAX_POINTS))
    if rng.random() < 0.5:
        return BINARY, b"\x00" * (16 * points), {}
    return "application/json", json.dumps({"points": [[0, 0, 0, 0]] * points}).encode(), {}


def bad_queries(rng):
    params = [{"format": "xml"}, {"format": "b" * 5000}, {"logits": "maybe"}, {"logits": "1" * 5000},
              {"format": "\u2603"}, {"format": "binary", "logits": "true", "junk": "x" * 1000}]
    cloud = valid_cloud(rng, int(rng.integers(1, 50)))
    return BINARY, cloud.tobytes(), params[rng.integers(len(params))]


def content_types(rng):
    kinds = ["", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
             "application/json;;;", "APPLICATION/OCTET-STREAM", "application/octet-stream; q=" + "9" * 3000,
             "\x01\x02", "application/" + "x" * 4000]
    return kinds[rng.integers(len(kinds))], valid_cloud(rng, 4).tobytes(), {}


PROBES: dict[str, tuple[Probe, int]] = {
    "random bytes": (random_bytes, 150), "wrong JSON types": (wrong_types, 150), "truncated bodies": (truncated, 150),
    "NaN / inf": (non_finite, 100), "deep nesting": (nesting, 70), "huge numbers": (huge_numbers, 90),
    "oversized bodies": (oversized, 30), "bad query strings": (bad_queries, 60), "content types": (content_types, 45),
}


def raw_exchange(port: int, data: bytes, timeout_s: float = 15.0) -> bytes:
    """Send ``data`` on a fresh connection; what the server answers before closing (b"" if it just closes).
    A server that neither answers nor closes within ``timeout_s`` fails the probe (socket.timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return received
                received += chunk
                if b"\r\n\r\n" in received and received.startswith(b"HTTP/1.1 "):
                    return received  # one answer is enough
        except ConnectionResetError:
            return received


def raw_status(answer: bytes) -> int | None:
    return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") and answer[9:12].isdigit() else None


def raw_probes(rng) -> list[tuple[str, bytes]]:
    """Malformed request heads and lying Content-Lengths, sent over raw sockets."""
    head = b"POST /v1/segment HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/octet-stream\r\n"
    body = valid_cloud(rng, 8).tobytes()
    probes = []
    for _ in range(30):
        declared = [len(body) + int(rng.integers(1, 100)), max(0, len(body) - int(rng.integers(1, 100))),
                    10 ** 30, -5][rng.integers(4)]
        probes.append(("lying Content-Length", head + f"Content-Length: {declared}\r\n\r\n".encode() + body))
    for _ in range(30):
        garbage = [b"\x00" * 64, rng.bytes(200), b"GET / HTTP/9.9\r\n\r\n", b"POST /v1/segment HTTP/1.1\r\n"
                   + b"X: " + b"a" * 100_000 + b"\r\n\r\n", head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
                   head + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\nabcdefg", b"\r\n" * 50][rng.integers(7)]
        probes.append(("malformed request heads", garbage))
    return probes


# ----------------------------------------------------------------------------------------- the run
@pytest.fixture
def package_folder(tmp_path) -> str:
    """A small blessed model packaged by the real serve stage."""
    from pipeline.registry import Registry
    from serving.entry import run

    cfg = serve_config(str(tmp_path / "home"))
    registry = Registry.open(cfg)
    model, _ = register_model(registry, seed=0)
    return run(cfg, registry, say=lambda m: None, model=model.ref)["location"]


@pytest.mark.slow
def test_a_thousand_hostile_requests_get_no_5xx_and_leave_the_server_healthy(package_folder, avp_env, tmp_path):
    rng = np.random.default_rng(SEED)
    package = load(package_folder)
    points, expected = package.example()
    tried, passed, statuses = Counter(), Counter(), Counter()
    failures: list[str] = []

    def record(probe: str, ok: bool, what: str) -> None:
        tried[probe] += 1
        passed[probe] += ok
        if not ok and len(failures) < 20:
            failures.append(f"{probe}: {what}")

    with LiveServer(one_thread_env(avp_env), tmp_path, "--package", package_folder, max_points=MAX_POINTS,
                    queue_size=4, header_timeout_s=1.0, body_timeout_s=1.0, max_connections=64) as server:
        with httpx.Client(base_url=server.base, timeout=60) as http:
            for _ in range(3):
                assert segment(server.base, points[:MAX_POINTS], http).status_code == 200
            baseline = server.rss_kib()

            for name, (probe, count) in PROBES.items():
                for _ in range(count):
                    content_type, body, params = probe(rng)
                    headers = {"Content-Type": content_type} if content_type else {}
                    try:
                        reply = http.post("/v1/segment", content=body, headers=headers, params=params)
                    except httpx.HTTPError as exc:
                        record(name, False, f"{type(exc).__name__}: {exc}")
                        continue
                    statuses[reply.status_code] += 1
                    record(name, reply.status_code < 500, f"{reply.status_code} {reply.text[:200]}")

            for _ in range(40):  # other paths and methods
                method = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"][rng.integers(5)]
                path = ["/v1/segment", "/", "/docs", "/openapi.json", "/" + "a" * 3000, "/v1/../etc/passwd",
                        "/metrics?x=" + "1" * 3000][rng.integers(7)]
                reply = http.request(method, path)
                statuses[reply.status_code] += 1
                record("other paths and methods", reply.status_code < 500, f"{method} {path[:60]} {reply.status_code}")

        for name, data in raw_probes(rng):
            try:
                answer = raw_exchange(server.port, data)
            except TimeoutError:
                record(name, False, "neither answered nor closed")
                continue
            status = raw_status(answer)
            statuses[status] += 1
            record(name, status is None or status < 500, answer[:120].decode("latin-1"))

        for _ in range(4):  # slow bodies: headers, then a body that never completes
            head = (b"POST /v1/segment HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: 16000\r\n\r\n" + b"\x00" * 160)
            try:
                status = raw_status(raw_exchange(server.port, head))
            except TimeoutError:
                status = -1
            record("slow bodies", status == 408, f"status {status}")

        cloud = valid_cloud(rng, 3000)
        answer = package.predict(cloud).tolist()

        def flood_one(_i: int) -> tuple[int, bool]:
            with httpx.Client(timeout=60) as client:
                reply = segment(server.base, cloud, client)
                return reply.status_code, reply.status_code != 200 or np.frombuffer(reply.content, np.uint8).tolist() == answer

        for _ in range(10):  # floods: 30 requests at once against a queue of 4
            with ThreadPoolExecutor(30) as pool:
                for status, right in pool.map(flood_one, range(30)):
                    statuses[status] += 1
                    record("concurrent floods", status in (200, 429) and right, f"{status} right={right}")

        reply = segment(server.base, points[:MAX_POINTS])
        after = server.rss_kib()
        assert reply.status_code == 200
        assert np.array_equal(np.frombuffer(reply.content, np.uint8), expected[:MAX_POINTS])

    table = "\n".join(f"| {name} | {tried[name]} | {passed[name]} |" for name in tried)
    print(f"\n| probe | tried | passed |\n| --- | ---: | ---: |\n{table}\n| total | {sum(tried.values())} | "
          f"{sum(passed.values())} |\nstatuses: {dict(sorted(statuses.items(), key=str))}\n"
          f"RSS {baseline} KiB before, {after} KiB after")
    assert sum(tried.values()) >= 1000
    assert not failures, failures
    assert "Traceback" not in server.log()
    assert after <= baseline * 1.15 + 30_000, (baseline, after)  # KiB: within 15 % + 30 MB
