"""The DAG path where evaluation does not bless the model: ``serve`` skips (the run still succeeds; a
model that falls short is an outcome, not an error), no package is built, and the skip's log gives the
verdict's reasons. The other DAG tests set ``min_miou=0`` so every model is blessed."""

from __future__ import annotations

import pytest

from tests.dags.test_dag_run import airflow_env, dag_test, prepare, registry_for

pytestmark = pytest.mark.slow


def test_an_unblessed_model_makes_serve_skip(tmp_path):
    env = airflow_env(prepare(tmp_path), AVP_EVALUATE__MIN_MIOU="1.0")  # no model reaches an mIoU of 1
    ok, log = dag_test(env, "2026-11-03")
    assert ok, log[-4000:]
    registry = registry_for(env)
    [model] = registry.list("model", state="succeeded")
    assert model.blessed is False
    assert any("min_miou 1.000" in reason for reason in model.meta["blessing_reasons"])
    assert registry.list("package") == []
    assert f"model {model.ref} is not blessed, nothing to serve" in log and "min_miou 1.000" in log
    assert "skipped" in log.lower()
