"""Stage specs: the one declaration a stage needs. A toy stage registered here shows up in the CLI (flags and
their help), runs through ``invoke``, rejects a misspelled input, and offers its DAG param."""

import ast
import importlib.util

import pytest

from pipeline import cli, config, orchestration, stages
from pipeline.errors import UserError
from pipeline.registry import KINDS, Registry


def toy_run(cfg, registry, say=print, run_id="", thing=None, loud=False):
    """The toy stage's entry function: records a 'log' artifact keyed by its config and input."""
    art = registry.build("log", "toy", entry_point="tests.pipeline.test_stages:toy_run",
                         config={"logs": cfg.simulate.logs, "thing": thing}, builder=lambda staging, record: None)
    say(f"toy built {art.ref}")
    return {"ref": art.ref, "logs": cfg.simulate.logs, "thing": thing, "loud": loud}


TOY = stages.StageSpec(
    "toy", "tests.pipeline.test_stages:toy_run", help="a toy stage registered by a test", section="simulate",
    produces="log", flags=(stages.Flag("logs", param="toy_logs"), stages.Flag("seed", name="--toy-seed")),
    inputs=(stages.Input("thing", "which thing to build"), stages.Input("loud", "say more", switch=True)))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(stages, "STAGES", dict(stages.STAGES))  # registered for this test only
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # cli.main must not take over pytest's SIGTERM
    return stages.register(TOY)


def test_toy_stage_appears_in_the_cli_with_its_flags_and_help(toy, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0 and "a toy stage registered by a test" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["toy", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--logs LOGS number of drive logs (simulate.logs, default 24)" in text
    assert "--toy-seed SEED random seed (same seed, same bytes) (simulate.seed, default 0)" in text
    assert "--thing THING which thing to build" in text and "--loud say more" in text and "--force" in text


def test_toy_stage_runs_from_the_cli_through_invoke(toy, tmp_path, capsys):
    home = str(tmp_path / "home")
    assert cli.main(["toy", "--home", home, "--logs", "3", "--thing", "box", "--loud"]) == 0
    out = capsys.readouterr().out
    assert "toy built log:toy@v1" in out and "thing: box" in out and "loud: True" in out
    art = Registry.open(config.load({"home": home}, env={})).get("log:toy@v1")
    assert art.state == "succeeded"
    runs = list((tmp_path / "home" / "runs").iterdir())
    assert len(runs) == 1 and "toy" in runs[0].name  # invoke recorded the run


def test_misspelled_input_is_an_error_naming_stage_input_and_allowed(toy, cfg):
    with pytest.raises(UserError, match="stage 'toy' has no input 'thng'; its inputs are: thing, loud"):
        stages.invoke("toy", cfg, thng="box")
    with pytest.raises(UserError, match="stage 'train' has no input 'datset'; its inputs are: dataset, resume"):
        stages.invoke("train", cfg, datset="1")
    with pytest.raises(UserError, match="unknown stage 'tarin'"):
        stages.invoke("tarin", cfg)


def test_toy_stage_params_appear_in_the_dag_params(toy):
    params = orchestration.dag_params()
    assert params["toy_logs"]["type"] == ["null", "integer"] and params["toy_logs"]["minimum"] == 1
    assert params["toy_logs"]["description"].startswith("number of drive logs")
    assert orchestration.run_config({"toy_logs": 5}).simulate.logs == 5


def test_a_spec_is_checked_when_registered(toy):
    with pytest.raises(ValueError, match="already registered"):
        stages.register(TOY)
    with pytest.raises(ValueError, match="'widget', not a registry kind"):
        stages.register(stages.StageSpec("w", "m:f", help="", section="simulate", produces="widget"))
    with pytest.raises(config.ConfigError, match="simulate.nope"):
        stages.register(stages.StageSpec("w", "m:f", help="", section="simulate", produces="log",
                                         flags=(stages.Flag("nope"),)))
    with pytest.raises(ValueError, match="DAG param 'epochs' of stage 'w' already sets train.epochs"):
        stages.register(stages.StageSpec("w", "m:f", help="", section="simulate", produces="log",
                                         flags=(stages.Flag("logs", param="epochs"),)))


def test_every_stage_produces_a_registry_kind_and_its_entry_takes_exactly_its_inputs():
    """Read from the entry modules' source, so the check imports no torch or Spark."""
    for spec in stages.STAGES.values():
        assert spec.produces in KINDS or not spec.produces, spec.name
        module, _, func = spec.entry.partition(":")
        tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
        entry = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
        assert entry.args.kwarg is None, f"{spec.entry} accepts **{entry.args.kwarg.arg}"
        names = [a.arg for a in entry.args.args + entry.args.kwonlyargs]
        declared = {i.name for i in spec.inputs}
        if spec.produces:
            assert set(names) - {"cfg", "registry", "say", "run_id"} == declared, spec.name
        else:  # a command may take optional keywords the CLI does not use (serve-http's host/port: config)
            assert declared <= set(names), spec.name
