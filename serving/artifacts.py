"""The deployable forms of a trained model, made, loaded, timed and counted in one place.

A model artifact folder (``model.json`` + ``model.pt``) becomes these runnable forms:

* **eager**: the ``nn.Module`` rebuilt from ``model.json`` with the weights of ``model.pt`` (``load_model``);
* **TorchScript**: ``torch.jit.script`` of the eager model (no tracing, so no shape is baked in), frozen
  (``freeze_torchscript``: weights become graph constants) and saved with provenance in ``_extra_files``
  (``save_torchscript``; loaded by ``load_torchscript`` and C++);
* **model.pt2**: ``torch.export`` under the one dynamic-shape spec ``ExportSpec`` (batch 1, the point
  count dynamic from 1 to ``serve.max_points``), compiled by AOTInductor, or the ``ExportedProgram``
  where AOTInductor is off or cannot compile (``compile_pt2``; loaded by ``load_pt2``);
* **int8**: that export quantized with torchao's PT2E flow for x86 (``quantize_int8``), then exported and
  compiled like ``model.pt2`` (the evaluate stage's ``int8_pt2e`` variant, kept in ``COMPILED_INT8_DIR``).

The evaluate stage times these forms (``evaluation.hardware``) and the serve stage ships them
(``serving.package``); both go through this module, so the latency in ``metrics.json`` is measured on
the program the package carries: same export spec, same compiler call. Evaluate keeps its compiled
``model.pt2`` with its metrics (``COMPILED_DIR``) together with a record of what it is (``export.json``:
model fingerprint, export spec, torch version, device, SHA-256); the serve stage copies it into the
package when the record matches the model and spec it is packaging, and checks the copy's SHA-256
(``reuse_compiled``), instead of compiling the same program a second time. Serve run alone compiles.

Why in ``serving``: the package is what these artifacts are for, and evaluation must measure exactly
what serving ships, so evaluation imports this module (evaluation -> serving, like it already depends on
training for the model registry). It imports nothing from ``evaluation``, so there is no cycle.

Timing (``time_interleaved``): round ``i`` calls every runner once on input ``i % len(inputs)``,
starting with a different runner each round, so load that comes and goes on a shared machine hits
every runtime alike; CUDA calls are timed with events. MACs (``count_flops``) come from PyTorch's
FLOP counter (matmuls and convolutions; scatter/gather do no multiply-adds; MACs = FLOPs / 2).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.contracts import CompiledProgram, ContractError, ModelSpec
from pipeline.files import sha256_file

Inputs = tuple[torch.Tensor, torch.Tensor]
Runner = Callable[[torch.Tensor, torch.Tensor], Any]

# The folder of a metrics artifact holding evaluate's compiled model.pt2 and its record.
COMPILED_DIR = "compiled"
COMPILED_PT2 = "model.pt2"
# The subfolder of COMPILED_DIR holding the int8 program (its own model.pt2 and export.json).
COMPILED_INT8_DIR = "int8"
PT2_FORMATS = ("aoti", "exported_program")


# ----------------------------------------------------------------------------------------- eager
def load_model(model_dir: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """The eager model of a model artifact folder, in eval mode, and its ``model.json``: ``model.json``
    says how to rebuild it and ``model.pt`` holds the state dict (read with ``weights_only=True``:
    tensors, never arbitrary objects)."""
    from training.models import build_model

    spec = ModelSpec.load_from(model_dir)
    model = build_model(spec.model, spec.options or None)
    state = torch.load(os.path.join(model_dir, "model.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), spec


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of what makes a model compute what it computes: its class, its config (when it has one)
    and every state-dict tensor (name, dtype, shape, bytes). Two stages loading the same model artifact
    get the same fingerprint; a program compiled for one model is never reused for another."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    header = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
              "config": asdict(config) if config is not None and hasattr(config, "__dataclass_fields__") else None}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"\n{name} {value.dtype} {tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frame_inputs(points: np.ndarray, device: torch.device | str = "cpu") -> Inputs:
    """One frame as the model's batch-1 input: ``points [1, N, 4]`` float32 and an all-true ``valid [1, N]``."""
    tensor = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).unsqueeze(0).to(device)
    return tensor, torch.ones(tensor.shape[:2], dtype=torch.bool, device=tensor.device)


# ----------------------------------------------------------------------------------------- TorchScript
def save_torchscript(model: torch.nn.Module, path: str, extra_files: dict[str, str]) -> torch.jit.ScriptModule:
    """Script ``model`` (a CPU copy in eval mode), freeze it (``freeze_torchscript``), save it to ``path``
    with ``extra_files``, and return the module read back from the file, so what is checked afterwards
    is what was written."""
    from training.checkpoint import script_model

    torch.jit.save(freeze_torchscript(script_model(model)), path, _extra_files=extra_files)
    return load_torchscript(path)


def freeze_torchscript(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """``torch.jit.freeze`` of an eval-mode scripted model: parameters and attributes become constants,
    so the graph optimiser can fold them (and drop the attribute lookups of every call). The result
    loads and runs like any TorchScript file, in Python and in C++; only ``forward`` is kept."""
    return torch.jit.freeze(scripted.eval())


def load_torchscript(source: str | bytes, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript module from a file path or from bytes already read (and checked) by the caller."""
    return torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location=device)


# ----------------------------------------------------------------------------------------- torch.export
@dataclass(frozen=True)
class ExportSpec:
    """The one dynamic-shape spec of every exported program: a batch of one frame whose point count
    may be anything from ``MIN_POINTS`` to ``max_points`` (``serve.max_points``, the most a server
    accepts). The evaluate stage exports with it too, so it times the program the package ships."""

    max_points: int
    MIN_POINTS = 1

    def __post_init__(self) -> None:
        if self.max_points < 2:
            raise ValueError(f"serve.max_points: {self.max_points} must be at least 2 (the exported point count "
                             "is dynamic between 1 and it)")

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """``torch.export``'s ``dynamic_shapes`` for ``forward(points [1, N, 4], valid [1, N])``."""
        num_points = torch.export.Dim("num_points", min=self.MIN_POINTS, max=self.max_points)
        return {"points": {1: num_points}, "valid": {1: num_points}}

    def as_dict(self) -> dict[str, Any]:
        """How the spec is recorded (package metadata and the compiled record)."""
        return {"num_points": [self.MIN_POINTS, self.max_points], "batch": 1}

    def check(self, num_points: int, what: str) -> None:
        """``ValueError`` when ``num_points`` is outside the spec (the program would refuse the input)."""
        if not self.MIN_POINTS <= num_points <= self.max_points:
            raise ValueError(f"{what} has {num_points} points; the exported program takes {self.MIN_POINTS} to "
                             f"{self.max_points} (serve.max_points)")


def export_program(model: torch.nn.Module, example: Inputs, spec: ExportSpec) -> torch.export.ExportedProgram:
    """``torch.export`` of (a copy of) ``model`` on ``example`` under ``spec``."""
    spec.check(int(example[0].shape[1]), "the export example")
    return torch.export.export(copy.deepcopy(model), example, dynamic_shapes=spec.dynamic_shapes())


def quantize_int8(model: torch.nn.Module, calibration: Sequence[Inputs], spec: ExportSpec) -> torch.nn.Module:
    """Post-training static int8 quantization for x86 CPUs (torchao's PT2E flow): ``torch.export`` of
    ``model`` under ``spec``, ``prepare_pt2e`` with the ``X86InductorQuantizer`` defaults (per-channel
    int8 weights, per-tensor int8 activations of convolutions and linears), observers fed with every
    ``calibration`` frame, then ``convert_pt2e``. The result is a ``GraphModule`` taking the model's
    inputs; ``export_program`` + ``compile_pt2`` turn it into an AOTInductor package whose quantized
    ops Inductor lowers to oneDNN int8 kernels. ``ValueError`` without calibration frames; anything the
    quantizer cannot handle raises (the caller reports the variant as not built, with the reason)."""
    if not calibration:
        raise ValueError("int8 quantization needs at least one calibration frame")
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(export_program(model, calibration[0], spec).module(), quantizer)
    with torch.no_grad():
        for points, valid in calibration:
            prepared(points, valid)
    return convert_pt2e(prepared)


def compile_pt2(exported: torch.export.ExportedProgram, path: str, aot_inductor: bool, setting: str,
                metadata: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """Write ``path``: AOTInductor first (``metadata`` goes into the package's AOTI metadata); if it is
    switched off (by the config field ``setting``) or cannot compile here, ``torch.export.save`` of the
    ExportedProgram with the reason.
    Returns ``{format, aoti_error[, compile_seconds]}``."""
    info: dict[str, Any] = {"format": "exported_program", "aoti_error": None}
    if aot_inductor:
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():  # torch-internal FutureWarnings (pytree) while packaging
                warnings.simplefilter("ignore", FutureWarning)
                torch._inductor.aoti_compile_and_package(
                    exported, package_path=path,
                    inductor_configs={"aot_inductor.metadata": {k: str(v) for k, v in metadata.items()}})
            info.update(format="aoti", compile_seconds=round(time.perf_counter() - started, 1))
            return info
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: fall back and say why
            first_line = (str(exc).strip().splitlines() or [""])[0][:500]
            info["aoti_error"] = f"{type(exc).__name__}: {first_line}"
            say(f"AOTInductor could not compile the model ({info['aoti_error']}); "
                "saving the ExportedProgram with torch.export.save instead")
            if os.path.exists(path):
                os.remove(path)
    else:
        info["aoti_error"] = f"skipped: {setting} is false"
    torch.export.save(exported, path)
    return info


def load_pt2(path: str, pt2_format: str, device: torch.device | str = "cpu") -> Runner:
    """A callable ``(points, valid) -> logits`` from a ``model.pt2`` (an AOTI package holds a shared
    library that is loaded and run: load only files that were verified)."""
    if pt2_format == "aoti":
        return torch._inductor.aoti_load_package(path)
    if pt2_format == "exported_program":
        return torch.export.load(path).module().to(device)
    raise ValueError(f"unknown model.pt2 format {pt2_format!r}; expected one of {', '.join(PT2_FORMATS)}")


def compiled_record(model: torch.nn.Module, spec: ExportSpec, device: torch.device | str) -> dict[str, Any]:
    """What a compiled ``model.pt2`` must match to be reused: the model, the spec, torch, the device and,
    on CPU, the vector instruction set the C++ was compiled for (a stage on another kind of host compiles
    its own)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    device_type = torch.device(device).type
    return {"model_fingerprint": model_fingerprint(model), "export_spec": spec.as_dict(),
            "torch": torch.__version__, "device": device_type,
            "cpu_isa": str(pick_vec_isa()) if device_type == "cpu" else None}


def write_compiled_record(folder: str, record: dict[str, Any], info: dict[str, Any]) -> CompiledProgram:
    """``export.json`` beside ``folder/model.pt2``: ``record``, the compile info and the file's SHA-256."""
    program = CompiledProgram(**record, **info, file=COMPILED_PT2,
                              sha256=sha256_file(os.path.join(folder, COMPILED_PT2)))
    program.save_to(folder)
    return program


def reuse_compiled(folder: str | None, record: dict[str, Any], target: str) -> tuple[dict[str, Any] | None, str]:
    """Copy an AOTInductor ``model.pt2`` compiled earlier into ``target`` when its ``export.json`` in
    ``folder`` matches ``record`` (see ``compiled_record``) and the copy has the recorded SHA-256.
    Returns (``{format, aoti_error, compile_seconds}``, why) on reuse, or (None, why not)."""
    if not folder or not os.path.isfile(os.path.join(folder, CompiledProgram.FILE)):
        return None, "no compiled model.pt2 from the evaluation"
    try:
        stored = CompiledProgram.load_from(folder)
    except ContractError as exc:
        return None, f"the evaluation's {CompiledProgram.FILE} is unreadable ({exc})"
    if stored.format != "aoti":
        return None, "the evaluation did not compile with AOTInductor"
    for key, value in record.items():
        if getattr(stored, key) != value:
            return None, f"the evaluation's model.pt2 was compiled for another {key.replace('_', ' ')}"
    shutil.copyfile(os.path.join(folder, stored.file), target)
    if sha256_file(target) != stored.sha256:
        os.remove(target)
        return None, f"the evaluation's model.pt2 does not match the SHA-256 in its {CompiledProgram.FILE}"
    return ({"format": "aoti", "aoti_error": None, "compile_seconds": stored.compile_seconds},
            f"reused the evaluation's AOTInductor model.pt2 (sha256 {stored.sha256[:16]}...)")


# ----------------------------------------------------------------------------------------- timing
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, like ``numpy.percentile``)."""
    return float(np.percentile(np.asarray(values, np.float64), q))


def latency_stats(samples_ms: Sequence[float], points_per_call: float) -> dict[str, Any]:
    """Summary of per-call latencies in milliseconds."""
    mean = float(np.mean(samples_ms))
    p50, p99 = percentile(samples_ms, 50), percentile(samples_ms, 99)
    return {
        "runs": len(samples_ms), "min_ms": float(np.min(samples_ms)), "p50_ms": p50,
        "p90_ms": percentile(samples_ms, 90), "p99_ms": p99, "max_ms": float(np.max(samples_ms)), "mean_ms": mean,
        "std_ms": float(statistics.pstdev(samples_ms)) if len(samples_ms) > 1 else 0.0,
        "jitter_ms": p99 - p50,
        "frames_per_s": 1000.0 / mean if mean > 0 else None,
        "points_per_s": 1000.0 * points_per_call / mean if mean > 0 else None,
        "samples_ms": [float(s) for s in samples_ms],
    }


def time_call(run: Runner, points: torch.Tensor, valid: torch.Tensor, device: torch.device) -> float:
    """Milliseconds of one call (CUDA: between two events, synchronised)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(points, valid)
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    began = time.perf_counter()
    run(points, valid)
    return (time.perf_counter() - began) * 1000.0


def warm_up(run: Runner, inputs: Sequence[Inputs], calls: int) -> None:
    """``calls`` untimed calls cycling through ``inputs`` (allocator, TorchScript's profiling runs)."""
    with torch.no_grad():
        for i in range(calls):
            run(*inputs[i % len(inputs)])


def time_interleaved(runners: dict[str, Runner], inputs: Sequence[Inputs], runs: int,
                     device: torch.device) -> dict[str, list[float]]:
    """``runs`` timed calls of every runner, interleaved (see the module docstring); per runner the
    milliseconds of each call."""
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for i in range(runs):
            points, valid = inputs[i % len(inputs)]
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                samples[name].append(time_call(runners[name], points, valid, device))
    return samples


# ----------------------------------------------------------------------------------------- compute
def count_flops(model: torch.nn.Module, inputs: Inputs) -> dict[str, Any]:
    """FLOPs and MACs of one call, in total and per top-level stage, by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=2)
    with counter, torch.no_grad():
        model(*inputs)
    per_stage = {}
    for name, ops in counter.get_flop_counts().items():
        if name.count(".") == 1:  # "<ModelClass>.<stage>": the model's direct children
            per_stage[name.split(".", 1)[1]] = int(sum(ops.values())) // 2
    flops = int(counter.get_total_flops())
    return {"flops": flops, "macs": flops // 2, "macs_per_stage": per_stage,
            "counted_ops": sorted({str(op) for ops in counter.get_flop_counts().values() for op in ops})}
