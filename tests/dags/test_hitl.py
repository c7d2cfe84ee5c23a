"""Human approval before production (pipeline/approval.py): the approve_promotion operator's callables on a real
registry and package (what Airflow calls once a person answers: approve, reject, timeout; and auto_promote),
and the whole request/answer round trip through the HITL REST API of a running `airflow standalone`."""

from __future__ import annotations

import datetime as dt
import os
from types import SimpleNamespace

import pytest

from pipeline import config
from pipeline.approval import PROMOTE, REJECT, ApprovePromotion, offer
from pipeline.registry import Registry

NAMESPACE = "perception"


@pytest.fixture
def candidate(tmp_path, monkeypatch):
    """A blessed model packaged by the serve stage in a fresh home (the environment points at it, as a task's
    does); returns (registry, package reference)."""
    from serving.entry import run
    from tests.serving.conftest import register_model, serve_config

    home = str(tmp_path / "home")
    for key in [k for k in os.environ if k.startswith("AVP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AVP_HOME", home)
    monkeypatch.setenv("AVP_SERVE__EXAMPLE_POINTS", "500")
    monkeypatch.setenv("AVP_SERVE__LATENCY_RUNS", "2")
    monkeypatch.setenv("AVP_SERVE__AOT_INDUCTOR", "false")
    cfg = serve_config(home, example_points=500, latency_runs=2)
    registry = Registry.open(cfg)
    model, _metrics = register_model(registry, seed=1)
    package = run(cfg, registry, say=lambda m: None, run_id="hitl", model=model.ref)["ref"]
    return registry, package


def operator(package: str) -> ApprovePromotion:
    return ApprovePromotion(task_id="approve_promotion", package=package)


def context(run_type: str = "manual", **params):
    # as Airflow passes them: the DAG's params and the approval form's own field (``reason``)
    return {"params": {"auto_promote": False, "reason": "", **params},
            "dag_run": SimpleNamespace(run_type=run_type, run_id="r1")}


def answer(choice: str, user: str, reason: str) -> dict:
    """The event Airflow resumes the task with once a person answered (models.hitl.as_resume_event_payload)."""
    return {"chosen_options": [choice], "params_input": {"reason": reason},
            "responded_at": dt.datetime.now(dt.timezone.utc), "responded_by_user": {"id": user, "name": user},
            "timedout": False}


def test_approve_promotes_to_the_next_minor_version_by_the_approver(candidate):
    registry, package = candidate
    result = operator(package).execute_complete(context(), answer(PROMOTE, "alice", "better vehicle IoU"))
    art = registry.get(package)
    production = registry.production(NAMESPACE, art.name)
    assert production.label == f"{NAMESPACE}/{art.name}/1.0" == result["production"]
    assert production.artifact_id == art.id and production.promoted_by == "alice"
    events = [(e["by"], e["reason"]) for e in registry.events(art.id)]
    assert ("alice", f"promoted to {NAMESPACE}/{art.name}/1.0") in events
    assert ("alice", "promotion approved: better vehicle IoU") in events
    # offered again (a re-run day, a cache hit): it is production already, so nobody is asked
    why_not, _ = offer(config.load(), package)
    assert why_not and "already production" in why_not


def test_reject_records_who_and_why_and_leaves_production_unchanged(candidate):
    registry, package = candidate
    art = registry.get(package)
    result = operator(package).execute_complete(context(), answer(REJECT, "bob", "pedestrian recall too low"))
    assert result["decision"] == "rejected" and result["production"] is None
    assert registry.production(NAMESPACE, art.name) is None and registry.promotions() == []
    last = registry.events(art.id)[-1]
    assert (last["by"], last["reason"]) == ("bob", "promotion rejected: pedestrian recall too low")
    assert last["from_state"] == last["to_state"] == "succeeded"  # the package itself is unchanged


def test_timeout_skips_and_leaves_production_unchanged(candidate):
    from airflow.sdk.exceptions import AirflowSkipException

    registry, package = candidate
    event = {"error": "The Human-in-the-loop response timeout has passed without a response.", "error_type": "timeout"}
    with pytest.raises(AirflowSkipException, match="no decision within serve.approval_timeout_s=259200 s"):
        operator(package).execute_complete(context(), event)
    assert registry.promotions() == []
    assert registry.events(registry.get(package).id)[-1]["by"] == "airflow"


def test_auto_promote_skips_the_wait_and_backfills_never_promote(candidate):
    from airflow.sdk.exceptions import AirflowSkipException

    registry, package = candidate
    with pytest.raises(AirflowSkipException, match="backfill runs rebuild past days and never promote"):
        operator(package).execute(context(run_type="backfill", auto_promote=True))
    assert registry.promotions() == []
    result = operator(package).execute(context(auto_promote=True))
    assert result["decision"] == "promoted" and result["by"] == "auto_promote (r1)"
    assert registry.production(NAMESPACE, registry.get(package).name).artifact_id == registry.get(package).id


def test_only_a_blessed_package_is_offered(candidate):
    from airflow.sdk.exceptions import AirflowSkipException

    registry, package = candidate
    model = next(p for p in registry.parents(registry.get(package).id) if p.kind == "model")
    registry.set_blessing(model.id, False, ["re-evaluated: regression on cyclists"])
    with pytest.raises(AirflowSkipException, match="is not blessed by evaluation"):
        operator(package).execute(context(auto_promote=True))
    assert registry.promotions() == []


def test_the_request_shows_what_changes_and_the_model_card(candidate):
    from pipeline.approval import request

    registry, package = candidate
    subject, body = request(config.load(), package)
    assert subject == f"Promote {package} to production ({NAMESPACE}/bev_segnet)?"
    assert f"the first production version of {NAMESPACE}/bev_segnet" in body
    assert "## Comparison with production" in body and "## Known limitations" in body
    assert "as a page: `" in body and "/MODEL_CARD.html`" in body
    registry.promote(package, NAMESPACE, "bev_segnet")
    registry.note(package, "pretend a newer one replaced it")
    _subject, body = request(config.load(), package)
    assert f"replacing **{NAMESPACE}/bev_segnet/1.0** ({package})" in body
