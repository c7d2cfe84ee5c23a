"""evaluation.report and evaluation.scoring without Spark: a tiny untrained model scored on simulated
frames, and the report page with and without a production baseline."""

from __future__ import annotations

import re

import pytest
import torch

from evaluation import blessing, hardware, report, scoring
from evaluation.frames import LoggedFrame
from pipeline.config import EvaluateConfig, SimulateConfig
from pipeline.contracts import EvaluationMetrics
from tests.evaluation.builders import TINY_MODEL


@pytest.fixture(scope="module")
def frames():
    from spark_jobs.simulator import fleet_plan, simulate_log

    sim = SimulateConfig(logs=2, frames=2, beams=8, azimuth_steps=128, seed=1)
    return [LoggedFrame(f.log_id, f.frame_index, meta.city, f.points, f.labels, f.boxes, float(f.ego[4]))
            for meta in fleet_plan(sim) for f in simulate_log(meta, sim)]


@pytest.fixture(scope="module")
def scored(frames, tmp_path_factory):
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model("bev_segnet", TINY_MODEL).eval()
    result = scoring.score_model(model, frames, scoring.Settings.from_config(EvaluateConfig()), say=lambda _m: None)
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


def page_for(scored, tmp_path, baseline=None):
    verdict = blessing.decide(scored, EvaluateConfig(), baseline)
    metrics = EvaluationMetrics(
        model="model:bev_segnet@v9", model_name="bev_segnet", dataset="dataset:fleet-lidar@v2", split="test",
        metrics_ref="metrics:bev_segnet@v3", created_at="now", host="test", code_version="abc", settings_key="k",
        thresholds={"latency_p99_budget_ms": 500.0}, candidate=scored, baseline=baseline,
        baseline_model="model:bev_segnet@v8" if baseline else None, baseline_source=None,
        verdict={"blessed": verdict.blessed, "reasons": verdict.reasons, "checks": verdict.checks},
        worst_scenes=scoring.worst_scenes(scored["scenes"], 3), feedback={"weights": {"log-x": 2.0}, "file": "f"})
    # The stage renders what metrics.json holds (strict JSON), so the test does too.
    strict = EvaluationMetrics.parse(metrics.dumps(), "metrics.json")
    return open(report.write_report(str(tmp_path), strict)).read(), verdict


def test_report_without_baseline(scored, tmp_path):
    page, verdict = page_for(scored, tmp_path)
    assert page.count('src="data:image/png;base64,') == 5
    assert not re.search(r'(src|href)="(http|//)', page)
    assert ("NOT BLESSED" in page) == (not verdict.blessed)
    assert "production IoU" not in page and "no production model" in page
    assert "log-x" in page  # the feedback weights


def test_report_with_baseline_shows_production_columns(scored, tmp_path):
    page, verdict = page_for(scored, tmp_path, baseline={k: v for k, v in scored.items() if k != "hardware"})
    assert "production IoU" in page and "production mIoU" in page and "candidate, all scenes" in page
    assert any(c["check"] == "class_regression" and c["passed"] for c in verdict.checks)
