"""evaluation.feedback: which logs get up-weighted, and a merge into the ingest feedback file that keeps
everyone else's weights, never lowers one, and is read back by ingest."""

from __future__ import annotations

import json
import os
import threading

from evaluation import feedback
from pipeline.home import Home
from tests.manifests import make_manifest

MANIFEST = make_manifest("dataset:test@v1", {
    "train": {"logs": ["t-city-a-cars", "t-city-a-people", "t-city-a-mixed", "t-city-b-cars"], "frames": 4, "points": 400,
              "row_groups": [4]},
    "test": {"logs": ["x-city-a-cars", "x-city-c"], "frames": 2, "points": 700, "row_groups": [2]},
}, {
    "t-city-a-cars": {"city": "a", "class_points": {"1": 50, "5": 50}},
    "t-city-a-people": {"city": "a", "class_points": {"1": 50, "6": 50}},
    "t-city-a-mixed": {"city": "a", "class_points": {"1": 50, "5": 25, "6": 25}},
    "t-city-b-cars": {"city": "b", "class_points": {"1": 50, "5": 50}},
    "x-city-a-cars": {"city": "a", "class_points": {"0": 500, "1": 48, "5": 52}},
    "x-city-c": {"city": "c", "class_points": {"1": 50, "6": 50}},
})


def test_similar_train_logs_are_from_the_same_city_and_closest_in_class_mix():
    assert feedback.similar_train_logs("x-city-a-cars", MANIFEST, 2) == ["t-city-a-cars", "t-city-a-mixed"]
    # no train log in city c: the closest of any city
    assert feedback.similar_train_logs("x-city-c", MANIFEST, 1) == ["t-city-a-people"]
    assert feedback.similar_train_logs("x-city-c", MANIFEST, 0) == []


def test_hard_scene_weights_cover_the_scenes_and_their_neighbours():
    weights = feedback.hard_scene_weights(["x-city-a-cars"], MANIFEST, 2.0, 1)
    assert weights == {"x-city-a-cars": 2.0, "t-city-a-cars": 2.0}


def test_merge_keeps_other_logs_and_never_lowers_a_weight(tmp_path):
    folder = str(tmp_path / "feedback")
    os.makedirs(folder)
    with open(os.path.join(folder, feedback.WEIGHTS_FILE), "w") as fh:
        json.dump({"someone-elses-log": 0.5, "t-city-a-cars": 3.0}, fh)
    path, merged = feedback.merge_sample_weights(folder, {"t-city-a-cars": 2.0, "x-city-a-cars": 2.0})
    assert merged == {"someone-elses-log": 0.5, "t-city-a-cars": 3.0, "x-city-a-cars": 2.0}
    assert json.loads(open(path).read()) == merged
    # running again changes nothing (no compounding)
    assert feedback.merge_sample_weights(folder, {"x-city-a-cars": 2.0})[1] == merged
    # nothing but the file and its lock is left behind
    assert sorted(os.listdir(folder)) == [feedback.WEIGHTS_FILE, feedback.WEIGHTS_FILE + ".lock"]


def test_concurrent_merges_lose_nothing(tmp_path):
    folder = str(tmp_path / "feedback")
    threads = [threading.Thread(target=feedback.merge_sample_weights, args=(folder, {f"log-{i}": 2.0}))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(open(os.path.join(folder, feedback.WEIGHTS_FILE)).read()) == {f"log-{i}": 2.0 for i in range(8)}


def test_ingest_reads_what_evaluation_writes(tmp_path):
    from spark_jobs.ingest import _sample_weights

    home = Home.from_config(str(tmp_path / "home"))
    feedback.merge_sample_weights(home.join("feedback"), {"x-city-a-cars": 2.0})
    assert _sample_weights(home, ["x-city-a-cars", "other"]) == {"x-city-a-cars": 2.0}
