"""Lifecycle rules around production: a retired (deprecated, end-of-life) artifact never becomes production
again by a rollback, and retiring the production artifact needs an explicit flag and says what production
becomes."""

from __future__ import annotations

import subprocess

import pytest

from pipeline import config
from pipeline.registry import PromotionRefused, Registry
from tests.pipeline.test_registry import _build


def _promoted(registry, count):
    """``count`` blessed models promoted in turn to perception/seg: 1.0 ... (the last one is production)."""
    models = []
    for i in range(count):
        model = _build(registry, kind="model", name="seg", config={"i": i})
        registry.set_blessing(model.id, True)
        registry.promote(model.id, "perception", "seg")
        models.append(model)
    return models


def test_rollback_skips_retired_versions_and_refuses_when_only_those_are_left(registry):
    m1, m2, m3 = _promoted(registry, 3)
    registry.deprecate(m2.id, "bad labels")
    back = registry.rollback("perception", "seg")
    assert back.artifact_id == m1.id and registry.production("perception", "seg").artifact_id == m1.id
    # now only m2 (deprecated) is previous: nothing left to roll back to
    with pytest.raises(PromotionRefused, match=r"no previous version to roll back to that is still succeeded: "
                                               r"perception/seg/1.1 \(model:seg@v2 is deprecated\)"):
        registry.rollback("perception", "seg")
    assert registry.production("perception", "seg").artifact_id == m1.id  # nothing changed
    assert m3.id not in [p.artifact_id for p in registry.promotions() if p.status == "production"]


def test_retiring_production_needs_the_flag_and_rolls_production_back(registry):
    m1, m2 = _promoted(registry, 2)
    with pytest.raises(PromotionRefused, match=r"model:seg@v2 is production as perception/seg/1.1"):
        registry.deprecate(m2.id)
    assert registry.get(m2.id).state == "succeeded"
    registry.deprecate(m2.id, "regression", production=True)
    assert registry.get(m2.id).state == "deprecated"
    assert registry.production("perception", "seg").artifact_id == m1.id
    # the last one: production becomes none, and end-of-life of a retired non-production one needs no flag
    registry.end_of_life(m2.id)
    registry.deprecate(m1.id, production=True)
    assert registry.production("perception", "seg") is None


def test_cli_says_what_production_becomes(avp_env, tmp_path):
    cfg = config.load({"home": avp_env["AVP_HOME"]}, env={})
    registry = Registry.open(cfg)
    m1, m2 = _promoted(registry, 2)
    out = subprocess.run(["avp", "registry", "deprecate", m2.ref], env=avp_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "is production as perception/seg/1.1" in out.stderr
    out = subprocess.run(["avp", "registry", "deprecate", m2.ref, "--production"], env=avp_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "model:seg@v2 is now deprecated" in text and f"production of perception/seg is now perception/seg/1.0 " \
        f"({m1.ref})" in text
