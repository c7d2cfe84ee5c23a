"""Ingest benchmark: frames/s extracted with Spark local[1] and local[2] vs a plain single-process pyarrow
writer of the same rows, in the same run; the Petastorm read rate of the result; memory peaks.

    .venv/bin/python -m bench.ingest_bench [--logs 20 --frames 50]

The plain writer runs the very same per-log function (extract, check, encode, write row groups) and the
same file ordering as the Spark job, in one process, so the ratio isolates what Spark adds (scheduling,
Python workers, collecting summaries). Every writer runs twice: cold (the first job: Python workers start and
import; the plain process imports) and warm (steady state). Spark's session start-up is reported separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from bench.common import PeakRSS
from pipeline import config, stages
from pipeline.registry import Registry


def _cfg(home: str, logs: int, frames: int, master: str = "local[2]"):
    return config.load({"home": home, "simulate.logs": logs, "simulate.frames": frames, "simulate.days": 2,
                        "ingest.spark_master": master}, env={})


def plain_writer(cfg) -> dict:
    """The baseline: the same extraction and row-group layout, one process, no Spark. Run twice: the
    first run pays the imports (cold), the second is the steady state (warm)."""
    from spark_jobs import extract, ingest
    from spark_jobs import split as splitting
    from spark_jobs.sources.registry import get_importer

    registry = Registry.open(cfg)
    selected, _bad = ingest.select_logs(cfg, registry.home, lambda m: None)
    splits = ingest.assign_splits(cfg, registry, selected)
    importer = get_importer(cfg.ingest.source).__name__
    tasks = [extract.LogTask(importer, s["handle"], s["meta"].log_id, s["meta"].city, 1.0, s["sha256"])
             for s in selected]
    runs = []
    for _ in range(2):
        out = tempfile.mkdtemp(prefix="plain-", dir=registry.home.scratch)
        started = time.perf_counter()
        logs = [{"split": splits[t.log_id], **extract.process_log(t, out, cfg.ingest.max_points,
                                                                  cfg.ingest.reader_ranks, cfg.ingest.rows_per_group)}
                for t in tasks]
        for split in splitting.SPLITS:
            ingest.arrange_split(out, logs, split, cfg.ingest.reader_ranks)
        runs.append(time.perf_counter() - started)
    return {"frames": sum(s.get("frames", 0) for s in logs), "cold": runs[0], "warm": runs[1]}


def spark_writer(cfg) -> dict:
    """The ingest stage twice on one session: the first job starts the Python workers (cold: what a
    one-off run on a fresh session pays), the second reuses them (warm: long-lived executors, and every
    job after the first). The session start is timed separately."""
    from spark_jobs.spark import get_session

    t0 = time.perf_counter()
    get_session(cfg.ingest.spark_master, Registry.open(cfg).home)
    startup = time.perf_counter() - t0
    cfg.force = True
    jobs, stage_seconds = [], []
    for _ in range(2):
        started = time.perf_counter()
        result = stages.invoke("ingest", cfg, say=lambda m: None)
        stage_seconds.append(time.perf_counter() - started)
        art = Registry.open(cfg).get(result["ref"])
        jobs.append(art.meta["job_seconds"])  # the Spark job (extract, write, order, metadata)
    frames = sum(v["frames"] for v in art.meta["splits"].values())
    return {"frames": frames, "cold": jobs[0], "warm": jobs[1], "stage_cold": stage_seconds[0],
            "stage_warm": stage_seconds[1], "startup": startup, "location": art.location}


def petastorm_read(location: str) -> dict:
    from petastorm import make_reader

    started, n = time.perf_counter(), 0
    with make_reader(f"file://{location}/train", num_epochs=1, workers_count=2) as reader:
        for row in reader:
            n += int(row.points.shape[0] > 0)
    return {"samples": n, "seconds": time.perf_counter() - started}


def _child(args) -> None:
    cfg = _cfg(args.home, args.logs, args.frames, args.master)
    with PeakRSS() as memory:
        out = plain_writer(cfg) if args.mode == "plain" else spark_writer(cfg)
    out["peak_rss_mb"] = memory.peak_mb
    if args.mode == "spark" and args.read:
        out["read"] = petastorm_read(out["location"])
    print("RESULT " + json.dumps(out))


def _run_child(home, logs, frames, mode, master="", read=False) -> dict:
    cmd = [sys.executable, "-m", "bench.ingest_bench", "--child", mode, "--home", home, "--logs", str(logs),
           "--frames", str(frames), "--master", master] + (["--read"] if read else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logs", type=int, default=20)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--home", default="")
    parser.add_argument("--child", dest="mode", default="")
    parser.add_argument("--master", default="")
    parser.add_argument("--read", action="store_true")
    args = parser.parse_args()
    if args.mode:
        _child(args)
        return
    home = args.home or tempfile.mkdtemp(prefix="avp-bench-ingest-")
    cfg = _cfg(home, args.logs, args.frames)
    t0 = time.perf_counter()
    stages.invoke("simulate", cfg, say=lambda m: None)
    simulate_s = time.perf_counter() - t0
    plain = _run_child(home, args.logs, args.frames, "plain")
    one = _run_child(home, args.logs, args.frames, "spark", "local[1]")
    two = _run_child(home, args.logs, args.frames, "spark", "local[2]", read=True)
    print(f"simulate {args.logs} logs x {args.frames} frames: {simulate_s:.1f} s")
    print("| writer | frames | cold job s | cold frames/s | cold vs plain | warm job s | warm frames/s "
          "| warm vs plain | whole stage s (cold/warm) | Spark start-up s | peak RSS (process tree) MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = (("plain pyarrow, 1 process", plain), ("Spark local[1]", one), ("Spark local[2]", two))
    fps = {name: {k: r["frames"] / r[k] for k in ("cold", "warm")} for name, r in rows}
    base = fps["plain pyarrow, 1 process"]
    for name, r in rows:
        stage = (f"{r['stage_cold']:.1f} / {r['stage_warm']:.1f}" if "stage_cold" in r
                 else f"{r['cold']:.1f} / {r['warm']:.1f}")
        print(f"| {name} | {r['frames']} | {r['cold']:.2f} | {fps[name]['cold']:.1f} | "
              f"{fps[name]['cold'] / base['cold']:.2f}x | {r['warm']:.2f} | {fps[name]['warm']:.1f} | "
              f"{fps[name]['warm'] / base['warm']:.2f}x | {stage} | {r.get('startup', 0):.1f} | {r['peak_rss_mb']:.0f} |")
    for kind in ("warm", "cold"):
        print(f"{kind}: Spark per core (local[1]) vs plain {fps['Spark local[1]'][kind] / base[kind]:.2f}x "
              f"(target >= 0.8x); local[2] vs local[1] "
              f"{fps['Spark local[2]'][kind] / fps['Spark local[1]'][kind]:.2f}x (target >= 1.7x)")
    read = two["read"]
    print(f"Petastorm read (train, 2 workers): {read['samples']} samples in {read['seconds']:.2f} s = "
          f"{read['samples'] / read['seconds']:.1f} samples/s")


if __name__ == "__main__":
    main()
