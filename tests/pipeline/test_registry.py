import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.registry import (
    BuildInProgress,
    IllegalTransition,
    NotFound,
    PromotionRefused,
    Registry,
    RegistryError,
    _now,
    parse_ref,
)
from tests.conftest import VENV_BIN

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(registry_cfg):
    """Every test here that uses the registry runs twice: on SQLite and on PostgreSQL."""
    return registry_cfg


def _write(content):
    def builder(staging, _record):
        Path(staging, "data.txt").write_text(content)
        return {"rows": len(content)}
    return builder


def _build(registry, name="fleet", config=None, parents=(), force=False, kind="dataset", content="x"):
    return registry.build(kind, name, entry_point="tests:build", config=config or {"a": 1},
                          builder=_write(content), parents=parents, force=force)


def test_build_publishes_atomically_with_provenance(registry):
    art = _build(registry)
    assert art.ref == "dataset:fleet@v1" and art.state == "succeeded"
    assert Path(art.location, "data.txt").read_text() == "x"
    assert art.meta["rows"] == 1 and "_staging" not in art.meta
    assert len(art.git_sha) >= 7 and art.entry_point == "tests:build" and art.config == {"a": 1}
    assert [e["to_state"] for e in registry.events(art.id)] == ["registered", "building", "succeeded"]
    # no staging folder is left beside the published version
    assert sorted(os.listdir(Path(art.location).parent)) == ["v1"]


def test_lifecycle_and_illegal_transitions(registry):
    art = _build(registry)
    with pytest.raises(IllegalTransition, match="is succeeded; it cannot become building"):
        registry.transition(art.id, "building")
    with pytest.raises(IllegalTransition, match="cannot become end_of_life"):
        registry.end_of_life(art.id)
    assert registry.deprecate(art.id, "superseded").state == "deprecated"
    assert registry.end_of_life(art.id).state == "end_of_life"
    with pytest.raises(IllegalTransition, match="final state"):
        registry.deprecate(art.id)
    with pytest.raises(IllegalTransition, match="unknown state"):
        registry.transition(art.id, "happy")


def test_failed_build_is_marked_failed_and_leaves_no_files(registry):
    def broken(staging, _record):
        Path(staging, "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        registry.build("dataset", "fleet", entry_point="tests:broken", config={}, builder=broken)
    [art] = registry.list("dataset", "fleet")
    assert art.state == "failed" and "disk full" in art.reason
    assert not Path(art.location).exists()
    assert os.listdir(Path(art.location).parent) == []
    with pytest.raises(NotFound):
        registry.get("dataset:fleet")  # nothing succeeded


def test_cache_hit_and_force(registry):
    first = _build(registry)
    again = _build(registry)
    assert again.cached and again.id == first.id
    changed = _build(registry, config={"a": 2})
    assert not changed.cached and changed.version == 2
    forced = _build(registry, force=True)
    assert not forced.cached and forced.version == 3
    # a new parent version changes the content key of the child
    model = _build(registry, kind="model", name="seg", parents=[first])
    assert _build(registry, kind="model", name="seg", parents=[first]).cached
    assert not _build(registry, kind="model", name="seg", parents=[changed]).cached
    assert model.version == 1


def test_lineage_up_and_down(registry):
    logs = _build(registry, kind="log", name="log-0001")
    data = _build(registry, parents=[logs])
    model = _build(registry, kind="model", name="seg", parents=[data])
    metrics = _build(registry, kind="metrics", name="seg", parents=[model, data])
    package = _build(registry, kind="package", name="seg", parents=[model, metrics])
    up = {(d, a.ref) for d, a in registry.lineage(package.ref, "up")}
    assert up == {(1, model.ref), (1, metrics.ref), (2, data.ref), (3, logs.ref)}
    down = [a.ref for _d, a in registry.lineage(logs.id, "down")]
    assert down == [data.ref, model.ref, metrics.ref, package.ref]


def test_parents_must_have_succeeded(registry):
    art = _build(registry)
    registry.deprecate(art.id)
    with pytest.raises(RegistryError, match="only succeeded artifacts can be built on"):
        _build(registry, kind="model", name="seg", parents=[registry.get(art.id)])


def test_promotion_requires_blessing_and_rollback_restores(registry):
    m1 = _build(registry, kind="model", name="seg", content="1")
    with pytest.raises(PromotionRefused, match="not blessed"):
        registry.promote(m1.id, "perception", "seg")
    data = _build(registry)
    with pytest.raises(PromotionRefused, match="only models and packages"):
        registry.promote(data.id, "perception", "seg")
    registry.set_blessing(m1.id, True, ["mIoU 0.61 >= 0.30"])
    p1 = registry.promote(m1.id, "perception", "seg")
    assert p1.label == "perception/seg/1.0" and p1.status == "production"

    m2 = _build(registry, kind="model", name="seg", config={"a": 2})
    registry.set_blessing(m2.id, True)
    # a package inherits the blessing of its model
    pkg = _build(registry, kind="package", name="seg", parents=[m2])
    p2 = registry.promote(pkg.id, "perception", "seg")
    assert p2.label == "perception/seg/1.1"
    statuses = {p.label: p.status for p in registry.promotions("perception", "seg")}
    assert statuses == {"perception/seg/1.0": "previous", "perception/seg/1.1": "production"}

    back = registry.rollback("perception", "seg")
    assert back.label == "perception/seg/1.0" and back.artifact_id == m1.id
    assert registry.production("perception", "seg").artifact_id == m1.id
    with pytest.raises(PromotionRefused, match="no previous version"):
        registry.rollback("perception", "seg")


def test_unblessed_verdict_blocks_promotion(registry):
    m = _build(registry, kind="model", name="seg")
    registry.set_blessing(m.id, False, ["mIoU 0.10 < 0.30"])
    assert registry.get(m.id).meta["blessing_reasons"] == ["mIoU 0.10 < 0.30"]
    with pytest.raises(PromotionRefused):
        registry.promote(m.id, "perception", "seg")


@pytest.mark.parametrize("ref", ["dataset:../x@v1", "widget:x", "dataset:x@vten"])
def test_bad_references_are_rejected(ref):
    with pytest.raises(NotFound):
        parse_ref(ref)


def _worker(mode, cfg, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVP_")}
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.registry_worker", mode, cfg.home,
                             cfg.registry_url, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_build_is_never_succeeded_and_rerun_recovers(cfg):
    proc = _worker("killed-build", cfg)
    assert proc.stdout.readline().strip() == "STARTED", proc.stderr.read()
    registry = Registry.open(cfg)
    [art] = registry.list("dataset", "victim")
    assert art.state == "building"
    staging = art.meta["_staging"][0]
    assert Path(staging, "part-0").exists()
    with pytest.raises(BuildInProgress, match="being built by pid"):
        registry.build("dataset", "victim", entry_point="tests:killed", config={"n": 1}, builder=_write("y"))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert registry.get(art.id).state == "building"  # nothing marked it good
    # same host, pid gone: taken over at once, long before its lease (60 s by default) would expire
    assert registry.get(art.id).lease_until > _now()
    rebuilt = registry.build("dataset", "victim", entry_point="tests:killed", config={"n": 1},
                             builder=_write("complete"))
    assert registry.get(art.id).state == "aborted"
    assert "ended during the build" in registry.get(art.id).reason
    assert not Path(staging).exists()
    assert rebuilt.state == "succeeded" and rebuilt.version == 2 and not rebuilt.cached
    assert Path(rebuilt.location, "data.txt").read_text() == "complete"


def test_two_processes_register_and_promote_concurrently(cfg):
    procs = [_worker("hammer", cfg, tag, "12") for tag in ("a", "b")]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    registry = Registry.open(cfg)
    models = registry.list("model", "segnet")
    assert sorted(m.version for m in models) == list(range(1, 25))
    assert all(m.state == "succeeded" for m in models)
    promos = registry.promotions("perception", "segnet")
    assert sorted(p.minor for p in promos) == list(range(24))
    assert [p.status for p in promos].count("production") == 1


def test_avp_stage_and_registry_list_on_postgresql(postgres_url, avp_env):
    cfg = config.load({"home": avp_env["AVP_HOME"], "registry_url": postgres_url}, env={})
    art = _build(Registry.open(cfg), name="on-postgres")
    # the plain scheme (psycopg is the driver) and a password (the test server trusts; never printed)
    plain = postgres_url.replace("postgresql+psycopg://avp@", "postgresql://avp:s3cret@")
    env = dict(avp_env, AVP_REGISTRY_URL=plain, COLUMNS="250")  # wide enough for the whole table
    avp = str(VENV_BIN / "avp")
    out = subprocess.run([avp, "simulate", "--logs", "1", "--frames", "2"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(list(Path(avp_env["AVP_HOME"], "logs").glob("*.mcap"))) == 1
    out = subprocess.run([avp, "registry", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"artifacts in {postgres_url.replace('avp@', 'avp:***@')}")
    assert art.name in out.stdout and "s3cret" not in out.stdout
    # nothing went to the home's SQLite file instead
    assert not Path(avp_env["AVP_HOME"], "registry.db").exists()
