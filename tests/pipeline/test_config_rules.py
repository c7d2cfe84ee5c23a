"""pipeline.config rules beyond the basics: every coercion (and its refusal, worded), tuples and Literals,
the environment's naming, the lower bounds at their edges, the share rule's tolerance, field help read
from comments, and the stable JSON every content key hashes."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from pipeline import config
from pipeline.config import ConfigError, coerce


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), ("1", True), ("true", True), ("Yes", True), (" ON ", True),
    ("0", False), ("false", False), ("no", False), ("OFF", False), (1, True), (0, False),
])
def test_booleans(value, expected):
    assert coerce("s.f", value, bool) is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, None, "tru"])
def test_not_booleans(value):
    with pytest.raises(ConfigError, match=rf"^config field s.f: {value!r} is not a boolean \(true/false\)$"):
        coerce("s.f", value, bool)


@pytest.mark.parametrize("value, expected", [("3", 3), (" 7 ", 7), (4, 4), (5.0, 5), ("-2", -2)])
def test_integers(value, expected):
    got = coerce("s.f", value, int)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", ["1.5", 1.5, True, False, "x", None, [1]])
def test_not_integers(value):
    with pytest.raises(ConfigError, match=rf"^config field s.f: {value!r} is not an integer$".replace("[", r"\[")):
        coerce("s.f", value, int)


@pytest.mark.parametrize("value, expected", [("0.25", 0.25), (2, 2.0), ("1e-3", 0.001), (" -1.5 ", -1.5)])
def test_floats(value, expected):
    got = coerce("s.f", value, float)
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value", [True, "half", None, {}])
def test_not_floats(value):
    with pytest.raises(ConfigError, match=rf"^config field s.f: {value!r} is not a number$"):
        coerce("s.f", value, float)


@pytest.mark.parametrize("value, expected", [("abc", "abc"), (3, "3"), (2.5, "2.5"), ("", "")])
def test_strings(value, expected):
    assert coerce("s.f", value, str) == expected


@pytest.mark.parametrize("value", [None, [1], {"a": 1}])
def test_not_strings(value):
    with pytest.raises(ConfigError, match=r"^config field s.f: .* is not a string$"):
        coerce("s.f", value, str)


def test_literals_accept_only_their_values():
    kind = Literal["a", "b"]
    assert coerce("s.f", "b", kind) == "b"
    with pytest.raises(ConfigError, match=r"^config field s.f: 'c' is not allowed; allowed values: a, b$"):
        coerce("s.f", "c", kind)


@pytest.mark.parametrize("value", ["-51.2,51.2", "[-51.2, 51.2]", " -51.2 , 51.2 ", [-51.2, "51.2"], (-51.2, 51.2),
                                   "-51.2,51.2,"])
def test_fixed_tuples_from_text_json_and_sequences(value):
    assert coerce("m.range", value, tuple[float, float]) == (-51.2, 51.2)


def test_variable_tuples_and_their_errors():
    assert coerce("m.c", "16,32,64", tuple[int, ...]) == (16, 32, 64)
    assert coerce("m.c", "[]", tuple[int, ...]) == ()
    with pytest.raises(ConfigError, match=r"^config field m.c\[1\]: 'x' is not an integer$"):
        coerce("m.c", "1,x", tuple[int, ...])
    with pytest.raises(ConfigError, match=r"^config field m.r: expected 2 values, got 3 \('1,2,3'\)$"):
        coerce("m.r", "1,2,3", tuple[float, float])
    with pytest.raises(ConfigError, match=r"^config field m.r: 5 is not a sequence$"):
        coerce("m.r", 5, tuple[float, float])
    with pytest.raises(ConfigError, match=r"^config field m.r\[0\]: 'a' is not a number$"):
        coerce("m.r", "a,2", tuple[float, float])


def test_an_unsupported_type_is_named():
    with pytest.raises(ConfigError, match=r"^config field s.f: unsupported type <class 'dict'>$"):
        coerce("s.f", "{}", dict)


# ---------------------------------------------------------------------------------------- setting values
def test_unknown_fields_list_what_exists():
    cfg = config.load(env={})
    with pytest.raises(ConfigError, match=r"unknown config field 'nope': the top level has evaluate, force, home, "):
        config.set_value(cfg, "nope", 1)
    with pytest.raises(ConfigError, match=r"unknown config field 'serve.nope': serve has aot_inductor, "
                                          r"approval_timeout_s, body_timeout_s, "):
        config.set_value(cfg, "serve.nope", 1)
    with pytest.raises(ConfigError, match=r"^config field 'seed' has no sub-fields$"):
        config.set_value(cfg, "seed.x", 1)


def test_top_level_fields_and_get_value():
    cfg = config.load(env={})
    config.set_value(cfg, "force", "yes")
    config.set_value(cfg, "seed", "9")
    assert cfg.force is True and cfg.seed == 9
    assert config.get_value(cfg, "seed") == 9 and config.get_value(cfg, "train.epochs") == cfg.train.epochs
    assert config.get_value(cfg, "train") is cfg.train


def test_environment_names_map_to_fields():
    env = {"AVP_HOME": "/h", "AVP_REGISTRY_URL": "sqlite:///r.db", "AVP_SEED": "5", "AVP_SERVE__PORT": "9000",
           "AVP_TRAIN__MODEL_OPTIONS": '{"a": 1}', "AVP_IGNORED": "x", "OTHER__X": "1", "AVP_EVALUATE__MIN_MIOU": "0.5"}
    cfg = config.load(env=env)
    assert (cfg.home, cfg.registry_url, cfg.seed, cfg.serve.port) == ("/h", "sqlite:///r.db", 5, 9000)
    assert cfg.train.model_options == '{"a": 1}' and cfg.evaluate.min_miou == 0.5


def test_empty_top_level_environment_values_are_ignored():
    cfg = config.load(env={"AVP_HOME": "", "AVP_SEED": ""})
    assert (cfg.home, cfg.seed) == (config.PipelineConfig().home, 0)


def test_load_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("AVP_TRAIN__EPOCHS", "11")
    assert config.load().train.epochs == 11
    assert config.load(env={}).train.epochs == config.TrainConfig().epochs


INCLUSIVE_MINIMUMS = sorted((path, bound.minimum) for path, bound in config.BOUNDS.items()
                            if bound.minimum is not None and not bound.exclusive_minimum
                            and not path.startswith("ingest.") and not path.endswith("_share"))


@pytest.mark.parametrize("path, minimum", INCLUSIVE_MINIMUMS)
def test_lower_bounds_are_inclusive(path, minimum):
    step = 1 if config.describe(path).annotation is int else 0.5
    assert config.get_value(config.load({path: minimum}, env={}), path) == minimum
    with pytest.raises(ConfigError, match=rf"^config field {re.escape(path)}: {minimum - step:g} must be at least "
                                          rf"{minimum:g}$"):
        config.load({path: minimum - step}, env={})


def test_shares_may_miss_one_by_float_noise_but_not_more():
    config.load({"ingest.train_share": 0.75 + 5e-7}, env={})  # within 1e-6
    with pytest.raises(ConfigError, match="must be >= 0 and sum to 1"):
        config.load({"ingest.train_share": 0.75 + 2e-6}, env={})


def test_a_negative_share_is_refused_even_when_the_sum_is_one():
    with pytest.raises(ConfigError, match=r"^config field ingest.train_share: 1.1 must be at most 1; "
                                          r"config field ingest.test_share: -0.2 must be at least 0$"):
        config.load({"ingest.train_share": 1.1, "ingest.test_share": -0.2}, env={})


def test_a_zero_share_is_allowed():
    cfg = config.load({"ingest.train_share": 0.9, "ingest.val_share": 0.0, "ingest.test_share": 0.1}, env={})
    assert cfg.ingest.val_share == 0.0


def test_parse_assignments_strips_keys_and_keeps_values():
    assert config.parse_assignments([" train.epochs =3", "a.b= x "]) == {"train.epochs": "3", "a.b": " x "}
    assert config.parse_assignments([]) == {}
    with pytest.raises(ConfigError, match=r"^--set expects section.field=value, got '=3'$"):
        config.parse_assignments(["=3"])


# ------------------------------------------------------------------------------------------ documentation
@dataclass
class Documented:
    """A section for the help reader."""

    plain: int = 1  # trailing comment
    # the comment above,
    # over two lines
    above: str = "x"
    none: float = 0.5
    # a comment above a field that has its own trailing comment
    both: bool = True  # the trailing one wins


def test_field_help_reads_trailing_and_above_comments():
    assert config.field_help(Documented) == {"plain": "trailing comment", "above": "the comment above, over two lines",
                                            "both": "the trailing one wins"}


def test_field_help_without_source_is_empty():
    Made = dataclasses.make_dataclass("Made", [("x", int, dataclasses.field(default=1))])
    assert config.field_help(Made) == {}


def test_describe_and_summary():
    doc = config.describe("train.epochs")
    assert (doc.path, doc.annotation, doc.default) == ("train.epochs", int, 4)
    assert doc.summary() == "passes over the train split (train.epochs, default 4)"
    top = config.describe("seed")
    assert top.summary() == "(seed, default 0)" and top.help == ""
    with pytest.raises(ConfigError, match=r"^unknown config field 'train'$"):
        config.describe("train")  # a section, not a field


def test_resolved_and_canonical_json():
    cfg = config.load(env={})
    assert config.resolved(cfg.train) == dataclasses.asdict(cfg.train)
    assert config.canonical_json({"b": 1, "a": [1, 2], "c": {"z": None, "y": 1.5}}) == (
        '{"a":[1,2],"b":1,"c":{"y":1.5,"z":null}}')
    assert config.canonical_json({"p": config.PipelineConfig}) == f'{{"p":"{config.PipelineConfig}"}}'


def test_a_field_below_a_field_is_refused_naming_the_field():
    cfg = config.load(env={})
    with pytest.raises(ConfigError, match=r"^config field 'train.epochs' has no sub-fields$"):
        config.set_value(cfg, "train.epochs.x", 1)


def test_an_environment_name_splits_at_its_first_double_underscore():
    with pytest.raises(ConfigError, match=r"unknown config field 'train.epochs__x'"):
        config.load(env={"AVP_TRAIN__EPOCHS__X": "1"})


def test_broken_rules_are_joined_in_one_message():
    with pytest.raises(ConfigError) as caught:
        config.load({"train.np": 0, "train.epochs": 0}, env={})
    assert str(caught.value) == ("config field train.np: 0 must be at least 1; "
                                 "config field train.epochs: 0 must be at least 1")


# ------------------------------------------------------------------------------------------------ ranges
# The ranges are built in the test, not at collection: `make mutate` switches a mutant on only while a test runs.
@pytest.mark.parametrize("make_bound, inside, outside", [
    (lambda: config._positive(5), [1e-9, 5], {0: "must be above 0", 5.5: "must be at most 5"}),
    (lambda: config._at_least(1, 9), [1, 9], {0.5: "must be at least 1", 10: "must be at most 9"}),
    (lambda: config._at_least(0), [0, 1e12], {-1: "must be at least 0"}),
    (lambda: config.Bound(0, 1, exclusive_maximum=True), [0, 0.999], {1: "must be below 1", -0.1: "must be at least 0"}),
    (lambda: config.Bound(), [-1e300, 1e300], {float("nan"): "is not a number (NaN)"}),
])
def test_a_range_says_which_side_a_value_is_out_on(make_bound, inside, outside):
    bound = make_bound()
    assert [bound.problem(v) for v in inside] == [None] * len(inside)
    assert {v: bound.problem(v) for v in outside} == outside


@pytest.mark.parametrize("make_bound, schema", [
    (lambda: config.Bound(0, 1), {"minimum": 0, "maximum": 1}),
    (lambda: config.Bound(0, 1, exclusive_minimum=True, exclusive_maximum=True),
     {"exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    (lambda: config._positive(), {"exclusiveMinimum": 0}),
    (lambda: config._at_least(2), {"minimum": 2}),
    (lambda: config.Bound(maximum=3), {"maximum": 3}),
    (lambda: config.Bound(), {}),
])
def test_a_range_is_the_same_as_json_schema(make_bound, schema):
    assert make_bound().json_schema() == schema


@pytest.mark.parametrize("overrides, name", [({}, config.FLEET_DATASET), ({"ingest.source": "kitti"}, "kitti"),
                                             ({"ingest.source": "av2", "ingest.dataset_name": "mine"}, "mine")])
def test_the_dataset_name_defaults_to_the_fleet_or_the_source(overrides, name):
    assert config.load(overrides, env={}).ingest.dataset_name == name
