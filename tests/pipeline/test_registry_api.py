"""The registry API (pipeline.registry_api) served by a real uvicorn on 127.0.0.1 over a real registry, once on
SQLite and once on PostgreSQL: every route, every error code, who did what, concurrent promotions, the
``--remote`` client and ``avp registry serve``."""

from __future__ import annotations

import datetime as dt
import getpass
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn

from pipeline import config
from pipeline.registry import Artifact, Registry
from pipeline.registry_api import TokenAuth, create_app
from pipeline.servers import free_port
from tests.airflow_standalone import wait_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-test-token"


@contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free 127.0.0.1 port in a thread of this process; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn to start", interval=0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _files(**content: str):
    def builder(staging, _record):
        for name, text in content.items():
            Path(staging, name).parent.mkdir(parents=True, exist_ok=True)
            Path(staging, name).write_text(text)
    return builder


@dataclass
class World:
    """A registry with the lineage the pipeline builds: logs -> dataset -> validation; dataset -> models ->
    metrics, package."""

    registry: Registry
    logs: list[Artifact]
    dataset: Artifact
    validation: Artifact
    models: list[Artifact]  # v1 and v2 blessed, v3 not
    metrics: Artifact
    package: Artifact


def make_world(registry: Registry) -> World:
    logs = [registry.record("log", f"drive-{i}", content_key=f"k{i}", location=f"/logs/drive-{i}.mcap",
                            entry_point="tests:record") for i in range(3)]
    dataset = registry.build("dataset", "fleet", entry_point="spark_jobs.ingest:run", config={"split": "hash"},
                             builder=_files(**{"manifest.json": "{}"}), parents=logs)
    validation = registry.build("validation", "fleet", entry_point="spark_jobs.validate:run", config={},
                                builder=_files(**{"report.html": "<h1>validation of fleet v1</h1>"}), parents=[dataset])
    models = [registry.build("model", "segnet", entry_point="training.entry:run", config={"epochs": n},
                             builder=_files(**{"weights.pt": str(n)}), parents=[dataset]) for n in (1, 2, 3)]
    for model, blessed in zip(models, (True, True, False)):
        registry.set_blessing(model.id, blessed, [] if blessed else ["mIoU 0.10 < 0.30"])
    metrics = registry.build("metrics", "segnet", entry_point="evaluation.entry:run", config={},
                             builder=_files(**{"report.html": "<h1>evaluation of segnet v1</h1>"}), parents=[models[0]])
    package = registry.build("package", "segnet", entry_point="serving.entry:run", config={},
                             builder=_files(**{"segnet-v1/metadata.json": '{"model": "model:segnet@v1"}',  # as serve
                                               "segnet-v1/MODEL_CARD.html": "<h1>model card of segnet v1</h1>"}),
                             parents=[models[0]])
    return World(registry, logs, dataset, validation, [registry.get(m.id) for m in models], metrics, package)


@pytest.fixture
def world(registry_cfg) -> World:
    return make_world(Registry.open(registry_cfg))


@pytest.fixture
def api(world) -> Iterator[httpx.Client]:
    """A client of the API over ``world``'s registry, authenticated with the token as user alice."""
    app = create_app(lambda: world.registry, TokenAuth(TOKEN), namespace="perception")
    with uvicorn_server(app) as url:
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}", "X-AVP-User": "alice"}) as client:
            yield client


def refs(items) -> list[str]:
    return sorted(i["ref"] for i in items)


def test_list_with_filters(api, world):
    everything = api.get("/api/artifacts").json()
    assert refs(everything) == sorted(a.ref for a in world.registry.list())
    assert refs(api.get("/api/artifacts", params={"kind": "model"}).json()) == [m.ref for m in world.models]
    assert refs(api.get("/api/artifacts", params={"kind": "model", "blessed": "true"}).json()) == [
        "model:segnet@v1", "model:segnet@v2"]
    assert refs(api.get("/api/artifacts", params={"blessed": "false"}).json()) == sorted(
        a.ref for a in world.registry.list() if not a.blessed)
    assert refs(api.get("/api/artifacts", params={"name": "drive-1"}).json()) == ["log:drive-1@v1"]
    world.registry.deprecate(world.models[2].id, "unblessed")
    assert refs(api.get("/api/artifacts", params={"state": "deprecated"}).json()) == ["model:segnet@v3"]
    today = dt.datetime.now(dt.timezone.utc).date()
    assert len(api.get("/api/artifacts", params={"created_from": today.isoformat()}).json()) == len(everything)
    assert api.get("/api/artifacts", params={"created_to": (today - dt.timedelta(days=1)).isoformat()}).json() == []
    assert api.get("/api/artifacts", params={"dag_run_id": "manual__nothing"}).json() == []


def test_one_artifact_has_every_recorded_field_and_its_links(api, world):
    model = world.models[0]
    got = api.get(f"/api/artifacts/{model.ref}").json()
    assert got == api.get(f"/api/artifacts/{model.id}").json()  # by reference or by id
    for field, value in vars(world.registry.get(model.id)).items():
        if field != "cached":
            assert got[field] == (value.isoformat() if isinstance(value, dt.datetime) else value), field
    assert got["parents"] == [world.dataset.ref]
    assert sorted(got["children"]) == sorted([world.metrics.ref, world.package.ref])
    assert [e["to_state"] for e in got["events"]] == ["registered", "building", "succeeded", "succeeded"]
    assert got["events"][-1]["reason"] == "blessed"
    links = got["links"]
    assert api.get(links["evaluation_report"]).text == "<h1>evaluation of segnet v1</h1>"
    assert api.get(links["model_card"]).text == "<h1>model card of segnet v1</h1>"  # in the package's folder
    assert links["validation_report"] is None and links["airflow_run"] is None
    dataset_links = api.get(f"/api/artifacts/{world.dataset.ref}").json()["links"]
    assert api.get(dataset_links["validation_report"]).text == "<h1>validation of fleet v1</h1>"
    # a file outside the artifact's folder is not served, however the path is spelled
    for path in ("../../registry.db", "..%2F..%2Fregistry.db", "nothing.html"):
        assert api.get(f"/api/artifacts/{model.id}/files/{path}").status_code == 404, path


def test_lineage_up_to_the_logs_and_down(api, world):
    up = api.get(f"/api/artifacts/{world.package.ref}/lineage").json()
    assert up["direction"] == "up"
    expected = [(d, a.ref) for d, a in world.registry.lineage(world.package.id, "up")]
    assert [(n["depth"], n["artifact"]["ref"]) for n in up["nodes"]] == expected
    assert {n["artifact"]["ref"] for n in up["nodes"] if n["depth"] == 3} == {a.ref for a in world.logs}
    dataset_node = next(n for n in up["nodes"] if n["artifact"]["kind"] == "dataset")
    assert sorted(dataset_node["parents"]) == sorted(a.ref for a in world.logs)
    down = api.get(f"/api/artifacts/{world.logs[0].ref}/lineage", params={"direction": "down"}).json()
    assert {n["artifact"]["ref"] for n in down["nodes"]} == {
        a.ref for a in (world.dataset, world.validation, *world.models, world.metrics, world.package)}


def test_promote_rollback_deprecate_end_of_life_record_who(api, world):
    v1, v2 = world.models[0], world.models[1]
    first = api.post("/api/promotions/perception/segnet", json={"ref": v1.ref})
    assert first.status_code == 200 and first.json()["label"] == "perception/segnet/1.0"
    second = api.post("/api/promotions/perception/segnet", json={"ref": str(v2.id), "major": 1}).json()
    assert (second["ref"], second["status"], second["promoted_by"]) == (v2.ref, "production", "alice")
    history = api.get("/api/promotions/perception/segnet").json()
    assert history["production"]["ref"] == v2.ref
    assert [(p["ref"], p["status"]) for p in history["history"]] == [(v1.ref, "previous"), (v2.ref, "production")]
    assert world.registry.production("perception", "segnet").artifact_id == v2.id  # the registry agrees

    restored = api.post("/api/promotions/perception/segnet/rollback").json()
    assert (restored["ref"], restored["label"]) == (v1.ref, "perception/segnet/1.0")
    assert world.registry.production("perception", "segnet").artifact_id == v1.id
    rollback_event = world.registry.events(v1.id)[-1]
    assert rollback_event["by"] == "alice" and rollback_event["reason"].startswith("rolled back perception/segnet")
    assert [p["label"] for p in api.get("/api/promotions", params={"namespace": "perception"}).json()] == [
        "perception/segnet/1.0", "perception/segnet/1.1"]
    assert [p["status"] for p in api.get(f"/api/artifacts/{v2.ref}").json()["promotions"]] == ["rolled_back"]

    deprecated = api.post(f"/api/artifacts/{world.models[2].ref}/deprecate", json={"reason": "unblessed"}).json()
    assert deprecated["state"] == "deprecated" and deprecated["reason"] == "unblessed"
    gone = api.post(f"/api/artifacts/{world.models[2].ref}/end-of-life", json={}).json()
    assert gone["state"] == "end_of_life"
    events = world.registry.events(world.models[2].id)
    assert [(e["to_state"], e["by"]) for e in events[-2:]] == [("deprecated", "alice"), ("end_of_life", "alice")]


def test_errors_are_404_409_422_401_403_503_never_500(api, world):
    def status(method, path, **kwargs):
        return api.request(method, path, **kwargs).status_code

    v3 = world.models[2]
    assert status("GET", "/api/artifacts/model:segnet@v9") == 404
    assert status("GET", "/api/artifacts/99999") == 404
    assert status("GET", "/api/artifacts/99999999999999999999999") == 404  # beyond the database's integers: none
    assert status("GET", "/api/artifacts/widget:segnet@v1") == 404  # unknown kind
    assert status("GET", "/api/artifacts/model:segnet@v1/lineage", params={"direction": "sideways"}) == 422
    assert status("GET", "/api/promotions/perception/nothing") == 404
    assert status("POST", "/api/promotions/perception/segnet", json={"ref": "model:segnet@v9"}) == 404
    refused = api.post("/api/promotions/perception/segnet", json={"ref": v3.ref})
    assert refused.status_code == 409 and "not blessed" in refused.json()["detail"]
    assert status("POST", "/api/promotions/perception/segnet", json={"ref": world.dataset.ref}) == 409
    assert status("POST", "/api/promotions/perception/segnet/rollback") == 409  # nothing in production
    assert status("POST", f"/api/artifacts/{v3.ref}/end-of-life", json={}) == 409  # succeeded -> end_of_life
    assert status("POST", "/api/artifacts/model:segnet@v9/deprecate", json={}) == 404
    for bad in ({}, {"ref": v3.ref, "major": -1}, {"ref": v3.ref, "extra": 1}, {"ref": ["x"]}):
        assert status("POST", "/api/promotions/perception/segnet", json=bad) == 422, bad
    assert status("POST", "/api/promotions/perception/segnet", content=b"{not json",
                  headers={"Content-Type": "application/json"}) == 422
    assert status("POST", "/api/promotions/bad..name/segnet", json={"ref": world.models[0].ref}) == 422
    assert status("GET", "/api/artifacts", params={"kind": "widget"}) == 422
    assert status("GET", "/api/artifacts", params={"created_from": "yesterday"}) == 422
    assert status("POST", "/api/datasets", json={"window": "sometimes"}) == 422
    assert status("POST", "/api/datasets", json={"name": "../escape"}) == 422
    assert status("POST", "/api/models", json={"dataset": world.dataset.ref, "epochs": 0}) == 422
    assert status("POST", "/api/models", json={"dataset": "dataset:fleet@v9"}) == 404
    assert status("POST", "/api/models", json={"dataset": world.models[0].ref}) == 409  # not a dataset
    long_name = api.post("/api/promotions/perception/long-user", json={"ref": world.models[0].ref},
                         headers={"X-AVP-User": "x" * 300})
    assert long_name.status_code == 200 and long_name.json()["promoted_by"] == "x" * 128  # what the column holds
    unavailable = api.post("/api/datasets", json={})
    assert unavailable.status_code == 503 and "registry.airflow_url" in unavailable.json()["detail"]
    base = str(api.base_url)
    assert httpx.get(f"{base}/api/artifacts").status_code == 401
    assert httpx.get(f"{base}/api/artifacts", headers={"Authorization": "Bearer wrong"}).status_code == 403
    # a browser signs in with the token once and then carries it in a cookie
    assert httpx.post(f"{base}/login", data={"token": "wrong"}).status_code == 403
    signed_in = httpx.post(f"{base}/login", data={"token": TOKEN})
    assert signed_in.status_code == 303 and signed_in.cookies[TokenAuth.COOKIE] == TOKEN
    assert httpx.get(f"{base}/", cookies=signed_in.cookies).status_code == 200
    assert httpx.get(f"{base}/login").status_code == 200
    sign_in = httpx.get(f"{base}/artifacts/1")  # a page without credentials: sent to sign in
    assert sign_in.status_code == 303 and sign_in.headers["location"] == "/login"


def test_concurrent_promotions_end_with_exactly_one_production(api, world):
    v1, v2 = world.models[0], world.models[1]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: api.post("/api/promotions/perception/race",
                                                   json={"ref": (v1, v2)[i % 2].ref}), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    history = world.registry.promotions("perception", "race")
    assert sorted(p.minor for p in history) == list(range(8))
    assert [p.status for p in history].count("production") == 1
    production = api.get("/api/promotions/perception/race").json()["production"]
    assert production["minor"] == 7 and production["artifact_id"] == history[-1].artifact_id


def test_openapi_documents_every_route(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/artifacts", "/api/artifacts/{ref}", "/api/artifacts/{ref}/lineage", "/api/artifacts/{ref}/files/{path}",
        "/api/artifacts/{ref}/deprecate", "/api/artifacts/{ref}/end-of-life", "/api/promotions",
        "/api/promotions/{namespace}/{name}", "/api/promotions/{namespace}/{name}/rollback", "/api/datasets",
        "/api/models"}
    assert api.get("/docs").status_code == 200


def test_pages_render_table_filters_and_artifact(api, world):
    table = api.get("/", params={"kind": "model", "blessed": "yes"}).text
    assert "model:segnet@v1" in table and "model:segnet@v2" in table and "model:segnet@v3" not in table
    assert "dataset:fleet@v1" not in table
    page = api.get(f"/artifacts/{world.models[2].id}").text
    assert "Production of perception/segnet becomes model:segnet@v3" in page  # the button's confirmation
    assert all(f"data-ref='{a.ref}'" in page for a in (world.dataset, *world.logs))  # lineage up to the logs
    assert api.get("/artifacts/model:segnet@v9").status_code == 404


def _avp(env, *args, timeout=120):
    return subprocess.run(["avp", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def remote_env(avp_env, tmp_path):
    """`avp` against an empty local home: everything it shows with --remote comes from the API."""
    return {**avp_env, "AVP_HOME": str(tmp_path / "empty-home"), "AVP_REGISTRY_TOKEN": TOKEN,
            "COLUMNS": "250", "PYTHONPATH": str(REPO)}


def test_remote_client_is_the_cli_over_the_api(api, world, remote_env):
    url = str(api.base_url)
    listed = _avp(remote_env, "registry", "list", "--kind", "model", "--remote", url)
    assert listed.returncode == 0, listed.stderr
    assert all(m.ref.split(":")[1].split("@")[0] in listed.stdout for m in world.models)
    assert listed.stdout.count("segnet") == 3 and f"artifacts in {url}" in listed.stdout
    shown = _avp(remote_env, "registry", "show", world.models[0].ref, "--remote", url)
    assert shown.returncode == 0 and world.dataset.ref in shown.stdout and world.package.ref in shown.stdout
    lineage = _avp(remote_env, "registry", "lineage", world.package.ref, "--remote", url)
    assert lineage.returncode == 0 and all(a.ref in lineage.stdout for a in world.logs)
    promoted = _avp(remote_env, "registry", "promote", world.models[1].ref, "--namespace", "perception", "--remote", url)
    assert promoted.returncode == 0, promoted.stderr
    assert world.registry.production("perception", "segnet").artifact_id == world.models[1].id
    assert world.registry.promotions("perception", "segnet")[-1].promoted_by == getpass.getuser()  # X-AVP-User
    refused = _avp(remote_env, "registry", "promote", world.models[2].ref, "--remote", url)
    assert refused.returncode == 2 and "not blessed" in refused.stderr
    missing = _avp(remote_env, "registry", "show", "model:segnet@v9", "--remote", url)
    assert missing.returncode == 2 and "model:segnet@v9" in missing.stderr
    deprecated = _avp(remote_env, "registry", "deprecate", world.models[2].ref, "--reason", "old", "--remote", url)
    assert deprecated.returncode == 0 and world.registry.get(world.models[2].id).state == "deprecated"
    promotions = _avp(remote_env, "registry", "promotions", "--remote", url)
    assert promotions.returncode == 0 and "perception/segnet/1.0" in promotions.stdout
    no_token = _avp({**remote_env, "AVP_REGISTRY_TOKEN": ""}, "registry", "list", "--remote", url)
    assert no_token.returncode == 2 and "401" in no_token.stderr


def test_avp_registry_serve_needs_a_token_and_serves_the_home(avp_env, tmp_path):
    env = {**avp_env, "PYTHONPATH": str(REPO)}
    refused = _avp(env, "registry", "serve")
    assert refused.returncode == 2 and "AVP_REGISTRY_TOKEN" in refused.stderr
    registry = Registry.open(config.load({"home": env["AVP_HOME"]}, env={}))
    log = registry.record("log", "drive-0", content_key="k", location="/logs/drive-0.mcap", entry_point="tests")
    port = free_port()
    proc = subprocess.Popen(["avp", "registry", "serve", "--set", f"registry.api_port={port}"],
                            env={**env, "AVP_REGISTRY_TOKEN": TOKEN}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def listed():
            try:
                return httpx.get(f"{url}/api/artifacts", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            except httpx.HTTPError:
                return None

        assert refs(wait_for(listed, 60, "avp registry serve", interval=0.5)) == [log.ref]
        assert httpx.get(f"{url}/api/artifacts").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
