"""Wall time of the evaluate stage followed by the serve stage on one small model, both with AOTInductor on:
the cost of exporting and compiling the model for the metrics and for the package.

    PYTHONPATH=$PWD .venv/bin/python -m bench.evaluate_serve_bench [--repeats 2] [--steps 10]

Each repeat runs in a fresh process with a fresh, empty TorchInductor cache (``TORCHINDUCTOR_CACHE_DIR``:
nothing compiled by an earlier repeat is reused, like a first ``make demo``) and a fresh home: a tiny
simulated dataset and a tiny ``bev_segnet`` trained in-process for ``--steps`` steps
(``tests.evaluation.builders``, the evaluate tests' own fixtures), then ``avp evaluate`` and ``avp serve``
through their stage entries (``evaluation.entry.run``, ``serving.entry.run``). Only the two stage calls
are timed. Prints one markdown row per repeat for docs/benchmarks.md. To compare two versions of the
code, run it from each checkout (``PYTHONPATH`` picks the code) in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Settings that let the tiny model be blessed (the bench times packaging, not the verdict).
SETTINGS = {"evaluate.min_miou": 0.0, "evaluate.latency_p99_budget_ms": 1e9, "evaluate.latency_runs": 5,
            "evaluate.latency_warmup": 1, "evaluate.latency_frames": 2, "evaluate.aot_inductor": True,
            "evaluate.device": "cpu", "serve.aot_inductor": True, "serve.latency_runs": 5,
            "serve.example_points": 5000}


def one_run(steps: int) -> dict[str, float]:
    """Seconds of evaluate and of serve on a fresh home."""
    from evaluation import entry as evaluate
    from pipeline import config
    from pipeline.registry import Registry
    from serving import entry as serve
    from tests.evaluation import builders

    with tempfile.TemporaryDirectory(prefix="avp-bench-evaluate-serve-") as home:
        cfg = config.load({"home": home, **SETTINGS}, env={})
        registry = Registry.open(cfg)
        logs = builders.simulated_logs()
        dataset = builders.register_sim_dataset(registry, logs)
        train = [f for _log, _city, frames in logs[:builders.SPLITS["train"]] for f in frames]
        model = builders.register_model(registry, dataset, builders.train_tiny(train, steps=steps), "bench")
        began = time.perf_counter()
        result = evaluate.run(cfg, registry, say=lambda _m: None, model=model.ref)
        evaluated = time.perf_counter()
        if not result["blessed"]:
            raise SystemExit(f"the bench model was not blessed: {json.dumps(result, default=str)[:500]}")
        package = serve.run(cfg, registry, say=lambda _m: None, model=model.ref)
        served = time.perf_counter()
        with open(os.path.join(package["location"], "metadata.json")) as fh:
            pt2 = json.load(fh)["runtimes"]["pt2"]
        return {"evaluate_s": evaluated - began, "serve_s": served - evaluated, "total_s": served - began,
                "pt2": f"{pt2['format']}, compiled by {pt2.get('compiled_by', 'serve')}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--one", action="store_true", help="run one repeat in this process, print JSON")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.steps)))
        return
    print("| repeat | evaluate s | serve s | evaluate + serve s | .pt2 |")
    print("| --- | ---: | ---: | ---: | --- |")
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="avp-bench-inductor-") as cache:
            out = subprocess.run([sys.executable, "-m", "bench.evaluate_serve_bench", "--one", "--steps",
                                  str(args.steps)], env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                                 capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {i + 1} | {r['evaluate_s']:.1f} | {r['serve_s']:.1f} | {r['total_s']:.1f} | {r['pt2']} |",
              flush=True)


if __name__ == "__main__":
    main()
