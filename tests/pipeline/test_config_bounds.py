"""Every config field has its range (numbers) or format (dates, Spark masters), checked wherever a value
comes from: environment variables, ``--set``, stage flags and DAG params; and bad input at the command
line is one line and exit 2, never a traceback."""

from __future__ import annotations

import math
import subprocess

import pytest

from pipeline import config, orchestration
from pipeline.config import ConfigError
from tests.reliability.corrupt_logs import read_capability_dropped


def test_every_numeric_field_has_a_range():
    numeric = set(config.numeric_fields())
    assert numeric - set(config.BOUNDS) == set(), "add these fields' ranges to pipeline.config.BOUNDS"
    assert set(config.BOUNDS) - numeric == set(), "BOUNDS names fields that are not numeric fields"
    defaults = config.PipelineConfig()
    for path, bound in config.BOUNDS.items():  # the defaults are in range
        assert bound.problem(config.get_value(defaults, path)) is None, path


@pytest.mark.parametrize("field, value, message", [
    ("simulate.beams", "0", "simulate.beams: 0 must be at least 1"),
    ("simulate.days", "0", "simulate.days: 0 must be at least 1"),
    ("simulate.dropout", "2", "simulate.dropout: 2.0 must be below 1"),
    ("simulate.start_date", "notadate", "simulate.start_date: 'notadate' is not a date YYYY-MM-DD"),
    ("simulate.start_date", "2026-02-30", "'2026-02-30' is not a real date"),
    ("ingest.reader_ranks", "0", "ingest.reader_ranks: 0 must be at least 1"),
    ("ingest.max_points", "-1", "ingest.max_points: -1 must be at least 1"),
    ("ingest.train_share", "nan", "ingest.train_share: 'nan' is not a number"),
    ("ingest.date_to", "tomorrow", "ingest.date_to: 'tomorrow' is not a date YYYY-MM-DD or empty"),
    ("ingest.spark_master", "bogus://x:1", "ingest.spark_master: 'bogus://x:1' is not a Spark master URL"),
    ("ingest.spark_master", "local[0]", "is not a Spark master URL"),
    ("train.np", "100000", "train.np: 100000 must be at most 1024"),
    ("train.lr", "0", "train.lr: 0.0 must be above 0"),
    ("serve.port", "99999", "serve.port: 99999 must be at most 65535"),
    ("validate.max_class_share", "1.5", "validate.max_class_share: 1.5 must be at most 1"),
])
def test_out_of_range_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config.load({field: value}, env={})
    env_var = "AVP_" + field.replace(".", "__").upper()  # the same from the environment
    with pytest.raises(ConfigError, match=field):
        config.load(env={env_var: value})


def test_nan_never_passes_a_range_even_when_set_directly():
    cfg = config.load(env={})
    cfg.ingest.train_share = math.nan  # bypassing coercion: check_rules still refuses it
    with pytest.raises(ConfigError, match="ingest.train_share: nan is not a number"):
        config.check_rules(cfg)


def test_valid_spark_masters_and_dates_pass():
    for master in ("local", "local[1]", "local[*]", "local[4,2]", "spark://h1:7077", "spark://a:7077,b:7077",
                   "yarn", "k8s://https://k.example:443"):
        assert config.load({"train.spark_master": master}, env={}).train.spark_master == master
    assert config.load({"ingest.spark_master": "", "ingest.date_from": "2026-11-01"}, env={}).ingest.date_from


def test_dag_params_carry_each_range_and_refuse_undeclared_conf():
    params = orchestration.dag_params()
    assert (params["np"]["minimum"], params["np"]["maximum"]) == (1, 1024)
    assert (params["ingest.train_share"]["minimum"], params["ingest.train_share"]["maximum"]) == (0, 1)
    assert "spark_master" not in params  # the master is the deployment's, not a trigger's
    for hostile in ({"ingest.spark_master": "spark://evil:7077"}, {"spark_master": "spark://evil:7077"},
                    {"home": "/"}, {"train.launcher": "spark"}, {"registry_url": "sqlite:////tmp/other.db"}):
        with pytest.raises(ConfigError, match="which the DAG does not declare"):
            orchestration.run_config(hostile)
    with pytest.raises(ConfigError, match="train.np: 100000 must be at most 1024"):
        orchestration.run_config({"np": 100000})
    with pytest.raises(ConfigError, match="ingest.train_share"):
        orchestration.run_config({"ingest.train_share": math.nan})
    cfg = orchestration.run_config({"np": 2}, deployment={"train.launcher": "spark", "train.spark_master": "local[2]"})
    assert (cfg.train.np, cfg.train.launcher) == (2, "spark")  # the DAG's own overrides still apply


def test_airflow_validates_the_params_ranges():
    from airflow.sdk import Param

    spec = orchestration.dag_params()["np"]
    param = Param(**spec)
    assert param.resolve(4) == 4
    with pytest.raises(Exception, match="1024"):
        param.resolve(100000)


def avp(env, *args, prefix=()):
    return subprocess.run([*prefix, "avp", *args], env=env, capture_output=True, text=True, timeout=120)


def _one_line_exit_2(out, *pieces):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avp: error:"), out.stderr
    for piece in pieces:
        assert piece in lines[0], lines[0]


def test_bad_flags_exit_2_with_one_line(avp_env):
    _one_line_exit_2(avp(avp_env, "simulate", "--start-date", "notadate"), "simulate.start_date")
    _one_line_exit_2(avp(avp_env, "simulate", "--days", "0"), "simulate.days: 0 must be at least 1")
    _one_line_exit_2(avp(avp_env, "serve-http", "--port", "99999", "--package", "x"), "serve.port")
    _one_line_exit_2(avp(avp_env, "ingest", "--spark-master", "nonsense"), "ingest.spark_master")
    _one_line_exit_2(avp(avp_env, "registry", "show", "dataset:x@v99999999999999999999999"), "out of range")
    _one_line_exit_2(avp(avp_env, "registry", "show", "99999999999999999999999"), "no artifact with id")


def test_a_home_that_is_not_a_writable_folder_is_one_line(avp_env, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    _one_line_exit_2(avp(dict(avp_env, AVP_HOME=str(not_a_folder)), "registry", "list"), str(not_a_folder))
    # read-only: a fresh home (nothing can be created) and a home whose registry exists (SQLite cannot open it)
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    fresh.mkdir()
    assert avp(dict(avp_env, AVP_HOME=str(used)), "registry", "list").returncode == 0
    for home in (fresh, used):
        for path in (home, *home.rglob("*")):
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        _one_line_exit_2(avp(dict(avp_env, AVP_HOME=str(fresh)), "registry", "list",
                             prefix=read_capability_dropped()), "not usable")
        _one_line_exit_2(avp(dict(avp_env, AVP_HOME=str(used)), "registry", "list",
                             prefix=read_capability_dropped()), "cannot open the registry")
    finally:
        for home in (fresh, used):
            for path in (home, *home.rglob("*")):
                path.chmod(0o755)


def test_simulate_force_with_a_bad_value_leaves_the_good_logs_alone(avp_env, tmp_path):
    tiny = ["--logs", "1", "--frames", "1", "--set", "simulate.beams=4", "--set", "simulate.azimuth_steps=16"]
    assert avp(avp_env, "simulate", *tiny).returncode == 0
    [log] = (tmp_path / "home" / "logs").glob("*.mcap")
    before = log.read_bytes()
    _one_line_exit_2(avp(avp_env, "simulate", *tiny, "--force", "--set", "simulate.dropout=2"), "simulate.dropout")
    assert log.read_bytes() == before
