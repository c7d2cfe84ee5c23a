import datetime as dt

import pytest

from pipeline import orchestration
from pipeline.config import ConfigError
from pipeline.errors import StageFailed


def test_cumulative_window_takes_everything_before_the_end_of_the_day():
    cfg = orchestration.run_config({"window": "cumulative"}, "2026-11-02T00:00:00+00:00", "2026-11-03T00:00:00+00:00")
    assert cfg.ingest.date_from == "" and cfg.ingest.date_to == "2026-11-03"


def test_rolling_window_and_params_map_onto_config():
    cfg = orchestration.run_config({"window": "rolling", "window_days": 2, "epochs": 3, "backend": "ddp", "np": 1,
                                    "force": True}, dt.datetime(2026, 11, 4), dt.datetime(2026, 11, 5))
    assert (cfg.ingest.date_from, cfg.ingest.date_to) == ("2026-11-03", "2026-11-05")
    assert (cfg.train.epochs, cfg.train.backend, cfg.train.np, cfg.force) == (3, "ddp", 1, True)


def test_triggered_run_without_interval_takes_everything_until_now():
    cfg = orchestration.run_config({}, None, None)
    assert cfg.ingest.date_to == (dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)).isoformat()


def test_bad_params_fail_clearly():
    with pytest.raises(ConfigError, match="window"):
        orchestration.run_config({"window": "weekly"})
    with pytest.raises(ConfigError, match="train.backend"):
        orchestration.run_config({"backend": "mpi"})


def test_unblessed_model_is_refused_with_reasons():
    orchestration.require_blessed({"blessed": True})
    with pytest.raises(StageFailed, match="not blessed.*mIoU 0.1 < 0.3"):
        orchestration.require_blessed({"model": "model:x@v1", "blessed": False, "reasons": ["mIoU 0.1 < 0.3"]})


@pytest.mark.parametrize("shares", [(0.8, 0.1, 0.1), (0.7, 0.2, 0.1)])
def test_dag_run_overrides_change_the_split_shares(shares, monkeypatch):
    cfg = orchestration.run_config({"ingest.train_share": shares[0], "ingest.test_share": shares[1]})
    assert (cfg.ingest.train_share, cfg.ingest.test_share, cfg.ingest.val_share) == shares
    # the worker's environment and the run's conf combine before the sum is checked
    monkeypatch.setenv("AVP_INGEST__TRAIN_SHARE", str(shares[0]))
    cfg = orchestration.run_config({"ingest.test_share": shares[1]})
    assert (cfg.ingest.train_share, cfg.ingest.test_share) == shares[:2]
    with pytest.raises(ConfigError, match="sum to 1"):
        orchestration.run_config({"ingest.test_share": 0.5})


def test_dag_params_keep_their_names_defaults_and_checks():
    params = orchestration.dag_params()
    assert set(params) >= {"epochs", "backend", "np", "force", "window", "window_days", "split"}
    assert {name: params[name]["default"] for name in ("epochs", "backend", "np", "force", "window",
                                                       "window_days", "split")} == {
        "epochs": None, "backend": None, "np": None, "force": False, "window": "cumulative", "window_days": 7,
        "split": None}
    assert params["epochs"]["type"] == ["null", "integer"] and params["epochs"]["minimum"] == 1
    assert params["backend"]["enum"] == [None, "horovod", "ddp"] and params["split"]["enum"] == [None, "hash", "geo"]
    assert params["force"]["type"] == "boolean"
    assert params["epochs"]["description"].startswith("passes over the train split (train.epochs")


def test_until_skips_the_stages_after_it_and_a_given_dataset_skips_ingest():
    from airflow.sdk.exceptions import AirflowSkipException

    for until, runs in (("validate", []), ("train", ["train"]), ("serve", ["train", "evaluate", "serve"])):
        ran = []
        for stage in ("train", "evaluate", "serve"):
            try:
                orchestration.skip_past_until(stage, {"until": until})
                ran.append(stage)
            except AirflowSkipException as why:
                assert f"until={until}" in str(why)
        assert ran == runs, until
    orchestration.skip_past_until("serve", {})  # default: the whole DAG
    with pytest.raises(ConfigError, match="DAG param until: 'deploy' is not allowed"):
        orchestration.skip_past_until("train", {"until": "deploy"})
    assert orchestration.ingest_or_given({"dataset": "dataset:fleet-lidar@v3"}) == "dataset:fleet-lidar@v3"
    assert orchestration.dag_params()["until"]["enum"] == list(orchestration.UNTIL_STAGES)
