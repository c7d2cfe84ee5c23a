"""evaluation.objects: BEV grouping of predicted points and their matching to boxes, on constructed
scenes whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import objects as obj
from pipeline.taxonomy import CLASS_ID

VEHICLE, PEDESTRIAN, CYCLIST, GROUND = (CLASS_ID[c] for c in ("vehicle", "pedestrian", "cyclist", "ground"))
SETTINGS = obj.ObjectSettings(radius=0.75, min_points=5, min_share=0.5, margin=0.2, band_edges=(20.0, 40.0))


def box(cx, cy, length, width, class_id, track, yaw=0.0, height=1.6):
    return [cx, cy, 0.0, length, width, height, yaw, class_id, track]


def fill(b, spacing=0.15):
    """A grid of points filling the box's footprint (axis-aligned boxes only), at its centre height."""
    cx, cy, cz, length, width = b[:5]
    xs = np.arange(cx - length / 2 + 0.05, cx + length / 2, spacing)
    ys = np.arange(cy - width / 2 + 0.05, cy + width / 2, spacing)
    xx, yy = np.meshgrid(xs, ys)
    return np.column_stack([xx.ravel(), yy.ravel(), np.full(xx.size, cz), np.full(xx.size, 0.5)])


def scene(boxes, extra_points=None, extra_labels=None):
    """Points inside every box labelled with the box's class, ground far away, plus extras."""
    parts, labels = [], []
    for b in boxes:
        p = fill(b)
        parts.append(p)
        labels.append(np.full(len(p), int(b[7])))
    ground = np.column_stack([np.linspace(-30, -20, 50), np.zeros(50), np.full(50, -1.8), np.zeros(50)])
    parts.append(ground)
    labels.append(np.full(50, GROUND))
    if extra_points is not None:
        parts.append(np.asarray(extra_points, float))
        labels.append(np.asarray(extra_labels))
    return (np.concatenate(parts).astype(np.float32), np.concatenate(labels).astype(np.uint8),
            np.asarray(boxes, np.float32).reshape(-1, 9))


def summarize(frames):
    acc = obj.ObjectAccumulator(SETTINGS)
    for points, labels, predicted, boxes in frames:
        acc.update(obj.match_frame(points, labels, predicted, boxes, SETTINGS))
    return acc.summary()


THREE = [box(10, 0, 4.5, 1.9, VEHICLE, 1), box(25, 5, 0.6, 0.6, PEDESTRIAN, 2), box(45, -3, 1.8, 0.7, CYCLIST, 3)]


def test_clusters_follow_the_radius_and_drop_small_groups():
    xy = np.array([[0, 0], [0.5, 0], [1.0, 0], [1.5, 0], [2.0, 0],  # a chain: one group
                   [10, 0], [10.5, 0],  # too small
                   [20, 0], [20.7, 0], [21.4, 0], [22.1, 0], [22.8, 0]])  # spacing 0.7 < 0.75: one group
    ids = obj.cluster_points(xy, 0.75, 5)
    assert ids.tolist() == [0] * 5 + [-1] * 2 + [1] * 5
    assert obj.cluster_points(xy, 0.6, 5).tolist() == [0] * 5 + [-1] * 7
    assert obj.cluster_points(np.zeros((0, 2)), 0.75, 5).tolist() == []


def _single_linkage_by_every_pair(xy, radius, min_points):
    """The definition, computed independently: every pair within radius linked, groups by scipy."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(xy), len(xy)))
    component = connected_components(graph, directed=False)[1]
    return component, np.bincount(component)[component] >= min_points


@pytest.mark.parametrize("seed", range(4))
def test_clusters_equal_single_linkage_over_every_pair_to_the_last_bit(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        radius = float(rng.choice([0.1, 0.5, 0.75, 1.0]))
        min_points = int(rng.integers(1, 6))
        xy = rng.uniform(-1, 1, (int(rng.integers(1, 500)), 2)) * float(rng.choice([1, 3, 10, 30]))
        if rng.random() < 0.5:  # pairs exactly radius apart or a rounding error off, and duplicates
            xy = np.round(xy, 1)
        ids = obj.cluster_points(xy, radius, min_points)
        component, kept = _single_linkage_by_every_pair(xy, radius, min_points)
        assert ((ids >= 0) == kept).all()
        # the same partition: one id per reference group, one reference group per id
        pairs = {(int(c), int(i)) for c, i in zip(component[kept], ids[kept])}
        assert len(pairs) == len({c for c, _ in pairs}) == len({i for _, i in pairs})
        first_seen = list(dict.fromkeys(ids[kept].tolist()))
        assert first_seen == sorted(first_seen)  # numbered by first point


def test_perfect_segmentation_finds_every_object_in_its_band():
    points, labels, boxes = scene(THREE)
    result = summarize([(points, labels, labels, boxes)])
    for name, band in (("vehicle", "0-20"), ("pedestrian", "20-40"), ("cyclist", "40+")):
        assert (result[name]["precision"], result[name]["recall"]) == (1.0, 1.0)
        assert result[name]["objects"] == 1
        assert result[name]["bands"][band]["recall"] == 1.0
        others = [b for b in SETTINGS.band_names() if b != band]
        assert all(result[name]["bands"][b]["objects"] == 0 for b in others)


def test_wrong_class_is_a_false_positive_and_a_miss():
    points, labels, boxes = scene(THREE)
    predicted = labels.copy()
    predicted[labels == PEDESTRIAN] = VEHICLE
    result = summarize([(points, labels, predicted, boxes)])
    assert result["pedestrian"]["recall"] == 0.0 and result["pedestrian"]["predicted"] == 0
    assert result["vehicle"]["predicted"] == 2 and result["vehicle"]["precision"] == 0.5
    assert result["vehicle"]["recall"] == 1.0


def test_noise_and_unseen_boxes_are_not_counted():
    # A pedestrian box with only 2 labelled points (occluded) and 3 stray predicted vehicle points.
    hidden = box(15, -8, 0.6, 0.6, PEDESTRIAN, 9)
    stray = [[30, 10, 0, 0.5], [30.2, 10, 0, 0.5], [30.4, 10, 0, 0.5]]
    points, labels, boxes = scene(THREE, [[15, -8, 0, 0.5], [15.1, -8, 0, 0.5]] + stray,
                                  [PEDESTRIAN, PEDESTRIAN, GROUND, GROUND, GROUND])
    boxes = np.vstack([boxes, np.asarray([hidden], np.float32)])
    predicted = labels.copy()
    predicted[-3:] = VEHICLE
    result = summarize([(points, labels, predicted, boxes)])
    assert result["pedestrian"]["objects"] == 1  # the hidden one is not expected
    assert result["vehicle"]["predicted"] == 1 and result["vehicle"]["precision"] == 1.0


def test_two_touching_vehicles_merge_into_one_prediction():
    pair = [box(10, 0, 4.5, 1.9, VEHICLE, 1), box(15.0, 0, 4.5, 1.9, VEHICLE, 2)]  # 0.5 m apart
    points, labels, boxes = scene(pair)
    result = summarize([(points, labels, labels, boxes)])["vehicle"]
    assert result["predicted"] == 1 and result["objects"] == 2
    # the merged group holds exactly half its points in each box (min_share 0.5): it matches one of them
    assert (result["precision"], result["recall"]) == (1.0, 0.5)


def test_a_prediction_mostly_outside_its_box_does_not_match():
    truth = box(10, 0, 1.0, 1.0, VEHICLE, 1)
    points, labels, boxes = scene([truth])
    # predicted vehicle: the box's points plus three times as many ground points next to it
    beside = fill(box(11.9, 0, 2.2, 1.0, GROUND, 0))
    points = np.vstack([points, beside.astype(np.float32)])
    labels = np.concatenate([labels, np.full(len(beside), GROUND, np.uint8)])
    predicted = labels.copy()
    predicted[-len(beside):] = VEHICLE
    assert len(beside) > (labels == VEHICLE).sum()
    result = summarize([(points, labels, predicted, boxes)])["vehicle"]
    assert (result["predicted"], result["precision"], result["recall"]) == (1, 0.0, 0.0)


def test_rotated_box_and_bands_over_several_frames():
    rotated = box(30, -30, 4.5, 1.9, VEHICLE, 5, yaw=np.pi / 4)  # centre at 42.4 m: band 40+
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    local = fill(box(0, 0, 4.5, 1.9, VEHICLE, 5))
    pts = np.column_stack([30 + c * local[:, 0] - s * local[:, 1], -30 + s * local[:, 0] + c * local[:, 1],
                           local[:, 2], local[:, 3]]).astype(np.float32)
    labels = np.full(len(pts), VEHICLE, np.uint8)
    frame_a = (pts, labels, labels, np.asarray([rotated], np.float32))
    points, labels_b, boxes_b = scene(THREE)
    missed = labels_b.copy()
    missed[labels_b == VEHICLE] = GROUND
    frame_b = (points, labels_b, missed, boxes_b)
    result = summarize([frame_a, frame_b])["vehicle"]
    assert result["objects"] == 2 and result["recall"] == 0.5
    assert result["bands"]["40+"]["recall"] == 1.0 and result["bands"]["0-20"]["recall"] == 0.0


def test_band_parsing():
    assert obj.parse_bands("20,40") == (20.0, 40.0)
    assert obj.ObjectSettings(band_edges=(10.0,)).band_names() == ["0-10", "10+"]
    for bad in ("40,20", "-5", "x"):
        with pytest.raises(ValueError):
            obj.parse_bands(bad)
