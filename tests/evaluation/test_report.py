"""evaluation.report, evaluation.scoring and the tallies behind evaluation.statistics without Spark: a tiny
untrained model scored on simulated frames, the intervals' point values against the point metrics, the
report page with and without a production baseline, and byte-identical metrics.json from two scorings."""

from __future__ import annotations

import re

import pytest
import torch

from evaluation import blessing, entry, hardware, report, scoring, statistics
from evaluation.frames import LoggedFrame
from pipeline.config import EvaluateConfig, SimulateConfig
from pipeline.contracts import EvaluationMetrics
from tests.evaluation.builders import TINY_MODEL


@pytest.fixture(scope="module")
def frames():
    from spark_jobs.simulator import fleet_plan, simulate_log

    sim = SimulateConfig(logs=3, frames=2, beams=8, azimuth_steps=128, seed=1)
    return [LoggedFrame(f.log_id, f.frame_index, meta.city, f.points, f.labels, f.boxes, float(f.ego[4]),
                        f.timestamp_ns)
            for meta in fleet_plan(sim) for f in simulate_log(meta, sim)]


def score(frames) -> tuple[torch.nn.Module, dict]:
    """A tiny untrained model and its metrics on ``frames``, with the statistics (as the stage adds them)."""
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model("bev_segnet", TINY_MODEL).eval()
    result = scoring.score_model(model, frames, scoring.Settings.from_config(EvaluateConfig()), say=lambda _m: None)
    entry.add_statistics(result, EvaluateConfig(), say=lambda _m: None)
    return model, result


@pytest.fixture(scope="module")
def scored(frames, tmp_path_factory):
    model, result = score(frames)
    result["hardware"] = hardware.measure(model, None, [frames[0].points], runs=2, warmup=0,
                                          device=torch.device("cpu"), aot_inductor=False, max_points=50_000,
                                          compiled_dir=str(tmp_path_factory.mktemp("hw")), say=lambda _m: None)
    return result


def test_score_model_covers_every_frame_and_scene(frames, scored):
    seg = scored["segmentation"]
    assert seg["frames"] == len(frames) == scored["planner"]["frames"]
    assert seg["points"] == sum(int((f.labels != 0).sum()) for f in frames)
    assert set(scored["scenes"]) == {f.log_id for f in frames}
    assert sum(s["frames"] for s in scored["scenes"].values()) == len(frames)
    assert set(scored["objects"]) == {"vehicle", "pedestrian", "cyclist"}


def test_worst_scenes_are_the_lowest_and_at_most_half():
    scenes = {f"log-{i}": {"miou": m, "missed_brakes": 0} for i, m in enumerate([0.5, 0.2, 0.9, 0.4, None])}
    assert scoring.worst_scenes(scenes, 3) == ["log-1", "log-3"]  # 4 scored scenes: at most 2
    assert scoring.worst_scenes(scenes, 1) == ["log-1"]
    assert scoring.worst_scenes({"only": {"miou": 0.1, "missed_brakes": 0}}, 3) == []


def metrics_of(scored, baseline=None) -> tuple[EvaluationMetrics, blessing.Verdict]:
    verdict = blessing.decide(scored, EvaluateConfig(), baseline)
    metrics = EvaluationMetrics(
        model="model:bev_segnet@v9", model_name="bev_segnet", dataset="dataset:fleet-lidar@v2", split="test",
        metrics_ref="metrics:bev_segnet@v3", created_at="now", host="test", code_version="abc", settings_key="k",
        thresholds={"latency_p99_budget_ms": 500.0, "max_regression": 0.05}, candidate=scored, baseline=baseline,
        baseline_model="model:bev_segnet@v8" if baseline else None, baseline_source=None,
        verdict={"blessed": verdict.blessed, "reasons": verdict.reasons, "checks": verdict.checks,
                 "comparisons": verdict.comparisons},
        worst_scenes=scoring.worst_scenes(scored["scenes"], 3), feedback={"weights": {"log-x": 2.0}, "file": "f"})
    return metrics, verdict


def page_for(scored, tmp_path, baseline=None):
    metrics, verdict = metrics_of(scored, baseline)
    # The stage renders what metrics.json holds (strict JSON), so the test does too.
    strict = EvaluationMetrics.parse(metrics.dumps(), "metrics.json")
    return open(report.write_report(str(tmp_path), strict)).read(), verdict


def test_report_without_baseline(scored, tmp_path):
    page, verdict = page_for(scored, tmp_path)
    assert page.count('src="data:image/png;base64,') == 6  # PR, confusion, distance, reliability, latency, scenes
    assert not re.search(r'(src|href)="(http|//)', page)
    assert ("NOT BLESSED" in page) == (not verdict.blessed)
    assert "production IoU" not in page and "no production model" in page
    assert "log-x" in page  # the feedback weights


def test_report_with_baseline_shows_production_columns(scored, tmp_path):
    page, verdict = page_for(scored, tmp_path, baseline={k: v for k, v in scored.items() if k != "hardware"})
    assert "production IoU" in page and "production mIoU" in page and "candidate, all scenes" in page
    assert any(c["check"] == "regression" and c["passed"] for c in verdict.checks)
    assert "Paired regression test against model:bev_segnet@v8" in page and "all: mIoU" not in page  # all passed


def test_report_shows_intervals_slices_and_calibration(scored, tmp_path):
    page, _verdict = page_for(scored, tmp_path)
    assert "How sure: intervals, slices, calibration" in page and "Reliability" not in page.split("<h2>")[0]
    assert "IoU [95% CI]" in page and "city=" in page and "distance=0-20" in page and "too small: " in page
    miou = scored["statistics"]["slices"]["all"]["metrics"]["miou"]
    assert f"{miou['value']:.3f} [{miou['low']:.3f}, {miou['high']:.3f}]" in page


def test_interval_point_values_are_the_point_metrics(scored):
    """The tallies and the accumulators are two ways to the same counts: the values must agree."""
    slices = scored["statistics"]["slices"]
    overall = slices["all"]["metrics"]
    seg = scored["segmentation"]
    assert overall["miou"]["value"] == pytest.approx(seg["miou"])
    for name, m in seg["classes"].items():
        if m["points"]:
            assert overall[f"iou/{name}"]["value"] == pytest.approx(m["iou"])
            assert overall[f"recall/{name}"]["value"] == pytest.approx(m["recall"])
            assert overall[f"iou/{name}"]["evidence"] == m["points"]
        else:
            assert f"iou/{name}" not in overall
    planner = scored["planner"]
    for rate in ("missed_brake_rate", "false_brake_rate"):
        assert overall.get(rate, {}).get("value") == (pytest.approx(planner[rate]) if planner[rate] is not None else None)
    for name, o in scored["objects"].items():
        for band, block in o["bands"].items():
            got = slices[f"distance={band}"]["metrics"].get(f"object_recall/{name}")
            assert (got and got["value"]) == (pytest.approx(block["recall"]) if block["recall"] is not None else None)
    assert slices["all"]["frames"] == seg["frames"] and slices["all"]["points"] == seg["points"]
    assert sum(slices[f"city={c}"]["logs"] for c in {s["city"] for s in scored["scenes"].values()}) == len(scored["scenes"])
    assert sum(s["frames"] for n, s in slices.items() if n.startswith("speed_mps=")) == seg["frames"]
    reliability = scored["statistics"]["reliability"]
    assert sum(reliability["points"]) == seg["points"]
    gap = sum(n * abs(a - c) for n, a, c in zip(reliability["points"], reliability["accuracy"],
                                                 reliability["confidence"]) if n)
    assert overall["ece"]["value"] == pytest.approx(gap / seg["points"])


def test_metrics_json_is_byte_identical_from_two_scorings(frames, tmp_path):
    first = metrics_of(score(frames)[1])[0].save_to(str(tmp_path / "a"))
    second = metrics_of(score(frames)[1])[0].save_to(str(tmp_path / "b"))
    assert open(first, "rb").read() == open(second, "rb").read()
    assert statistics.ALL in EvaluationMetrics.load(first).candidate["statistics"]["slices"]
