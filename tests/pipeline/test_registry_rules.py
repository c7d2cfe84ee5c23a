"""pipeline.registry rules the build/promotion tests do not pin: what goes into a content key (the code
version among them), references, versions, lineage, the lifecycle table, blessing records and promotion
refusals - each with the message a person sees. SQLite only (the PostgreSQL paths are in test_registry.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline import provenance
from pipeline import registry as registry_module
from pipeline.home import Home
from pipeline.registry import (
    KINDS,
    STATES,
    TRANSITIONS,
    BuildInProgress,
    IllegalTransition,
    NotFound,
    PromotionRefused,
    Registry,
    RegistryError,
    content_key,
    parse_ref,
)


def build(registry, kind="dataset", name="fleet", config=None, parents=(), code_modules=(), content="x", force=False):
    def write(staging, _record):
        Path(staging, "data.txt").write_text(content)
    return registry.build(kind, name, entry_point="tests:rules", config={"a": 1} if config is None else config,
                          builder=write, parents=parents, code_modules=code_modules, force=force)


# ------------------------------------------------------------------------------------------- content keys
def expected_key(kind, name, parents, code, config):
    """The documented recipe, written out: sha256 of sorted-key, whitespace-free JSON."""
    payload = {"kind": kind, "name": name, "code": code, "config": config,
               "parents": sorted([p.kind, p.name, p.version, p.content_key] for p in parents)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_the_content_key_is_the_hash_of_kind_name_code_config_and_parents(registry):
    data = build(registry)
    model = build(registry, "model", "seg", {"lr": 0.1}, [data], ["spark_jobs.split"])
    code = provenance.code_version("spark_jobs.split")
    assert model.content_key == expected_key("model", "seg", [data], code, {"lr": 0.1})
    assert model.meta["code_version"] == code
    assert data.content_key == expected_key("dataset", "fleet", [], provenance.code_version(), {"a": 1})


@pytest.mark.parametrize("change", ["kind", "name", "code", "config", "parent_version", "parent_key"])
def test_every_input_of_the_content_key_changes_it(registry, change):
    parent = build(registry)
    args = dict(kind="model", name="seg", parents=[parent], code_version="code-a", config={"lr": 0.1})
    base = content_key(**args)
    changed = dict(args)
    if change == "kind":
        changed["kind"] = "package"
    elif change == "name":
        changed["name"] = "seg2"
    elif change == "code":
        changed["code_version"] = "code-b"
    elif change == "config":
        changed["config"] = {"lr": 0.2}
    else:
        other = build(registry, config={"a": 2})  # v2 of the same parent, another key
        if change == "parent_key":
            other.version = parent.version
        changed["parents"] = [other]
    assert content_key(**changed) != base


def test_parent_order_does_not_change_the_key(registry):
    a, b = build(registry), build(registry, "statistics", "fleet")
    key = content_key("model", "seg", [a, b], "c", {})
    assert content_key("model", "seg", [b, a], "c", {}) == key
    assert content_key("model", "seg", [a, b], "c", {"x": 1, "y": 2}) == content_key("model", "seg", [b, a], "c",
                                                                                       {"y": 2, "x": 1})


def test_changed_code_is_not_a_cache_hit(registry):
    """The code version is part of the key: the same build running other code publishes a new version."""
    first = build(registry, code_modules=["spark_jobs.split"])
    assert build(registry, code_modules=["spark_jobs.split"]).cached
    other = build(registry, code_modules=["spark_jobs.quality"])
    assert provenance.code_version("spark_jobs.split") != provenance.code_version("spark_jobs.quality")
    assert not other.cached and other.version == first.version + 1
    assert other.meta["code_version"] == provenance.code_version("spark_jobs.quality")


def test_a_cache_hit_is_the_newest_succeeded_version_with_the_key(registry):
    build(registry)
    second = build(registry, force=True)
    hit = build(registry)
    assert hit.cached and hit.id == second.id and hit.version == 2
    assert registry.find_succeeded("dataset", "fleet", "0" * 64) is None
    assert registry.find_succeeded("model", "fleet", second.content_key) is None  # kind is part of the lookup


def test_a_deprecated_version_is_not_reused(registry):
    first = build(registry)
    registry.deprecate(first.id)
    again = build(registry)
    assert not again.cached and again.version == 2


# --------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("ref, parsed", [("dataset:fleet@v3", ("dataset", "fleet", 3)),
                                         ("dataset:fleet", ("dataset", "fleet", None)),
                                         ("fleet@4", (None, "fleet", 4)), ("fleet", (None, "fleet", None)),
                                         ("model:seg@v12", ("model", "seg", 12))])
def test_parse_ref(ref, parsed):
    assert parse_ref(ref) == parsed


def test_unknown_kind_names_the_kinds():
    with pytest.raises(NotFound, match="unknown artifact kind 'widget' in 'widget:x'; kinds are " + ", ".join(KINDS)):
        parse_ref("widget:x")


def test_get_by_id_reference_and_latest(registry):
    v1 = build(registry)
    v2 = build(registry, config={"a": 2})
    build(registry, "model", "fleet")
    assert registry.get(v1.id).version == 1 and registry.get(str(v2.id)).version == 2
    assert registry.get("dataset:fleet").version == 2 and registry.get("dataset:fleet@v1").id == v1.id
    assert registry.get("dataset:fleet@1").id == v1.id
    with pytest.raises(NotFound, match="'fleet' is ambiguous: name it with its kind, e.g. dataset:fleet"):
        registry.get("fleet")
    with pytest.raises(NotFound, match=f"no artifact with id {v2.id + 10}"):
        registry.get(v2.id + 10)
    with pytest.raises(NotFound, match="no artifact 'dataset:fleet@v9' in the registry"):
        registry.get("dataset:fleet@v9")
    registry.deprecate(v2.id)
    assert registry.get("dataset:fleet").id == v1.id  # latest *succeeded*
    assert registry.get("dataset:fleet@v2").state == "deprecated"  # an explicit version is any state


def test_versions_count_per_kind_and_name(registry):
    assert [build(registry, config={"a": i}).version for i in range(3)] == [1, 2, 3]
    assert build(registry, "model", "fleet").version == 1
    assert build(registry, "dataset", "other").version == 1
    assert [a.version for a in registry.list("dataset", "fleet")] == [1, 2, 3]
    assert [a.ref for a in registry.list(state="succeeded")] == [
        "dataset:fleet@v1", "dataset:fleet@v2", "dataset:fleet@v3", "dataset:other@v1", "model:fleet@v1"]
    assert registry.list("dataset", "fleet", "failed") == []


def test_unknown_kind_and_bad_names_are_refused(registry):
    with pytest.raises(RegistryError, match="unknown artifact kind 'widget'"):
        registry.register("widget", "x", content_key="k", entry_point="e")
    with pytest.raises(ValueError):
        registry.register("dataset", "../x", content_key="k", entry_point="e")


# ------------------------------------------------------------------------------------------------ lineage
def test_lineage_depths_and_directions(registry):
    logs = build(registry, "log", "l1")
    data = build(registry, parents=[logs])
    model = build(registry, "model", "seg", parents=[data])
    pkg = build(registry, "package", "seg", parents=[model, data])
    assert [(d, a.ref) for d, a in registry.lineage(pkg.id)] == [
        (1, "dataset:fleet@v1"), (1, "model:seg@v1"), (2, "log:l1@v1")]
    assert [(d, a.ref) for d, a in registry.lineage(logs.id, "down")] == [
        (1, "dataset:fleet@v1"), (2, "model:seg@v1"), (2, "package:seg@v1")]
    assert [a.ref for a in registry.parents(model.id)] == ["dataset:fleet@v1"]
    assert [a.ref for a in registry.children(data.id)] == ["model:seg@v1", "package:seg@v1"]
    with pytest.raises(ValueError, match="^direction must be 'up' or 'down'$"):
        registry.lineage(pkg.id, "sideways")


# ---------------------------------------------------------------------------------------------- lifecycle
def test_the_lifecycle_table_is_the_documented_one():
    assert STATES == ("registered", "building", "succeeded", "failed", "aborted", "deprecated", "end_of_life")
    assert TRANSITIONS == {"registered": {"building", "aborted"}, "building": {"succeeded", "failed", "aborted"},
                           "succeeded": {"deprecated"}, "deprecated": {"end_of_life"}, "failed": set(),
                           "aborted": set(), "end_of_life": set()}


def test_every_transition_is_recorded_with_its_reason(registry):
    art = build(registry)
    registry.deprecate(art.id, "superseded by v2")
    registry.end_of_life(art.id, "deleted")
    events = registry.events(art.id)
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "registered"), ("registered", "building"), ("building", "succeeded"),
        ("succeeded", "deprecated"), ("deprecated", "end_of_life")]
    assert [e["reason"] for e in events[-2:]] == ["superseded by v2", "deleted"]
    assert registry.get(art.id).reason == "deleted"


def test_an_illegal_transition_lists_what_is_allowed(registry):
    art = registry.register("dataset", "fleet", content_key="k", entry_point="e")
    with pytest.raises(IllegalTransition, match=r"dataset:fleet@v1 is registered; it cannot become succeeded "
                                                r"\(allowed from registered: aborted, building\)"):
        registry.transition(art.id, "succeeded")
    assert registry.transition(art.id, "aborted", "given up").state == "aborted"
    with pytest.raises(IllegalTransition, match=r"allowed from aborted: none \(final state\)"):
        registry.transition(art.id, "building")


def test_update_meta_merges(registry):
    art = build(registry)
    registry.update_meta(art.id, a=1, b=[2])
    assert registry.update_meta(art.id, b=3).meta == {**art.meta, "a": 1, "b": 3}


# ------------------------------------------------------------------------------------ blessing, promotion
def test_blessing_is_recorded_with_its_reasons(registry):
    model = build(registry, "model", "seg")
    assert model.blessed is None
    done = registry.set_blessing(model.id, False, ["mIoU 0.1 < 0.3", "slow"])
    assert done.blessed is False and done.meta["blessing_reasons"] == ["mIoU 0.1 < 0.3", "slow"]
    assert registry.events(model.id)[-1]["reason"] == "not blessed: mIoU 0.1 < 0.3; slow"
    assert registry.set_blessing(model.id, True).blessed is True
    assert registry.events(model.id)[-1]["reason"] == "blessed"


def test_only_a_succeeded_artifact_can_be_blessed(registry):
    art = registry.register("model", "seg", content_key="k", entry_point="e")
    with pytest.raises(IllegalTransition, match="model:seg@v1 is registered; only a succeeded artifact can be blessed"):
        registry.set_blessing(art.id, True)


def test_a_deprecated_blessed_model_cannot_be_promoted(registry):
    model = build(registry, "model", "seg")
    registry.set_blessing(model.id, True)
    registry.deprecate(model.id)
    with pytest.raises(PromotionRefused, match="model:seg@v1 is deprecated; only a succeeded artifact can be promoted"):
        registry.promote(model.id, "perception", "seg")


def test_a_package_of_an_unblessed_model_cannot_be_promoted(registry):
    model = build(registry, "model", "seg")
    registry.set_blessing(model.id, False)
    pkg = build(registry, "package", "seg", parents=[model])
    with pytest.raises(PromotionRefused, match="package:seg@v1 is not blessed by evaluation"):
        registry.promote(pkg.id, "perception", "seg")
    other = build(registry, "dataset", "seg-data")
    pkg2 = build(registry, "package", "seg", parents=[other], config={"b": 1})
    registry.set_blessing(other.id, True)  # a blessed parent that is not a model does not count
    with pytest.raises(PromotionRefused):
        registry.promote(pkg2.id, "perception", "seg")


def test_promotions_count_minor_versions_per_major_and_name(registry):
    model = build(registry, "model", "seg")
    registry.set_blessing(model.id, True)
    labels = [registry.promote(model.id, "perception", "seg").label for _ in range(2)]
    labels.append(registry.promote(model.id, "perception", "seg", major=2).label)
    labels.append(registry.promote(model.id, "perception", "other").label)
    assert labels == ["perception/seg/1.0", "perception/seg/1.1", "perception/seg/2.0", "perception/other/1.0"]
    assert [p.label for p in registry.promotions("perception", "seg") if p.status == "production"] == [
        "perception/seg/2.0"]
    assert registry.production("perception", "other").label == "perception/other/1.0"
    assert registry.production("perception", "none") is None
    assert len(registry.promotions()) == 4 and len(registry.promotions("perception")) == 4
    assert registry.events(model.id)[-1]["reason"] == "promoted to perception/other/1.0"


def test_rollback_without_production_is_refused(registry):
    with pytest.raises(PromotionRefused, match="perception/seg has no production version to roll back"):
        registry.rollback("perception", "seg")


# ------------------------------------------------------------------------------------------ sticky ledger
def test_sticky_assign_decides_new_keys_once_and_keeps_old_ones(registry):
    calls = []

    def decide(existing, new):
        calls.append((dict(existing), list(new)))
        return {k: f"v{len(existing)}-{k}" for k in new}

    assert registry.sticky_assign("ledger-a", ["x", "y", "x"], decide) == {"x": "v0-x", "y": "v0-y"}
    assert registry.sticky_assign("ledger-a", ["y", "z"], decide) == {"y": "v0-y", "z": "v2-z"}
    assert registry.sticky_assign("ledger-a", ["x"], decide) == {"x": "v0-x"}
    assert calls == [({}, ["x", "y"]), ({"x": "v0-x", "y": "v0-y"}, ["z"])]
    assert registry.sticky_assign("ledger-b", ["x"], lambda e, n: {"x": "other"}) == {"x": "other"}


def test_record_registers_an_existing_thing_once(registry, tmp_path):
    """What ingest does for a source drive log: a succeeded record pointing at a file that already exists."""
    (tmp_path / "a.mcap").write_bytes(b"log")
    log = registry.record("log", "log-a", content_key="sha-a", location=str(tmp_path / "a.mcap"),
                          entry_point="tests:record", meta={"city": "pittsburgh"})
    assert (log.ref, log.state, log.location, log.meta) == ("log:log-a@v1", "succeeded", str(tmp_path / "a.mcap"),
                                                            {"city": "pittsburgh"})
    assert [e["to_state"] for e in registry.events(log.id)] == ["registered", "building", "succeeded"]
    assert registry.record("log", "log-a", content_key="sha-a", location="elsewhere", entry_point="x").id == log.id
    changed = registry.record("log", "log-a", content_key="sha-b", location=str(tmp_path / "a.mcap"), entry_point="x")
    assert changed.version == 2 and changed.meta == {}


# ------------------------------------------------------------------------------------ references and ids
@pytest.mark.parametrize("ref, message", [
    ("dataset:../x", r"bad artifact reference 'dataset:\.\./x': expected kind:name@vN \(artifact name '\.\./x' is "
                     r"not allowed"),
    ("dataset:a:b", r"bad artifact reference 'dataset:a:b': expected kind:name@vN \(artifact name 'a:b'"),
    ("dataset:a@X3", r"bad artifact reference 'dataset:a@X3': expected kind:name@vN \(invalid literal"),
    ("dataset:a@v-1", r"bad artifact reference 'dataset:a@v-1': version -1 is out of range"),
    (f"dataset:a@v{2**31}", rf"bad artifact reference 'dataset:a@v{2**31}': version {2**31} is out of range"),
])
def test_a_bad_reference_says_what_is_wrong(ref, message):
    with pytest.raises(NotFound, match=message):
        parse_ref(ref)


def test_versions_up_to_the_database_integer_parse():
    assert parse_ref("dataset:a@v0") == ("dataset", "a", 0)
    assert parse_ref(f"dataset:a@v{2**31 - 1}") == ("dataset", "a", 2**31 - 1)


# ------------------------------------------------------------------------------------------------ cleanup
def _failing_build(registry, write):
    def builder(staging, _record):
        write(staging)
        raise ValueError("the builder broke")
    with pytest.raises(ValueError, match="the builder broke"):
        registry.build("dataset", "fleet", entry_point="tests:cleanup", config={}, builder=builder)
    [art] = registry.list("dataset", "fleet")
    return art


def test_a_cleanup_that_fails_does_not_hide_the_builders_error(registry, monkeypatch):
    def busy(path, *args, **kwargs):
        raise OSError(16, "Device or resource busy", path)
    monkeypatch.setattr(registry_module.shutil, "rmtree", busy)
    art = _failing_build(registry, lambda staging: Path(staging, "part.txt").write_text("half"))
    assert art.state == "failed" and art.reason == "ValueError: the builder broke"


def test_cleanup_removes_a_file_as_well_as_a_folder(tmp_path):
    home = Home.from_config(str(tmp_path))
    (tmp_path / "stray.txt").write_text("x")
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "f.txt").write_text("x")
    for path in ("stray.txt", "folder", "missing"):
        registry_module._remove(home, str(tmp_path / path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def remote_registry(tmp_path):
    """A registry whose home is an fsspec URL (the in-memory filesystem stands in for s3:// or hdfs://)."""
    home = Home.from_config(f"memory://avp-{uuid.uuid4().hex[:8]}/home")
    yield Registry(f"sqlite:///{tmp_path / 'registry.db'}", home)
    home.fs.rm(home.root, recursive=True)


def test_a_remote_home_publishes_by_moving_the_staging_folder(remote_registry):
    fs = remote_registry.home.fs

    def write(staging, _record):
        fs.pipe(f"{staging}/sub/data.txt", b"x")
        return {"rows": 1}
    art = remote_registry.build("dataset", "fleet", entry_point="tests:remote", config={}, builder=write)
    assert art.location == remote_registry.home.artifact_dir("dataset", "fleet", 1)
    assert fs.cat(f"{art.location}/sub/data.txt") == b"x"
    versions = fs.ls(remote_registry.home.join("artifacts", "dataset", "fleet"), detail=False)
    assert [Path(p).name for p in versions] == ["v1"]


def test_a_failed_build_on_a_remote_home_leaves_no_files(remote_registry):
    fs = remote_registry.home.fs
    art = _failing_build(remote_registry, lambda staging: fs.pipe(f"{staging}/sub/part.txt", b"half"))
    assert art.state == "failed"
    assert fs.find(remote_registry.home.join("artifacts")) == []


def test_a_builder_gets_its_record_and_a_staging_folder_of_its_own(registry):
    seen = {}

    def builder(staging, record):
        seen.update(staging=staging, ref=record.ref, state=record.state, staging_meta=record.meta["_staging"])
        Path(staging, "data.txt").write_text("x")
    art = registry.build("dataset", "fleet", entry_point="tests:record", config={}, builder=builder)
    assert (seen["ref"], seen["state"], seen["staging_meta"]) == ("dataset:fleet@v1", "building", [seen["staging"]])
    assert re.fullmatch(r"\.staging-v1-[0-9a-f]{8}", Path(seen["staging"]).name)
    assert Path(seen["staging"]).parent == Path(art.location).parent and "_staging" not in art.meta


def test_build_says_what_it_does(registry):
    said = []
    art = registry.build("dataset", "fleet", entry_point="tests:say", config={}, builder=lambda s, r: None,
                         say=said.append)
    again = registry.build("dataset", "fleet", entry_point="tests:say", config={}, builder=lambda s, r: None,
                           say=said.append)
    key = art.content_key[:12]
    assert said == [f"building dataset:fleet@v1 (content key {key})",
                    f"published dataset:fleet@v1 at {art.location}",
                    f"cache hit: dataset:fleet@v1 has the same content key ({key}); reusing it (--force rebuilds)"]
    assert again.id == art.id and again.cached  # reuse is the default, without force


def test_an_interrupted_build_is_aborted_and_a_long_error_is_cut_to_2000_characters(registry):
    def interrupted(staging, _record):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        registry.build("dataset", "fleet", entry_point="tests:abort", config={}, builder=interrupted)

    def verbose(staging, _record):
        raise ValueError("x" * 5000)
    with pytest.raises(ValueError):
        registry.build("dataset", "fleet", entry_point="tests:abort", config={"b": 1}, builder=verbose)
    first, second = registry.list("dataset", "fleet")
    assert (first.state, first.reason) == ("aborted", "KeyboardInterrupt: ")
    assert second.state == "failed" and second.reason == ("ValueError: " + "x" * 5000)[:2000]


def _live_building_record(registry, kind="dataset", name="fleet", config=None):
    """What another live build of the same content looks like: registered and building by a live process."""
    key = content_key(kind, name, [], provenance.code_version(), {} if config is None else config)
    art = registry.register(kind, name, content_key=key, entry_point="tests:other", config={})
    return registry.transition(art.id, "building")


def test_a_build_of_the_same_content_in_progress_is_refused_unless_forced(registry):
    other = _live_building_record(registry)
    with pytest.raises(BuildInProgress, match=rf"^dataset:fleet@v1 with the same content key is being built by pid "
                                              rf"{os.getpid()} on {re.escape(provenance.host())}$"):
        registry.build("dataset", "fleet", entry_point="tests:b", config={}, builder=lambda s, r: None)
    forced = registry.build("dataset", "fleet", entry_point="tests:b", config={}, builder=lambda s, r: None,
                            force=True)
    assert forced.version == 2 and registry.get(other.id).state == "building"


@pytest.mark.parametrize("kind, name, config", [("model", "fleet", {}), ("dataset", "other", {}),
                                                ("dataset", "fleet", {"a": 2})])
def test_only_the_same_kind_name_and_content_counts_as_in_progress(registry, kind, name, config):
    _live_building_record(registry, kind, name, config)
    art = registry.build("dataset", "fleet", entry_point="tests:b", config={}, builder=lambda s, r: None)
    assert art.state == "succeeded"


def test_records_with_the_same_content_key_under_two_names_are_two_artifacts(registry, tmp_path):
    a = registry.record("log", "log-a", content_key="same", location=str(tmp_path / "a"), entry_point="x")
    b = registry.record("log", "log-b", content_key="same", location=str(tmp_path / "b"), entry_point="x")
    assert (a.ref, b.ref) == ("log:log-a@v1", "log:log-b@v1")


def test_ids_and_latest_references(registry):
    art = build(registry)
    assert registry.get("fleet").id == art.id  # one kind has the name: no ambiguity
    for ref, message in [(2**31, f"no artifact with id {2**31}"), ("00000000001", "no artifact with id 00000000001"),
                         ("model:fleet", r"no succeeded version of 'model:fleet' in the registry \(sqlite")]:
        with pytest.raises(NotFound, match=message):
            registry.get(ref)


def test_names_in_messages(registry):
    with pytest.raises(ValueError, match=r"^artifact name '\.\./x' is not allowed"):
        registry.register("dataset", "../x", content_key="k", entry_point="e")
    with pytest.raises(RegistryError, match=r"unknown artifact kind 'widget'; kinds are log, dataset, statistics, "):
        registry.register("widget", "x", content_key="k", entry_point="e")
    with pytest.raises(IllegalTransition, match=r"unknown state 'gone'; states are registered, building, succeeded, "):
        registry.transition(build(registry).id, "gone")
    model = build(registry, "model", "seg")
    registry.set_blessing(model.id, True)
    with pytest.raises(ValueError, match=r"^namespace 'a/b' is not allowed"):
        registry.promote(model.id, "a/b", "seg")
    with pytest.raises(ValueError, match=r"^promotion name '\.\.' is not allowed"):
        registry.promote(model.id, "perception", "..")


def test_every_write_moves_updated_at_and_events_record_from_where(registry):
    art = build(registry, "model", "seg")
    stamps = [art.updated_at]
    registry.set_blessing(art.id, True)
    stamps.append(registry.get(art.id).updated_at)
    registry.update_meta(art.id, note="x")
    stamps.append(registry.get(art.id).updated_at)
    registry.promote(art.id, "perception", "seg")
    registry.deprecate(art.id, "bad labels", production=True)
    stamps.append(registry.get(art.id).updated_at)
    registry.end_of_life(art.id)
    assert stamps == sorted(stamps) and len(set(stamps)) == 4
    events = registry.events(art.id)
    assert [(e["from_state"], e["to_state"], e["reason"]) for e in events] == [
        (None, "registered", ""), ("registered", "building", ""), ("building", "succeeded", ""),
        ("succeeded", "succeeded", "blessed"), ("succeeded", "succeeded", "promoted to perception/seg/1.0"),
        ("succeeded", "deprecated", "bad labels"), ("deprecated", "end_of_life", "")]
    assert registry.get(art.id).reason == "bad labels"  # a transition without a reason keeps the last one


def test_a_state_change_of_a_missing_artifact_names_it(registry):
    with pytest.raises(NotFound, match="^no artifact with id 999$"), registry._tx() as conn:
        registry._set_state(conn, 999, "building")


def test_each_namespace_and_name_keeps_its_own_versions_production_and_rollback(registry):
    models = [build(registry, "model", "seg", config={"i": i}) for i in range(4)]
    for model in models:
        registry.set_blessing(model.id, True)
    registry.promote(models[0].id, "perception", "seg")
    registry.promote(models[1].id, "perception", "seg")
    assert registry.promote(models[2].id, "planning", "seg").label == "planning/seg/1.0"  # promoted last
    assert registry.promote(models[3].id, "perception", "other").label == "perception/other/1.0"
    assert registry.rollback("perception", "seg").label == "perception/seg/1.0"
    production = {(p.namespace, p.name): p.artifact_id for p in registry.promotions() if p.status == "production"}
    assert production == {("perception", "seg"): models[0].id, ("planning", "seg"): models[2].id,
                          ("perception", "other"): models[3].id}


def test_retiring_production_names_every_promotion_it_serves(registry):
    model = build(registry, "model", "seg")
    registry.set_blessing(model.id, True)
    registry.promote(model.id, "perception", "seg")
    registry.promote(model.id, "planning", "seg")
    with pytest.raises(PromotionRefused, match=(
            r"^model:seg@v1 is production as perception/seg/1\.0, planning/seg/1\.0; retiring it needs the "
            r"explicit production flag \(avp registry \.\.\. --production\), which rolls production back to the "
            r"previous succeeded version$")):
        registry.transition(model.id, "deprecated")  # without the flag, as deprecate() without it
    assert registry.get(model.id).state == "succeeded"


def test_a_rollback_refusal_lists_each_retired_previous_version(registry):
    models = [build(registry, "model", "seg", config={"i": i}) for i in range(3)]
    for model in models:
        registry.set_blessing(model.id, True)
        registry.promote(model.id, "perception", "seg")
    registry.deprecate(models[0].id)
    registry.deprecate(models[1].id, "bad labels")
    with pytest.raises(PromotionRefused, match=(
            r"^perception/seg has no previous version to roll back to that is still succeeded: perception/seg/1\.1 "
            r"\(model:seg@v2 is deprecated\), perception/seg/1\.0 \(model:seg@v1 is deprecated\)$")):
        registry.rollback("perception", "seg")
    other = build(registry, "model", "other")
    registry.set_blessing(other.id, True)
    registry.promote(other.id, "perception", "other")
    with pytest.raises(PromotionRefused, match=r"^perception/other has no previous version to roll back to$"):
        registry.rollback("perception", "other")


def test_rollback_restores_the_newest_previous_version_and_promoting_keeps_rolled_back(registry):
    models = []
    for i in range(3):
        models.append(build(registry, "model", "seg", config={"i": i}))
        registry.set_blessing(models[-1].id, True)
        registry.promote(models[-1].id, "perception", "seg")
    assert registry.rollback("perception", "seg").artifact_id == models[1].id
    events = registry.events(models[1].id)
    assert (events[-1]["from_state"], events[-1]["to_state"], events[-1]["reason"]) == (
        "succeeded", "succeeded", "rolled back perception/seg: production again instead of 1.2")
    registry.promote(models[0].id, "perception", "seg")
    assert [p.status for p in registry.promotions("perception", "seg")] == [
        "previous", "previous", "rolled_back", "production"]
    assert [p.artifact_id for p in registry.production_of(models[0].id)] == [models[0].id]
    assert registry.production_of(models[2].id) == []


def test_a_note_is_an_event_that_changes_nothing_else(registry):
    art = build(registry, "model", "seg")
    registry.note(art.id, "promotion rejected: labels look off", by="reviewer")
    last = registry.events(art.id)[-1]
    assert (last["from_state"], last["to_state"], last["by"], last["reason"]) == (
        "succeeded", "succeeded", "reviewer", "promotion rejected: labels look off")
    registry.note(art.id, "timed out")
    assert registry.events(art.id)[-1]["by"] == provenance.user()
    assert registry.get(art.id).updated_at == art.updated_at


def test_assignments_read_a_ledger(registry):
    registry.sticky_assign("ledger-a", ["x", "y"], lambda existing, new: {k: "train" for k in new})
    registry.sticky_assign("ledger-b", ["x"], lambda existing, new: {k: "val" for k in new})
    assert registry.assignments("ledger-a") == {"x": "train", "y": "train"}
    assert registry.assignments("ledger-b") == {"x": "val"} and registry.assignments("none") == {}


@pytest.mark.parametrize("operation", ["register", "promote"])
def test_a_version_clash_is_retried_with_growing_waits_then_named(registry, monkeypatch, operation):
    # On PostgreSQL two writers can race for one version number; the unique constraint turns the loser's
    # insert into an IntegrityError and it tries again. Here every insert clashes.
    model = build(registry, "model", "seg")
    registry.set_blessing(model.id, True)
    table = "promotions" if operation == "promote" else "artifacts"

    @sa.event.listens_for(registry.engine, "before_cursor_execute")
    def clash(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith(f"INSERT INTO {table} "):
            raise sa.exc.IntegrityError(statement, parameters, Exception("UNIQUE constraint failed"))
    waits = []
    monkeypatch.setattr(registry_module.time, "sleep", waits.append)
    if operation == "promote":
        with pytest.raises(RegistryError, match=r"^could not promote model:seg@v1: too many concurrent promotions$"):
            registry.promote(model.id, "perception", "seg")
    else:
        with pytest.raises(RegistryError, match=r"^could not allocate a version for model:seg after 50 attempts$"):
            registry.register("model", "seg", content_key="k", entry_point="e")
    assert waits == pytest.approx([0.01 * (attempt + 1) for attempt in range(50)])


def test_a_single_version_clash_costs_one_short_wait(registry, monkeypatch):
    model = build(registry, "model", "seg")
    registry.set_blessing(model.id, True)
    clashes = []

    @sa.event.listens_for(registry.engine, "before_cursor_execute")
    def clash_once(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO promotions ") and not clashes:
            clashes.append(statement)
            raise sa.exc.IntegrityError(statement, parameters, Exception("UNIQUE constraint failed"))
    waits = []
    monkeypatch.setattr(registry_module.time, "sleep", waits.append)
    assert registry.promote(model.id, "perception", "seg").label == "perception/seg/1.0"
    assert waits == [0.01] and len(registry.promotions()) == 1


# ------------------------------------------------------------------------------------ opening a registry
def test_an_unreachable_registry_server_is_named_without_its_password(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryError, match=rf"^cannot open the registry postgresql\+psycopg://avp:\*\*\*@127\.0\.0\.1:"
                                            rf"{port}/avp: ") as refused:
        Registry(f"postgresql://avp:s3cret@127.0.0.1:{port}/avp", Home.from_config(str(tmp_path)))
    assert "s3cret" not in str(refused.value)


def test_a_sqlite_registry_makes_its_folder_and_queues_writers(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path}/new/folder/registry.db", Home.from_config(str(tmp_path)))
    assert (tmp_path / "new" / "folder" / "registry.db").exists()
    with registry.engine.connect() as conn:
        pragmas = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                   for name in ("journal_mode", "busy_timeout", "foreign_keys")}
    assert pragmas == {"journal_mode": "wal", "busy_timeout": 120_000, "foreign_keys": 1}
    assert (registry.lease_s, registry.lease_renew_s) == (60.0, 10.0)  # config's defaults


@pytest.mark.parametrize("renew_s", [0, 60])
def test_a_lease_must_be_renewed_more_often_than_it_lasts(tmp_path, renew_s):
    with pytest.raises(RegistryError, match=rf"^registry.lease_renew_s \({renew_s}\) must be above 0 and below "
                                            r"registry.lease_s \(60\)"):
        Registry(f"sqlite:///{tmp_path}/r.db", Home.from_config(str(tmp_path)), lease_s=60, lease_renew_s=renew_s)


def test_a_record_says_who_made_it_where_when_and_in_which_airflow_run(registry, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "avp_daily")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__2026-11-30")
    art = registry.register("dataset", "fleet", content_key="k", entry_point="tests:who")
    snap = provenance.snapshot()
    assert (art.created_by, art.host, art.pid, art.diff_hash, art.git_sha) == (
        snap["user"], snap["host"], os.getpid(), snap["diff_hash"], snap["git_sha"])
    assert (art.dag_id, art.dag_run_id) == ("avp_daily", "scheduled__2026-11-30")
    assert (art.state, art.reason, art.blessed, art.locations, art.meta) == ("registered", "", None, [], {})
    assert art.created_at == art.updated_at and art.lease_until == art.created_at + dt.timedelta(seconds=60)


def test_times_are_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        utc = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        assert abs(registry_module._now() - utc) < dt.timedelta(minutes=1)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_transition_without_a_reason_records_none(registry):
    a, b = build(registry, config={"a": 1}), build(registry, config={"a": 2})
    registry.deprecate(a.id)
    registry.transition(b.id, "deprecated")
    assert [registry.events(x.id)[-1]["reason"] for x in (a, b)] == ["", ""]
    assert [registry.get(x.id).reason for x in (a, b)] == ["", ""]
