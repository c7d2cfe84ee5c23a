"""serving/http.py: the FastAPI app in-process (every input case, concurrency) and one real uvicorn server
started with ``avp serve-http`` on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from pipeline.config import ServeConfig
from pipeline.servers import free_port

with warnings.catch_warnings():  # starlette's notice that its TestClient will move to httpx2 one day
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from serving.http import create_app
from serving.package import synthetic_scan
from serving.runtime import load

LIMIT = 5000  # the in-process app's max_points, small so the 413 case is cheap


@pytest.fixture(scope="module")
def package(served):
    return load(served[3]["location"])


@pytest.fixture(scope="module")
def client(package):
    with TestClient(create_app(package, max_points=LIMIT)) as test_client:
        yield test_client


def cloud(seed: int, n: int = 700) -> np.ndarray:
    return synthetic_scan(n, seed=seed, x_range=(-12.8, 12.8), y_range=(-12.8, 12.8))


def post_binary(client, points: np.ndarray, **kwargs):
    return client.post("/v1/segment", content=points.astype("<f4").tobytes(),
                       headers={"Content-Type": "application/octet-stream", **kwargs.pop("headers", {})}, **kwargs)


# ----------------------------------------------------------------------------------------- happy paths
def test_healthz_and_metadata(client, package):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["package"] == package.ref and health["max_points"] == LIMIT
    assert health["manifest_sha256"] == package.manifest_sha256
    meta = client.get("/metadata").json()
    assert meta["class_map"]["1"] == "ground" and meta["model"]["ref"] == package.metadata.model["ref"]


def test_binary_request_json_response(client, package):
    points = cloud(1)
    response = post_binary(client, points)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["num_points"] == len(points) and body["package"] == package.ref
    assert body["classes"] == package.predict(points).tolist()


def test_json_request(client, package):
    points = cloud(2, 300)
    response = client.post("/v1/segment", json={"points": points.tolist()})
    assert response.status_code == 200, response.text
    assert response.json()["classes"] == package.predict(points).tolist()


def test_binary_response_by_query_and_by_accept_header(client, package):
    points, expected = package.example()
    by_query = post_binary(client, points, params={"format": "binary"})
    by_accept = post_binary(client, points, headers={"Accept": "application/octet-stream"})
    for response in (by_query, by_accept):
        assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
        assert response.headers["x-num-points"] == str(len(points))
        assert np.array_equal(np.frombuffer(response.content, np.uint8), expected)


def test_content_type_parameters_are_accepted(client, package):
    points = cloud(3, 50)
    response = client.post("/v1/segment", content=json.dumps({"points": points.tolist()}),
                           headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200 and response.json()["classes"] == package.predict(points).tolist()


# ----------------------------------------------------------------------------------------- bad input
BAD_BINARY = {
    "length not a multiple of 16": (np.zeros(10, "<f4").tobytes(), 400, "not a multiple of 16"),
    "NaN": (np.array([[0, 0, 0, 0], [np.nan, 1, 1, 0.5]], "<f4").tobytes(), 400, "NaN or inf"),
    "inf": (np.array([[np.inf, 1, 1, 0.5]], "<f4").tobytes(), 400, "NaN or inf"),
    "empty body": (b"", 400, "empty body"),
    "too many points": (np.zeros((LIMIT + 1, 4), "<f4").tobytes(), 413, "more than this server's limit of 5000"),
    "far too many points": (np.zeros((2 * LIMIT, 4), "<f4").tobytes(), 413, "exceeds the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_BINARY))
def test_bad_binary_bodies_get_a_clear_4xx(client, case):
    body, status, fragment = BAD_BINARY[case]
    response = client.post("/v1/segment", content=body, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == status and fragment in response.json()["detail"], response.text
    assert client.get("/healthz").status_code == 200  # the server stays up


BAD_JSON = {
    "malformed": ('{"points": [[1, 2, 3, 4]', 400, "malformed JSON"),
    "not an object": ("[[1, 2, 3, 4]]", 400, 'must be an object {"points"'),
    "no points key": ('{"pts": []}', 400, 'must be an object {"points"'),
    "points not a list": ('{"points": "many"}', 400, "must be a list"),
    "three values": ('{"points": [[1, 2, 3]]}', 400, "point 0 must be a list of 4 numbers"),
    "ragged": ('{"points": [[1, 2, 3, 4], [1, 2]]}', 400, "point 1 must be a list of 4 numbers"),
    "a string": ('{"points": [[1, 2, 3, 4], [1, "2", 3, 4]]}', 400, "point 1 holds something that is not a number"),
    "a null": ('{"points": [[null, 2, 3, 4]]}', 400, "not a number"),
    "nested": ('{"points": [[[1], 2, 3, 4]]}', 400, "not a number"),
    "NaN literal": ('{"points": [[NaN, 2, 3, 4]]}', 400, "NaN or inf"),
    "overflow": ('{"points": [[1e300, 2, 3, 4]]}', 400, "NaN or inf"),
    "no points": ('{"points": []}', 400, "no points"),
    "too many points": (json.dumps({"points": [[0, 0, 0, 0]] * (LIMIT + 1)}), 413, "more than this server's limit"),
    "not UTF-8": (b'{"points": [[1, 2, 3, \xff]]}', 400, "malformed JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_bodies_get_a_clear_4xx(client, case):
    body, status, fragment = BAD_JSON[case]
    response = client.post("/v1/segment", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status and fragment in response.json()["detail"], response.text
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_other_content_types_are_415(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/segment", content=np.zeros(16, "<f4").tobytes(), headers=headers)
    assert response.status_code == 415 and "not supported" in response.json()["detail"]


def test_unknown_response_format_is_400(client):
    response = post_binary(client, cloud(4, 10), params={"format": "xml"})
    assert response.status_code == 400 and "format must be json or binary" in response.json()["detail"]


def test_a_lying_content_length_is_refused(client):
    response = client.post("/v1/segment", content=b"x" * 32,
                           headers={"Content-Type": "application/octet-stream", "Content-Length": "999999999"})
    assert response.status_code in (400, 413)


# ----------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_each_get_their_own_answer(package):
    """Many different clouds in flight at once (decoding and inference in worker threads): every answer
    must be the one for its own cloud, whatever the interleaving (the queue holds them all)."""
    clouds = [cloud(100 + i, 200 + 37 * i) for i in range(24)]
    app = create_app(package, max_points=LIMIT, settings=ServeConfig(queue_size=len(clouds)))
    expected = [package.predict(c).tolist() for c in clouds]

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*[
                http.post("/v1/segment", content=c.astype("<f4").tobytes(),
                          headers={"Content-Type": "application/octet-stream"}) if i % 2 else
                http.post("/v1/segment", json={"points": c.tolist()})
                for i, c in enumerate(clouds)])

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(clouds)
    assert [r.json()["classes"] for r in responses] == expected


# ----------------------------------------------------------------------------------------- a real server
def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            return httpx.get(base + "/healthz", timeout=2.0).json()
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError(f"server not healthy after {timeout_s} s")


def test_real_uvicorn_server_via_the_cli(served, avp_env):
    result = served[3]
    port = free_port()
    proc = subprocess.Popen(["avp", "serve-http", "--package", result["tarball"], "--port", str(port),
                             "--set", "serve.max_points=5000"],
                            env=avp_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(base, proc)
        assert health["package"] == result["ref"] and health["max_points"] == 5000
        package = load(result["location"])
        points, expected = package.example()
        response = httpx.post(base + "/v1/segment", content=points.astype("<f4").tobytes(),
                              headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert response.status_code == 200 and response.json()["classes"] == expected.tolist()
        small = cloud(9, 120)
        response = httpx.post(base + "/v1/segment", json={"points": small.tolist()}, timeout=60)
        assert response.json()["classes"] == package.predict(small).tolist()
        bad = httpx.post(base + "/v1/segment", content=b"\x00" * 17,
                         headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert bad.status_code == 400 and "multiple of 16" in bad.json()["detail"]

        # 4 clients x 6 requests, each with its own cloud, over real sockets.
        clouds = [cloud(200 + i, 150 + 11 * i) for i in range(24)]

        def ask(points: np.ndarray) -> list[int]:
            with httpx.Client(base_url=base, timeout=60) as http:
                reply = http.post("/v1/segment", content=points.astype("<f4").tobytes(),
                                  headers={"Content-Type": "application/octet-stream"}, params={"format": "binary"})
                assert reply.status_code == 200, reply.text
                return np.frombuffer(reply.content, np.uint8).tolist()

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(ask, clouds))
        assert answers == [package.predict(c).tolist() for c in clouds]
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    output = proc.stdout.read()
    assert f"http://127.0.0.1:{port}" in output  # bound to loopback by default


def test_serve_http_refuses_a_tampered_package_with_exit_2(package_copy, avp_env):
    with open(os.path.join(package_copy, "metadata.json"), "a") as fh:
        fh.write(" ")
    out = subprocess.run(["avp", "serve-http", "--package", package_copy, "--port", str(free_port())],
                         env=avp_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "metadata.json: checksum mismatch" in out.stderr
