import json
import subprocess


def avp(env, *args):
    return subprocess.run(["avp", *args], env=env, capture_output=True, text=True, timeout=120)


def test_version(avp_env):
    out = avp(avp_env, "--version")
    assert out.returncode == 0 and out.stdout.startswith("avp 0.")


def test_unknown_artifact_exits_2_with_one_clear_line(avp_env):
    out = avp(avp_env, "registry", "show", "dataset:does-not-exist")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no succeeded version of 'dataset:does-not-exist'" in lines[0]


def test_bad_config_exits_2_naming_field_and_allowed_values(avp_env):
    out = avp(avp_env, "config", "show", "--set", "train.backend=mpi")
    assert out.returncode == 2
    assert out.stderr.strip() == ("avp: error: config field train.backend: 'mpi' is not allowed; "
                                  "allowed values: horovod, ddp")
    env = dict(avp_env, AVP_SIMULATE__LOGS="many")
    out = avp(env, "config", "show")
    assert out.returncode == 2 and "simulate.logs: 'many' is not an integer" in out.stderr


def test_unknown_flag_and_command_exit_2(avp_env):
    for args in (["registry", "list", "--bogus"], ["teleport"], ["registry", "promote"]):
        out = avp(avp_env, *args)
        assert out.returncode == 2, args
        assert out.stderr.startswith("avp: error:") and len(out.stderr.strip().splitlines()) == 1


def test_config_show_resolves_flags_env_and_set(avp_env):
    env = dict(avp_env, AVP_TRAIN__EPOCHS="9")
    out = avp(env, "config", "show", "--set", "ingest.split=geo")
    data = json.loads(out.stdout)
    assert data["train"]["epochs"] == 9 and data["ingest"]["split"] == "geo"
    assert data["home"] == avp_env["AVP_HOME"]


def test_registry_commands_on_real_artifacts(avp_env, tmp_path):
    from pipeline import config
    from pipeline.registry import Registry

    registry = Registry.open(config.load({"home": avp_env["AVP_HOME"]}, env={}))
    data = registry.build("dataset", "fleet", entry_point="t", config={}, builder=lambda s, r: None)
    model = registry.build("model", "seg", entry_point="t", config={}, parents=[data], builder=lambda s, r: None)
    out = avp(avp_env, "registry", "lineage", "model:seg@v1")
    assert out.returncode == 0 and "dataset:fleet@v1" in out.stdout
    out = avp(avp_env, "registry", "promote", model.ref)
    assert out.returncode == 2 and "not blessed" in out.stderr
    registry.set_blessing(model.id, True)
    out = avp(avp_env, "registry", "promote", model.ref)
    assert out.returncode == 0 and "perception/seg/1.0" in out.stdout
    out = avp(avp_env, "registry", "rollback", "perception/seg")
    assert out.returncode == 2 and "no previous version" in out.stderr
    out = avp(avp_env, "registry", "deprecate", data.ref, "--reason", "old")
    assert out.returncode == 0 and "deprecated" in out.stdout
    out = avp(avp_env, "registry", "show", data.ref)
    assert json.loads(out.stdout)["state"] == "deprecated"


def test_split_shares_via_set_in_either_order_and_via_environment(avp_env):
    for order in (["ingest.train_share=0.8", "ingest.test_share=0.1"],
                  ["ingest.test_share=0.1", "ingest.train_share=0.8"]):
        out = avp(avp_env, "config", "show", "--set", order[0], "--set", order[1])
        assert out.returncode == 0, out.stderr
        ingest = json.loads(out.stdout)["ingest"]
        assert (ingest["train_share"], ingest["test_share"], ingest["val_share"]) == (0.8, 0.1, 0.1)
    env = dict(avp_env, AVP_INGEST__TRAIN_SHARE="0.7", AVP_INGEST__TEST_SHARE="0.2")
    out = avp(env, "config", "show")
    assert out.returncode == 0, out.stderr
    ingest = json.loads(out.stdout)["ingest"]
    assert (ingest["train_share"], ingest["test_share"], ingest["val_share"]) == (0.7, 0.2, 0.1)
    out = avp(avp_env, "config", "show", "--set", "ingest.train_share=0.8")
    assert out.returncode == 2 and "must be >= 0 and sum to 1" in out.stderr and "= 1.05" in out.stderr


def test_stage_flags_set_their_config_fields(avp_env):
    """Every flag the README and docs show still parses, onto the field it always set."""
    from pipeline import cli

    cases = {
        ("simulate", "--logs", "5", "--frames", "6", "--days", "2", "--start-date", "2026-12-01", "--seed", "3"):
            {"simulate.logs": 5, "simulate.frames": 6, "simulate.days": 2, "simulate.start_date": "2026-12-01",
             "simulate.seed": 3},
        ("ingest", "--split", "geo", "--date-from", "2026-11-01", "--date-to", "2026-11-03", "--name", "d",
         "--spark-master", "local[1]", "--source", "kitti", "/data/kitti", "--force"):
            {"ingest.split": "geo", "ingest.date_from": "2026-11-01", "ingest.date_to": "2026-11-03",
             "ingest.dataset_name": "d", "ingest.spark_master": "local[1]", "ingest.source": "kitti",
             "ingest.source_path": "/data/kitti", "force": True},
        ("validate", "--warn-only"): {"validate.warn_only": True},
        ("train", "--backend", "ddp", "--np", "1", "--epochs", "2", "--model", "bev_segnet", "--batch-size", "4"):
            {"train.backend": "ddp", "train.np": 1, "train.epochs": 2, "train.model": "bev_segnet",
             "train.batch_size": 4},
        ("evaluate", "--latency-runs", "3", "--min-miou", "0.2", "--max-regression", "0.1", "--device", "cpu"):
            {"evaluate.latency_runs": 3, "evaluate.min_miou": 0.2, "evaluate.max_regression": 0.1,
             "evaluate.device": "cpu"},
        ("serve", "--example-points", "100", "--max-points", "1000"):
            {"serve.example_points": 100, "serve.max_points": 1000},
        ("serve-http", "--package", "p", "--host", "0.0.0.0", "--port", "9000"):
            {"serve.host": "0.0.0.0", "serve.port": 9000},
    }
    for argv, expected in cases.items():
        cfg = cli._load_config(cli.build_parser().parse_args([*argv, "--home", avp_env["AVP_HOME"]]))
        got = {path: config_value(cfg, path) for path in expected}
        assert got == expected, argv
    inputs = cli.build_parser().parse_args(["train", "--dataset", "3", "--resume"])
    assert (getattr(inputs, "input:dataset"), getattr(inputs, "input:resume")) == ("3", True)


def config_value(cfg, dotted):
    from pipeline import config

    return config.get_value(cfg, dotted)


def test_stage_flag_breaking_a_rule_exits_2_before_the_stage_runs(avp_env):
    out = avp(avp_env, "train", "--epochs", "0")
    assert out.returncode == 2 and out.stderr.strip() == "avp: error: config field train.epochs: 0 must be at least 1"
    out = avp(avp_env, "serve-http")
    assert out.returncode == 2 and "--package" in out.stderr
