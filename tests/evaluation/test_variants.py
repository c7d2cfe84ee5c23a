"""Inference variants (``evaluation.variants``): the choice of the variant to serve under a latency budget and
accuracy limits, its line in the verdict, and the evaluate stage's variant table end to end (frozen
TorchScript, AOTInductor and int8 PT2E built, timed and scored on the test split; fp16/bf16 reported as not
built on a CPU host)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from evaluation import blessing, variants
from pipeline import config
from pipeline.contracts import EvaluationMetrics
from pipeline.registry import Registry

LIMITS = {"latency_budget_ms": 100.0, "max_miou_drop": 0.5, "max_class_iou_drop": 1.0}


def row(p50: float, p99: float, miou_change: float | None, classes: dict[str, float] | None = None,
        servable: bool = True) -> dict:
    return {"p50_ms": p50, "p99_ms": p99, "miou_change_pts": miou_change,
            "class_iou_change_pts": classes or {"vehicle": miou_change or 0.0}, "servable": servable}


def table(**overrides) -> dict:
    """Eager slowest, frozen TorchScript 30 ms, .pt2 20 ms, int8 10 ms with a small accuracy loss."""
    rows = {"eager": row(5.0, 6.0, 0.0, servable=False),  # fastest here, but not in the package
            "torchscript": row(40.0, 45.0, None, servable=False),
            "torchscript_frozen": row(30.0, 35.0, 0.0), "aot_inductor": row(20.0, 25.0, 0.0),
            "int8_pt2e": row(10.0, 12.0, -0.2, {"vehicle": -0.6, "ground": 0.1})}
    rows.update(overrides)
    return rows


def test_the_fastest_eligible_servable_variant_is_chosen():
    choice = variants.choose(table(), **LIMITS)
    assert choice["variant"] == "int8_pt2e" and choice["runtime"] == "int8" and choice["file"] == "model_int8.pt2"
    assert not choice["fallback"] and choice["eligible"] == ["torchscript_frozen", "aot_inductor", "int8_pt2e"]
    assert "fastest of 3 eligible" in choice["reason"]


def test_a_variant_losing_more_accuracy_than_allowed_is_never_chosen():
    # mIoU loss over the limit
    choice = variants.choose(table(int8_pt2e=row(1.0, 2.0, -0.6)), **LIMITS)
    assert choice["variant"] == "aot_inductor"
    assert choice["excluded"]["int8_pt2e"] == ["mIoU -0.60 points (limit -0.50)"]
    # one class over its limit, the mIoU within
    choice = variants.choose(table(int8_pt2e=row(1.0, 2.0, -0.1, {"pedestrian": -1.5, "ground": 2.0})), **LIMITS)
    assert choice["variant"] == "aot_inductor"
    assert choice["excluded"]["int8_pt2e"] == ["pedestrian IoU -1.50 points (limit -1.00)"]
    # a limit of 0: any loss at all excludes it, no change is allowed
    choice = variants.choose(table(), **{**LIMITS, "max_class_iou_drop": 0.0})
    assert choice["variant"] == "aot_inductor" and "int8_pt2e" in choice["excluded"]
    # no accuracy measured is not "no loss"
    choice = variants.choose(table(int8_pt2e=row(1.0, 2.0, None, {})), **LIMITS)
    assert choice["variant"] == "aot_inductor" and choice["excluded"]["int8_pt2e"] == ["no mIoU measured"]


def test_a_variant_over_the_latency_budget_is_never_chosen():
    # int8 is fastest at p50 but its p99 breaks the budget
    choice = variants.choose(table(int8_pt2e=row(10.0, 150.0, 0.0)), **LIMITS)
    assert choice["variant"] == "aot_inductor"
    assert choice["excluded"]["int8_pt2e"] == ["p99 150.0 ms over the budget 100.0 ms"]
    choice = variants.choose(table(), **{**LIMITS, "latency_budget_ms": 30.0})
    assert choice["variant"] == "int8_pt2e" and choice["eligible"] == ["aot_inductor", "int8_pt2e"]


def test_none_eligible_falls_back_to_the_reference_torchscript_and_says_so():
    choice = variants.choose(table(), **{**LIMITS, "latency_budget_ms": 1.0})
    assert choice["variant"] == "torchscript_frozen" and choice["file"] == "model.ts" and choice["fallback"]
    assert choice["eligible"] == [] and set(choice["excluded"]) == {"torchscript_frozen", "aot_inductor", "int8_pt2e"}
    assert "no variant is within the latency budget 1.0 ms" in choice["reason"]
    assert "falls back to the reference TorchScript model.ts" in choice["reason"]
    # the verdict names it
    candidate = {"variants": {"choice": choice}}
    assert blessing.serve_variant_note(candidate).startswith("serve variant: no variant is within")


def test_the_choice_is_deterministic():
    rows = table(aot_inductor=row(10.0, 12.0, 0.0))  # a tie at p50 with int8: the SERVABLE order decides
    first = variants.choose(rows, **LIMITS)
    assert first["variant"] == "aot_inductor"
    names = list(rows)
    for seed in range(5):
        random.Random(seed).shuffle(names)
        assert variants.choose({n: rows[n] for n in names}, **LIMITS) == first


def test_accuracy_change_is_in_iou_points_against_the_reference():
    reference = {"miou": 0.5, "classes": {"ground": {"iou": 0.9}, "vehicle": {"iou": 0.4}, "cyclist": {"iou": None}}}
    mine = {"miou": 0.49, "classes": {"ground": {"iou": 0.905}, "vehicle": {"iou": 0.37}, "cyclist": {"iou": None}}}
    change = variants.accuracy_change(mine, reference)
    assert change["miou_change_pts"] == pytest.approx(-1.0)
    assert change["class_iou_change_pts"] == pytest.approx({"ground": 0.5, "vehicle": -3.0})


def test_calibration_picks_spread_over_the_split():
    assert variants.calibration_picks(3, 9) == [0, 4, 8]
    assert variants.calibration_picks(8, 2) == [0, 1]
    assert variants.calibration_picks(4, 0) == []


def test_not_built_reasons_name_the_obstacle():
    import torch

    cpu = torch.device("cpu")
    assert variants.int8_obstacle(cpu, True, True, 4) == ""
    assert "evaluate.int8 is false" in variants.int8_obstacle(cpu, True, False, 4)
    assert "evaluate.aot_inductor is false" in variants.int8_obstacle(cpu, False, True, 4)
    assert "no validation frames" in variants.int8_obstacle(cpu, True, True, 0)
    assert "runs on cuda" in variants.int8_obstacle(torch.device("cuda"), True, True, 4)


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The evaluate stage on the tiny simulated dataset and a tiny trained model, twice: with the test
    settings, and with a latency budget no variant meets."""
    from evaluation import entry
    from tests.evaluation import builders
    from tests.evaluation.test_entry import make_cfg

    home = tmp_path_factory.mktemp("variants") / "home"
    registry = Registry.open(make_cfg(home))
    logs = builders.simulated_logs()
    dataset = builders.register_sim_dataset(registry, logs)
    train_frames = [f for _log, _city, frames in logs[:builders.SPLITS["train"]] for f in frames]
    builders.register_model(registry, dataset, builders.train_tiny(train_frames, steps=40), "good")
    cfg = make_cfg(home)
    first = entry.run(cfg, Registry.open(cfg), say=lambda m: None, model="1")
    tight = make_cfg(home, **{"evaluate.latency_p99_budget_ms": 0.001, "evaluate.int8": False})
    second = entry.run(tight, Registry.open(tight), say=lambda m: None, model="1")
    load = lambda result: EvaluationMetrics.load(result["metrics"])  # noqa: E731
    return load(first), load(second), first, cfg


@pytest.mark.slow
def test_evaluate_reports_every_variant_with_its_cost_and_chooses_one(evaluated):
    metrics, _tight, result, cfg = evaluated
    table = metrics.candidate["variants"]
    rows = table["rows"]
    assert set(rows) == {"eager", "torchscript", "torchscript_frozen", "aot_inductor", "int8_pt2e"}
    assert set(table["not_built"]) == {"fp16_cuda", "bf16_cuda"}
    assert all("CUDA only" in why and "runs on cpu" in why for why in table["not_built"].values())
    assert table["matmul_peak_gflops"] > 0
    for name, r in rows.items():
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["peak_memory_mb"] is not None
        assert r["peak_share"] == pytest.approx(r["achieved_gflops"] / table["matmul_peak_gflops"])
    # frozen and unfrozen TorchScript timed side by side in the hardware metrics
    hw = metrics.candidate["hardware"]["variants"]
    assert {"torchscript", "torchscript_frozen"} <= set(hw)
    # the float variants predict exactly what eager predicts on every test frame; int8 is scored too
    segmentation = metrics.candidate["segmentation"]
    for name in ("torchscript_frozen", "aot_inductor"):
        assert rows[name]["miou"] == pytest.approx(segmentation["miou"]) and rows[name]["miou_change_pts"] == 0.0
        assert all(change == 0.0 for change in rows[name]["class_iou_change_pts"].values())
        assert hw[name]["max_abs_diff_vs_eager"] <= 1e-4 * 50
        # and its logits equal eager's within the package's tolerance on every latency frame
        agreement = rows[name]["agreement_vs_eager"]
        assert agreement["agrees"] and agreement["frames"] == 2 and agreement["class_match_rate"] == 1.0
    assert rows["int8_pt2e"]["agreement_vs_eager"]["max_abs_diff"] > 0
    frozen = table["frozen_vs_unfrozen"]
    assert frozen["frozen_p50_ms"] == hw["torchscript_frozen"]["p50_ms"]
    assert frozen["speedup_p50"] == pytest.approx(hw["torchscript"]["p50_ms"] / hw["torchscript_frozen"]["p50_ms"])
    assert rows["int8_pt2e"]["miou"] is not None and rows["int8_pt2e"]["class_iou_change_pts"]
    expected = variants.choose(rows, **table["limits"])
    assert table["choice"] == expected  # the recorded choice is the function of the recorded table
    assert table["limits"] == {"latency_budget_ms": cfg.evaluate.latency_p99_budget_ms,
                               "max_miou_drop": cfg.evaluate.variant_max_miou_drop,
                               "max_class_iou_drop": cfg.evaluate.variant_max_class_iou_drop}
    assert metrics.verdict["serve_variant"] == expected["variant"]
    assert f"serve variant: {expected['reason']}" in metrics.verdict["reasons"]
    with open(result["report"]) as fh:
        page = fh.read()
    assert "Inference variants" in page and expected["reason"] in page


@pytest.mark.slow
def test_evaluate_with_no_eligible_variant_falls_back_to_torchscript(evaluated):
    _first, tight, _result, _cfg = evaluated
    table = tight.candidate["variants"]
    assert table["not_built"]["int8_pt2e"] == "switched off: evaluate.int8 is false"
    assert "int8_pt2e" not in table["rows"]
    assert table["choice"]["variant"] == "torchscript_frozen" and table["choice"]["fallback"]
    assert tight.verdict["serve_variant"] == "torchscript_frozen" and not tight.verdict["blessed"]
    assert any(r.startswith("serve variant: no variant is within the latency budget") for r in tight.verdict["reasons"])
    assert np.isfinite(table["matmul_peak_gflops"])


def test_config_declares_the_variant_limits():
    cfg = config.load({"evaluate.variant_max_miou_drop": 0.25}, env={})
    assert cfg.evaluate.variant_max_miou_drop == 0.25 and cfg.evaluate.variant_max_class_iou_drop == 1.0
    assert cfg.serve.runtime == "auto"
