"""The blessing gate: may this model be promoted?

Two kinds of checks, all thresholds from ``cfg.evaluate``:

* **Absolute** (always): mIoU >= ``min_miou``; the point recall of every class present in the test split
  >= ``min_class_recall``; the TorchScript latency p99 on this machine <= ``latency_p99_budget_ms``
  (TorchScript is the format the training stage ships; eager when there is none); the planner's
  missed-brake rate <= ``max_missed_brake_rate`` (1.0, the default, leaves it ungated).
* **Relative to production** (when there is a production model, evaluated on the same test frames): the
  paired bootstrap over test logs of ``statistics.compare``, per slice (all, city, distance, speed, time
  of day) and gated metric (mIoU, class IoU, object recall, missed-brake rate). A change whose interval
  lies entirely beyond ``max_regression`` fails; one whose interval straddles it is "not enough
  evidence", which blocks for the safety metric (missed brakes) and warns for the rest by default
  (``undecided_blocks``); a slice with too few logs or too little evidence is named, never judged. The
  first model has no production baseline: the verdict says so and rests on the absolute checks alone.

``decide`` returns the verdict and its reasons: the failed checks first, then the passed ones, each a
sentence a person can act on. The registry records both (``Registry.set_blessing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evaluation import statistics


@dataclass
class Verdict:
    blessed: bool
    reasons: list[str]
    checks: list[dict[str, Any]] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # statistics.compare, one per slice x metric


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def gated_latency(hardware: dict[str, Any] | None) -> tuple[str, float] | None:
    """(variant, p99 ms) the latency budget applies to: TorchScript, else eager; None without timings."""
    variants = (hardware or {}).get("variants") or {}
    for name in ("torchscript", "eager"):
        if name in variants:
            return name, float(variants[name]["p99_ms"])
    return None


def decide(candidate: dict[str, Any], settings: Any, baseline: dict[str, Any] | None = None,
           baseline_label: str = "production") -> Verdict:
    """The verdict on ``candidate`` (the metrics of ``scoring.score_model`` plus ``hardware``) against the
    thresholds in ``settings`` (an ``EvaluateConfig``) and, when given, the ``baseline`` metrics."""
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, text: str) -> None:
        checks.append({"check": name, "passed": bool(passed), "text": text})

    seg = candidate["segmentation"]
    miou = seg["miou"]
    check("min_miou", miou is not None and miou >= settings.min_miou,
          f"mIoU {_fmt(miou)} {'>=' if miou is not None and miou >= settings.min_miou else '<'} "
          f"min_miou {settings.min_miou:.3f}")
    low_recall = [(name, m["recall"]) for name, m in seg["classes"].items()
                  if m["points"] > 0 and m["recall"] < settings.min_class_recall]
    if low_recall:
        for name, recall in low_recall:
            check("min_class_recall", False, f"{name} point recall {recall:.3f} < min_class_recall "
                                             f"{settings.min_class_recall:.3f}")
    else:
        present = [m["recall"] for m in seg["classes"].values() if m["points"] > 0]
        check("min_class_recall", True, f"every class's point recall >= min_class_recall "
                                        f"{settings.min_class_recall:.3f} (lowest {_fmt(min(present, default=None))})")
    latency = gated_latency(candidate.get("hardware"))
    if latency is not None:
        variant, p99 = latency
        ok = p99 <= settings.latency_p99_budget_ms
        check("latency_p99_budget_ms", ok, f"{variant} latency p99 {p99:.1f} ms {'<=' if ok else '>'} budget "
                                           f"{settings.latency_p99_budget_ms:.1f} ms")
    missed = candidate["planner"]["missed_brake_rate"]
    if settings.max_missed_brake_rate < 1.0:
        ok = missed is None or missed <= settings.max_missed_brake_rate
        check("max_missed_brake_rate", ok, f"missed-brake rate {_fmt(missed)} {'<=' if ok else '>'} "
                                           f"max_missed_brake_rate {settings.max_missed_brake_rate:.3f}")

    notes = []
    comparisons = []
    if baseline is None:
        notes.append("no production model to compare with (first model): absolute thresholds only")
    else:
        comparisons = _relative_checks(candidate, baseline, settings, baseline_label, check, notes)
    small = statistics.evidence_warning(candidate.get("statistics"))
    if small:
        notes.append(small)

    blessed = all(c["passed"] for c in checks)
    failed = [c["text"] for c in checks if not c["passed"]]
    passed = [c["text"] for c in checks if c["passed"]]
    return Verdict(blessed, [*failed, *passed, *notes], checks, comparisons)


def _relative_checks(candidate: dict[str, Any], baseline: dict[str, Any], settings: Any, label: str, check,
                     notes: list[str]) -> list[dict[str, Any]]:
    """The paired bootstrap test against the baseline: a failed check per regression and per blocking "not
    enough evidence", a warning note per other one, and one summary line; returns the comparisons."""
    comparisons = statistics.compare(candidate, baseline, settings)
    for c in comparisons:
        text = statistics.describe_comparison(c, label, settings)
        if c["blocks"]:
            check("regression" if c["outcome"] == "fail" else "not_enough_evidence", False, text)
        elif c["outcome"] == "undecided":
            notes.append(f"warning: {text}")
    small_but_worse = [c for c in comparisons if c["outcome"] == "too_small" and c["worse_than_allowed"]
                       and not c["blocks"]]
    if small_but_worse:
        notes.append("warning: too little evidence to judge, but worse than allowed by the point estimate: "
                     + ", ".join(f"{c['slice']} {statistics.metric_label(c['metric'])} {c['change']:+.3f}"
                                 for c in small_but_worse))
    counts = {o: sum(c["outcome"] == o for c in comparisons) for o in statistics.OUTCOMES}
    slices = len({c["slice"] for c in comparisons})
    summary = (f"paired bootstrap against {label} over {slices} slices: {counts['pass']} of {len(comparisons)} "
               f"slice x metric changes within the allowed {settings.max_regression:.3f}, {counts['fail']} "
               f"regressions, {counts['undecided']} without enough evidence, {counts['too_small']} too small to judge")
    if any(c["blocks"] for c in comparisons):
        notes.append(summary)
    else:
        check("regression", True, summary)
    return comparisons
