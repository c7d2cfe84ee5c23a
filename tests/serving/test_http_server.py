"""``avp serve-http`` as a real process: following the production alias (promotion, rollback, a corrupted
package), overload, SIGTERM during load, slow and vanishing clients."""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from serving.package import synthetic_scan, write_manifest
from serving.runtime import load
from tests.serving.conftest import register_model, serve_config
from tests.serving.live import LiveServer, one_thread_env, segment


def cloud(seed: int, n: int) -> np.ndarray:
    return synthetic_scan(n, seed=seed, x_range=(-12.8, 12.8), y_range=(-12.8, 12.8))


def wait_for(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------- production alias
@pytest.fixture
def three_packages(avp_env):
    """A registry (the CLI's home) with package:bev_segnet@v1..v3 of three blessed models."""
    from pipeline.registry import Registry
    from serving.entry import run

    cfg = serve_config(avp_env["AVP_HOME"], example_points=400, latency_runs=1, max_points=20_000)
    registry = Registry.open(cfg)
    results = []
    for seed in range(3):
        model, _ = register_model(registry, seed=seed)
        results.append(run(cfg, registry, say=lambda m: None, model=model.ref))
    return registry, results


@pytest.mark.slow
def test_promotion_and_rollback_while_serving_fail_no_request(three_packages, avp_env, tmp_path):
    """A client sends requests without pause while v2 is promoted and then rolled back: every request
    succeeds, each answer is the one of the version that says it answered, and the version switches
    exactly once each way. Then a corrupted v3 is promoted: refused, v1 keeps serving, the failure counted."""
    registry, results = three_packages
    registry.promote("package:bev_segnet@v1", "perception", "bev_segnet")
    models = {r["ref"]: load(r["location"]) for r in results}
    points = cloud(5, 900)
    expected = {ref: m.predict(points).tolist() for ref, m in models.items()}
    assert expected["package:bev_segnet@v1"] != expected["package:bev_segnet@v2"]  # the switch is visible

    with LiveServer(one_thread_env(avp_env), tmp_path, "--production", "perception/bev_segnet",
                    poll_s=0.2) as server:
        answers: list[tuple[int, str, bool]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=server.base, timeout=60) as http:
                while not stop.is_set():
                    reply = http.post("/v1/segment", json={"points": points.tolist()})
                    version = reply.headers.get("x-model-version", "")
                    answers.append((reply.status_code, version,
                                    reply.status_code == 200 and reply.json()["classes"] == expected.get(version)))

        thread = threading.Thread(target=client)
        thread.start()
        try:
            wait_for(lambda: len(answers) >= 3, "first answers")
            registry.promote("package:bev_segnet@v2", "perception", "bev_segnet")
            wait_for(lambda: answers[-1][1] == "package:bev_segnet@v2", "v2 served after its promotion")
            count = len(answers)
            wait_for(lambda: len(answers) >= count + 3, "more answers from v2")
            registry.rollback("perception", "bev_segnet")
            wait_for(lambda: answers[-1][1] == "package:bev_segnet@v1", "v1 served after the rollback")
            count = len(answers)
            wait_for(lambda: len(answers) >= count + 3, "more answers from v1")
        finally:
            stop.set()
            thread.join(timeout=120)
        assert all(status == 200 and right for status, _v, right in answers), \
            [a for a in answers if a[0] != 200 or not a[2]][:5]
        versions = [v for _s, v, _r in answers]
        switches = [versions[0]] + [b for a, b in zip(versions, versions[1:]) if a != b]
        assert switches == ["package:bev_segnet@v1", "package:bev_segnet@v2", "package:bev_segnet@v1"]
        assert server.metric("avp_model_swaps_total") == 2
        meta = httpx.get(server.base + "/metadata", timeout=10).json()["serving"]
        assert meta["package"] == "package:bev_segnet@v1" and meta["production"] == "perception/bev_segnet/1.0"

        # A package rewritten after it was published: its manifest no longer has the registry's digest.
        folder = results[2]["location"]
        with open(f"{folder}/expected_output.bin", "r+b") as fh:
            fh.write(b"\x07")
        write_manifest(folder)
        registry.promote("package:bev_segnet@v3", "perception", "bev_segnet")
        wait_for(lambda: server.metric("avp_model_swaps_failed_total") == 1, "the failed swap counted")
        reply = segment(server.base, points)
        assert reply.status_code == 200 and reply.headers["x-model-version"] == "package:bev_segnet@v1"
        assert np.frombuffer(reply.content, np.uint8).tolist() == expected["package:bev_segnet@v1"]
        assert server.metric("avp_model_swaps_total") == 2
        time.sleep(1.0)  # several polls later: refused once, not retried on every poll
        assert server.metric("avp_model_swaps_failed_total") == 1
    log = server.log()
    assert "NOT swapped in" in log and "differs from the registry's record" in log


# ----------------------------------------------------------------------------------------- load
@pytest.mark.slow
def test_overload_gets_429s_never_5xx_and_memory_returns_to_its_baseline(served, avp_env, tmp_path):
    """16 clients against one worker and a queue of 2: some requests are refused with 429 and
    Retry-After, none fails otherwise, every answer is right, and the server's RSS comes back."""
    package = load(served[3]["location"])
    clouds = [cloud(40 + i, 20_000) for i in range(4)]
    expected = [package.predict(c).tolist() for c in clouds]
    with LiveServer(one_thread_env(avp_env), tmp_path, "--package", served[3]["location"], workers=1,
                    queue_size=2, max_points=50_000) as server:
        for c in clouds:  # warm up every size the load uses
            assert segment(server.base, c).status_code == 200
        baseline = server.rss_kib()

        def client(i: int) -> list[tuple[int, bool, str]]:
            out = []
            with httpx.Client(timeout=120) as http:
                for j in range(6):
                    reply = segment(server.base, clouds[(i + j) % 4], http)
                    right = reply.status_code != 200 or \
                        np.frombuffer(reply.content, np.uint8).tolist() == expected[(i + j) % 4]
                    out.append((reply.status_code, right, reply.headers.get("retry-after", "")))
            return out

        with ThreadPoolExecutor(16) as pool:
            results = [r for rs in pool.map(client, range(16)) for r in rs]
        after = server.rss_kib()
        statuses = [s for s, _r, _a in results]
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
        assert all(right for _s, right, _a in results)
        assert all(retry.isdigit() for s, _r, retry in results if s == 429)
        assert server.metric("avp_http_requests_total", route="/v1/segment", status="429") == statuses.count(429)
        assert after <= baseline * 1.10 + 20_000, (baseline, after)  # KiB: within 10 % + 20 MB


@pytest.mark.slow
def test_sigterm_during_load_drains_in_flight_requests_and_exits_0(served, avp_env, tmp_path):
    points = cloud(7, 20_000)
    expected = load(served[3]["location"]).predict(points).tolist()
    server = LiveServer(one_thread_env(avp_env), tmp_path, "--package", served[3]["location"], workers=1,
                        queue_size=8, max_points=50_000)
    with server:
        sent_at: list[tuple[float, float, int, bool]] = []  # (sent, answered, status, right)
        errors: list[tuple[float, str]] = []
        signalled = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                while not signalled.is_set():
                    started = time.monotonic()
                    try:
                        reply = segment(server.base, points, http)
                    except httpx.HTTPError as exc:  # a connection the draining server no longer accepts
                        errors.append((started, type(exc).__name__))
                        return
                    sent_at.append((started, time.monotonic(), reply.status_code,
                                    np.frombuffer(reply.content, np.uint8).tolist() == expected))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(sent_at) >= 4, "requests answered before the signal")
        term_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        signalled.set()
        for t in threads:
            t.join(timeout=120)
        code = server.proc.wait(timeout=120)
    assert code == 0, server.log()[-3000:]
    assert all(status == 200 and right for _s, _a, status, right in sent_at)
    in_flight = [r for r in sent_at if r[0] < term_at < r[1]]
    assert in_flight, "no request was in flight when SIGTERM arrived"
    assert all(started > term_at - 0.5 for started, _name in errors), errors  # only requests sent around the signal
    assert "Traceback" not in server.log()


# ----------------------------------------------------------------------------------------- slow clients
@pytest.mark.slow
def test_slow_and_vanishing_clients_are_dropped_without_tracebacks(served, avp_env, tmp_path):
    """Connections beyond the limit are closed at once; those that trickle their headers are closed after
    the header timeout; a body that stalls is 408; a client that disconnects mid-body leaves no traceback;
    and a normal client is still served."""
    with LiveServer(one_thread_env(avp_env), tmp_path, "--package", served[3]["location"], max_connections=8,
                    header_timeout_s=1.0, body_timeout_s=1.0) as server:
        sockets = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
            sock.sendall(b"P")  # one byte of "POST ..."
            sockets.append(sock)
        closed = []
        for sock in sockets:
            try:
                closed.append(sock.recv(1) == b"")  # the server closes: EOF
            except ConnectionResetError:
                closed.append(True)
            except TimeoutError:  # still open 15 s later
                closed.append(False)
            finally:
                sock.close()
        assert all(closed)

        # Headers complete, body stalls: 408 after body_timeout_s.
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: 1600\r\n\r\n" + b"\x00" * 16)
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]

        # Headers complete, part of the body, then the client goes away.
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
                sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: 160000\r\n\r\n" + b"\x00" * 1600)
        time.sleep(0.5)
        points, expected = load(served[3]["location"]).example()
        reply = segment(server.base, points)
        assert reply.status_code == 200 and np.array_equal(np.frombuffer(reply.content, np.uint8), expected)
    log = server.log()
    assert "Traceback" not in log and "connection refused" in log and "did not arrive within" in log
