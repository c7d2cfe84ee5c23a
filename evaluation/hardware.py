"""Hardware metrics: how fast and how big the model is on this machine, on logged test frames.

For each way of running the model - **eager** PyTorch, the **TorchScript** ``model.ts`` the training
stage wrote (``torch.jit.script`` of the same model, as the package's), and the **exported** ``model.pt2``
exactly as the serve stage makes it (``serving.artifacts``: ``torch.export`` under the serving export
spec, point count 1..``serve.max_points``, compiled ahead of time by AOTInductor) - the same real
test frames (full resolution, batch 1) are run ``warmup`` times untimed and then ``runs`` times timed,
cycling through the frames. Reported per variant: latency p50 / p90 / p99 / max / mean, jitter (std and p99 - p50),
throughput (frames and points per second at the mean latency), peak memory, and the largest difference
of its logits from eager on the first frame (a variant that disagrees is not a faster version of the
same model).

* **Timing.** CPU: ``time.perf_counter`` around each call. CUDA: ``torch.cuda.Event`` pairs around each
  call, synchronised after it; the frames are on the device beforehand (host-to-device copies are not
  in the numbers). The timed calls of the variants are interleaved (round robin, rotating who goes
  first), so on a shared machine a burst of someone else's load hits every variant alike.
* **Memory.** Measured over each variant's untimed calls (the agreement check and the warm-up). CUDA:
  ``torch.cuda.max_memory_allocated`` minus what was allocated before. CPU: the peak resident set size
  sampled every millisecond by a thread, minus the RSS before (after ``malloc_trim`` returns freed heap
  to the OS) - an estimate: allocations shorter than the sampling period can be missed, and memory the
  allocator kept from an earlier variant is not seen again.
* **Compute.** MACs from PyTorch's own FLOP counter (``torch.utils.flop_counter.FlopCounterMode``,
  MACs = FLOPs / 2) on the eager model with the first frame, in total and per top-level stage. The
  counter knows matrix multiplies and convolutions only; scatter, gather and element-wise work is not
  counted, so achieved GFLOP/s (counted FLOPs / p50 latency) is a lower bound. Parameters by count.
* **AOTInductor** compiles C++ (tens of seconds). The compiled ``model.pt2`` and its ``export.json``
  (model fingerprint, export spec, torch, device, SHA-256) stay in ``compiled_dir``; the evaluate stage
  keeps them with its metrics, and the serve stage ships that very file (checked) instead of compiling
  again. If AOTInductor is switched off (``evaluate.aot_inductor``) or fails, the ``torch.export``
  program (``torch.export.save``d, loaded back) is timed instead and the note says so.
* Timing, model loading, export, compiling and MAC counting are ``serving.artifacts``'s; this module
  adds the variants' memory, agreement and the summary.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import psutil
import torch

from serving import artifacts
from serving.artifacts import Inputs


def pick_device(wanted: str) -> torch.device:
    """``cuda`` when asked for or (``auto``) available, else ``cpu``."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluate.device is cuda but no CUDA device is available; use --set evaluate.device=cpu")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so an RSS peak reflects what the next code needs."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Measure the peak memory of the code in the ``with`` block; the dict is filled on exit."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out.update(peak_mb=(torch.cuda.max_memory_allocated(device) - before) / 2**20,
                   method="torch.cuda.max_memory_allocated minus allocated before")
        return
    _release_free_heap()
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.001)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        out.update(peak_mb=(peak[0] - before) / 2**20, method="peak RSS (sampled every 1 ms) minus RSS before")


@dataclass
class Variant:
    """One way to run the model: a name, the callable, and what to know about how it was made."""

    name: str
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    note: str = ""
    build_s: float = 0.0


def exported_variant(model: torch.nn.Module, example: Inputs, spec: artifacts.ExportSpec, compiled_dir: str,
                     aot_inductor: bool, device: torch.device, say: Callable[[str], None]) -> Variant:
    """The ``model.pt2`` the serve stage would ship: ``torch.export`` under ``spec``, compiled by
    AOTInductor (the ExportedProgram when AOTInductor is off or fails), written to ``compiled_dir`` with
    its ``export.json`` record, and loaded back from the file."""
    began = time.perf_counter()
    program = artifacts.export_program(model, example, spec)
    if aot_inductor:
        say("compiling the exported program with AOTInductor (C++; this takes a while)")
    os.makedirs(compiled_dir, exist_ok=True)
    path = os.path.join(compiled_dir, artifacts.COMPILED_PT2)
    record = artifacts.compiled_record(model, spec, device)
    info = artifacts.compile_pt2(program, path, aot_inductor, "evaluate.aot_inductor", record, say)
    artifacts.write_compiled_record(compiled_dir, record, info)
    runner = artifacts.load_pt2(path, info["format"], device)
    build_s = time.perf_counter() - began
    if info["format"] == "aoti":
        return Variant("aot_inductor", runner, "torch.export + AOTInductor (aoti_compile_and_package)", build_s)
    if aot_inductor:
        return Variant("exported", runner, f"AOTInductor failed ({info['aoti_error']}); timed the torch.export "
                                           "program's module instead", build_s)
    return Variant("exported", runner,
                   "torch.export program's module (AOTInductor switched off: evaluate.aot_inductor=false)", build_s)


def measure(model: torch.nn.Module, torchscript_path: str | None, frames: Sequence[np.ndarray], *, runs: int,
            warmup: int, device: torch.device, aot_inductor: bool, max_points: int, compiled_dir: str,
            say: Callable[[str], None] = print, extra: Sequence[Variant] = ()) -> dict[str, Any]:
    """Latency, memory and agreement of every variant on ``frames`` (arrays of points), plus MACs and
    parameters. ``model`` is the eager model (any device; it is moved to ``device``). The exported
    variant uses the serving export spec (point count 1..``max_points``) and leaves its ``model.pt2``
    and ``export.json`` in ``compiled_dir``. ``extra`` variants (``evaluation.variants``) are timed
    with the others."""
    if not frames:
        raise ValueError("hardware metrics need at least one frame")
    if runs < 1:
        raise ValueError(f"evaluate.latency_runs must be at least 1, got {runs}")
    spec = artifacts.ExportSpec(max_points)
    for i, frame in enumerate(frames):
        spec.check(len(frame), f"latency frame {i}")
    model = model.to(device).eval()
    inputs = [artifacts.frame_inputs(f, device) for f in frames]
    notes: list[str] = []
    variants = [Variant("eager", model, "the nn.Module in eval mode")]
    if torchscript_path and os.path.exists(torchscript_path):
        began = time.perf_counter()
        variants.append(Variant("torchscript", artifacts.load_torchscript(torchscript_path, device),
                                f"TorchScript {os.path.basename(torchscript_path)} (torch.jit.load)",
                                time.perf_counter() - began))
    else:
        notes.append("no model.ts in the model artifact: TorchScript not timed")
    try:
        variants.append(exported_variant(model, inputs[0], spec, compiled_dir, aot_inductor, device, say))
    except Exception as exc:
        notes.append(f"torch.export failed ({type(exc).__name__}: {str(exc)[:200]}): no exported variant")
    variants.extend(extra)
    with torch.no_grad():
        reference = model(*inputs[0]).float()
    # Per variant, untimed: the agreement check and the warm-up calls, under the memory probe.
    checks: dict[str, tuple[float, float]] = {}
    for variant in variants:
        with peak_memory(device) as memory, torch.no_grad():
            difference = float((variant.run(*inputs[0]).float() - reference).abs().max())
            artifacts.warm_up(variant.run, inputs, warmup)
        checks[variant.name] = (difference, memory["peak_mb"])
    say(f"timing {', '.join(v.name for v in variants)}: {runs} interleaved calls each on {len(inputs)} test "
        f"frames ({device.type})")
    samples = artifacts.time_interleaved({v.name: v.run for v in variants}, inputs, runs, device)
    points_per_call = float(np.mean([inputs[i % len(inputs)][0].shape[1] for i in range(runs)]))
    results = {}
    for variant in variants:
        difference, peak_mb = checks[variant.name]
        results[variant.name] = {**artifacts.latency_stats(samples[variant.name], points_per_call),
                                 "peak_memory_mb": peak_mb, "max_abs_diff_vs_eager": difference, "note": variant.note,
                                 "build_s": variant.build_s}
    flops = artifacts.count_flops(model, inputs[0])
    eager_p50 = results["eager"]["p50_ms"]
    for result in results.values():
        result["achieved_gflops"] = flops["flops"] / (result["p50_ms"] / 1000.0) / 1e9 if result["p50_ms"] else None
        result["speedup_vs_eager"] = eager_p50 / result["p50_ms"] if result["p50_ms"] else None
    return {
        "device": device.type, "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else _cpu_name()),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "frames": len(inputs), "points_per_frame": [int(i[0].shape[1]) for i in inputs],
        "flop_frame_points": int(inputs[0][0].shape[1]), **flops,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "memory_method": memory["method"], "variants": results, "notes": notes,
    }


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), or the platform's processor string."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "cpu"


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, device: torch.device | None = None) -> float:
    """Best-of-``repeats`` float32 ``torch.mm`` throughput on ``size x size`` matrices, in GFLOP/s: the
    machine's practical peak to compare a model's achieved GFLOP/s with."""
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up (thread pool, cuBLAS handles)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best / 1e9
