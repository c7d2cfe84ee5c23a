"""serving/http.py in-process: the inference queue (429, 504), dynamic batching, /metrics, the default
runtime, labels and logits, hostile JSON, the metadata schema and what the server exposes."""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings

import httpx
import numpy as np
import pytest

from pipeline.config import ServeConfig
from serving.http import InferencePool, Metrics, create_app, json_depth, public_metadata
from serving.package import METADATA, PackageError, synthetic_scan, write_manifest
from serving.runtime import RUNTIMES, choose_runtimes, load

with warnings.catch_warnings():  # starlette's notice that its TestClient will move to httpx2 one day
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def package(served):
    return load(served[3]["location"], runtime="torchscript")  # the runtime that takes padded batches


def cloud(seed: int, n: int = 500) -> np.ndarray:
    return synthetic_scan(n, seed=seed, x_range=(-12.8, 12.8), y_range=(-12.8, 12.8))


def binary(points: np.ndarray) -> dict:
    return {"content": points.astype("<f4").tobytes(), "headers": {"Content-Type": "application/octet-stream"}}


def metric(text: str, sample: str) -> float:
    """The value of one exposition line ``sample value`` (0 when absent)."""
    for line in text.splitlines():
        if line.rpartition(" ")[0] == sample:
            return float(line.rpartition(" ")[2])
    return 0.0


def gather(app, requests: list[dict]) -> list[httpx.Response]:
    """Send ``requests`` (kwargs of ``post``) to ``app`` at once, over ASGI."""
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await asyncio.gather(*[http.post("/v1/segment", **r) for r in requests])

    return asyncio.run(main())


# ----------------------------------------------------------------------------------------- the runtime
def test_the_default_runtime_is_the_fastest_the_package_verified(served):
    metadata = load(served[3]["location"]).metadata
    assert metadata.runtimes["onnx"]["file"] == "model.onnx"  # the shared package carries ONNX
    carried = [name for name in RUNTIMES if (metadata.runtimes.get(name) or {}).get("file")]  # no int8 choice here
    assert carried == ["torchscript", "pt2", "onnx"]
    recorded = {name: metadata.performance[f"{name}_latency_ms"]["p50"] for name in carried}
    assert choose_runtimes(metadata) == sorted(recorded, key=recorded.get)
    assert choose_runtimes(metadata, batched=True) == ["torchscript"]
    model = load(served[3]["location"], runtime="auto")
    measured = model.runtime_choice["measured_p50_ms"]  # timed here: every verified runtime passed the example
    assert sorted(measured) == sorted(carried) and model.runtime == min(measured, key=measured.get)
    assert model.runtime_choice["candidates"] == sorted(recorded, key=recorded.get)
    points, expected = model.example()
    assert np.array_equal(model.predict(points), expected)
    with TestClient(create_app(model)) as client:
        serving = client.get("/metadata").json()["serving"]
    assert serving["runtime"] == model.runtime and serving["runtime_choice"]["how"].startswith("auto")


def test_a_runtime_the_package_did_not_verify_is_not_chosen(package):
    data = package.metadata.to_dict()
    data["runtimes"]["onnx"] = {**data["runtimes"]["onnx"], "check": {"agrees": False}}
    data["performance"]["pt2_latency_ms"]["p50"] = 0.001
    from pipeline.contracts import PackageMetadata

    assert choose_runtimes(PackageMetadata.from_dict(data, "test")) == ["pt2", "torchscript"]


# ----------------------------------------------------------------------------------------- answers
def test_binary_labels_are_uint8_and_logits_come_only_when_asked(package):
    points = cloud(1)
    expected_logits = package.predict_logits(points)
    with TestClient(create_app(package)) as client:
        plain = client.post("/v1/segment", params={"format": "binary"}, **binary(points))
        both = client.post("/v1/segment", params={"format": "binary", "logits": "true"}, **binary(points))
        as_json = client.post("/v1/segment", params={"logits": "true"}, **binary(points)).json()
        without = client.post("/v1/segment", **binary(points)).json()
    assert len(plain.content) == len(points) and "x-num-classes" not in plain.headers
    assert np.array_equal(np.frombuffer(plain.content, np.uint8), expected_logits.argmax(-1))
    offset, k = int(both.headers["x-logits-offset"]), int(both.headers["x-num-classes"])
    assert offset == len(points) and k == expected_logits.shape[1]
    assert np.array_equal(both.content[:offset], plain.content)
    logits = np.frombuffer(both.content[offset:], "<f4").reshape(len(points), k)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    np.testing.assert_allclose(np.array(as_json["logits"]), expected_logits, atol=1e-5)
    assert "logits" not in without and without["classes"] == as_json["classes"]


def test_every_response_names_the_serving_version(package):
    with TestClient(create_app(package)) as client:
        for response in (client.get("/healthz"), client.get("/metadata"), client.get("/nowhere"),
                         client.post("/v1/segment", content=b"x", headers={"Content-Type": "text/plain"}),
                         client.post("/v1/segment", **binary(cloud(2, 50)))):
            assert response.headers["x-model-version"] == package.ref


# ----------------------------------------------------------------------------------------- load
def test_a_full_queue_is_429_with_retry_after_and_nothing_else_fails(served):
    """One worker, a queue of 2, the model's only replica held while 16 requests arrive: exactly 3 are
    taken (one by the worker, two queued), 13 refused at once; the 3 are answered once it is released."""
    model = load(served[3]["location"])
    clouds = [cloud(10 + i, 400 + 10 * i) for i in range(16)]
    app = create_app(model, settings=ServeConfig(workers=1, queue_size=2))
    held = model._forwards.get()  # the worker blocks in its forward until this is returned

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            tasks = [asyncio.create_task(http.post("/v1/segment", **binary(c))) for c in clouds]
            while sum(t.done() for t in tasks) < 13:
                await asyncio.sleep(0.05)
            model._forwards.put(held)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] * 3 + [429] * 13, statuses
    for response, points in zip(responses, clouds):
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1 and "busy" in response.json()["detail"]
        else:
            assert response.json()["classes"] == model.predict(points).tolist()


def test_a_request_past_its_deadline_is_504(package):
    with TestClient(create_app(package, settings=ServeConfig(deadline_ms=1))) as client:
        response = client.post("/v1/segment", **binary(cloud(3, 3000)))
        assert response.status_code == 504 and "deadline of 1 ms" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_closing_the_pool_finishes_queued_work_and_stops_every_worker(package):
    pool = InferencePool(workers=3, queue_size=8, max_batch=2, max_batch_wait_ms=1.0, metrics=Metrics())
    clouds = [cloud(50 + i, 64) for i in range(5)]

    async def main() -> list[np.ndarray]:
        deadline = time.monotonic() + 600
        return await asyncio.gather(*[pool.infer(package, c, deadline) for c in clouds])

    answers = asyncio.run(main())
    pool.close()
    assert not any(thread.is_alive() for thread in pool._threads)
    assert [a.argmax(-1).tolist() for a in answers] == [package.predict(c).tolist() for c in clouds]


def test_dynamic_batching_answers_each_request_with_its_own_cloud(package):
    """Requests batched into one padded forward get exactly the answer of their own cloud."""
    clouds = [cloud(30 + i, 100 + 53 * i) for i in range(12)]
    app = create_app(package, settings=ServeConfig(max_batch=8, max_batch_wait_ms=200, queue_size=32))
    responses = gather(app, [binary(c) for c in clouds])
    assert [r.json()["classes"] for r in responses] == [package.predict(c).tolist() for c in clouds]
    text = app.state.metrics.exposition().decode()
    forwards = metric(text, "avp_inference_batch_size_count")
    assert metric(text, "avp_inference_batch_size_sum") == len(clouds) and forwards < len(clouds)


# ----------------------------------------------------------------------------------------- metrics
def test_metrics_count_requests_latency_forwards_and_the_served_version(package):
    with TestClient(create_app(package)) as client:
        for seed in range(3):
            client.post("/v1/segment", **binary(cloud(seed, 80)))
        client.post("/v1/segment", content=b"\x00" * 17, headers={"Content-Type": "application/octet-stream"})
        client.get("/no/such/route")
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, 'avp_http_requests_total{route="/v1/segment",status="200"}') == 3
    assert metric(text, 'avp_http_requests_total{route="/v1/segment",status="400"}') == 1
    assert metric(text, 'avp_http_requests_total{route="other",status="404"}') == 1
    assert metric(text, 'avp_http_request_duration_seconds_count{route="/v1/segment"}') == 4
    assert metric(text, "avp_model_forward_seconds_count") == 3
    assert metric(text, "avp_inference_queue_depth") == 0
    assert metric(text, "avp_model_swaps_total") == 0 and metric(text, "avp_model_swaps_failed_total") == 0
    info = next(line for line in text.splitlines() if line.startswith("avp_serving_info{"))
    assert f'package="{package.ref}"' in info and f'runtime="{package.runtime}"' in info


# ----------------------------------------------------------------------------------------- exposure
def test_docs_are_opt_in_and_metadata_leaves_out_who_built_it(package):
    with TestClient(create_app(package)) as client:
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
        meta = client.get("/metadata").json()
    assert "user" not in meta["provenance"] and "host" not in meta["provenance"]
    assert "created_by" not in meta["model"] and meta["provenance"]["git_sha"] == package.metadata.provenance["git_sha"]
    with TestClient(create_app(package, settings=ServeConfig(docs=True))) as client:
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
    assert package.metadata.provenance.get("user") is not None  # the package itself keeps them
    assert "user" not in public_metadata(package, create_app(package).state.served)["provenance"]


# ----------------------------------------------------------------------------------------- hostile JSON
@pytest.mark.parametrize("depth", [100, 1000, 100_000])
def test_deeply_nested_json_is_400(package, depth):
    body = '{"points": ' + "[" * depth + "]" * depth + "}"
    with TestClient(create_app(package)) as client:
        response = client.post("/v1/segment", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "nested" in response.json()["detail"]
        assert client.post("/v1/segment", **binary(cloud(4, 20))).status_code == 200


@pytest.mark.parametrize("digits", [41, 4301, 100_000])
def test_huge_integers_in_json_are_400(package, digits):
    body = '{"points": [[' + "9" * digits + ", 1, 2, 3]]}"
    with TestClient(create_app(package)) as client:
        response = client.post("/v1/segment", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and f"{digits} digits" in response.json()["detail"]


def test_json_depth_matches_the_parsed_structure():
    def depth(value) -> int:
        return 1 + max((depth(v) for v in (value.values() if isinstance(value, dict) else value)), default=0) \
            if isinstance(value, (list, dict)) else 0

    for document in ({"points": [[1, 2, 3, 4]]}, [], [[[]], [[[[]]]]], {"a": {"b": [1, {"c": []}]}}, 5):
        assert json_depth(json.dumps(document).encode()) == depth(document)


def test_a_content_length_with_thousands_of_digits_is_400(package):
    with TestClient(create_app(package)) as client:
        response = client.post("/v1/segment", content=b"", headers={"Content-Type": "application/octet-stream",
                                                                    "Content-Length": "9" * 5000})
    assert response.status_code in (400, 413)


# ----------------------------------------------------------------------------------------- metadata schema
def rewrite(folder: str, name: str, edit) -> None:
    """Change one package file and re-write the manifest, so only the content check can catch it."""
    path = os.path.join(folder, name)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(edit(data))
    write_manifest(folder)


def edit_metadata(change):
    def edit(data: bytes) -> bytes:
        document = json.loads(data)
        change(document)
        return json.dumps(document).encode()
    return edit


MALFORMED_METADATA = {
    "not JSON": (lambda data: b"{not json", "metadata.json: not valid JSON"),
    "a list": (lambda data: b"[1, 2]", "metadata.json should be a JSON object"),
    "nested 100000 deep": (lambda data: b"[" * 100_000 + b"]" * 100_000, "metadata.json"),
    "no input key": (edit_metadata(lambda d: d.pop("input")), "missing field 'input'"),
    "input without max_points": (edit_metadata(lambda d: d["input"].pop("max_points")), "'input.max_points' is missing"),
    "max_points a string": (edit_metadata(lambda d: d["input"].update(max_points="many")),
                            "'input.max_points' should be int"),
    "max_points above the cap": (edit_metadata(lambda d: d["input"].update(max_points=10**12)),
                                 "'input.max_points' is 1000000000000"),
    "example shape wrong": (edit_metadata(lambda d: d["example"]["expected_logits"].update(shape=[5, "K"])),
                            "'example.expected_logits.shape'"),
    "example file outside": (edit_metadata(lambda d: d["example"]["input"].update(file="../../etc/passwd")),
                             "'example.input.file' names '../../etc/passwd'"),
    "no pt2 format": (edit_metadata(lambda d: d["runtimes"]["pt2"].pop("format")), "'runtimes.pt2.format' is missing"),
    "package ref a number": (edit_metadata(lambda d: d["package"].update(ref=7)), "'package.ref' should be str"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_METADATA))
def test_malformed_metadata_is_a_package_error_naming_the_field(package_copy, case):
    edit, fragment = MALFORMED_METADATA[case]
    rewrite(package_copy, METADATA, edit)
    with pytest.raises(PackageError, match=None) as refused:
        load(package_copy)
    assert fragment in str(refused.value) and str(refused.value).startswith(METADATA), str(refused.value)


def test_a_truncated_example_file_is_a_package_error_naming_it(package_copy):
    rewrite(package_copy, "expected_logits.bin", lambda data: data[:-4])
    with pytest.raises(PackageError, match=r"^expected_logits.bin: \d+ bytes, but example.expected_logits.shape"):
        load(package_copy)


# ----------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("setting, value", [("queue_size", 0), ("workers", 0), ("deadline_ms", -1),
                                            ("header_timeout_s", float("nan")), ("max_connections", 0)])
def test_server_settings_that_cannot_work_are_refused_before_loading(served, setting, value):
    from pipeline.config import ConfigError
    from tests.serving.conftest import serve_config

    with pytest.raises(ConfigError, match=f"config field serve.{setting}: "):  # config.BOUNDS, before any load
        serve_config(served[0].home, **{setting: value})


def test_serve_http_needs_exactly_one_target(served):
    from pipeline.errors import UserError
    from serving.http import serve

    for targets in ({}, {"package": served[3]["location"], "production": "perception/bev_segnet"}):
        with pytest.raises(UserError, match="exactly one of --package"):
            serve(served[0], say=lambda m: None, **targets)
    with pytest.raises(UserError, match="expected NAMESPACE/NAME"):
        serve(served[0], production="../x", say=lambda m: None)
