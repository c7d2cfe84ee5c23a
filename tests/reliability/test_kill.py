"""The kill run: ``avp <stage>`` SIGKILLed at seeded random moments, at least ``KILLS`` times per stage on tiny
data. After each kill no process the stage started survives it (Spark's JVM and Python workers, training
ranks), no artifact whose files are incomplete is marked succeeded, and in the end a plain rerun of the
stage succeeds (the killed builds are recovered as aborted and their staging folders removed).

A kill lands anywhere: before the build starts, in the middle of Spark or training, or after the record was
published. The delay is drawn from a seeded generator over a horizon that shrinks whenever a run finishes
before its kill, so every stage gets its kills however fast this machine is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline import config
from pipeline.contracts import verified_manifest
from pipeline.registry import Registry

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

KILLS = 4  # per stage
STAGES = {"ingest": "dataset", "validate": "validation", "train": "model", "evaluate": "metrics", "serve": "package"}
TINY = {  # every stage does its real work, on little data (as tests/dags/test_dag_run.py)
    "AVP_SIMULATE__LOGS": "10", "AVP_SIMULATE__FRAMES": "3", "AVP_SIMULATE__DAYS": "2",
    "AVP_SIMULATE__BEAMS": "16", "AVP_SIMULATE__AZIMUTH_STEPS": "256",
    "AVP_INGEST__ROWS_PER_GROUP": "2", "AVP_INGEST__SPARK_MASTER": "local[1]", "AVP_VALIDATE__SPLIT_TOLERANCE": "0.2",
    "AVP_TRAIN__EPOCHS": "1", "AVP_TRAIN__NP": "1", "AVP_TRAIN__BACKEND": "ddp", "AVP_TRAIN__MAX_POINTS": "2000",
    "AVP_EVALUATE__MIN_MIOU": "0.0", "AVP_EVALUATE__LATENCY_RUNS": "2", "AVP_EVALUATE__LATENCY_WARMUP": "1",
    "AVP_EVALUATE__AOT_INDUCTOR": "false",
    "AVP_EVALUATE__LATENCY_P99_BUDGET_MS": "1e7",  # the machine is busy with the kills: latency is not the point
    "AVP_SERVE__AOT_INDUCTOR": "false", "AVP_SERVE__EXAMPLE_POINTS": "500", "AVP_SERVE__LATENCY_RUNS": "2",
}
ORPHAN_GRACE_S = 30  # how long what the killed process started may take to notice and exit


def avp(env, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _session(sid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def kill_after(env, stage: str, delay: float) -> tuple[bool, list[str]]:
    """Start ``avp <stage> --force`` and SIGKILL it after ``delay`` s: (was it killed while running, the
    processes it had started that are still alive ``ORPHAN_GRACE_S`` later - killed then, so none stays)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", stage, "--force"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return False, []
    except subprocess.TimeoutExpired:
        pass
    try:
        started = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _gone, alive = psutil.wait_procs(started, timeout=ORPHAN_GRACE_S)
    alive += [p for p in _session(proc.pid) if p not in alive]
    left = []
    for p in alive:
        try:
            left.append(" ".join(p.cmdline())[:160])
            p.kill()
        except psutil.Error:
            continue
    return True, left


def check_no_partial_artifact(cfg, kind: str) -> None:
    """Every succeeded artifact of ``kind`` is complete: its folder is there (a dataset: every file matches
    its checksums), and no record of a killed build is succeeded without it."""
    registry = Registry.open(cfg)
    for art in registry.list(kind, state="succeeded"):
        assert art.location and os.path.isdir(art.location) and os.listdir(art.location), art.ref
        assert ".staging" not in art.location, art.ref
        if kind == "dataset":
            verified_manifest(art, say=lambda _m: None)


def test_sigkill_at_random_moments_leaves_no_partial_artifact_no_orphan_and_reruns_succeed(tmp_path, avp_env):
    env = {**avp_env, **TINY, "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1"}
    cfg = config.load({"home": env["AVP_HOME"]}, env={})
    assert avp(env, "simulate").returncode == 0
    rng = np.random.default_rng(19)
    report = {}
    for stage, kind in STAGES.items():
        kills, tries, horizon, orphans = 0, 0, 25.0, []
        while kills < KILLS and tries < 4 * KILLS:
            tries += 1
            killed, left = kill_after(env, stage, float(rng.uniform(0.5, horizon)))
            if not killed:  # finished first: aim earlier
                horizon = max(2.0, horizon * 0.6)
                continue
            kills += 1
            orphans += left
            check_no_partial_artifact(cfg, kind)
        rerun = avp(env, stage)
        staging = list(Path(env["AVP_HOME"], "artifacts", kind).glob("*/.staging-*"))
        report[stage] = {"tries": tries, "kills": kills, "orphans": len(orphans), "rerun": rerun.returncode,
                         "staging_left": len(staging)}
        print(f"kill run {stage}: {report[stage]}", flush=True)
        assert kills >= KILLS, report
        assert orphans == [], (stage, orphans)
        assert rerun.returncode == 0, (stage, rerun.stdout[:3000], rerun.stderr[-2000:])
        check_no_partial_artifact(cfg, kind)
        assert staging == [], staging
        registry = Registry.open(cfg)
        assert not registry.list(kind, state="building") and not registry.list(kind, state="registered")
