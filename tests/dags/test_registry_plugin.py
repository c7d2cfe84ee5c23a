"""The registry plugin (pipeline/airflow_plugins/avp_registry.py) loaded by a real `airflow standalone` with two
users of the simple auth manager (admin; viewer, who may read but not trigger DAGs), in one session for the
module: the plugin is listed by /api/v2/plugins; /avp refuses unauthenticated requests, lets the viewer read
and only the admin write; a dataset build registered through the API runs avp_daily up to validation and
its artifacts show up through the API; and the pages, in the system Chromium, from Airflow's navigation to
a promotion and back (screenshots in docs/images/)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import expect

from pipeline import config
from pipeline.registry import Registry
from tests.airflow_standalone import chromium_page, standalone_airflow
from tests.pipeline.test_registry_api import World, make_world

pytestmark = pytest.mark.slow
IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    with standalone_airflow(tmp_path_factory.mktemp("registry-plugin"),
                            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="False",
                            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin,viewer:viewer",
                            # no scheduled run (a whole training) for the registered build to queue behind
                            AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False") as running:
        yield running


@pytest.fixture(scope="module")
def world(airflow) -> World:
    """Models, a package and their lineage down to drive logs, in the registry the plugin serves."""
    return make_world(Registry.open(config.load({"home": airflow.env["AVP_HOME"]}, env={})))


@pytest.fixture(scope="module")
def admin(airflow) -> httpx.Client:
    return airflow.client(headers={"Authorization": f"Bearer {airflow.token('admin')}"})


def test_plugin_is_listed_and_behind_airflow_auth(airflow, world, admin):
    plugins = {p["name"]: p for p in admin.get("/api/v2/plugins").json()["plugins"]}
    assert "avp_registry" in plugins, plugins.keys()
    assert [a["url_prefix"] for a in plugins["avp_registry"]["fastapi_apps"]] == ["/avp"]
    assert [(v["name"], v["href"]) for v in plugins["avp_registry"]["external_views"]] == [("Registry", "/avp/")]

    anonymous = airflow.client()
    assert anonymous.get("/avp/api/artifacts").status_code == 401
    page = anonymous.get("/avp/")  # a page: sent to Airflow's login, and back here afterwards
    assert page.status_code == 303 and page.headers["location"].startswith("/auth/login")
    assert "next=" in page.headers["location"] and "%2Favp%2F" in page.headers["location"]
    assert anonymous.post("/avp/api/promotions/perception/auth-check", json={"ref": world.models[0].ref}).status_code == 401
    viewer = airflow.client(headers={"Authorization": f"Bearer {airflow.token('viewer')}"})
    listed = viewer.get("/avp/api/artifacts", params={"kind": "model"})
    assert listed.status_code == 200 and [a["ref"] for a in listed.json()] == [m.ref for m in world.models]
    refused = viewer.post("/avp/api/promotions/perception/auth-check", json={"ref": world.models[0].ref})
    assert refused.status_code == 403 and "permission to trigger the avp_daily DAG" in refused.json()["detail"]
    assert viewer.post("/avp/api/datasets", json={}).status_code == 403
    promoted = admin.post("/avp/api/promotions/perception/auth-check", json={"ref": world.models[0].ref})
    assert promoted.status_code == 200 and promoted.json()["promoted_by"] == "admin"
    assert world.registry.production("perception", "auth-check").promoted_by == "admin"
    assert admin.get("/avp/openapi.json").json()["info"]["title"] == "avp registry"


def test_registry_pages_from_the_airflow_navigation_to_a_promotion(airflow, world):
    v1, v2, v3 = world.models
    world.registry.promote(v1.id, "perception", "segnet")  # production before the browser promotes v2
    with chromium_page(IMAGES) as page:
        page.context.add_cookies([{"name": "_token", "value": airflow.token("admin"), "url": airflow.base_url}])
        page.goto(airflow.base_url)
        page.get_by_role("link", name="Registry").click()
        expect(page).to_have_url(re.compile(f"^{airflow.base_url}/plugin/avp-registry"))  # inside the Airflow UI
        frame = page.frame_locator("iframe")
        frame.locator("#artifacts").wait_for()
        page.screenshot(path=IMAGES / "registry-table.png")

        frame.locator("select[name=kind]").select_option("model")
        frame.locator("select[name=blessed]").select_option("yes")
        frame.get_by_role("button", name="Filter").click()
        frame.get_by_text("2 artifacts").wait_for()
        shown = frame.locator("#artifacts a").all_inner_texts()
        assert shown == [v2.ref, v1.ref]

        frame.get_by_role("link", name=v1.ref).click()  # the model with a package: reports and model card
        expect(frame.locator("#links a")).to_have_text(["evaluation report", "model card"])
        page.screenshot(path=IMAGES / "registry-model.png")
        frame.get_by_role("link", name="all artifacts").click()
        frame.get_by_role("link", name=v2.ref).click()
        frame.locator("#lineage").wait_for()
        # follow the lineage: the model's dataset, then one of the dataset's drive logs
        frame.locator(f"#lineage a[data-ref='{world.dataset.ref}']").click()
        frame.get_by_role("heading", name=world.dataset.ref).wait_for()
        frame.locator(f"#lineage a[data-ref='{world.logs[0].ref}']").click()
        frame.get_by_role("heading", name=world.logs[0].ref).wait_for()
        assert "/logs/drive-0.mcap" in frame.locator("#record").inner_text()

        frame.get_by_role("link", name="all artifacts").click()
        frame.get_by_role("link", name=v2.ref).click()
        frame.get_by_role("heading", name=v2.ref).wait_for()
        frame.get_by_role("button", name="Promote to perception/segnet").click()
        expect(frame.locator("#confirm-question")).to_have_text(
            f"Promote {v2.ref}? Production of perception/segnet becomes {v2.ref} (perception/segnet/1.1); "
            f"now it is {v1.ref} (perception/segnet/1.0).")
        page.screenshot(path=IMAGES / "registry-promote-confirm.png")
        frame.get_by_role("button", name="Confirm").click()
        frame.locator("#promotions .promotion-status", has_text="production").wait_for()
        assert world.registry.production("perception", "segnet").artifact_id == v2.id
        page.screenshot(path=IMAGES / "registry-promoted.png")

        frame.get_by_role("button", name="Roll back perception/segnet").click()
        expect(frame.locator("#confirm-question")).to_contain_text(
            f"Roll back perception/segnet? Production becomes {v1.ref} (perception/segnet/1.0) instead of {v2.ref}")
        frame.get_by_role("button", name="Confirm").click()
        frame.locator("#promotions .promotion-status", has_text="rolled_back").wait_for()
        assert world.registry.production("perception", "segnet").artifact_id == v1.id
        assert v3.ref not in shown  # the unblessed one was filtered out


def test_a_registered_dataset_build_runs_until_validation(airflow, admin):
    started = admin.post("/avp/api/datasets", json={"until": "validate", "window": "cumulative"})
    assert started.status_code == 202, started.text
    run_id = started.json()["dag_run_id"]
    assert started.json()["conf"] == {"until": "validate", "window": "cumulative", "window_days": 7, "force": False}

    assert airflow.run_end_state(admin, run_id) == "success", airflow.log_tail()
    tasks = admin.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    assert {t["task_id"]: t["state"] for t in tasks} == {
        "ingest": "success", "validate": "success", "train": "skipped", "evaluate": "skipped", "serve": "skipped",
        "approve_promotion": "skipped"}
    built = admin.get(started.json()["artifacts"]).json()  # the artifacts this run registered
    assert {a["kind"] for a in built} >= {"dataset", "validation"} and "model" not in {a["kind"] for a in built}
    assert all(a["state"] == "succeeded" and a["dag_id"] == "avp_daily" for a in built)
    dataset = next(a for a in built if a["kind"] == "dataset")
    links = admin.get(f"/avp/api/artifacts/{dataset['id']}").json()["links"]
    assert links["airflow_run"] == f"/dags/avp_daily/runs/{quote(run_id, safe='')}"  # the run's page in the UI
    report = admin.get(links["validation_report"])
    assert report.status_code == 200 and dataset["ref"] in report.text


def test_a_registered_model_build_trains_on_the_given_dataset(airflow, admin):
    """After the dataset build above: train (only) on that dataset, which ingest hands on instead of building."""
    [dataset] = admin.get("/avp/api/artifacts", params={"kind": "dataset", "name": "fleet-lidar"}).json()
    started = admin.post("/avp/api/models", json={"dataset": dataset["ref"], "until": "train", "epochs": 1})
    assert started.status_code == 202, started.text
    assert started.json()["conf"] == {"dataset": dataset["ref"], "until": "train", "epochs": 1, "force": False}
    run_id = started.json()["dag_run_id"]
    assert airflow.run_end_state(admin, run_id) == "success", airflow.log_tail()
    tasks = admin.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    assert {t["task_id"]: t["state"] for t in tasks} == {
        "ingest": "success", "validate": "success", "train": "success", "evaluate": "skipped", "serve": "skipped",
        "approve_promotion": "skipped"}
    [model] = [a for a in admin.get(started.json()["artifacts"]).json() if a["kind"] == "model"]
    assert model["state"] == "succeeded" and model["config"]["epochs"] == 1
    assert admin.get(f"/avp/api/artifacts/{model['id']}").json()["parents"] == [dataset["ref"]]
    # no dataset was built for it
    assert [a["ref"] for a in admin.get("/avp/api/artifacts", params={"kind": "dataset", "name": "fleet-lidar"})
            .json()] == [dataset["ref"]]
