"""Object-level metrics from a per-point segmentation: group points into objects, match them to boxes.

A segmentation model outputs no objects, but what the planner and the people reading a report care
about is objects ("did we see that pedestrian?"), so the evaluation makes them:

* **Predicted objects.** For each object class (vehicle, pedestrian, cyclist) the points predicted as
  that class are grouped in bird's-eye view by single-linkage clustering: two points closer than
  ``radius`` (x, y only) belong to the same object, and so do chains of such points (connected components
  of the radius graph, i.e. DBSCAN with ``min_samples=1``). A group with fewer than ``min_points`` points
  is noise and dropped.
* **Ground-truth objects.** The frame's boxes of object classes that hold at least ``min_points`` points
  labelled with the box's class: a box the sensor did not see (occluded, out of range) cannot be found
  from points and is not counted.
* **Matching.** A predicted object matches a box of the same class when at least ``min_share`` of its
  points lie inside the box grown by ``margin`` (points on a face, range noise). Pairs are taken greedily
  by the number of shared points, each object and box at most once. Unmatched predictions are false
  positives, unmatched boxes false negatives.
* **Distance bands.** A box counts in the band of its centre's planar range, a prediction in the band
  of its points' centroid's.

Known limits, on purpose (simple and stated): two objects closer than ``radius`` merge into one
prediction, which matches at most one of their boxes (and none when neither holds half its points);
one object split by a gap wider than ``radius`` gives two predictions, one of which is a false positive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from pipeline.geometry import points_in_boxes
from pipeline.taxonomy import CLASSES, IGNORE, OBJECT_CLASS_IDS


@dataclass(frozen=True)
class ObjectSettings:
    """How points become objects and when an object matches a box (see the module docstring)."""

    radius: float = 0.75
    min_points: int = 5
    min_share: float = 0.5
    margin: float = 0.2
    band_edges: tuple[float, ...] = (20.0, 40.0)

    def band_names(self) -> list[str]:
        """``["0-20", "20-40", "40+"]`` for edges (20, 40)."""
        return band_names(self.band_edges)

    def band_of(self, distance: np.ndarray | float) -> np.ndarray:
        """Index of the distance band of each planar range."""
        return np.searchsorted(np.asarray(self.band_edges), np.asarray(distance), side="right")


def band_names(edges: Sequence[float]) -> list[str]:
    """Names of the bands cut by ``edges``: ``["0-20", "20-40", "40+"]`` for (20, 40)."""
    lows = (0.0, *edges)
    names = [f"{lo:g}-{hi:g}" for lo, hi in zip(lows, edges)]
    return names + [f"{lows[-1]:g}+"]


def parse_bands(text: str, where: str = "evaluate.distance_bands_m", unit: str = "metres") -> tuple[float, ...]:
    """``"20,40"`` -> (20.0, 40.0); the edges must be positive and increasing (``where`` names the setting)."""
    try:
        edges = tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a comma-separated list of {unit}") from None
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"{where}: {text!r} must be positive and increasing, e.g. 20,40")
    return edges


def cluster_points(xy: np.ndarray, radius: float, min_points: int) -> np.ndarray:
    """Cluster id of each point (0, 1, ...) by single linkage at ``radius`` in the plane, or -1 for points
    in a group smaller than ``min_points``. Ids are ordered by each cluster's first point.

    Exact single linkage without listing every close pair (a real scan predicted as objects everywhere has
    tens of millions of them, seconds and gigabytes per frame): the plane is cut into square cells whose
    diagonal is ``radius``, so the points of one cell are always linked, and two cells are linked when a
    point of one lies within ``radius`` of a point of the other, which one nearest-neighbour query per
    point and neighbouring cell answers (only cells at most two apart can be that close).
    """
    xy = np.asarray(xy, np.float64)
    n = len(xy)
    if n == 0:
        return np.zeros(0, np.int64)
    xy = xy.reshape(n, -1)[:, :2]
    side = radius / np.sqrt(2) * (1 - 1e-9)  # a hair under: two points of one cell are < radius apart
    scaled = (xy - xy.min(axis=0)) / side
    cell_ij = np.floor(scaled).astype(np.int64)
    within = scaled - cell_ij  # where each point lies in its cell, in [0, 1)
    width = int(cell_ij[:, 1].max()) + 5  # room for the offsets below: no two cells share a key
    cell_key = cell_ij[:, 0] * width + cell_ij[:, 1] + 2
    keys, cell_of = np.unique(cell_key, return_inverse=True)
    cell_of = cell_of.reshape(-1)
    # The third coordinate is the cell's index times more than radius, so a query lifted to one cell's
    # index finds only that cell's points within radius.
    lift = 2.0 * radius + 1.0
    tree = cKDTree(np.column_stack([xy, cell_of * lift]))
    src, dst = [cell_of[:0]], [cell_of[:0]]
    for di, dj in [(0, 1), (0, 2), *((1, d) for d in range(-2, 3)), *((2, d) for d in range(-1, 2))]:
        # each unordered pair of neighbouring cells once; cells two apart on both axes are too far
        gap_i = np.maximum(0.0, np.maximum(di - within[:, 0], within[:, 0] - (di + 1)))
        gap_j = np.maximum(0.0, np.maximum(dj - within[:, 1], within[:, 1] - (dj + 1)))
        near = np.hypot(gap_i, gap_j) * side <= radius * (1 + 1e-6)  # can reach that cell at all (rounding aside)
        wanted = cell_key + di * width + dj
        target = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        ask = np.flatnonzero(near & (keys[target] == wanted))
        if len(ask) == 0:
            continue
        _, nearest = tree.query(np.column_stack([xy[ask], target[ask] * lift]), k=1,
                                distance_upper_bound=radius * (1 + 1e-6))
        found = nearest < n
        ask, nearest = ask[found], nearest[found]
        dx, dy = (xy[ask] - xy[nearest]).T
        hit = ask[dx * dx + dy * dy <= radius * radius]  # the test query_pairs makes, to the last bit
        src.append(cell_of[hit])
        dst.append(target[hit])
    src_all, dst_all = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(src_all), np.int8), (src_all, dst_all)), shape=(len(keys), len(keys)))
    _count, cell_component = connected_components(graph, directed=False)
    component = cell_component[cell_of]
    sizes = np.bincount(component)
    keep = sizes[component] >= min_points
    # Renumber the kept components 0.. in order of first appearance so results do not depend on scipy.
    _, first = np.unique(component[keep], return_index=True)
    renumber = np.full(len(sizes), -1, np.int64)
    renumber[component[keep][np.sort(first)]] = np.arange(len(first))
    out = np.full(n, -1, np.int64)
    out[keep] = renumber[component[keep]]
    return out


def _grown(boxes: np.ndarray, margin: float) -> np.ndarray:
    grown = np.array(boxes, np.float64, copy=True)
    grown[:, 3:6] += 2 * margin
    return grown


@dataclass
class FrameObjects:
    """Per object class: what was predicted, what was there, and what matched (one frame)."""

    # class id -> arrays, one entry per object
    predicted_band: dict[int, np.ndarray] = field(default_factory=dict)
    predicted_matched: dict[int, np.ndarray] = field(default_factory=dict)
    truth_band: dict[int, np.ndarray] = field(default_factory=dict)
    truth_matched: dict[int, np.ndarray] = field(default_factory=dict)


def visible_boxes(points: np.ndarray, labels: np.ndarray, boxes: np.ndarray, class_id: int,
                  min_points: int) -> np.ndarray:
    """Indexes of the boxes of ``class_id`` holding at least ``min_points`` points labelled ``class_id``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 9)
    of_class = np.flatnonzero(boxes[:, 7].astype(np.int64) == class_id)
    if len(of_class) == 0:
        return of_class
    mine = labels == class_id
    owner = points_in_boxes(np.asarray(points, np.float64)[mine, :3], boxes[of_class])
    counts = np.bincount(owner[owner >= 0], minlength=len(of_class))
    return of_class[counts >= min_points]


def match_frame(points: np.ndarray, labels: np.ndarray, predicted: np.ndarray, boxes: np.ndarray,
                settings: ObjectSettings, classes: Sequence[int] = OBJECT_CLASS_IDS) -> FrameObjects:
    """Objects of one frame: cluster the predicted points of each class and match them to its boxes."""
    out = FrameObjects()
    points = np.asarray(points)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 9)
    for c in classes:
        truth = visible_boxes(points, labels, boxes, c, settings.min_points)
        # points labelled ignore are left out of every metric: an unlabelled region (all of a KITTI frame
        # outside the camera's boxes) holds no ground truth to match a prediction against
        mine = np.flatnonzero((predicted == c) & (labels != IGNORE))
        cluster = cluster_points(points[mine, :2], settings.radius, settings.min_points)
        clusters = int(cluster.max()) + 1 if len(cluster) else 0
        # shared[k, j]: points of predicted object k inside (grown) box j
        shared = np.zeros((clusters, len(truth)), np.int64)
        sizes = np.bincount(cluster[cluster >= 0], minlength=clusters)
        if clusters and len(truth):
            kept = cluster >= 0
            owner = points_in_boxes(points[mine[kept], :3].astype(np.float64), _grown(boxes[truth], settings.margin))
            inside = owner >= 0
            np.add.at(shared, (cluster[kept][inside], owner[inside]), 1)
        predicted_matched = np.zeros(clusters, bool)
        truth_matched = np.zeros(len(truth), bool)
        # Greedy one-to-one: the pairs sharing the most points first.
        for k, j in sorted(zip(*np.nonzero(shared)), key=lambda kj: (-shared[kj], kj[0], kj[1])):
            if predicted_matched[k] or truth_matched[j] or shared[k, j] < settings.min_share * sizes[k]:
                continue
            predicted_matched[k] = truth_matched[j] = True
        centroids = np.zeros((clusters, 2))
        if clusters:
            kept = cluster >= 0
            for axis in (0, 1):
                centroids[:, axis] = np.bincount(cluster[kept], weights=points[mine[kept], axis],
                                                 minlength=clusters) / np.maximum(sizes, 1)
        out.predicted_band[c] = settings.band_of(np.hypot(centroids[:, 0], centroids[:, 1]))
        out.predicted_matched[c] = predicted_matched
        out.truth_band[c] = settings.band_of(np.hypot(boxes[truth, 0], boxes[truth, 1]))
        out.truth_matched[c] = truth_matched
    return out


def band_counts(frame: FrameObjects, bands: int) -> dict[int, np.ndarray]:
    """Per object class of one frame: ``[bands, 4]`` matched predictions, predictions, matched truths, truths."""
    out = {}
    for c in frame.truth_band:
        out[c] = np.stack([np.bincount(frame.predicted_band[c][frame.predicted_matched[c]], minlength=bands),
                           np.bincount(frame.predicted_band[c], minlength=bands),
                           np.bincount(frame.truth_band[c][frame.truth_matched[c]], minlength=bands),
                           np.bincount(frame.truth_band[c], minlength=bands)], axis=1).astype(np.int64)
    return out


@dataclass
class ObjectAccumulator:
    """True positives, false positives and false negatives per class and distance band, summed."""

    settings: ObjectSettings
    # counts[class id] -> [bands, 4]: matched predictions, predictions, matched truths, truths
    counts: dict[int, np.ndarray] = field(default_factory=dict)

    def update(self, frame: FrameObjects) -> None:
        for c, counts in band_counts(frame, len(self.settings.band_edges) + 1).items():
            self.counts[c] = self.counts.get(c, 0) + counts

    def summary(self) -> dict[str, Any]:
        """Per class: precision, recall and counts overall and per distance band."""
        names = self.settings.band_names()
        out = {}
        for c, counts in sorted(self.counts.items()):
            def block(row: np.ndarray) -> dict[str, Any]:
                tp_pred, pred, tp_truth, truth = (int(v) for v in row)
                # Matched predictions and matched boxes are equal in number overall, but may fall in
                # different bands (a prediction's centroid vs its box's centre), so both are kept.
                return {"precision": tp_pred / pred if pred else None, "recall": tp_truth / truth if truth else None,
                        "predicted": pred, "matched_predicted": tp_pred, "objects": truth,
                        "matched_objects": tp_truth, "false_positive": pred - tp_pred,
                        "false_negative": truth - tp_truth}
            out[CLASSES[c]] = {**block(counts.sum(axis=0)),
                               "bands": {name: block(counts[b]) for b, name in enumerate(names)}}
        return out
