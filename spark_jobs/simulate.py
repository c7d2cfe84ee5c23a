"""The ``simulate`` stage: write the simulated fleet's drive logs (MCAP, one file per log) into the home.

Idempotent: a log file that already exists with the same name is left alone (the same seed and log id
always give the same bytes), so re-running or growing the fleet only writes the new logs. Logs are
simulated in parallel worker processes; each log's bytes depend only on (seed, log id).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

from pipeline.config import PipelineConfig, SimulateConfig
from pipeline.home import check_name
from pipeline.registry import Registry


def _write_one(meta, cfg: SimulateConfig, path: str) -> dict:
    from spark_jobs.simulator import simulate_log
    from spark_jobs.sources.mcap_log import write_log

    return write_log(path, meta, simulate_log(meta, cfg))


def run(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None] = print,
        run_id: str = "") -> dict[str, Any]:
    """Simulate ``simulate.logs`` logs of ``simulate.frames`` frames over ``simulate.days`` days."""
    from pipeline.ui import progress
    from spark_jobs.simulator import fleet_plan

    out_dir = registry.home.logs
    os.makedirs(out_dir, exist_ok=True)
    plan = fleet_plan(cfg.simulate)
    todo = [(m, os.path.join(out_dir, f"{check_name(m.log_id, 'log id')}.mcap")) for m in plan]
    missing = [(m, p) for m, p in todo if cfg.force or not os.path.exists(p)]
    say(f"simulating {len(missing)} of {len(plan)} logs into {out_dir} "
        f"({len(plan) - len(missing)} already there)")
    workers = max(1, min(len(missing), os.cpu_count() or 1))
    if missing:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_write_one, m, cfg.simulate, p) for m, p in missing]
            for _ in progress((f.result() for f in futures), total=len(futures), description="simulating logs"):
                pass
    per_day: dict[tuple[str, str], int] = {}
    for meta in plan:
        day = _day(meta.start_time_ns)
        per_day[(day, meta.city)] = per_day.get((day, meta.city), 0) + 1
    rows = [[day, city, n, n * cfg.simulate.frames] for (day, city), n in sorted(per_day.items())]
    return {"logs": len(plan), "written": len(missing), "location": out_dir,
            "tables": [("simulated fleet", ["day", "city", "logs", "frames"], rows)]}


def _day(ns: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).strftime("%Y-%m-%d")
