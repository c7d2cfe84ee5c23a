"""How sure the evaluation is: bootstrap-over-logs confidence intervals, slices, calibration, and the
paired regression test against production.

**Logs are the unit.** Frames of one drive log share a street, a driver and the weather; points of one
frame share everything. Resampling points or frames would pretend to far more independent evidence than
the split holds, so every interval here resamples *logs*: draw as many logs as the slice has, with
replacement, add up their counts, recompute the metric; repeat ``bootstrap_resamples`` times; the interval
is the central ``confidence_level`` share of the resampled values (percentile bootstrap).

**Tallies.** While scoring, every frame adds its counts into one vector per (log, slice group)
(``SliceTally``): the confusion matrix, the calibration histogram (points, correct points and summed
confidence per confidence bin), the object counts per class (matched predictions, predictions, matched
boxes, boxes) and the planner's counts (frames, needed brakes, missed, false). Every metric here is a
ratio of sums of these counts, so a resample is one matrix product (resample counts ``[B, logs]`` times
tallies ``[logs, F]``) and the metrics of all resamples come out of a few array operations at once.

**Slices** (``evaluate.slices``, ';'-separated): ``city`` (the logs of each city), ``distance`` (points
by planar range, objects by their box's / centroid's range; bands from ``evaluate.distance_bands_m`` or
``distance:10,30``), ``speed_mps:E1,E2`` (frames by the ego speed) and ``hour_utc:E1,E2`` (frames by the
UTC hour of their timestamp). The whole split is the slice ``all``. A slice with fewer than
``min_slice_logs`` logs is reported as too small and never judged; a metric resting on fewer than
``min_slice_count`` points, objects or needed brakes likewise. Adding a dimension (rain, night) is one
entry in ``FRAME_KEYS`` (a function of a ``LoggedFrame``) once the logs carry it.

**Paired regression test** (``compare``). Candidate and production are scored on the same logs; each
resample draws the *same* logs for both, so what the two models share (a hard street) cancels out of the
difference. Per slice and gated metric, the interval of (candidate - production), signed so that negative
is worse, gives the verdict: *fail* when it lies entirely below ``-max_regression``, *pass* when it lies
entirely above, and *not enough evidence* when it straddles it; ``undecided_blocks`` says whether that
blocks (default: for the safety metric, missed brakes, only) - and whether a *too small* comparison whose
point estimate is worse than allowed blocks too. With ``bootstrap_resamples = 0`` an interval is its point
estimate, and the gate compares point estimates.

**Calibration.** The expected calibration error of the per-point softmax: points binned by their top
softmax score (the confidence of the predicted class); ECE = sum over bins of (bin's points / all points)
x |bin accuracy - bin mean confidence|. The reliability diagram plots accuracy against confidence per bin.
"""

from __future__ import annotations

import datetime as dt
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from evaluation.objects import band_counts, band_names, parse_bands
from pipeline.metrics import SCORED_CLASSES
from pipeline.taxonomy import CLASSES, IGNORE, NUM_CLASSES, OBJECT_CLASS_IDS

ALL = "all"
# Metrics where lower is better (the others: higher is better), and the safety ones (undecided_blocks).
LOWER_IS_BETTER = ("missed_brake_rate", "false_brake_rate", "ece")
SAFETY_METRICS = ("missed_brake_rate",)
OUTCOMES = ("fail", "undecided", "too_small", "pass")  # a comparison's verdict, in report order


def _hour_utc(frame: Any) -> float:
    return dt.datetime.fromtimestamp(frame.timestamp_ns / 1e9, dt.timezone.utc).hour


# Frame-level slice dimensions: the value of a frame that its band is taken of.
FRAME_KEYS: dict[str, Callable[[Any], float]] = {
    "speed_mps": lambda frame: frame.speed,
    "hour_utc": _hour_utc,
}
DIMENSIONS = ("city", "distance", *FRAME_KEYS)


@dataclass(frozen=True)
class SliceSpec:
    """One slice dimension: ``city`` (by log), ``distance`` (by point / object range) or a frame key."""

    dimension: str
    edges: tuple[float, ...] = ()

    @property
    def groups(self) -> list[str]:
        return band_names(self.edges) if self.edges else []


def parse_slices(text: str, distance_edges: Sequence[float]) -> tuple[SliceSpec, ...]:
    """``"city;distance;speed_mps:3,10"`` -> slice specs; ``ValueError`` naming the bad entry."""
    specs = []
    for entry in (e.strip() for e in str(text).split(";")):
        if not entry:
            continue
        name, _, edges = (part.strip() for part in entry.partition(":"))
        if name not in DIMENSIONS:
            raise ValueError(f"evaluate.slices: unknown slice {name!r} in {text!r}; known: {', '.join(DIMENSIONS)}")
        if any(s.dimension == name for s in specs):
            raise ValueError(f"evaluate.slices: {name!r} is given twice in {text!r}")
        if name == "city":
            if edges:
                raise ValueError(f"evaluate.slices: city takes no edges, got {entry!r}")
            specs.append(SliceSpec("city"))
        elif name == "distance" and not edges:
            specs.append(SliceSpec("distance", tuple(distance_edges)))
        elif not edges:
            raise ValueError(f"evaluate.slices: {name} needs band edges, e.g. {name}:3,10")
        else:
            specs.append(SliceSpec(name, parse_bands(edges, f"evaluate.slices entry {entry!r}", "numbers")))
    return tuple(specs)


# ----------------------------------------------------------------------------------------- tallies
@dataclass(frozen=True)
class Layout:
    """Where each count lives in a tally vector (``calibration_bins`` decides its length)."""

    calibration_bins: int

    @property
    def confusion(self) -> slice:
        return slice(0, NUM_CLASSES * NUM_CLASSES)

    @property
    def calibration(self) -> slice:  # [bins, 3]: points, correct points, summed confidence
        start = self.confusion.stop
        return slice(start, start + 3 * self.calibration_bins)

    @property
    def objects(self) -> slice:  # [object classes, 4]: matched predictions, predictions, matched boxes, boxes
        start = self.calibration.stop
        return slice(start, start + 4 * len(OBJECT_CLASS_IDS))

    @property
    def planner(self) -> slice:  # frames, needed brakes, missed brakes, false brakes
        start = self.objects.stop
        return slice(start, start + 4)

    @property
    def size(self) -> int:
        return self.planner.stop


def _point_counts(layout: Layout, groups: np.ndarray, count: int, labels: np.ndarray, predicted: np.ndarray,
                  confidence: np.ndarray) -> np.ndarray:
    """``[count, F]`` confusion and calibration counts of one frame's points, by each point's group."""
    out = np.zeros((count, layout.size))
    scored = labels != IGNORE
    g, labels, predicted, confidence = groups[scored], labels[scored], predicted[scored], confidence[scored]
    k = NUM_CLASSES
    out[:, layout.confusion] = np.bincount((g * k + labels) * k + predicted, minlength=count * k * k).reshape(count, -1)
    bins = layout.calibration_bins
    which = g * bins + np.minimum((confidence * bins).astype(np.int64), bins - 1)
    calibration = np.stack([np.bincount(which, minlength=count * bins),
                            np.bincount(which, weights=(labels == predicted).astype(np.float64), minlength=count * bins),
                            np.bincount(which, weights=confidence, minlength=count * bins)], axis=1)
    out[:, layout.calibration] = calibration.reshape(count, -1)
    return out


class SliceTally:
    """Per log, per slice dimension (``all``, ``distance``, the frame keys): a ``[groups, F]`` count array.

    ``update`` takes one scored frame; ``as_dict`` is the JSON form kept in metrics.json (so a stored
    production evaluation can be paired with a later candidate's)."""

    def __init__(self, specs: Sequence[SliceSpec], calibration_bins: int, object_band_edges: Sequence[float]):
        if calibration_bins < 1:
            raise ValueError(f"evaluate.calibration_bins must be at least 1, got {calibration_bins}")
        self.layout = Layout(calibration_bins)
        self.specs = [s for s in specs if s.dimension != "city"]
        self.object_bands = len(object_band_edges) + 1
        self.logs: dict[str, dict[str, np.ndarray]] = {}
        self.cities: dict[str, str] = {}

    def update(self, frame: Any, predicted: np.ndarray, scores: np.ndarray, matched: Any, decision: Any) -> None:
        """Add one frame: its ``LoggedFrame``, argmax predictions, softmax ``scores [N, K]``, object matches
        (``objects.FrameObjects``) and planner decision (``planner.FrameDecision``)."""
        layout = self.layout
        labels = np.asarray(frame.labels).astype(np.int64)
        predicted = np.asarray(predicted).astype(np.int64)
        confidence = np.asarray(scores).max(axis=1)
        objects = band_counts(matched, self.object_bands)  # class -> [object bands, 4]
        # The whole frame as one vector (the "all" slice and every frame-level dimension)
        whole = _point_counts(layout, np.zeros(len(labels), np.int64), 1, labels, predicted, confidence)[0]
        whole[layout.objects] = np.concatenate([objects[c].sum(axis=0) for c in OBJECT_CLASS_IDS])
        whole[layout.planner] = (1, decision.truth_brake, decision.missed, decision.false_brake)
        log = self.logs.setdefault(frame.log_id, {})
        self.cities[frame.log_id] = frame.city
        self._add(log, ALL, 1, 0, whole)
        for spec in self.specs:
            count = len(spec.groups)
            if spec.dimension == "distance":
                edges = np.asarray(spec.edges)
                groups = np.searchsorted(edges, np.hypot(frame.points[:, 0], frame.points[:, 1]), side="right")
                counts = _point_counts(layout, groups, count, labels, predicted, confidence)
                if self.object_bands == count:  # the object bands are the slice's bands when the edges agree
                    counts[:, layout.objects] = np.stack([objects[c] for c in OBJECT_CLASS_IDS], axis=1).reshape(
                        count, -1)
                counts[:, layout.planner.start] = np.bincount(groups, minlength=count) > 0  # frames, no decisions
                log[spec.dimension] = log.get(spec.dimension, np.zeros((count, layout.size))) + counts
            else:
                group = int(np.searchsorted(np.asarray(spec.edges), FRAME_KEYS[spec.dimension](frame), side="right"))
                self._add(log, spec.dimension, count, group, whole)

    def _add(self, log: dict[str, np.ndarray], dimension: str, count: int, group: int, vector: np.ndarray) -> None:
        counts = log.setdefault(dimension, np.zeros((count, self.layout.size)))
        counts[group] += vector

    def as_dict(self) -> dict[str, Any]:
        logs = sorted(self.logs)
        dimensions = {ALL: [ALL], **{s.dimension: s.groups for s in self.specs}}
        return {"calibration_bins": self.layout.calibration_bins, "logs": logs,
                "cities": [self.cities[log] for log in logs],
                "dimensions": {d: {"groups": groups,
                                   "counts": [self.logs[log].get(d, np.zeros((len(groups), self.layout.size))).tolist()
                                              for log in logs]}
                               for d, groups in dimensions.items()}}


# ----------------------------------------------------------------------------------------- metrics
def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio, NaN where the denominator is 0 (undefined, like ``pipeline.metrics.ratio``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def metric_table(sums: np.ndarray, layout: Layout, planner: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every metric of summed tallies ``[B, F]``: name -> (values ``[B]``, NaN where undefined; evidence
    ``[B]``, the count the value rests on). The definitions are ``pipeline.metrics``' and the planner's."""
    batch = len(sums)
    confusion = sums[:, layout.confusion].reshape(batch, NUM_CLASSES, NUM_CLASSES)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    truth, predicted = confusion.sum(axis=2), confusion.sum(axis=1)
    iou = _divide(tp, (truth + predicted - tp) * (truth > 0))  # a class the ground truth lacks: no IoU
    present = truth[:, list(SCORED_CLASSES)] > 0
    ious = iou[:, list(SCORED_CLASSES)]
    with np.errstate(invalid="ignore"):
        miou = np.where(present.any(axis=1), np.nansum(ious, axis=1) / np.maximum(present.sum(axis=1), 1), np.nan)
    points = truth[:, list(SCORED_CLASSES)].sum(axis=1)
    out = {"miou": (miou, points)}
    for c in SCORED_CLASSES:
        out[f"iou/{CLASSES[c]}"] = (iou[:, c], truth[:, c])
        out[f"recall/{CLASSES[c]}"] = (_divide(tp[:, c], truth[:, c]), truth[:, c])
    calibration = sums[:, layout.calibration].reshape(batch, layout.calibration_bins, 3)
    gap = np.abs(calibration[:, :, 1] - calibration[:, :, 2]).sum(axis=1)  # sum over bins of n |acc - conf|
    out["ece"] = (_divide(gap, calibration[:, :, 0].sum(axis=1)), calibration[:, :, 0].sum(axis=1))
    objects = sums[:, layout.objects].reshape(batch, len(OBJECT_CLASS_IDS), 4)
    for k, c in enumerate(OBJECT_CLASS_IDS):
        out[f"object_recall/{CLASSES[c]}"] = (_divide(objects[:, k, 2], objects[:, k, 3]), objects[:, k, 3])
    if planner:
        frames, needed, missed, false = (sums[:, layout.planner.start + i] for i in range(4))
        out["missed_brake_rate"] = (_divide(missed, needed), needed)
        out["false_brake_rate"] = (_divide(false, frames - needed), frames - needed)
    return out


def metric_label(name: str) -> str:
    """``iou/vehicle`` -> ``vehicle IoU``: how a metric is named in verdicts and the report."""
    kind, _, cls = name.partition("/")
    return {"miou": "mIoU", "ece": "ECE (calibration)", "missed_brake_rate": "missed-brake rate",
            "false_brake_rate": "false-brake rate", "iou": f"{cls} IoU", "recall": f"{cls} point recall",
            "object_recall": f"{cls} object recall"}[kind]


@dataclass(frozen=True)
class Slice:
    """One slice of the test split: which logs, and each log's tally vector in it (``[logs, F]``)."""

    name: str
    dimension: str
    group: str
    logs: list[str]
    tallies: np.ndarray

    @property
    def per_point(self) -> bool:
        """Distance slices split frames by point range: the planner's per-frame decisions have no band."""
        return self.dimension == "distance"


def slices_of(tallies: dict[str, Any]) -> list[Slice]:
    """Every slice of a scored split's tallies: all, each city, each group of each other dimension that
    has test frames; a log is in a slice when it has frames in it."""
    logs, cities = tallies["logs"], tallies["cities"]
    dims = tallies["dimensions"]
    layout = Layout(tallies["calibration_bins"])
    everything = np.asarray(dims[ALL]["counts"], np.float64)[:, 0, :]
    out = [Slice(ALL, ALL, ALL, list(logs), everything)]
    for city in sorted(set(cities)):
        mine = [i for i, c in enumerate(cities) if c == city]
        out.append(Slice(f"city={city}", "city", city, [logs[i] for i in mine], everything[mine]))
    for dimension, block in dims.items():
        if dimension == ALL:
            continue
        counts = np.asarray(block["counts"], np.float64).reshape(len(logs), len(block["groups"]), layout.size)
        for g, group in enumerate(block["groups"]):
            mine = np.flatnonzero(counts[:, g, layout.planner.start] > 0)
            if not len(mine):
                continue  # no test frame falls in this group: nothing to report
            out.append(Slice(f"{dimension}={group}", dimension, group, [logs[i] for i in mine], counts[mine, g]))
    return out


def resample_counts(slice_name: str, logs: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, logs]``: how often each log is drawn in each resample (each row sums to ``logs``).
    Seeded by ``seed`` and the slice's name, so a slice gets the same draws in every run and for both
    models of a paired comparison."""
    rng = np.random.default_rng([seed, zlib.crc32(slice_name.encode())])
    return rng.multinomial(logs, np.full(logs, 1.0 / logs), size=resamples).astype(np.float64)


def _interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``[B, M]`` samples: the central ``level`` percentile interval over the defined ones."""
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: no interval
        low, high = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def check_settings(settings: Any) -> None:
    """``ValueError`` naming the field when the statistics settings of an ``EvaluateConfig`` make no sense."""
    if not 0 < settings.confidence_level < 1:
        raise ValueError(f"evaluate.confidence_level must be between 0 and 1, got {settings.confidence_level}")
    if settings.bootstrap_resamples < 0:
        raise ValueError(f"evaluate.bootstrap_resamples must be at least 0, got {settings.bootstrap_resamples}")
    if settings.min_slice_logs < 1:
        raise ValueError(f"evaluate.min_slice_logs must be at least 1, got {settings.min_slice_logs}")


def _slice_evidence(s: Slice, layout: Layout, settings: Any) -> dict[str, Any]:
    total = s.tallies.sum(axis=0)
    confusion = total[layout.confusion].reshape(NUM_CLASSES, NUM_CLASSES)
    evidence = {"logs": len(s.logs), "frames": int(total[layout.planner.start]),
                "points": int(confusion[list(SCORED_CLASSES)].sum()),
                "objects": int(total[layout.objects].reshape(-1, 4)[:, 3].sum())}
    if not s.per_point:
        evidence["needed_brakes"] = int(total[layout.planner.start + 1])
    small = len(s.logs) < settings.min_slice_logs
    evidence["too_small"] = (f"{len(s.logs)} test log{'s' if len(s.logs) != 1 else ''} "
                             f"(< min_slice_logs {settings.min_slice_logs})") if small else None
    return evidence


def describe(tallies: dict[str, Any], settings: Any) -> dict[str, Any]:
    """The intervals of every metric in every slice, the evidence behind each, and the reliability diagram
    of the whole split: what metrics.json keeps as ``candidate["statistics"]``. ``settings``: an
    ``EvaluateConfig``."""
    check_settings(settings)
    layout = Layout(tallies["calibration_bins"])
    out: dict[str, Any] = {"method": "percentile bootstrap over test logs", "resamples": settings.bootstrap_resamples,
                           "confidence_level": settings.confidence_level, "seed": settings.bootstrap_seed,
                           "min_slice_logs": settings.min_slice_logs, "min_slice_count": settings.min_slice_count,
                           "slices": {}}
    every = slices_of(tallies)
    for s in every:
        point = metric_table(s.tallies.sum(axis=0, keepdims=True), layout, planner=not s.per_point)
        names = [n for n, (v, _e) in point.items() if np.isfinite(v[0])]
        low = high = np.full(len(names), np.nan)
        if settings.bootstrap_resamples and s.logs and names:  # a slice can have no finite metric
            draws = resample_counts(s.name, len(s.logs), settings.bootstrap_resamples, settings.bootstrap_seed)
            table = metric_table(draws @ s.tallies, layout, planner=not s.per_point)
            low, high = _interval(np.stack([table[n][0] for n in names], axis=1), settings.confidence_level)
        evidence = _slice_evidence(s, layout, settings)
        metrics = {}
        for k, name in enumerate(names):
            value, count = float(point[name][0][0]), int(point[name][1][0])
            bootstrapped = bool(settings.bootstrap_resamples)
            metrics[name] = {"value": value, "low": _number(low[k]) if bootstrapped else value,
                             "high": _number(high[k]) if bootstrapped else value, "evidence": count,
                             "too_small": evidence["too_small"] is not None or count < settings.min_slice_count}
        out["slices"][s.name] = {"dimension": s.dimension, "group": s.group, **evidence, "log_ids": s.logs,
                                 "metrics": metrics}
    out["reliability"] = reliability(every[0].tallies.sum(axis=0), layout)
    return out


def reliability(total: np.ndarray, layout: Layout) -> dict[str, Any]:
    """Per confidence bin of the whole split: points, accuracy and mean confidence (the diagram's data)."""
    calibration = total[layout.calibration].reshape(layout.calibration_bins, 3)
    points = calibration[:, 0]
    return {"edges": (np.arange(layout.calibration_bins + 1) / layout.calibration_bins).tolist(),
            "points": [int(p) for p in points],
            "accuracy": [_number(v) for v in _divide(calibration[:, 1], points)],
            "confidence": [_number(v) for v in _divide(calibration[:, 2], points)]}


# ----------------------------------------------------------------------------------------- comparison
def gated_metric(name: str) -> bool:
    """The metrics the regression test judges: mIoU, class IoU, object recall, missed brakes."""
    return name == "miou" or name.startswith(("iou/", "object_recall/")) or name in SAFETY_METRICS


def compare(candidate: dict[str, Any], baseline: dict[str, Any], settings: Any) -> list[dict[str, Any]]:
    """The paired bootstrap test of ``candidate`` against ``baseline`` (both scored on the same logs, with
    their ``tallies``), one entry per slice and gated metric, in ``OUTCOMES`` order. ``settings``: an
    ``EvaluateConfig`` (max_regression, the bootstrap, the evidence minimums, undecided_blocks)."""
    check_settings(settings)
    mine, theirs = candidate.get("tallies"), baseline.get("tallies")
    if not mine or not theirs:
        raise ValueError("the paired regression test needs the tallies of both models (scored by this code)")
    if mine["logs"] != theirs["logs"] or mine["calibration_bins"] != theirs["calibration_bins"]:
        raise ValueError("the candidate and the production model were not scored on the same test logs "
                         "with the same settings: they cannot be compared pairwise")
    layout = Layout(mine["calibration_bins"])
    theirs_by_name = {s.name: s for s in slices_of(theirs)}
    out = []
    for s in slices_of(mine):
        other = theirs_by_name.get(s.name)
        if other is None or other.logs != s.logs:
            continue  # a group only one model's tallies have (cannot happen with the same frames)
        evidence = _slice_evidence(s, layout, settings)
        point = (metric_table(s.tallies.sum(axis=0, keepdims=True), layout, planner=not s.per_point),
                 metric_table(other.tallies.sum(axis=0, keepdims=True), layout, planner=not s.per_point))
        names = [n for n in point[0] if gated_metric(n) and np.isfinite(point[0][n][0][0])
                 and np.isfinite(point[1][n][0][0])]
        if not names:
            continue
        if settings.bootstrap_resamples:
            draws = resample_counts(s.name, len(s.logs), settings.bootstrap_resamples, settings.bootstrap_seed)
            tables = (metric_table(draws @ s.tallies, layout, planner=not s.per_point),
                      metric_table(draws @ other.tallies, layout, planner=not s.per_point))
            change = np.stack([tables[0][n][0] - tables[1][n][0] for n in names], axis=1)
            low, high = _interval(change, settings.confidence_level)
        for k, name in enumerate(names):
            value, base = float(point[0][name][0][0]), float(point[1][name][0][0])
            delta = value - base
            lo, hi = (float(low[k]), float(high[k])) if settings.bootstrap_resamples else (delta, delta)
            count = int(min(point[0][name][1][0], point[1][name][1][0]))
            out.append(_judge(s.name, name, value, base, delta, lo, hi, count, evidence, settings))
    return sorted(out, key=lambda c: OUTCOMES.index(c["outcome"]))


def _judge(slice_name: str, name: str, value: float, base: float, delta: float, low: float, high: float,
           count: int, evidence: dict[str, Any], settings: Any) -> dict[str, Any]:
    """One comparison's outcome. ``worse_*`` is the change signed so that negative is worse."""
    sign = -1.0 if name in LOWER_IS_BETTER else 1.0
    worse_low, worse_high = sorted((sign * low, sign * high))
    limit = settings.max_regression
    worse_than_allowed = sign * delta < -limit - 1e-12  # by the point estimate alone
    if evidence["too_small"] or count < settings.min_slice_count:
        outcome = "too_small"
    elif np.isnan(worse_low) or np.isnan(worse_high):
        outcome = "undecided"  # the metric was undefined in every resample
    elif worse_high < -limit - 1e-12:
        outcome = "fail"
    elif worse_low >= -limit - 1e-12:
        outcome = "pass"
    else:
        outcome = "undecided"
    # Not enough evidence blocks where undecided_blocks says so; so does too little evidence for a change
    # that looks worse than allowed: a safety metric is not waved through for lack of data.
    unsure = outcome == "undecided" or (outcome == "too_small" and worse_than_allowed)
    blocks = outcome == "fail" or (unsure and (
        settings.undecided_blocks == "all" or (settings.undecided_blocks == "safety" and name in SAFETY_METRICS)))
    return {"slice": slice_name, "metric": name, "candidate": value, "production": base, "change": delta,
            "low": _number(low), "high": _number(high), "outcome": outcome, "blocks": blocks,
            "worse_than_allowed": worse_than_allowed,
            "evidence": {"logs": evidence["logs"], "frames": evidence["frames"], "count": count}}


def describe_comparison(c: dict[str, Any], label: str, settings: Any) -> str:
    """The sentence a verdict gives for one comparison: slice, metric, both values, the interval."""
    bound = f"{'+' if c['metric'] in LOWER_IS_BETTER else '-'}{settings.max_regression:.3f}"
    interval = ("n/a" if c["low"] is None else f"{c['low']:+.3f} to {c['high']:+.3f}")
    level = f"{100 * settings.confidence_level:g}% CI" if settings.bootstrap_resamples else "no bootstrap"
    ev = c["evidence"]
    what = (f"{c['slice']}: {metric_label(c['metric'])} {c['candidate']:.3f} vs {label} {c['production']:.3f}, "
            f"change {c['change']:+.3f} ({level} {interval}; {ev['logs']} log{'s' if ev['logs'] != 1 else ''}, "
            f"{ev['frames']} frames, "
            f"evidence {ev['count']})")
    return what + {"fail": f": regression, the interval lies beyond the allowed {bound}",
                   "undecided": f": not enough evidence, the interval straddles the allowed {bound}"
                                + (" (blocks)" if c["blocks"] else " (warning)"),
                   "too_small": ": too little evidence to judge" + (
                       f", and its point estimate is beyond the allowed {bound} (blocks)" if c["blocks"] else ""),
                   "pass": f": within the allowed {bound}"}[c["outcome"]]


def evidence_warning(described: dict[str, Any] | None) -> str | None:
    """One verdict line naming every slice too small to judge (None when there is none)."""
    small = [(name, s) for name, s in ((described or {}).get("slices") or {}).items() if s["too_small"]]
    if not small:
        return None
    return (f"warning: {len(small)} slice{'s' if len(small) != 1 else ''} with fewer than "
            f"min_slice_logs {described['min_slice_logs']} test logs, reported but not judged: "
            + ", ".join(f"{name} ({s['logs']} log{'s' if s['logs'] != 1 else ''})" for name, s in small))
