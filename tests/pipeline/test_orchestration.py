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
