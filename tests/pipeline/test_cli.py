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
