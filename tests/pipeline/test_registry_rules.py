"""pipeline.registry rules the build/promotion tests do not pin: what goes into a content key (the code
version among them), references, versions, lineage, the lifecycle table, blessing records and promotion
refusals - each with the message a person sees. SQLite only (the PostgreSQL paths are in test_registry.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline import provenance
from pipeline.registry import (
    KINDS,
    STATES,
    TRANSITIONS,
    IllegalTransition,
    NotFound,
    PromotionRefused,
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
    with pytest.raises(ValueError, match="direction must be 'up' or 'down'"):
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
