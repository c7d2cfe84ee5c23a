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


@pytest.mark.parametrize("shares", [(0.8, 0.1, 0.1), (0.7, 0.2, 0.1)])
@pytest.mark.parametrize("reverse", [False, True])
def test_split_shares_can_be_changed_in_any_order(shares, reverse):
    """The sum rule runs once on the resolved config, not after each field (which made any change fail)."""
    pairs = [("ingest.train_share", str(shares[0])), ("ingest.test_share", str(shares[1]))]
    cfg = config.load(dict(reversed(pairs) if reverse else pairs), env={})
    assert (cfg.ingest.train_share, cfg.ingest.test_share, cfg.ingest.val_share) == shares


def test_split_shares_from_the_environment_and_mixed_with_overrides():
    cfg = config.load(env={"AVP_INGEST__TRAIN_SHARE": "0.8", "AVP_INGEST__TEST_SHARE": "0.1"})
    assert (cfg.ingest.train_share, cfg.ingest.test_share) == (0.8, 0.1)
    cfg = config.load({"ingest.test_share": "0.2"}, env={"AVP_INGEST__TRAIN_SHARE": "0.7"})
    assert (cfg.ingest.train_share, cfg.ingest.test_share, cfg.ingest.val_share) == (0.7, 0.2, 0.1)


def test_every_broken_rule_is_reported_once_with_the_values():
    with pytest.raises(ConfigError) as caught:
        config.load({"ingest.train_share": "0.8", "train.epochs": "0"}, env={})
    message = str(caught.value)
    assert "train_share 0.8 + test_share 0.15 + val_share 0.1 = 1.05" in message
    assert "config field train.epochs: 0 must be at least 1" in message


def test_set_value_coerces_without_checking_other_fields():
    cfg = config.load(env={})
    config.set_value(cfg, "ingest.train_share", "0.5")  # the shares do not sum to 1 until the next line
    config.set_value(cfg, "ingest.val_share", "0.35")
    config.check_rules(cfg)
    assert cfg.ingest.train_share == 0.5
    with pytest.raises(ConfigError, match="not a number"):
        config.set_value(cfg, "ingest.train_share", "half")


def test_field_documentation_is_the_fields_comment():
    helps = config.field_help(config.TrainConfig)
    assert helps["epochs"] == "passes over the train split"
    assert "model config overrides" in helps["model_options"]
    # a comment block above a field documents it when the line has no comment of its own
    assert config.field_help(config.EvaluateConfig)["latency_p99_budget_ms"].startswith("TorchScript p99")
    doc = config.describe("train.backend")
    assert (doc.default, doc.help) == ("horovod", "horovod (horovodrun --gloo) or ddp (torchrun)")
    with pytest.raises(ConfigError, match="unknown config field 'train.nope'"):
        config.describe("train.nope")
