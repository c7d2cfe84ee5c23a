"""The Airflow UI as an operator uses it, in a real browser (Playwright driving the system Chromium) against
`airflow standalone` on a free localhost port, on tiny simulated data:

log in -> read the DAG's docs and a task's docstring -> trigger a run from the trigger form with non-default
params -> its approve_promotion task asks for approval -> approve it in *Required actions*: the package
becomes production (checked in the registry) -> create a two-day backfill from the backfill dialog: one run
per day succeeds -> open a run that failed validation and find the failed expectation in the task's log.

Every state is awaited through the REST API (never by sleeping); a screenshot of each step goes to the test's
tmp dir, and the key ones to docs/images/ (docs/airflow.md, "Operating the pipeline"). Slow: several full DAG
runs (see the figure in docs/airflow.md)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from pipeline import config
from pipeline.registry import Registry
from tests.airflow_standalone import chromium_executable, chromium_page, standalone_airflow, wait_for
from tests.conftest import REAL_DATA
from tests.dags.test_dag_run import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * 3600),  # several full DAG runs, one after the other
              pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"the failing run imports {REAL_DATA}/semantickitti")]

USER = "operator"  # a simple-auth-manager user with the admin role (its password is generated at start)
DAG = "avp_daily"
DOCS_IMAGES = REPO / "docs" / "images"
RUN_MINUTES = 45  # generous: a full tiny DAG run takes minutes on a busy 2-core machine
TRIGGERED = "ui-epochs2"  # the run id typed into the trigger form
FAILING = "ui-strict-validation"


def task_states(api, run_id: str) -> dict[str, str | None]:
    tis = api.get(f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    return {t["task_id"]: t["state"] for t in tis}


def run_state(api, run_id: str) -> str | None:
    response = api.get(f"/api/v2/dags/{DAG}/dagRuns/{run_id}")
    return response.json()["state"] if response.status_code == 200 else None


def awaiting_approval(api, run_id: str) -> bool:
    return task_states(api, run_id).get("approve_promotion") == "awaiting_input"


def finished(api, run_id: str) -> str | None:
    state = run_state(api, run_id)
    return state if state in ("success", "failed") else None


def test_an_operator_runs_the_pipeline_from_the_ui(tmp_path):
    chromium_executable()  # skip (or fail under CI) before starting anything when there is no browser
    from playwright.sync_api import expect
    started = time.monotonic()
    shots = tmp_path / "screenshots"
    env = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin"}
    with standalone_airflow(tmp_path, **env) as airflow, chromium_page(shots) as page:
        page.set_default_timeout(60_000)
        base = airflow.base_url
        registry = Registry.open(config.load({"home": airflow.env["AVP_HOME"]}, env={}))

        def shot(name: str, key: bool = False) -> None:
            page.screenshot(path=shots / f"{name}.png")
            if key:
                DOCS_IMAGES.mkdir(exist_ok=True)
                shutil.copy(shots / f"{name}.png", DOCS_IMAGES / f"ui-{name}.png")

        # 1. log in: the UI sends an anonymous visitor to the login page
        page.goto(f"{base}/dags/{DAG}")
        page.wait_for_url("**/auth/login**")
        page.get_by_label("Username").fill(USER)
        page.get_by_label("Password").fill(airflow.password(USER))
        shot("01-login")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"**/dags/{DAG}")
        api = airflow.client(user=USER)

        # 2. the DAG's documentation (doc_md) and a task's docstring, rendered
        page.get_by_role("button", name="Dag Docs").click()
        docs = page.get_by_role("dialog")
        docs.get_by_text("fleet drive logs -> a served LiDAR segmentation model").wait_for()
        assert "Human approval" in docs.inner_text() and "approve_promotion" in docs.inner_text()
        shot("02-dag-docs")
        page.keyboard.press("Escape")
        page.goto(f"{base}/dags/{DAG}/tasks/validate")
        page.get_by_role("button", name="Documentation").click()
        page.get_by_role("dialog").get_by_text("Great Expectations").wait_for()
        shot("03-task-docs")
        page.keyboard.press("Escape")

        # 3. trigger with non-default params from the trigger form
        page.goto(f"{base}/dags/{DAG}")
        page.get_by_role("button", name="Trigger Dag").click()
        form = page.get_by_role("dialog")
        form.locator("input[name=element_epochs]").fill("2")
        window = form.locator("input[name=element_window]").locator("xpath=..").get_by_role("combobox")
        window.click()
        window.fill("rolling")
        page.keyboard.press("Enter")
        form.locator("input[name=element_window_days]").fill("30")
        form.locator("input[name=element_epochs]").scroll_into_view_if_needed()
        shot("04-trigger-form", key=True)
        form.get_by_role("button", name="Advanced Options").click()
        form.get_by_label("Run ID").fill(TRIGGERED)
        shot("04-trigger-run-id")
        form.get_by_role("button", name="Trigger").last.click()
        run = wait_for(lambda: api.get(f"/api/v2/dags/{DAG}/dagRuns/{TRIGGERED}").json() if
                       run_state(api, TRIGGERED) else None, 60, "the triggered run")
        assert {k: run["conf"][k] for k in ("epochs", "window", "window_days", "auto_promote")} == {
            "epochs": 2, "window": "rolling", "window_days": 30, "auto_promote": False}

        # The scheduled run Airflow created when the DAG appeared (catchup is off: the latest day) runs
        # first (one active run at a time) and asks for approval too: reject it through the REST API.
        [scheduled] = wait_for(lambda: [r["dag_run_id"] for r in api.get(f"/api/v2/dags/{DAG}/dagRuns").json()[
            "dag_runs"] if r["run_type"] == "scheduled"], 300, "the scheduled run")
        wait_for(lambda: awaiting_approval(api, scheduled) or finished(api, scheduled), RUN_MINUTES * 60,
                 f"the scheduled run {scheduled} to ask for approval")
        assert awaiting_approval(api, scheduled), task_states(api, scheduled)
        hitl = f"/api/v2/dags/{DAG}/dagRuns/{scheduled}/taskInstances/approve_promotion/-1/hitlDetails"
        response = api.patch(hitl, json={"chosen_options": ["Reject"], "params_input": {"reason": "not this one"}})
        assert response.status_code == 200, response.text
        assert wait_for(lambda: finished(api, scheduled), 600, "the rejected run to finish") == "success"
        rejected = api.get(f"/api/v2/dags/{DAG}/dagRuns/{scheduled}/taskInstances/serve/xcomEntries/return_value"
                           ).json()["value"]
        events = [(e["by"], e["reason"]) for e in registry.events(registry.get(rejected).id)]
        assert (USER, "promotion rejected: not this one") in events
        assert registry.production("perception", "bev_segnet") is None

        # 4. the triggered run reaches the approval; approve it in the UI
        wait_for(lambda: awaiting_approval(api, TRIGGERED) or finished(api, TRIGGERED), RUN_MINUTES * 60,
                 f"run {TRIGGERED} to ask for approval")
        assert awaiting_approval(api, TRIGGERED), task_states(api, TRIGGERED)
        package = api.get(f"/api/v2/dags/{DAG}/dagRuns/{TRIGGERED}/taskInstances/serve/xcomEntries/return_value"
                          ).json()["value"]
        assert package != rejected  # two epochs: another model, another package
        page.goto(f"{base}/dags/{DAG}/runs/{TRIGGERED}/tasks/approve_promotion/required_actions")
        page.get_by_text(f"Promote {package} to production").first.wait_for()
        card_page = page.locator("code", has_text="MODEL_CARD.html").first.inner_text()  # where the card's page is
        assert Path(card_page).is_file() and Path(card_page).parent.name == package.split(":")[1].replace("@", "-")
        for heading in ("Training data", "Evaluation", "Comparison with production", "Known limitations"):
            page.get_by_role("heading", name=heading, exact=True).wait_for()  # the card, rendered in the request
        shot("05-approval", key=True)
        page.locator("[name=element_reason]").fill("two epochs: better on every class")
        page.get_by_role("button", name="Promote").click()
        production = wait_for(lambda: registry.production("perception", "bev_segnet"), 600,
                              "the package to become production")
        assert registry.get(production.artifact_id).ref == package and production.promoted_by == USER
        assert production.label == "perception/bev_segnet/1.0"
        assert wait_for(lambda: finished(api, TRIGGERED), 600, f"run {TRIGGERED} to finish") == "success"
        page.goto(f"{base}/dags/{DAG}/runs/{TRIGGERED}")
        page.get_by_text("approve_promotion").first.wait_for()
        shot("06-approved-run")

        # 6. a run whose data fails validation, triggered with its config in the run's conf: the one-scan
        # SemanticKITTI sample of ../shared has no cyclist, which its label map can produce (see
        # tests/spark_jobs/test_real_imports.py); queued now, it runs after the approval above
        strict = {"source": "semantickitti", "ingest.source_path": str(REAL_DATA / "semantickitti")}
        wait_for(lambda: api.post(f"/api/v2/dags/{DAG}/dagRuns", json={
            "dag_run_id": FAILING, "logical_date": None, "conf": strict}).status_code in (200, 201, 409), 60,
            "the trigger to be accepted")  # SQLite behind a busy scheduler may answer 500 (database locked)

        # 5. a two-day backfill from the backfill dialog; both days select the same logs as the scheduled run,
        # so they reuse its artifacts (cache hits), and backfills never ask for approval
        page.goto(f"{base}/dags/{DAG}")
        page.get_by_role("button", name="Trigger Dag").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Backfill", exact=True).click()
        # Each field opens a date/time popover; one that is closing can linger in the page beside the next, so
        # fill only the visible inputs and wait for the popover to close before opening the other field.
        date_input = page.get_by_placeholder("YYYY/MM/DD").locator("visible=true")
        time_input = page.get_by_placeholder("HH:mm").locator("visible=true")
        for label, day in (("From", "2026/11/03"), ("To", "2026/11/04")):
            dialog.get_by_text(label, exact=True).locator("xpath=..").get_by_test_id("datetime-input").click()
            date_input.fill(day)
            time_input.fill("00:00")
            dialog.get_by_text("Date Range").click()
            expect(date_input).to_have_count(0, timeout=30_000)
        dialog.get_by_text("2 runs will be triggered").wait_for()
        shot("07-backfill-dialog", key=True)
        dialog.get_by_role("button", name="Run Backfill").click()

        def backfill_runs():
            runs = api.get(f"/api/v2/dags/{DAG}/dagRuns", params={"run_type": "backfill"}).json()["dag_runs"]
            return len(runs) == 2 and all(r["state"] in ("success", "failed") for r in runs) and runs

        runs = wait_for(backfill_runs, RUN_MINUTES * 60, "the two backfill runs")
        assert sorted((r["logical_date"][:10], r["state"]) for r in runs) == [
            ("2026-11-03", "success"), ("2026-11-04", "success")]
        assert all(task_states(api, r["dag_run_id"])["approve_promotion"] == "skipped" for r in runs)
        page.goto(f"{base}/dags/{DAG}")
        page.get_by_role("link", name="Backfills").click()
        page.get_by_text("2026-11-03").first.wait_for()
        shot("08-backfills")

        # 6. the failed run: find the failed expectation in the validate task's log
        assert wait_for(lambda: finished(api, FAILING), RUN_MINUTES * 60, f"run {FAILING}") == "failed"
        assert task_states(api, FAILING)["validate"] == "failed"
        page.goto(f"{base}/dags/{DAG}/runs/{FAILING}/tasks/validate")
        page.get_by_text("required_classes_present").first.wait_for(timeout=120_000)
        shot("09-failed-validation-log", key=True)
        assert registry.production("perception", "bev_segnet").label == "perception/bev_segnet/1.0"  # unchanged
    print(f"browser test: {time.monotonic() - started:.0f} s")
