"""Evaluation's hardware benchmark: the latency table of the demo model - eager, TorchScript and the
``torch.export`` program compiled by AOTInductor - on demo-sized frames, with the counted compute turned
into achieved GFLOP/s and compared with a float32 matrix-multiply peak measured in the same run.

    .venv/bin/python -m bench.evaluate_bench [--model bev_segnet --runs 20 --warmup 3 --frames 3 --no-aot]
    .venv/bin/python -m bench.evaluate_bench --model-dir <home>/artifacts/model/bev_segnet/v1

Frames come from the fleet simulator at the demo's sensor settings (32 beams x 1024 columns, ~30k points
per frame): the first ``--frames`` frames of one simulated log, cycled, batch 1. The model is the
registered ``--model`` with its default config and fresh weights (latency does not depend on the weights;
``--model-dir`` times a trained model artifact instead). The TorchScript variant is scripted here exactly
as the training stage scripts ``model.ts``. Everything goes through ``evaluation.hardware.measure``, the
code ``avp evaluate`` uses. The peak is the best of five ``torch.mm`` of 2048 x 2048 float32 matrices;
"% of mm peak" compares the best model call with it (on a shared machine the best calls are the least
disturbed by other load; p50-based GFLOP/s is printed too).

Prints markdown rows for docs/benchmarks.md (and docs/evaluation.md).

``--bootstrap`` measures instead what the statistics (``evaluation.statistics``) add to evaluate, side by
side with them off:

    .venv/bin/python -m bench.evaluate_bench --bootstrap [--logs 4 --log-frames 20 --resamples 1000]

Two models (``--model`` with fresh weights, seeds 0 and 1: candidate and production) score the same
simulated test logs at the demo's sensor settings through ``scoring.score_model``, the code ``avp
evaluate`` runs; the per-log tallies are timed inside that pass. Then ``statistics.describe`` (the
candidate's intervals) and ``statistics.compare`` (the paired test) run with the bootstrap off (0
resamples: point estimates) and on. The overhead is (tallies + bootstrap) / (scoring without the tallies).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from evaluation import hardware
from pipeline.config import ServeConfig


def demo_frames(count: int) -> list:
    """The first ``count`` frames (points only) of one simulated demo log."""
    from pipeline.config import SimulateConfig
    from spark_jobs.simulator import fleet_plan, simulate_log

    sim = SimulateConfig(logs=1, frames=count)
    meta = fleet_plan(sim)[0]
    return [frame.points for frame in simulate_log(meta, sim)][:count]


def load(args: argparse.Namespace, workdir: str) -> tuple[torch.nn.Module, str, str]:
    """(eager model, TorchScript path, description) of the model to time."""
    from training.checkpoint import script_model

    if args.model_dir:
        from serving.artifacts import load_model

        model, spec = load_model(args.model_dir)
        return model, os.path.join(args.model_dir, "model.ts"), f"{spec['model']} from {args.model_dir}"
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model(args.model).eval()
    path = os.path.join(workdir, "model.ts")
    torch.jit.save(script_model(model), path)
    return model, path, f"{args.model} (default config, fresh weights)"


def bootstrap_overhead(args: argparse.Namespace) -> None:
    """The statistics' cost against the scoring pass they ride on (see the module docstring)."""
    import time

    from evaluation import scoring, statistics
    from evaluation.frames import LoggedFrame
    from pipeline.config import EvaluateConfig, SimulateConfig
    from spark_jobs.simulator import fleet_plan, simulate_log
    from training.models import build_model

    sim = SimulateConfig(logs=args.logs, frames=args.log_frames)
    frames = [LoggedFrame(f.log_id, f.frame_index, meta.city, f.points, f.labels, f.boxes, float(f.ego[4]),
                          f.timestamp_ns) for meta in fleet_plan(sim) for f in simulate_log(meta, sim)]
    ev = EvaluateConfig(bootstrap_resamples=args.resamples)
    settings = scoring.Settings.from_config(ev)
    tally_seconds = [0.0]
    update = statistics.SliceTally.update

    def timed_update(self, *a, **k):
        start = time.perf_counter()
        update(self, *a, **k)
        tally_seconds[0] += time.perf_counter() - start

    statistics.SliceTally.update = timed_update
    scored, seconds = [], 0.0
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(args.model).eval()
        start = time.perf_counter()
        scored.append(scoring.score_model(model, frames, settings, say=lambda _m: None))
        seconds += time.perf_counter() - start
    statistics.SliceTally.update = update
    candidate, production = scored
    timings = {}
    for resamples in (0, args.resamples):
        cfg = EvaluateConfig(bootstrap_resamples=resamples)
        start = time.perf_counter()
        candidate["statistics"] = statistics.describe(candidate["tallies"], cfg)
        comparisons = statistics.compare(candidate, production, cfg)
        timings[resamples] = time.perf_counter() - start
    base = seconds - tally_seconds[0]
    points = sum(len(f.points) for f in frames)
    print(f"{len(frames)} frames of {args.logs} simulated logs ({points:,} points), two {args.model} models "
          f"(candidate, production), {len(candidate['statistics']['slices'])} slices, {len(comparisons)} "
          f"comparisons; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| step | bootstrap off s | bootstrap on s |")
    print("| --- | ---: | ---: |")
    print(f"| scoring both models, without the tallies | {base:.2f} | {base:.2f} |")
    print(f"| per-log tallies (inside the scoring pass) | {tally_seconds[0]:.3f} | {tally_seconds[0]:.3f} |")
    print(f"| intervals + paired test ({args.resamples} resamples when on) | {timings[0]:.3f} | "
          f"{timings[args.resamples]:.3f} |")
    total_off, total_on = base + tally_seconds[0] + timings[0], base + tally_seconds[0] + timings[args.resamples]
    print(f"| total | {total_off:.2f} | {total_on:.2f} |")
    print()
    print(f"bootstrap on vs off: +{100 * (total_on - total_off) / total_off:.2f}%; everything statistical "
          f"(tallies + intervals + paired test) vs scoring without it: "
          f"+{100 * (tally_seconds[0] + timings[args.resamples]) / base:.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bev_segnet")
    parser.add_argument("--model-dir", default="", help="a model artifact folder (model.json, model.pt, model.ts)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-aot", action="store_true", help="time the torch.export program instead of AOTInductor")
    parser.add_argument("--bootstrap", action="store_true", help="time the statistics against scoring instead")
    parser.add_argument("--logs", type=int, default=4, help="--bootstrap: simulated test logs (the demo's: 4)")
    parser.add_argument("--log-frames", type=int, default=20, help="--bootstrap: frames per log")
    parser.add_argument("--resamples", type=int, default=1000, help="--bootstrap: bootstrap resamples when on")
    args = parser.parse_args()
    if args.bootstrap:
        bootstrap_overhead(args)
        return

    device = hardware.pick_device(args.device)
    frames = demo_frames(args.frames)
    with tempfile.TemporaryDirectory(prefix="avp-bench-evaluate-") as workdir:
        model, script, what = load(args, workdir)
        result = hardware.measure(model, script, frames, runs=args.runs, warmup=args.warmup, device=device,
                                  aot_inductor=not args.no_aot, max_points=ServeConfig.max_points,
                                  compiled_dir=workdir, say=lambda m: None)
    peak = hardware.matmul_peak_gflops(2048, device=device)

    points = result["points_per_frame"]
    print(f"model: {what}; {result['parameters']:,} parameters; {result['macs'] / 1e9:.3f} GMACs "
          f"({result['flops'] / 1e9:.3f} GFLOP counted: {', '.join(result['counted_ops'])}) on a "
          f"{result['flop_frame_points']:,}-point frame")
    print("MACs per stage: " + ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in result["macs_per_stage"].items()))
    print(f"device: {result['device_name']} ({result['device']}, {result['threads']} threads), torch {result['torch']}; "
          f"{len(points)} frames of {min(points):,}-{max(points):,} points, batch 1, {args.warmup} warm-up + "
          f"{args.runs} timed calls per variant")
    print(f"float32 torch.mm 2048x2048 peak: {peak:.1f} GFLOP/s")
    print()
    # On a shared machine both the model and the peak are slowed by whatever else runs; the best call of
    # each is the least disturbed, so "% of peak" compares best with best.
    print("| variant | min ms | p50 ms | p90 ms | p99 ms | max ms | std ms | p99-p50 ms | frames/s | peak MB "
          "| GFLOP/s at p50 | GFLOP/s at min | % of mm peak (min) | vs eager (p50) | max abs diff vs eager | build s |")
    print("| --- | " + " | ".join(["---:"] * 15) + " |")
    for name, v in result["variants"].items():
        best_gflops = result["flops"] / (v["min_ms"] / 1000.0) / 1e9
        print(f"| {name} | {v['min_ms']:.1f} | {v['p50_ms']:.1f} | {v['p90_ms']:.1f} | {v['p99_ms']:.1f} | "
              f"{v['max_ms']:.1f} | {v['std_ms']:.1f} | {v['jitter_ms']:.1f} | {v['frames_per_s']:.2f} | "
              f"{v['peak_memory_mb']:.0f} | {v['achieved_gflops']:.2f} | {best_gflops:.2f} | "
              f"{100 * best_gflops / peak:.1f}% | {v['speedup_vs_eager']:.2f}x | {v['max_abs_diff_vs_eager']:.1e} | "
              f"{v['build_s']:.1f} |")
    for name, v in result["variants"].items():
        print(f"- {name}: {v['note']}")
    for note in result["notes"]:
        print(f"- {note}")


if __name__ == "__main__":
    main()
