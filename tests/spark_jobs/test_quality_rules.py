"""spark_jobs.quality: every check of ``frame_problem`` with the exact sentence it gives (frame, what, how
many), the checks the other file does not feed (box and ego NaN/inf, bad shapes, box class ids), the
boundaries (exactly ``max_points``, a size of 0, class id ``NUM_CLASSES - 1``), and what ``normalise``
casts to."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.frames import Frame
from pipeline.taxonomy import NUM_CLASSES
from spark_jobs.quality import frame_problem, normalise

BOX = [1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.3, 5.0, 7.0]


def frame(n=10, box_rows=(BOX,), **changes):
    """A clean frame of ``n`` points and ``box_rows``, then ``changes`` set as they are (no reshaping)."""
    f = Frame(log_id="log-q", frame_index=12, timestamp_ns=1, points=np.ones((n, 4), np.float32),
              labels=np.arange(n, dtype=np.uint8) % NUM_CLASSES, boxes=np.array(box_rows, np.float32).reshape(-1, 9))
    for name, value in changes.items():
        setattr(f, name, value)
    return f


def test_a_clean_frame_with_and_without_boxes_has_no_problem():
    assert frame_problem(frame(), 10) is None
    assert frame_problem(frame(box_rows=()), 10) is None


def test_exactly_max_points_is_allowed_and_one_more_is_not():
    assert frame_problem(frame(n=10), 10) is None
    assert frame_problem(frame(n=11), 10) == "frame 12: 11 points, more than ingest.max_points=10"


@pytest.mark.parametrize("points, shape", [(np.ones((10, 3), np.float32), "(10, 3)"),
                                           (np.ones((10, 5), np.float32), "(10, 5)"),
                                           (np.ones(40, np.float32), "(40,)")])
def test_points_of_the_wrong_shape(points, shape):
    assert frame_problem(frame(points=points), 100) == f"frame 12: points have shape {shape}, expected (N, 4)"


def test_non_finite_points_are_counted():
    f = frame()
    f.points[[1, 4], 0] = np.nan
    f.points[4, 2] = np.inf  # the same point twice counts once
    f.points[7, 3] = -np.inf
    assert frame_problem(f, 100) == "frame 12: 3 points with NaN or inf coordinates/intensity"


def test_label_count_must_match_the_points():
    assert frame_problem(frame(labels=np.zeros(9, np.uint8)), 100) == "frame 12: 9 labels for 10 points"
    assert frame_problem(frame(labels=np.zeros((10, 2), np.uint8)), 100) == "frame 12: 10 labels for 10 points"
    assert frame_problem(frame(labels=np.array(3, np.uint8)), 100) == "frame 12: 0 labels for 10 points"


def test_the_last_taxonomy_id_is_a_label_and_the_next_is_not():
    labels = np.zeros(10, np.uint8)
    labels[3] = NUM_CLASSES - 1
    assert frame_problem(frame(labels=labels), 100) is None
    labels[5] = NUM_CLASSES
    assert frame_problem(frame(labels=labels), 100) == (
        f"frame 12: label id {NUM_CLASSES} is outside the taxonomy (0..{NUM_CLASSES - 1})")


@pytest.mark.parametrize("boxes, shape", [(np.ones((2, 8), np.float32), "(2, 8)"),
                                          (np.ones(9, np.float32), "(9,)")])
def test_boxes_of_the_wrong_shape(boxes, shape):
    assert frame_problem(frame(boxes=boxes), 100) == f"frame 12: boxes have shape {shape}, expected (M, 9)"


@pytest.mark.parametrize("column", range(9))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_box_with_nan_or_inf_anywhere_is_a_problem(column, bad):
    boxes = np.array([BOX, BOX], np.float32)
    boxes[1, column] = bad
    assert frame_problem(frame(boxes=boxes), 100) == "frame 12: a box has NaN or inf values"


@pytest.mark.parametrize("column", [3, 4, 5])
def test_a_box_size_of_zero_or_less_names_the_box(column):
    boxes = np.array([BOX, BOX, BOX], np.float32)
    boxes[1, column] = 0.0
    boxes[2, column] = -1.0
    sizes = boxes[1, 3:6].tolist()
    assert frame_problem(frame(boxes=boxes), 100) == f"frame 12: box 1 has a non-positive size {sizes}"


def test_a_size_of_exactly_zero_is_a_problem_and_the_first_bad_box_is_named():
    small = BOX[:3] + [1.0, 0.5, 1.0] + BOX[6:]  # sizes of at most 1 m are fine
    boxes = np.array([small, small, BOX], np.float32)
    boxes[2, 5] = 0.0
    assert frame_problem(frame(boxes=boxes), 100) == "frame 12: box 2 has a non-positive size [4.0, 2.0, 0.0]"


def test_a_tiny_positive_size_is_fine():
    boxes = np.array([BOX], np.float32)
    boxes[0, 3:6] = 1e-3
    assert frame_problem(frame(boxes=boxes), 100) is None


@pytest.mark.parametrize("class_id, ok", [(0.0, True), (NUM_CLASSES - 1, True), (NUM_CLASSES, False), (-1.0, False),
                                          (2.5, False)])
def test_box_class_ids_must_be_whole_taxonomy_ids(class_id, ok):
    boxes = np.array([BOX], np.float32)
    boxes[0, 7] = class_id
    problem = frame_problem(frame(boxes=boxes), 100)
    assert problem is None if ok else problem == "frame 12: a box class id is outside the taxonomy"


@pytest.mark.parametrize("column", range(6))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_ego_state_with_nan_or_inf_is_a_problem(column, bad):
    ego = np.zeros(6)
    ego[column] = bad
    assert frame_problem(frame(ego=ego), 100) == "frame 12: ego state has NaN or inf values"


def test_a_missing_gps_fix_is_not_a_problem():
    assert frame_problem(frame(gps=np.full(3, np.nan), route=np.full(3, np.nan)), 100) is None


def test_the_first_problem_found_is_the_one_reported():
    f = frame(n=11, ego=np.full(6, np.nan))
    f.points[0, 0] = np.nan
    assert frame_problem(f, 10).startswith("frame 12: 11 points")  # point count before values before ego


def test_normalise_casts_to_the_stored_dtypes_and_keeps_values():
    f = Frame(log_id="l", frame_index=0, timestamp_ns=0, points=np.arange(8, dtype=np.float64).reshape(2, 4),
              labels=np.array([1, 2], np.int64), boxes=np.array(BOX, np.float64), ego=np.arange(6, dtype=np.float32),
              gps=np.array([1, 2, 3], np.float32), route=np.array([4, 5, 6], np.int32))
    out = normalise(f)
    expected = {"points": np.float32, "labels": np.uint8, "boxes": np.float32, "ego": np.float64, "gps": np.float64,
                "route": np.float64}
    for name, dtype in expected.items():
        assert getattr(out, name).dtype == dtype, name
    assert out.points.flags["C_CONTIGUOUS"] and out.labels.flags["C_CONTIGUOUS"] and out.boxes.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out.points, np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(out.labels, [1, 2])
    assert out.boxes.shape == (1, 9) and out.boxes[0].tolist() == pytest.approx(BOX)
    np.testing.assert_array_equal(out.ego, np.arange(6))
    np.testing.assert_array_equal(out.gps, [1, 2, 3])
    np.testing.assert_array_equal(out.route, [4, 5, 6])


def test_normalise_gives_an_empty_box_list_its_nine_columns():
    f = frame(box_rows=())
    f.boxes = np.zeros(0)
    assert normalise(f).boxes.shape == (0, 9)


@pytest.mark.parametrize("raw, stored", [([0, 255, 3], [0, 255, 3]), ([-1, 3], [255, 3]), ([256, 3], [255, 3]),
                                         ([-300, 1000, 2], [255, 255, 2]), ([-1, 0, 255, 7], [255, 0, 255, 7])])
def test_labels_outside_uint8_become_255_instead_of_wrapping(raw, stored):
    f = frame(n=len(raw), labels=np.array(raw, np.int64))
    assert normalise(f).labels.tolist() == stored


def test_normalise_keeps_an_empty_label_array():
    f = frame(n=0, labels=np.array([], np.int64))
    assert normalise(f).labels.shape == (0,) and normalise(f).labels.dtype == np.uint8
