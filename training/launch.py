"""Launching N training ranks with ``horovodrun`` or ``torchrun``, and watching them.

Every rank runs ``python -m training.trainer JOB.json``; the job file carries everything (dataset,
config, folders, provenance), so both launchers start exactly the same program:

    horovodrun -np N -H localhost:N --gloo python -m training.trainer JOB.json
    python -m torch.distributed.run --standalone --nproc-per-node N -m training.trainer JOB.json

``train.launcher`` chooses where the ranks run (``Placement``): ``local`` (above), ``spark`` (a Spark
driver, ``python -m training.spark_launch JOB.json``, runs the same trainer as Horovod ranks in Spark
tasks on ``train.spark_master``) or ``hosts`` (``horovodrun -H h1:2,h2:2``, or for DDP one ``torchrun``
per host, over ssh for a host that is not this one). ``train.nnodes > 1`` is one node of a DDP job whose
nodes are started one by one (``avp train --nnodes 2 --node-rank R --rdzv HOST:PORT``): this node's
``torchrun`` with a static rendezvous, so node R's ranks are ``R * per_node ...``.

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
import shlex
import shutil
import signal
import socket
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


@dataclass(frozen=True)
class Placement:
    """Where the ranks run: the ``train.launcher`` fields of the job's training config."""

    launcher: str = "local"
    spark_master: str = ""
    hosts: str = ""
    nnodes: int = 1
    node_rank: int = 0
    rdzv: str = ""
    rank_timeout_s: int = 120

    @classmethod
    def from_train(cls, train: dict[str, Any]) -> "Placement":
        """The placement of a job's ``train`` section (defaults for a job written before it existed)."""
        return cls(**{name: train[name] for name in cls.__dataclass_fields__ if name in train})

    def host_slots(self) -> list[tuple[str, int]]:
        """``train.hosts`` as (host, slots) pairs, in order."""
        pairs = []
        for item in (part.strip() for part in self.hosts.split(",")):
            host, _, slots = item.rpartition(":")
            if not item or not host or not slots.isdigit() or int(slots) < 1:
                raise ValueError(f"config field train.hosts: {item!r} is not HOST:SLOTS (e.g. h1:2,h2:2)")
            pairs.append((host, int(slots)))
        return pairs


def is_this_host(host: str) -> bool:
    """Whether ``host`` names this machine (then no ssh is needed to start processes there)."""
    return host in ("localhost", socket.gethostname(), socket.getfqdn()) or host.startswith("127.")


def torchrun_node(nnodes: int, node_rank: int, rdzv: str, per_node: int, timeout_s: int) -> list[str]:
    """One node's ``torchrun`` of a multi-node DDP job: a static rendezvous at ``rdzv`` (node 0 hosts it),
    so the ranks of node R are ``R * per_node ... R * per_node + per_node - 1``, whatever order nodes join."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--rdzv-backend", "static", "--rdzv-endpoint", rdzv, "--rdzv-conf", f"timeout={timeout_s}",
            "--nproc-per-node", str(per_node), "--max-restarts", "0", "-m", "training.trainer"]


def job_commands(backend: str, np: int, job_path: str, placement: Placement) -> list[list[str]]:
    """The processes that start the job's ``np`` ranks where ``placement`` says (one per node for DDP on
    hosts; a single launcher otherwise)."""
    if placement.launcher == "spark":
        return [[sys.executable, "-m", "training.spark_launch", job_path]]
    if placement.nnodes > 1:
        return [[*torchrun_node(placement.nnodes, placement.node_rank, placement.rdzv, np // placement.nnodes,
                                placement.rank_timeout_s), job_path]]
    if placement.launcher == "local":
        return [rank_command(backend, np, job_path)]
    hosts = placement.host_slots()
    program = [sys.executable, "-m", "training.trainer", job_path]
    if backend == "horovod":
        local = ["--network-interface", "lo"] if all(is_this_host(h) for h, _ in hosts) else []
        return [[horovodrun_path(), "-np", str(np), "-H", placement.hosts, "--gloo", *local, *program]]
    rdzv = placement.rdzv or f"{hosts[0][0]}:29500"
    commands = []
    for node_rank, (host, slots) in enumerate(hosts):
        command = [*torchrun_node(len(hosts), node_rank, rdzv, slots, placement.rank_timeout_s), job_path]
        if not is_this_host(host):  # the same checkout, venv and home paths on every node (docs/training.md)
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in rank_settings(placement).items())
            command = ["ssh", "-o", "BatchMode=yes", host, f"cd {shlex.quote(str(REPO_ROOT))} && env {env} "
                       + shlex.join(command)]
        commands.append(command)
    return commands


def rank_settings(placement: Placement) -> dict[str, str]:
    """The variables every rank needs wherever it runs: the repository importable, one thread per rank,
    deterministic cuBLAS, and the time a collective may wait for a lost peer (gloo under Horovod, the
    process group's timeout under DDP).

    ``HOROVOD_CYCLE_TIME`` (ms, default 20 here, Horovod's own is 1): how often Horovod's background
    thread wakes to negotiate and fuse ready tensors. At 1 ms it competed with the ranks' compute
    threads for the CPU cores: on the shared 2-core machine Horovod x2 / DDP x2 step time was 1.27-1.88
    at 1 ms and 1.03-1.29 at 20 ms (noisy; docs/benchmarks.md). Sums are unchanged (the weights stay
    bitwise equal to DDP's, tested); set the variable to override it, e.g. lower on GPU nodes with spare
    cores."""
    return {"HOROVOD_CYCLE_TIME": os.environ.get("HOROVOD_CYCLE_TIME", "20"), "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(placement.rank_timeout_s),
            "AVP_RANK_TIMEOUT_S": str(placement.rank_timeout_s)}


def job_environment(placement: Placement = Placement()) -> dict[str, str]:
    """The launcher's (and local ranks') environment: this one plus ``rank_settings``."""
    env = dict(os.environ)
    settings = rank_settings(placement)
    settings["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(settings)
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


def stop_job(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S, leader_only: bool = False) -> None:
    """SIGTERM the job's process group (the ranks checkpoint and exit), SIGKILL it after ``grace_s``.
    ``leader_only``: SIGTERM only the launcher itself (the Spark driver, whose JVM in the same group
    must keep running while the driver asks the ranks to checkpoint)."""
    if proc.poll() is not None:
        return
    try:
        if leader_only:
            os.kill(proc.pid, signal.SIGTERM)
        else:
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
           say: Callable[[str], None] = print, progress_bar: bool | None = None,
           placement: Placement = Placement()) -> LaunchResult:
    """Run the job to its end and return how it ended; the launchers' own output goes to
    ``<logs_dir>/launcher.log`` and every rank's to ``<logs_dir>/rank-<r>.log``.

    With several launcher processes (DDP on several hosts), the first that fails gives the others
    ``placement.rank_timeout_s`` to notice the lost peers and end, then they are stopped."""
    os.makedirs(logs_dir, exist_ok=True)
    commands = job_commands(backend, np, job_path, placement)
    bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    watcher = ProgressWatcher(progress_file, say, bar)
    started = time.time()
    procs: list[subprocess.Popen] = []
    leader_only = placement.launcher == "spark"
    with open(os.path.join(logs_dir, "launcher.log"), "ab") as launcher_log:
        try:
            for command in commands:
                launcher_log.write(("$ " + shlex.join(command) + "\n").encode())
                launcher_log.flush()
                procs.append(subprocess.Popen(command, cwd=str(REPO_ROOT), env=job_environment(placement),
                                              stdin=subprocess.DEVNULL, stdout=launcher_log, stderr=subprocess.STDOUT,
                                              start_new_session=True, preexec_fn=_die_with_parent))
            failed_at = None
            while any(proc.poll() is None for proc in procs):
                watcher.poll()
                if failed_at is None and any(proc.poll() not in (None, 0) for proc in procs):
                    failed_at = time.time()
                if failed_at is not None and time.time() - failed_at > placement.rank_timeout_s:
                    for proc in procs:
                        stop_job(proc, leader_only=leader_only)
                time.sleep(0.2)
        except BaseException:
            say(f"stopping the training job (pids {' '.join(str(p.pid) for p in procs)}): "
                "ranks save a checkpoint at the next step")
            for proc in procs:
                stop_job(proc, leader_only=leader_only)
            raise
        finally:
            watcher.close()
    returncode = next((proc.returncode for proc in procs if proc.returncode != 0), 0)
    return LaunchResult(returncode, read_errors(logs_dir), time.time() - started, commands[0])


# ----------------------------------------------------------------------------------------- nodes, hosts
def node_pointer(runs_dir: str, rdzv: str) -> str:
    """Where node 0 of a multi-node DDP job publishes its job file for the other nodes (shared home)."""
    return os.path.join(runs_dir, "nodes", rdzv.replace(":", "_").replace("/", "_") + ".json")


def wait_for_node_job(runs_dir: str, rdzv: str, timeout_s: float) -> str:
    """On node R > 0: the job file node 0 published for rendezvous ``rdzv``; ``TimeoutError`` if none
    appears within ``timeout_s``."""
    path = node_pointer(runs_dir, rdzv)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with open(path) as fh:
                return json.load(fh)["job"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.5)
    raise TimeoutError(f"no job from node 0 for rendezvous {rdzv} within {timeout_s:.0f} s (expected {path}): "
                       "start node 0 (`avp train --node-rank 0 ...`) with the same --rdzv and home")


def rank_hosts(logs_dir: str) -> list[dict[str, Any]]:
    """Every started rank's ``{"rank", "host", "pid"}`` (``host-rank-<r>.json``), in rank order."""
    found = []
    for path in glob.glob(os.path.join(logs_dir, "host-rank-*.json")):
        with open(path) as fh:
            found.append(json.load(fh))
    return sorted(found, key=lambda h: h["rank"])


def lost_ranks(logs_dir: str) -> list[dict[str, Any]]:
    """Ranks that started but ended with neither a summary nor an error report: killed (SIGKILL, out of
    memory) or gone with their executor or host."""
    return [h for h in rank_hosts(logs_dir)
            if not any(os.path.exists(os.path.join(logs_dir, f"{kind}rank-{h['rank']}.json")) for kind in ("", "error-"))]
