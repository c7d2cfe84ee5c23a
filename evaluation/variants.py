"""Inference variants: every way the package can run the model, what each costs in accuracy on the test
split, and the choice of the one to serve.

The variants (names as in ``metrics.json``):

* ``eager`` - the ``nn.Module``: the reference every other variant is compared with (not packaged);
* ``torchscript`` - the training stage's ``model.ts`` as written (not frozen), timed only so that frozen
  and unfrozen latency sit side by side (the package ships the frozen one);
* ``torchscript_frozen`` - ``torch.jit.freeze`` of it: the package's ``model.ts`` (``serving.artifacts``);
* ``aot_inductor`` - the package's ``model.pt2`` (``exported`` where AOTInductor is off or failed: an
  ExportedProgram is not a faster runtime, so that one is never chosen);
* ``int8_pt2e`` - post-training static int8 quantization with torchao's PT2E flow for x86
  (``serving.artifacts.quantize_int8``), calibrated on validation frames, compiled once by AOTInductor
  (``compiled/int8/model.pt2`` with its ``export.json``, shipped by the serve stage as ``model_int8.pt2``
  when chosen); CPU only;
* ``fp16_cuda`` / ``bf16_cuda`` - the eager model under ``torch.autocast`` on CUDA; evaluated when the
  stage runs on a GPU, never served (the package holds CPU programs).

A variant that cannot be built here is listed under ``not_built`` with the reason (no GPU, the quantizer
or the compiler failed, switched off), never dropped silently.

Per built variant the table holds: p50 / p99 latency and peak memory (timed interleaved with the others
by ``evaluation.hardware.measure``), achieved GFLOP/s (counted FLOPs / p50) and its share of a float32
matmul peak measured in the same run, and - for the variants the package can carry - the mIoU and
per-class IoU on the whole test split with their change against eager, in IoU points (1 point = 0.01),
and the agreement of their logits with eager's on the latency frames (the package's tolerance).
``frozen_vs_unfrozen`` puts the two TorchScript latencies side by side.

**The choice** (``choose``): among the servable variants, those whose p99 is within the latency budget
(``evaluate.latency_p99_budget_ms``) and whose mIoU and every class IoU lose at most
``evaluate.variant_max_miou_drop`` / ``evaluate.variant_max_class_iou_drop`` points against eager are
eligible; the fastest by p50 is served (ties: the order of ``SERVABLE``). With none eligible the choice
says so and falls back to the reference TorchScript ``model.ts``. It is a pure function of the table and
the limits: the same measurements give the same variant.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from evaluation import hardware
from evaluation import segmentation as seg
from evaluation.frames import LoggedFrame
from serving import artifacts
from serving.artifacts import Inputs

EAGER = "eager"
TORCHSCRIPT = "torchscript"
FROZEN = "torchscript_frozen"
AOT = "aot_inductor"
INT8 = "int8_pt2e"
REDUCED_PRECISION = {"fp16_cuda": torch.float16, "bf16_cuda": torch.bfloat16}
# What the package can carry: variant -> (the runtime serving.load and the C++ consumer call it, file).
# The order breaks ties in latency; the first is the reference served when no variant is eligible.
SERVABLE = {FROZEN: ("torchscript", "model.ts"), AOT: ("pt2", "model.pt2"), INT8: ("int8", "model_int8.pt2")}
REFERENCE = FROZEN


# ----------------------------------------------------------------------------------------- building
def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def build(model: torch.nn.Module, torchscript_path: str, calibration: Sequence[np.ndarray],
          spec: artifacts.ExportSpec, compiled_dir: str, device: torch.device, *, aot_inductor: bool, int8: bool,
          say: Callable[[str], None]) -> tuple[list[hardware.Variant], dict[str, str]]:
    """The variants ``hardware.measure`` does not make itself (frozen TorchScript, int8, fp16/bf16), and
    {variant: why it was not built} for those that cannot be made here."""
    built: list[hardware.Variant] = []
    not_built: dict[str, str] = {}
    if os.path.exists(torchscript_path):
        began = time.perf_counter()
        frozen = artifacts.freeze_torchscript(artifacts.load_torchscript(torchscript_path, device))
        built.append(hardware.Variant(FROZEN, frozen, "torch.jit.freeze of model.ts: the package's model.ts",
                                      time.perf_counter() - began))
    else:
        not_built[FROZEN] = "no model.ts in the model artifact"

    reason = int8_obstacle(device, aot_inductor, int8, len(calibration))
    if reason:
        not_built[INT8] = reason
    else:
        say(f"quantizing to int8 (PT2E, X86InductorQuantizer; {len(calibration)} validation frames) and "
            "compiling it with AOTInductor")
        began = time.perf_counter()
        try:
            run = build_int8(model, [artifacts.frame_inputs(f, device) for f in calibration], spec,
                             os.path.join(compiled_dir, artifacts.COMPILED_INT8_DIR), device, say)
            built.append(hardware.Variant(INT8, run, "int8 PT2E (X86InductorQuantizer defaults) + AOTInductor",
                                          time.perf_counter() - began))
        except Exception as exc:  # noqa: BLE001 - an op that does not quantize or compile: report, go on
            not_built[INT8] = _first_line(exc)
            say(f"int8 variant not built: {not_built[INT8]}")

    for name, dtype in REDUCED_PRECISION.items():
        if device.type != "cuda":
            not_built[name] = f"{str(dtype).removeprefix('torch.')} is evaluated on CUDA only; this evaluation " \
                              f"runs on {device.type}"
        else:
            built.append(hardware.Variant(name, autocast_runner(model, dtype),
                                          f"eager under torch.autocast(cuda, {dtype}); not packaged (CPU programs)"))
    return built, not_built


def int8_obstacle(device: torch.device, aot_inductor: bool, int8: bool, calibration_frames: int) -> str:
    """Why the int8 variant cannot be built here, or "" when it can."""
    if not int8:
        return "switched off: evaluate.int8 is false"
    if device.type != "cpu":
        return f"the x86 int8 kernels run on CPU; this evaluation runs on {device.type}"
    if not aot_inductor:
        # Un-lowered, the quantized graph computes quantize/dequantize in float: its speed means nothing.
        return "needs AOTInductor to lower the quantized graph to int8 kernels; evaluate.aot_inductor is false"
    if calibration_frames < 1:
        return "no validation frames to calibrate on"
    return ""


def build_int8(model: torch.nn.Module, calibration: Sequence[Inputs], spec: artifacts.ExportSpec, folder: str,
               device: torch.device, say: Callable[[str], None]) -> artifacts.Runner:
    """Quantize once, compile once into ``folder/model.pt2`` with its ``export.json`` (the serve stage ships
    that file), and load it back. ``RuntimeError`` when AOTInductor cannot compile the quantized program."""
    quantized = artifacts.quantize_int8(model, calibration, spec)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, artifacts.COMPILED_PT2)
    record = artifacts.compiled_record(model, spec, device)
    info = artifacts.compile_pt2(artifacts.export_program(quantized, calibration[0], spec), path, True,
                                 "evaluate.aot_inductor", record, say)
    if info["format"] != "aoti":
        raise RuntimeError(f"AOTInductor could not compile the quantized program ({info['aoti_error']})")
    artifacts.write_compiled_record(folder, record, info)
    return artifacts.load_pt2(path, "aoti", device)


def autocast_runner(model: torch.nn.Module, dtype: torch.dtype) -> artifacts.Runner:
    """The eager model under CUDA autocast to ``dtype``, returning float32 logits."""
    def run(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype):
            return model(points, valid).float()
    return run


def calibration_picks(count: int, available: int) -> list[int]:
    """``count`` frame indices spread evenly over ``available`` frames (all of them when fewer)."""
    count = min(count, available)
    if count <= 0:
        return []
    return sorted({round(i * (available - 1) / max(1, count - 1)) for i in range(count)})


# ----------------------------------------------------------------------------------------- accuracy
def segmentation_of(runners: dict[str, artifacts.Runner], frames: Sequence[LoggedFrame],
                    device: torch.device) -> dict[str, dict[str, Any]]:
    """The segmentation summary (``segmentation.SegmentationAccumulator``) of each runner on ``frames``,
    frame by frame with the same inputs, like ``scoring.score_model`` computes the eager model's."""
    accumulators = {name: seg.SegmentationAccumulator() for name in runners}
    with torch.no_grad():
        for frame in frames:
            inputs = artifacts.frame_inputs(frame.points, device)
            for name, run in runners.items():
                predicted = run(*inputs)[0].float().argmax(-1).cpu().numpy()
                accumulators[name].update(frame.labels, predicted)
    return {name: acc.summary() for name, acc in accumulators.items()}


def accuracy_change(summary: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """mIoU and per-class IoU of ``summary`` and their change against ``reference`` in IoU points
    (100 x the IoU difference; negative is a loss). Classes without an IoU on either side are left out."""
    def points(mine: float | None, theirs: float | None) -> float | None:
        return None if mine is None or theirs is None else round(100.0 * (mine - theirs), 4)

    classes = {}
    for name, metrics in summary["classes"].items():
        change = points(metrics.get("iou"), reference["classes"].get(name, {}).get("iou"))
        if change is not None:
            classes[name] = change
    return {"miou": summary["miou"], "miou_change_pts": points(summary["miou"], reference["miou"]),
            "class_iou": {name: m.get("iou") for name, m in summary["classes"].items()},
            "class_iou_change_pts": classes}


def agreement_on(eager: artifacts.Runner, runners: dict[str, artifacts.Runner], frames: Sequence[np.ndarray],
                 device: torch.device) -> dict[str, dict[str, Any]]:
    """Per runner, its logits against eager's on each of ``frames`` (``serving.package.compare_logits``, the
    package's tolerance): the largest difference, the lowest class match rate, and whether every frame
    agrees. The float variants must; a quantized one is not expected to (its cost is the accuracy change)."""
    from serving.package import compare_logits

    worst: dict[str, dict[str, Any]] = {name: {"frames": len(frames), "max_abs_diff": 0.0, "class_match_rate": 1.0,
                                               "agrees": True} for name in runners}
    with torch.no_grad():
        for points in frames:
            inputs = artifacts.frame_inputs(points, device)
            reference = eager(*inputs)[0].float().cpu().numpy()
            for name, run in runners.items():
                result = compare_logits(reference, run(*inputs)[0].float().cpu().numpy())
                mine = worst[name]
                mine.update(max_abs_diff=max(mine["max_abs_diff"], result["max_abs_diff"]),
                            class_match_rate=min(mine["class_match_rate"], result["class_match_rate"]),
                            agrees=mine["agrees"] and result["agrees"])
    return worst


# ----------------------------------------------------------------------------------------- the table
def evaluate(hardware_result: dict[str, Any], built: Sequence[hardware.Variant], not_built: dict[str, str],
             frames: Sequence[LoggedFrame], latency_frames: Sequence[np.ndarray], eager: artifacts.Runner,
             eager_segmentation: dict[str, Any], compiled_dir: str, device: torch.device, limits: dict[str, float],
             say: Callable[[str], None]) -> dict[str, Any]:
    """The variant table of ``metrics.json``: every timed variant with its accuracy change (servable ones,
    on all of ``frames``) and its logits' agreement with eager on the ``latency_frames``, frozen against
    unfrozen TorchScript, the matmul peak, what was not built and why, the limits and the choice."""
    timed = hardware_result["variants"]
    runners = {v.name: v.run for v in built if v.name in SERVABLE and v.name in timed}
    if AOT in timed:  # the program hardware.measure compiled, loaded back from its file
        runners[AOT] = artifacts.load_pt2(os.path.join(compiled_dir, artifacts.COMPILED_PT2), "aoti", device)
    say(f"scoring {', '.join(runners)} on the {len(frames)} test frames (accuracy change against eager)")
    summaries = segmentation_of(runners, frames, device)
    agreement = agreement_on(eager, runners, latency_frames, device)
    peak = hardware.matmul_peak_gflops(device=device)
    rows: dict[str, dict[str, Any]] = {}
    for name, timing in timed.items():
        row = {"p50_ms": timing["p50_ms"], "p99_ms": timing["p99_ms"], "peak_memory_mb": timing["peak_memory_mb"],
               "achieved_gflops": timing["achieved_gflops"],
               "peak_share": timing["achieved_gflops"] / peak if timing["achieved_gflops"] and peak else None,
               "max_abs_diff_vs_eager": timing["max_abs_diff_vs_eager"], "note": timing["note"],
               "servable": name in SERVABLE, "runtime": SERVABLE.get(name, (None, None))[0],
               "file": SERVABLE.get(name, (None, None))[1]}
        if name == EAGER:
            row.update(accuracy_change(eager_segmentation, eager_segmentation))
        elif name in summaries:
            row.update(accuracy_change(summaries[name], eager_segmentation), agreement_vs_eager=agreement[name])
        else:
            row["accuracy_note"] = "not scored: not a variant the package can carry"
        rows[name] = row
    choice = choose(rows, **limits)
    frozen = None
    if TORCHSCRIPT in timed and FROZEN in timed:
        frozen = {"unfrozen_p50_ms": timed[TORCHSCRIPT]["p50_ms"], "frozen_p50_ms": timed[FROZEN]["p50_ms"],
                  "speedup_p50": timed[TORCHSCRIPT]["p50_ms"] / timed[FROZEN]["p50_ms"]}
    return {"matmul_peak_gflops": peak, "test_frames": len(frames), "limits": dict(limits), "rows": rows,
            "frozen_vs_unfrozen": frozen, "not_built": dict(not_built), "choice": choice}


# ----------------------------------------------------------------------------------------- the choice
def ineligibility(row: dict[str, Any], latency_budget_ms: float, max_miou_drop: float,
                  max_class_iou_drop: float) -> list[str]:
    """Why a variant may not be served (empty: it may)."""
    why = []
    if not row.get("servable"):
        return ["the package cannot carry it"]
    if row.get("p99_ms") is None or row["p99_ms"] > latency_budget_ms:
        why.append(f"p99 {row.get('p99_ms') or float('nan'):.1f} ms over the budget {latency_budget_ms:.1f} ms")
    change = row.get("miou_change_pts")
    if change is None:
        why.append("no mIoU measured")
    elif -change > max_miou_drop:
        why.append(f"mIoU {change:+.2f} points (limit -{max_miou_drop:.2f})")
    drops = {name: c for name, c in (row.get("class_iou_change_pts") or {}).items() if -c > max_class_iou_drop}
    for name, c in sorted(drops.items()):
        why.append(f"{name} IoU {c:+.2f} points (limit -{max_class_iou_drop:.2f})")
    return why


def choose(rows: dict[str, dict[str, Any]], latency_budget_ms: float, max_miou_drop: float,
           max_class_iou_drop: float) -> dict[str, Any]:
    """The variant to serve: the fastest (p50) eligible one, else the reference TorchScript, saying so."""
    limits = (latency_budget_ms, max_miou_drop, max_class_iou_drop)
    excluded = {name: ineligibility(row, *limits) for name, row in rows.items() if name in SERVABLE}
    eligible = [name for name in SERVABLE if name in excluded and not excluded[name]]
    order = list(SERVABLE)
    if eligible:
        best = min(eligible, key=lambda n: (rows[n]["p50_ms"], order.index(n)))
        reason = (f"{best} ({SERVABLE[best][1]}) is served: p50 {rows[best]['p50_ms']:.1f} ms, p99 "
                  f"{rows[best]['p99_ms']:.1f} ms, mIoU {rows[best]['miou_change_pts']:+.2f} points against eager; "
                  f"the fastest of {len(eligible)} eligible ({', '.join(eligible)})")
        fallback = False
    else:
        best, fallback = REFERENCE, True
        reason = (f"no variant is within the latency budget {latency_budget_ms:.1f} ms and the accuracy limits "
                  f"(mIoU -{max_miou_drop:.2f}, class IoU -{max_class_iou_drop:.2f} points): falls back to the "
                  f"reference TorchScript {SERVABLE[REFERENCE][1]}")
    return {"variant": best, "runtime": SERVABLE[best][0], "file": SERVABLE[best][1], "fallback": fallback,
            "eligible": eligible, "excluded": {n: why for n, why in excluded.items() if why}, "reason": reason}
