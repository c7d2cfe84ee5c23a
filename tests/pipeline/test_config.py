import pytest

from pipeline import config
from pipeline.config import ConfigError


def test_defaults_are_valid_and_resolved_is_complete():
    cfg = config.load(env={})
    data = config.resolved(cfg)
    assert data["train"]["backend"] == "horovod"
    assert set(data) >= {"home", "registry_url", "simulate", "ingest", "validate", "train", "evaluate", "serve"}


def test_environment_then_explicit_overrides_win():
    env = {"AVP_HOME": "/tmp/somewhere", "AVP_TRAIN__EPOCHS": "7", "AVP_TRAIN__BACKEND": "ddp"}
    cfg = config.load({"train.epochs": "3"}, env=env)
    assert cfg.home == "/tmp/somewhere"
    assert cfg.train.backend == "ddp"
    assert cfg.train.epochs == 3  # the flag beats the environment


@pytest.mark.parametrize("field, value, message", [
    ("train.backend", "mpi", "allowed values: horovod, ddp"),
    ("train.epochs", "three", "train.epochs: 'three' is not an integer"),
    ("train.epochs", "1.5", "is not an integer"),
    ("validate.warn_only", "maybe", "is not a boolean"),
    ("train.nonsense", "1", "unknown config field 'train.nonsense'"),
    ("nosection.x", "1", "unknown config field 'nosection.x'"),
    ("train", "1", "is a section"),
    ("train.np", "0", "train.np: 0 must be at least 1"),
])
def test_bad_values_name_the_field_and_what_is_allowed(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load({field: value}, env={})


def test_split_shares_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        config.load({"ingest.train_share": "0.8"}, env={})


def test_bad_environment_variable_is_reported_with_its_field():
    with pytest.raises(ConfigError, match="ingest.split"):
        config.load(env={"AVP_INGEST__SPLIT": "random"})


def test_parse_assignments_rejects_pairs_without_equals():
    assert config.parse_assignments(["a.b=1", "c.d=x=y"]) == {"a.b": "1", "c.d": "x=y"}
    with pytest.raises(ConfigError, match="--set expects"):
        config.parse_assignments(["train.epochs"])
