"""Launching N training ranks with ``horovodrun`` or ``torchrun``, and watching them.

Every rank runs ``python -m training.trainer JOB.json``; the job file carries everything (dataset,
config, folders, provenance), so both launchers start exactly the same program:

    horovodrun -np N -H localhost:N --gloo python -m training.trainer JOB.json
    python -m torch.distributed.run --standalone --nproc-per-node N -m training.trainer JOB.json

The launcher runs in its own session so that stopping it reaches all of it. When the calling process
is interrupted (SIGTERM turned into ``SystemExit`` by the CLI, Ctrl-C, an exception), the job gets
SIGTERM - both launchers pass it on to the ranks, which checkpoint at the next step boundary - and
SIGKILL if it has not ended after a grace period. If the calling process dies outright, the kernel
sends the launcher SIGTERM (``PR_SET_PDEATHSIG``), so no orphaned job keeps writing checkpoints.

Rank 0 appends progress events to a JSON-lines file; the launcher turns them into a tqdm bar when its
stderr is a terminal and into one line per epoch otherwise.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 60.0  # how long ranks get to write their checkpoint after SIGTERM


def horovodrun_path() -> str:
    """``horovodrun`` of this interpreter's environment (the one Horovod was built for)."""
    beside = Path(sys.executable).parent / "horovodrun"
    return str(beside) if beside.exists() else (shutil.which("horovodrun") or "horovodrun")


def rank_command(backend: str, np: int, job_path: str) -> list[str]:
    """The command line that starts ``np`` ranks of the trainer with ``backend``."""
    program = [sys.executable, "-m", "training.trainer", job_path]
    if backend == "horovod":
        return [horovodrun_path(), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
                "--network-interface", "lo", *program]
    if backend == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(np), "--max-restarts", "0", *program[1:]]
    raise ValueError(f"unknown backend {backend!r}; use horovod or ddp")


def job_environment() -> dict[str, str]:
    """The ranks' environment: the repository importable, one thread per rank, deterministic cuBLAS."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask the kernel to SIGTERM the launcher when the process that started it dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class LaunchResult:
    """How the job ended: the launcher's exit code, the ranks' error reports, and the time it took."""

    returncode: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    command: list[str] = field(default_factory=list)


class ProgressWatcher:
    """Follows rank 0's progress events: a tqdm bar on a terminal, one line per epoch through ``say``."""

    def __init__(self, path: str, say: Callable[[str], None], bar: bool):
        self.path = path
        self.say = say
        self.want_bar = bar
        self.bar = None
        self.offset = 0
        self.buffer = ""

    def poll(self) -> None:
        """Read the events appended since the last call and show them."""
        try:
            with open(self.path) as fh:
                fh.seek(self.offset)
                chunk = fh.read()
                self.offset = fh.tell()
        except FileNotFoundError:
            return
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.strip():
                self._handle(json.loads(line))

    def _handle(self, event: dict[str, Any]) -> None:
        """One event: start (create the bar), step (advance it), epoch (print a summary line)."""
        kind = event["event"]
        if kind == "start":
            where = f" from {os.path.basename(event['resumed_from'])}" if event.get("resumed_from") else ""
            self.say(f"training {event['world']} ranks: {event['epochs']} epochs x {event['steps_per_epoch']} steps"
                     f"{where}")
            if self.want_bar:
                from tqdm import tqdm

                self.bar = tqdm(total=event["total_steps"], initial=event["global_step"], unit="step",
                                desc="train", dynamic_ncols=True, file=sys.stderr)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["global_step"] - self.bar.n)
            self.bar.set_postfix(epoch=event["epoch"] + 1, loss=f"{event['loss']:.4f}", refresh=False)
        elif kind == "epoch":
            miou = event.get("val_miou")
            line = (f"epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f}, val mIoU "
                    f"{'n/a' if miou is None else f'{miou:.3f}'}, {event['samples_per_s']:.1f} samples/s, "
                    f"data wait {100 * event['data_wait_fraction']:.1f}% of step time")
            if self.bar is not None:
                self.bar.write(line)
            else:
                self.say(line)

    def close(self) -> None:
        """Show the last events and close the bar."""
        self.poll()
        if self.bar is not None:
            self.bar.close()


def stop_job(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the job's process group (the ranks checkpoint and exit), SIGKILL it after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def read_errors(logs_dir: str) -> list[dict[str, Any]]:
    """The ``error-rank-*.json`` reports the ranks wrote when they failed, in rank order."""
    errors = []
    for path in sorted(glob.glob(os.path.join(logs_dir, "error-rank-*.json"))):
        with open(path) as fh:
            errors.append(json.load(fh))
    return sorted(errors, key=lambda e: e.get("rank", 0))


def launch(job_path: str, backend: str, np: int, logs_dir: str, progress_file: str,
           say: Callable[[str], None] = print, progress_bar: bool | None = None) -> LaunchResult:
    """Run the job to its end and return how it ended; the launcher's own output goes to
    ``<logs_dir>/launcher.log`` and every rank's to ``<logs_dir>/rank-<r>.log``."""
    os.makedirs(logs_dir, exist_ok=True)
    command = rank_command(backend, np, job_path)
    bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    watcher = ProgressWatcher(progress_file, say, bar)
    started = time.time()
    with open(os.path.join(logs_dir, "launcher.log"), "ab") as launcher_log:
        launcher_log.write(("$ " + " ".join(command) + "\n").encode())
        launcher_log.flush()
        proc = subprocess.Popen(command, cwd=str(REPO_ROOT), env=job_environment(), stdin=subprocess.DEVNULL,
                                stdout=launcher_log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            while proc.poll() is None:
                watcher.poll()
                time.sleep(0.2)
        except BaseException:
            say(f"stopping the training job (pid {proc.pid}): ranks save a checkpoint at the next step")
            stop_job(proc)
            raise
        finally:
            watcher.close()
    return LaunchResult(proc.returncode, read_errors(logs_dir), time.time() - started, command)
