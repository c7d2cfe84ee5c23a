"""The blessing gate: may this model be promoted?

Two kinds of checks, all thresholds from ``cfg.evaluate``:

* **Absolute** (always): mIoU >= ``min_miou``; the point recall of every class present in the test split
  >= ``min_class_recall``; the TorchScript latency p99 on this machine <= ``latency_p99_budget_ms``
  (TorchScript is the format the training stage ships; eager when there is none); the planner's
  missed-brake rate <= ``max_missed_brake_rate`` (1.0, the default, leaves it ungated).
* **Relative to production** (when there is a production model, evaluated on the same test frames): no
  class IoU, no scene (log) mIoU may fall more than ``max_regression`` below production's, and the
  missed-brake rate may not rise by more than ``max_regression``. The first model has no production
  baseline: the verdict says so and rests on the absolute checks alone.

``decide`` returns the verdict and its reasons: the failed checks first, then the passed ones, each a
sentence a person can act on. The registry records both (``Registry.set_blessing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Verdict:
    blessed: bool
    reasons: list[str]
    checks: list[dict[str, Any]] = field(default_factory=list)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def gated_latency(hardware: dict[str, Any] | None) -> tuple[str, float] | None:
    """(variant, p99 ms) the latency budget applies to: TorchScript, else eager; None without timings."""
    variants = (hardware or {}).get("variants") or {}
    for name in ("torchscript", "eager"):
        if name in variants:
            return name, float(variants[name]["p99_ms"])
    return None


def serve_variant_note(candidate: dict[str, Any]) -> str:
    """The verdict's line naming the variant that will be served (``evaluation.variants.choose``)."""
    choice = candidate["variants"]["choice"]
    return f"serve variant: {choice['reason']}"


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

    notes = [serve_variant_note(candidate)] if candidate.get("variants") else []
    if baseline is None:
        notes.append("no production model to compare with (first model): absolute thresholds only")
    else:
        _relative_checks(candidate, baseline, settings.max_regression, baseline_label, check)

    blessed = all(c["passed"] for c in checks)
    failed = [c["text"] for c in checks if not c["passed"]]
    passed = [c["text"] for c in checks if c["passed"]]
    return Verdict(blessed, [*failed, *passed, *notes], checks)


def _relative_checks(candidate: dict[str, Any], baseline: dict[str, Any], max_regression: float, label: str,
                     check) -> None:
    """Class IoU, scene mIoU and missed-brake rate against the baseline, one line per failure (and
    one summary line per kind when nothing failed)."""
    drops = []
    for name, mine in candidate["segmentation"]["classes"].items():
        theirs = baseline["segmentation"]["classes"].get(name, {})
        if mine.get("iou") is not None and theirs.get("iou") is not None:
            drops.append((theirs["iou"] - mine["iou"], name, mine["iou"], theirs["iou"]))
    _regressions("class_regression", "class", "IoU", drops, max_regression, label, check)

    drops = []
    for log, mine in candidate["scenes"].items():
        theirs = baseline["scenes"].get(log, {})
        if mine.get("miou") is not None and theirs.get("miou") is not None:
            drops.append((theirs["miou"] - mine["miou"], log, mine["miou"], theirs["miou"]))
    _regressions("scene_regression", "scene", "mIoU", drops, max_regression, label, check)

    mine, theirs = candidate["planner"]["missed_brake_rate"], baseline["planner"]["missed_brake_rate"]
    if mine is not None and theirs is not None:
        ok = mine - theirs <= max_regression
        check("planner_regression", ok, f"missed-brake rate {mine:.3f} vs {label} {theirs:.3f} "
                                        f"({'+' if mine >= theirs else ''}{mine - theirs:.3f}; allowed +{max_regression:.3f})")


def _regressions(name: str, what: str, metric: str, drops: list[tuple[float, str, float, float]],
                 max_regression: float, label: str, check) -> None:
    """One failed check per item that dropped more than allowed, else one passed summary check."""
    worse = [d for d in drops if d[0] > max_regression + 1e-12]
    for drop, item, mine, theirs in sorted(worse, reverse=True):
        check(name, False, f"{what} {item} {metric} {mine:.3f} vs {label} {theirs:.3f} "
                           f"(-{drop:.3f}, more than the allowed {max_regression:.3f})")
    if not worse and drops:
        drop, item, _mine, _theirs = max(drops)
        change = f"largest drop {drop:.3f} ({item})" if drop > 0 else "none dropped"
        check(name, True, f"no {what} {metric} fell more than {max_regression:.3f} below {label} "
                          f"({len(drops)} compared; {change})")
