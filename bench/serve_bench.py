"""Serving benchmark, in one run on one package: in-process forward of every runtime the package carries,
the C++ LibTorch consumer, and the HTTP server (binary with 1 client; 4 clients with one worker, one
worker per core, and dynamic batching; JSON), then a soak at a fixed request rate (p50/p99, errors, the
server's RSS at the start and the end), and every runtime the package carries side by side
(``print_variant_rows``: GFLOP/s against a matmul peak of the same run, the package's default runtime - the
evaluation's chosen variant - marked).

    .venv/bin/python -m bench.serve_bench [--requests 40] [--points 20000] [--small] [--threads 0]
                                          [--package PATH] [--no-cpp] [--soak-s 60] [--soak-rate 0]

Without ``--package`` it registers the default ``bev_segnet`` (seeded weights: latency does not depend
on training), blesses it and runs the real serve stage (AOTInductor and ONNX included) in a temporary
home. Everything runs on this host over loopback (127.0.0.1); the number of requests is bounded. The
server runs its default runtime (the fastest the package verified); ``--soak-rate 0`` soaks at half of
what one client achieved. Prints markdown table rows. The host is shared: the load average before and
after is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.servers import free_port

REPO = Path(__file__).resolve().parent.parent


def build_package(home: str, points: int, small: bool) -> str:
    """Register a seeded default model, bless it, run the serve stage; returns the package folder."""
    import torch

    from pipeline import config
    from pipeline.contracts import ModelSpec
    from pipeline.registry import Registry
    from serving.entry import run
    from training.models import build_model, config_to_dict

    cfg = config.load({"home": home, "serve.example_points": points, "serve.latency_runs": 5}, env={})
    registry = Registry.open(cfg)
    options = {"x_range_m": [-25.6, 25.6], "y_range_m": [-25.6, 25.6]} if small else None

    def write_model(staging, _record):
        torch.manual_seed(0)
        model = build_model("bev_segnet", options).eval()
        torch.save(model.state_dict(), os.path.join(staging, "model.pt"))
        ModelSpec.for_model("bev_segnet", config_to_dict(model.config)).save_to(staging)

    model = registry.build("model", "bev_segnet", entry_point="bench", config={"bench": True}, builder=write_model)
    registry.set_blessing(model.id, True, ["benchmark"])
    started = time.perf_counter()
    result = run(cfg, registry, say=lambda m: None, run_id="serve-bench", model=model.ref)
    print(f"<!-- packaged {result['ref']} ({result['pt2_format']}) in {time.perf_counter() - started:.0f} s -->")
    return result["location"]


def stats(latencies_ms: list[float], wall_s: float) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s)."""
    return (float(np.percentile(latencies_ms, 50)), float(np.percentile(latencies_ms, 99)),
            len(latencies_ms) / wall_s if wall_s > 0 else float("nan"))


def timed(fn, count: int, clients: int) -> tuple[float, float, float]:
    """Call ``fn()`` ``count`` times from ``clients`` threads; latency of each call and overall rate."""
    latencies: list[float] = []

    def one(_i: int) -> None:
        started = time.perf_counter()
        fn()
        latencies.append((time.perf_counter() - started) * 1000.0)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(count)))
    return stats(latencies, time.perf_counter() - started)


def start_server(folder: str, home: str, threads: int, **settings) -> tuple[subprocess.Popen, str]:
    """``avp serve-http`` on a free loopback port with ``serve.K=V`` settings; waits (bounded) until
    /healthz answers."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVP_")}
    env.update(AVP_HOME=home, AVP_SERVE__THREADS=str(threads))
    sets = [arg for key, value in settings.items() for arg in ("--set", f"serve.{key}={value}")]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "avp"), "serve-http", "--package", folder,
                             "--port", str(port), *sets], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"avp serve-http exited with {proc.returncode}")
        try:
            httpx.get(base + "/healthz", timeout=2).raise_for_status()
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 180 s")


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(send, duration_s: float, rate: float) -> tuple[list[float], int]:
    """Requests at a fixed rate (open loop: each starts on its schedule, whether or not the previous one
    has finished) for ``duration_s``; (latencies ms of the successful ones, errors)."""
    latencies: list[float] = []
    errors = [0]

    def one() -> None:
        started = time.perf_counter()
        try:
            send()
            latencies.append((time.perf_counter() - started) * 1000.0)
        except Exception:  # noqa: BLE001 - counted: the soak reports errors rather than stopping
            errors[0] += 1

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for i in range(int(duration_s * rate)):
            time.sleep(max(0.0, began + i / rate - time.perf_counter()))
            pool.submit(one)
    return latencies, errors[0]


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def cpp_latency(folder: str, runs: int, threads: int) -> dict[str, dict[str, str]]:
    """Build the consumer (incremental) and run it; {runtime: its key=value report}."""
    build = subprocess.run(["bash", str(REPO / "serving" / "cpp" / "build.sh")], capture_output=True, text=True,
                           env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    if build.returncode != 0:
        raise RuntimeError("building the C++ consumer failed:\n" + build.stderr[-2000:])
    binary = build.stdout.strip().splitlines()[-1]
    args = [binary, folder, "--runs", str(runs), "--warmup", "5", "--runtime", "all"] + (
        ["--threads", str(threads)] if threads else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the C++ consumer failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    reports = {}
    for line in out.stdout.splitlines():
        found = dict(re.findall(r"(\w+)=(\S+)", line))
        if line.startswith("runtime=") and "p50_ms" in found:
            reports[found["runtime"]] = found
    return reports


def _bare_forward(model):
    """The loaded program of a one-replica ``ServingModel`` (tensors in, logits out), without the checks and
    the replica queue around it: what the variants are timed as."""
    forward = model._forwards.get()
    model._forwards.put(forward)
    return forward


def print_variant_rows(folder: str, runs: int) -> None:
    """Every runtime the package carries, side by side in one interleaved timing on its example: p50/p99,
    achieved GFLOP/s (counted FLOPs / p50) against a float32 matmul peak measured in the same run, and
    which one the package serves by default (the evaluation's choice, ``runtimes.default``)."""
    import torch

    from evaluation.hardware import matmul_peak_gflops
    from serving import artifacts
    from serving.runtime import RUNTIMES, load

    with load(folder, runtime="torchscript") as reference:
        runtimes = [r for r in RUNTIMES if r in reference.metadata.runtimes and (
            r == "torchscript" or reference.metadata.runtimes[r].get("format") == "aoti")]
        default = reference.metadata.runtimes.get("default", {}).get("serve_runtime")  # none: no evaluation
        points, _ = reference.example()
    models = {r: load(folder, runtime=r) for r in runtimes}
    inputs = [artifacts.frame_inputs(points)]
    runners = {r: _bare_forward(m) for r, m in models.items()}
    for run in runners.values():
        artifacts.warm_up(run, inputs, 3)
    samples = artifacts.time_interleaved(runners, inputs, runs, torch.device("cpu"))
    flops = models["torchscript"].metadata.performance["macs"] * 2
    peak = matmul_peak_gflops()
    print(f"\n| runtime ({len(points)} points, interleaved) | p50 ms | p99 ms | GFLOP/s at p50 | % of mm peak "
          f"({peak:.0f} GFLOP/s) | the evaluation's choice |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, times in samples.items():
        stats = artifacts.latency_stats(times, len(points))
        gflops = flops / (stats["p50_ms"] / 1000.0) / 1e9
        print(f"| {name} | {stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} | {gflops:.1f} | {100 * gflops / peak:.0f}% "
              f"| {'yes' if name == default else ''} |")
    for model in models.values():
        model.close()


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print markdown rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="an existing package folder (default: build one)")
    parser.add_argument("--requests", type=int, default=40, help="requests per measurement (bounded)")
    parser.add_argument("--points", type=int, default=20_000, help="points in the example cloud when building")
    parser.add_argument("--small", action="store_true", help="a 128 x 128-cell grid instead of 256 x 256")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no-cpp", action="store_true", help="skip the C++ consumer")
    parser.add_argument("--soak-s", type=float, default=60.0, help="length of the fixed-rate soak (0: none)")
    parser.add_argument("--soak-rate", type=float, default=0.0,
                        help="requests/s of the soak (0: half the 1-client HTTP rate)")
    args = parser.parse_args(argv)

    import httpx
    import torch

    from serving.runtime import RUNTIMES, load

    if args.threads:
        torch.set_num_threads(args.threads)
    home = tempfile.mkdtemp(prefix="avp-serve-bench-")
    try:
        folder = args.package or build_package(home, args.points, args.small)
        load_before = os.getloadavg()[0]
        default = load(folder, runtime="auto")
        points, expected = default.example()
        assert np.array_equal(default.predict(points), expected)
        n = len(points)
        meta = default.metadata
        print(f"<!-- {meta.package['ref']} of {meta.model['ref']}: {n} points, {torch.get_num_threads()} "
              f"torch threads, {os.cpu_count()} cores, load average {load_before:.1f}; default runtime "
              f"{default.runtime} (recorded p50 {default.runtime_choice.get('recorded_p50_ms')}) -->")
        rows: list[tuple[str, int, int, float, float, float]] = []

        # In-process: the raw forward of each runtime (what C++ times), then predict() (with input checks).
        tensor = torch.from_numpy(points).unsqueeze(0)
        valid = torch.ones(tensor.shape[:2], dtype=torch.bool)
        names = {"torchscript": "TorchScript", "pt2": f".pt2 ({meta.runtimes['pt2']['format']})",
                 "int8": "int8 .pt2", "onnx": "ONNX"}
        for runtime in RUNTIMES:
            if not (meta.runtimes.get(runtime) or {}).get("file"):
                continue  # not in this package (int8 only when the evaluation chose it; ONNX when exported)
            forward = load(folder, runtime=runtime)._forwards.get()
            with torch.inference_mode():
                for _ in range(5):
                    forward(tensor, valid)
                rows.append((f"Python forward, {names[runtime]}", 1, args.requests,
                             *timed(lambda: forward(tensor, valid), args.requests, 1)))
        # C++ right after Python on the same cloud, so both see the same load on a shared host.
        if not args.no_cpp:
            for runtime, report in cpp_latency(folder, args.requests, args.threads).items():
                assert report["match"] == "yes", report
                label = {"torchscript": "C++ forward, TorchScript", "aoti": "C++ forward, AOTInductor .pt2",
                         "int8": "C++ forward, int8 .pt2"}[runtime]
                rows.append((label, 1, int(report["runs"]), float(report["p50_ms"]), float(report["p99_ms"]),
                             1000.0 / float(report["p50_ms"])))
        for _ in range(3):
            default.predict(points)
        rows.append((f"Python predict(), {names[default.runtime]} (the server's default)", 1, args.requests,
                     *timed(lambda: default.predict(points), args.requests, 1)))

        binary, as_json = points.astype("<f4").tobytes(), json.dumps({"points": points.tolist()})
        local = threading.local()

        def client(base: str) -> httpx.Client:
            if getattr(local, "base", None) != base:
                local.client, local.base = httpx.Client(base_url=base, timeout=120), base
            return local.client

        def post_binary(base: str) -> None:
            reply = client(base).post("/v1/segment", content=binary, params={"format": "binary"},
                                      headers={"Content-Type": "application/octet-stream"})
            assert reply.status_code == 200 and len(reply.content) == n, reply.status_code

        def post_json(base: str) -> None:
            reply = client(base).post("/v1/segment", content=as_json, headers={"Content-Type": "application/json"})
            assert reply.status_code == 200, reply.status_code

        # HTTP over loopback: one server process per configuration.
        cores = os.cpu_count() or 1
        configurations = [
            ("1 worker", 1, {}, {}),
            ("1 worker", 4, {}, {}),
            (f"{cores} workers x 1 thread", 4, {"workers": cores}, {"threads": 1}),
            ("dynamic batching (TorchScript, max 4, 5 ms)", 4, {"max_batch": 4, "max_batch_wait_ms": 5}, {}),
        ]
        one_client_rate = 0.0
        for label, clients, settings, overrides in configurations:
            proc, base = start_server(folder, home, overrides.get("threads", args.threads), **settings)
            try:
                runtime = httpx.get(base + "/metadata", timeout=10).json()["serving"]["runtime"]
                for _ in range(3):
                    post_binary(base)
                result = timed(lambda: post_binary(base), args.requests, clients)
                rows.append((f"HTTP binary, {label}, {names[runtime]}", clients, args.requests, *result))
                if clients == 1 and not settings:
                    one_client_rate = result[2]
                    count = max(4, args.requests // 4)
                    rows.append((f"HTTP JSON in, JSON out, {names[runtime]}", 1, count,
                                 *timed(lambda: post_json(base), count, 1)))
                    if args.soak_s > 0:
                        rate = args.soak_rate or round(one_client_rate / 2, 1)
                        rss_start = rss_mib(proc.pid)
                        latencies, errors = soak(lambda: post_binary(base), args.soak_s, rate)
                        rss_end = rss_mib(proc.pid)
                        soak_row = (args.soak_s, rate, len(latencies), errors, *stats(latencies, args.soak_s)[:2],
                                    rss_start, rss_end)
            finally:
                stop_server(proc)

        print()
        print(f"| path ({n} points) | clients | requests | p50 ms | p99 ms | requests/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, clients, count, p50, p99, rate in rows:
            print(f"| {name} | {clients} | {count} | {p50:.2f} | {p99:.2f} | {rate:.1f} |")
        if args.soak_s > 0:
            duration, rate, ok, errors, p50, p99, rss_start, rss_end = soak_row
            print("\n| soak (binary, 1 worker) | seconds | requests/s | answered | errors | p50 ms | p99 ms | "
                  "RSS start MiB | RSS end MiB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            print(f"| fixed rate | {duration:.0f} | {rate:.1f} | {ok} | {errors} | {p50:.2f} | {p99:.2f} | "
                  f"{rss_start:.0f} | {rss_end:.0f} ({100 * (rss_end / rss_start - 1):+.1f} %) |")
        print(f"\n<!-- load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}; C++ requests/s is "
              "1000 / p50 (one caller) -->")
        print_variant_rows(folder, args.requests)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
