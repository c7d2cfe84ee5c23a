"""``avp evaluate --model REF --dataset REF --split all``: a model scored on a dataset it was not trained on
(every frame of it), reported with that dataset and split, and never judged by it: the model's blessing
and the feedback to ingest come only from its own test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation import entry
from pipeline import config
from pipeline.config import SimulateConfig
from pipeline.errors import UserError
from pipeline.registry import Registry
from tests.evaluation import builders

SETTINGS = {"evaluate.min_miou": 0.0, "evaluate.latency_runs": 1, "evaluate.latency_warmup": 0,
            "evaluate.latency_frames": 1, "evaluate.latency_p99_budget_ms": 60000, "evaluate.aot_inductor": False}


def quiet(_message):
    pass


@pytest.mark.slow
def test_a_model_is_evaluated_on_all_of_another_dataset_without_being_judged(tmp_path):
    cfg = config.load({"home": str(tmp_path / "home"), **SETTINGS}, env={})
    registry = Registry.open(cfg)
    own = builders.register_sim_dataset(registry, builders.simulated_logs())
    # Another dataset: other streets (another seed), every log in the train split, so "test" has no frames.
    other_logs = builders.simulated_logs(SimulateConfig(logs=2, frames=2, beams=16, azimuth_steps=256, seed=11))
    other = registry.build("dataset", "other-sensor", entry_point="tests", config={"seed": 11},
                           builder=lambda staging, _r: builders.write_dataset(staging, other_logs, {"train": 2})
                           and None)
    train_frames = [f for _log, _city, frames in builders.simulated_logs()[:builders.SPLITS["train"]] for f in frames]
    model = builders.register_model(registry, own, builders.train_tiny(train_frames, steps=5), "tiny")

    with pytest.raises(UserError, match="has no test frames"):
        entry.run(cfg, registry, say=quiet, model="1", dataset=other.ref)
    said: list[str] = []
    all_cfg = config.load({"home": str(tmp_path / "home"), **SETTINGS, "evaluate.split": "all"}, env={})
    result = entry.run(all_cfg, registry, say=said.append, model="1", dataset=other.ref)
    metrics = json.loads(Path(result["metrics"]).read_text())
    assert metrics["dataset"] == other.ref and metrics["split"] == "all"
    assert metrics["candidate"]["segmentation"]["frames"] == 4  # every frame of the other dataset
    assert set(metrics["candidate"]["scenes"]) == {log for log, _c, _f in other_logs}
    assert result["tables"][0][0] == f"{model.ref} on the all split of {other.ref}"
    assert any("the verdict is not recorded" in line for line in said)
    assert registry.get(model.id).blessed is None and result["blessed"] is None  # not judged by another dataset
    assert not (tmp_path / "home" / "feedback" / "sample_weights.json").exists()
    assert {p.ref for p in registry.parents(registry.get(result["ref"]).id)} == {model.ref, other.ref}
    assert f"all split of {other.ref}" in Path(result["report"]).read_text()

    # Its own test split still judges it, and is a separate metrics artifact.
    own_result = entry.run(cfg, registry, say=quiet, model="1")
    assert own_result["ref"] != result["ref"]
    assert json.loads(Path(own_result["metrics"]).read_text())["split"] == "test"
    assert registry.get(model.id).blessed is not None
