"""The per-rank training loop: one code path for 1..N processes, under Horovod or DDP (or in-process).

``training.launch`` starts N copies of ``python -m training.trainer JOB.json`` with ``horovodrun`` or
``torchrun``; each copy is one rank and runs ``Trainer(job, backend).run()`` below. ``LocalBackend``
(world size 1, no process group) runs the same ``Trainer`` inside the calling process, which is how
the unit tests drive it. In order:

1. **Determinism.** ``torch.use_deterministic_algorithms(True)`` and one CPU thread per rank, so the
   same dataset, config and seed give bitwise-identical weights - under Horovod and DDP alike (both
   average gradients with gloo's ring allreduce; with 2 ranks ``a/2 + b/2 == (a + b) / 2`` exactly).
2. **Model, loss, optimizer, schedule**, built identically on every rank from the seed; the loss,
   optimizer and schedule come from the model's train spec (``training.models.get_train_spec``). The
   backend wraps them (``hvd.DistributedOptimizer`` or ``DistributedDataParallel``).
3. **Resume** from the newest checkpoint when asked: weights, optimizer, schedule, data position
   (epoch, step) and every rank's RNG state, then broadcast from rank 0.
4. **Epochs.** Each rank reads its own Petastorm shard (``training.data``); every rank runs the same
   number of steps. After each backward pass one small allreduce carries the mean loss, a "not finite"
   flag and a "stop" flag, so all ranks take the same decision at the same step: a NaN/inf loss stops
   the run before the optimizer applies it (the last good checkpoint is kept), and SIGTERM saves a
   checkpoint at the step boundary and exits non-zero.
5. **Checkpoints** every ``checkpoint_every`` steps and at each epoch end (rank 0, atomic), each with
   a TorchScript ``model.ts`` checked against eager and carrying provenance.
6. **Validation** after every epoch: each rank scores its shard of the val split, the confusion
   matrices are summed, and mIoU (ignore class excluded; ``pipeline.metrics``, the evaluate stage's
   implementation too) is logged with per-class IoU.
7. **Outputs.** Rank 0 writes ``model.pt`` (state dict), ``model.json`` (how to rebuild it),
   ``model.ts`` and ``metrics.json``; every rank writes a summary (steps run, parameter digest) and its
   log into the run's log folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.contracts import MODEL_INPUT, MODEL_OUTPUT, ModelSpec, TrainMetrics
from pipeline.contracts import TrainJob as Job  # the launcher's job.json
from pipeline.files import atomic_write_json
from pipeline.metrics import class_iou, confusion_matrix
from pipeline.taxonomy import CLASSES, IGNORE, NUM_CLASSES
from training import checkpoint as ckpt
from training.data import Batch, Prefetcher, ShardPlan, class_points, class_weights, train_stream, val_batches

EXIT_DIVERGED = 3
EXIT_TERMINATED = 143
log = logging.getLogger("avp.train")


class Diverged(RuntimeError):
    """The loss stopped being finite."""


class Terminated(RuntimeError):
    """A SIGTERM (preemption, Airflow killing the task) stopped the run after a checkpoint."""


# ----------------------------------------------------------------------------------------- backends
class Backend:
    """What the loop needs from a data-parallel backend; ranks call every method in the same order."""

    name = "base"
    rank = 0
    world = 1
    local_rank = 0
    device = torch.device("cpu")

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over all ranks (a new tensor)."""
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (equal shapes), in rank order."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return only when every rank has got here."""
        self.allreduce_sum(torch.zeros(1, device=self.device))

    def distribute_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer the loop steps (Horovod wraps it so ``step`` averages gradients first)."""
        return optimizer

    def synchronize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Make every rank start from rank 0's state; returns the module to call in training."""
        return model

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) to every rank, so all ranks validate one model."""

    def close(self) -> None:
        """Leave the process group."""
        pass


class HorovodBackend(Backend):
    """Horovod over gloo (``horovodrun -np N --gloo``): ``DistributedOptimizer`` + broadcasts."""

    name = "horovod"

    def __init__(self, device_kind: str):
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.world, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        if device_kind == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum)

    def allgather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gathered = self.hvd.allgather(tensor.unsqueeze(0))
        return [gathered[i] for i in range(self.world)]

    def barrier(self) -> None:
        self.hvd.barrier()

    def distribute_optimizer(self, model, optimizer):
        # One group: every gradient goes into a single grouped allreduce, negotiated once per step instead
        # of once per tensor (the same sums, so the same weights: 1.29x -> 1.08x DDP's step time, see
        # docs/benchmarks.md).
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), groups=1)

    def synchronize(self, model, optimizer):
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # Horovod initialises an empty optimizer state by taking a zero-gradient step, which moves the
        # weights under AdamW's weight decay (and would make Horovod's weights differ from DDP's). A
        # fresh optimizer is identical on every rank anyway; only a restored state needs broadcasting.
        if optimizer.state_dict()["state"]:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return model

    def broadcast_buffers(self, model):
        buffers = dict(model.named_buffers())
        if buffers:
            self.hvd.broadcast_parameters(buffers, root_rank=0)

    def close(self):
        self.hvd.shutdown()


class DdpBackend(Backend):
    """``torch.distributed`` (started by ``torchrun``): gloo on CPU, NCCL on GPU, DistributedDataParallel."""

    name = "ddp"

    def __init__(self, device_kind: str):
        import torch.distributed as dist

        self.dist = dist
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_kind == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        # A collective waiting for a lost peer fails after train.rank_timeout_s (set by the launcher).
        timeout = datetime.timedelta(seconds=float(os.environ.get("AVP_RANK_TIMEOUT_S", "1800")))
        dist.init_process_group(backend=process_group_backend(device_kind), timeout=timeout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM)
        return tensor

    def allgather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self.dist.all_gather(out, tensor.contiguous())
        return out

    def barrier(self) -> None:
        self.dist.barrier()

    def synchronize(self, model, optimizer):
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters and buffers when it wraps the model; the optimizer state
        # needs nothing: it is empty on a fresh start and read from the same checkpoint on a resume.
        # broadcast_buffers=False: like Horovod, buffers are synchronised once per epoch (below)
        # rather than before every forward, so both backends compute exactly the same thing.
        return DistributedDataParallel(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                                       broadcast_buffers=False)

    def broadcast_buffers(self, model):
        for buffer in model.buffers():
            self.dist.broadcast(buffer.data, src=0)

    def close(self):
        self.dist.destroy_process_group()


class LocalBackend(Backend):
    """One process and no process group (world size 1): collectives are identities. Lets tests and
    notebooks run the ``Trainer`` in-process, without Horovod or ``torch.distributed``."""

    name = "local"

    def __init__(self, device_kind: str = "cpu"):
        if device_kind == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def allgather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.clone()]

    def barrier(self) -> None:
        pass


def process_group_backend(device_kind: str) -> str:
    """``torch.distributed``'s backend for a device: NCCL between GPUs (one process per GPU of a node),
    gloo on CPU."""
    return "nccl" if device_kind == "cuda" else "gloo"


def rank_host() -> str:
    """The host this rank runs on, as the cluster names it: the address a Spark worker was told to bind
    (``SPARK_LOCAL_IP``, inherited by its executors), else the host name."""
    return os.environ.get("SPARK_LOCAL_IP") or socket.gethostname()


def make_backend(name: str, device_kind: str) -> Backend:
    """The backend the job asked for; ``device_kind`` is ``cpu`` or ``cuda`` (resolved by the launcher)."""
    if name == "horovod":
        return HorovodBackend(device_kind)
    if name == "ddp":
        return DdpBackend(device_kind)
    if name == "local":
        return LocalBackend(device_kind)
    raise ValueError(f"unknown backend {name!r}; use horovod, ddp or local")


# ----------------------------------------------------------------------------------------- pieces
def configure_determinism(device: torch.device) -> None:
    """Same inputs, same bits: deterministic kernels and a fixed (single) CPU thread per rank.

    One thread because intra-op parallel reductions split sums by thread count, which changes the
    rounding; with two ranks on two cores nothing is lost.
    """
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; harmless if already set
        pass
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def majority_baseline(confusion: np.ndarray, train_counts: np.ndarray) -> dict[str, Any]:
    """mIoU of predicting the most common training class everywhere, on the same validation points."""
    counts = np.asarray(train_counts, dtype=np.float64).copy()
    counts[IGNORE] = 0
    majority = int(counts.argmax())
    ground_truth = np.asarray(confusion, dtype=np.float64).sum(axis=1)
    baseline = np.zeros_like(np.asarray(confusion, dtype=np.float64))
    baseline[:, majority] = ground_truth
    ious, miou = class_iou(baseline)
    return {"class": CLASSES[majority], "miou": miou, "iou": ious}


def parameter_digest(module: nn.Module) -> str:
    """sha256 over every parameter's and buffer's bytes, in state-dict order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def parameters_digest(module: nn.Module) -> str:
    """sha256 over the trainable parameters only (buffers such as BatchNorm statistics excluded)."""
    digest = hashlib.sha256()
    for name, tensor in module.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def peak_memory_mb() -> float:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop checks it at every step boundary (together with the other ranks)."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        """Signal handler: note the request; the loop acts on it at the next step boundary."""
        if not self.event.is_set():
            log.warning("received %s: saving a checkpoint at the next step boundary", signal.Signals(signum).name)
        self.event.set()

    def close(self) -> None:
        """Put back the handlers that were there before (an in-process run leaves its host as it was)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@dataclass
class Position:
    """Where training is, and the running totals of the epoch in progress (all in the checkpoint)."""

    epoch: int = 0
    step: int = 0  # steps of ``epoch`` already done
    global_step: int = 0
    loss_sum: float = 0.0
    steps_done: int = 0
    samples: int = 0
    step_s: float = 0.0
    wait_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return dict(vars(self))

    def start_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch`` with fresh running totals."""
        self.epoch, self.step = epoch, 0
        self.loss_sum, self.steps_done, self.samples, self.step_s, self.wait_s = 0.0, 0, 0, 0.0, 0.0


# ----------------------------------------------------------------------------------------- the job
class Reporter:
    """Rank 0's outward view of training: TensorBoard scalars and progress events for the launcher."""

    def __init__(self, job: Job, rank: int, purge_step: int | None):
        self.enabled = rank == 0
        self.writer = None
        self.events = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(job.state_dir, "tensorboard"), purge_step=purge_step)
        self.events = open(job.progress_file, "a", buffering=1)

    def event(self, kind: str, **values: Any) -> None:
        """Append one progress event (rank 0 only) for the launcher to show."""
        if self.events:
            self.events.write(json.dumps({"event": kind, "time": time.time(), **values}, default=str) + "\n")

    def scalars(self, step: int, **values: float | None) -> None:
        """TensorBoard scalars at ``step``; ``a__b`` names the tag ``a/b``; None and NaN are skipped."""
        if self.writer:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag.replace("__", "/"), value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.events:
            self.events.close()


def _gather_rng(backend: Backend) -> list[dict[str, Any]]:
    """Every rank's RNG state (collective: all ranks call it), for rank 0 to put in the checkpoint."""
    mine = ckpt.capture_rng()
    ranks: list[dict[str, Any]] = [{} for _ in range(backend.world)]
    for key in sorted(mine):
        value = mine[key]
        if key == "cuda":
            per_device = [backend.allgather(s.to(torch.int64).to(backend.device)) for s in value]
            for r in range(backend.world):
                ranks[r][key] = [d[r].cpu().to(torch.uint8) for d in per_device]
        elif isinstance(value, torch.Tensor):
            gathered = backend.allgather(value.to(torch.int64).to(backend.device))
            for r in range(backend.world):
                ranks[r][key] = gathered[r].cpu().to(value.dtype)
        else:
            gathered = backend.allgather(torch.tensor([value], dtype=torch.int64, device=backend.device))
            for r in range(backend.world):
                ranks[r][key] = int(gathered[r].item())
    return ranks


class Trainer:
    """One rank's training run: ``Trainer(job, backend).run()`` returns this rank's summary.

    ``__init__`` builds everything identically on every rank (data plan, model, and the loss, optimizer
    and schedule of the model's train spec), resumes from the newest checkpoint when the job asks, and
    lets the backend synchronise the ranks. ``run`` is the loop, in small named steps: per epoch
    ``train_epoch`` (per step ``forward_backward``, ``agree``, ``optimizer_step``, ``record_step`` and,
    every ``checkpoint_every`` steps, ``save_checkpoint``), then ``validate_epoch`` and ``report_epoch``
    and an end-of-epoch checkpoint; at the end ``write_outputs`` on rank 0.
    """

    def __init__(self, job: Job, backend: Backend):
        from training.models import build_model, config_to_dict, get_train_spec

        self.job, self.backend, self.cfg = job, backend, job.train
        self.rank, self.world, self.device = backend.rank, backend.world, backend.device
        self.is_chief = self.rank == 0
        configure_determinism(self.device)

        # The data plan: this rank's shard, and the steps every rank runs per epoch.
        cfg = self.cfg
        self.plan = ShardPlan(location=job.dataset.location, manifest=job.dataset.manifest, rank=self.rank,
                              world=self.world, batch_size=cfg["batch_size"], max_points=cfg["max_points"],
                              seed=cfg["seed"], shuffle_buffer=cfg["shuffle_buffer"])
        self.steps = self.plan.steps_per_epoch()
        self.epochs = cfg["epochs"]
        self.total_steps = self.steps * self.epochs
        log.info("rank %d/%d on %s: %d train rows in my shard, %d steps per epoch, %d epochs",
                 self.rank, self.world, self.device, self.plan.rows("train"), self.steps, self.epochs)
        if self.steps < 1:
            raise ValueError(f"rank {self.rank} has {self.plan.rows('train')} train rows, "
                             f"fewer than one batch of {cfg['batch_size']}")

        # Model, loss, optimizer and schedule: identical on every rank (same seed, same order).
        torch.manual_seed(cfg["seed"])
        spec = get_train_spec(cfg["model"])
        self.model = build_model(cfg["model"], job.model_options).to(self.device)
        self.model_config = config_to_dict(self.model.config)
        self.train_counts = class_points(job.dataset.manifest, "train")
        self.loss_fn = spec.build_loss(self.train_counts).to(self.device)
        self.optimizer = backend.distribute_optimizer(self.model, spec.build_optimizer(self.model, cfg))
        self.scheduler = spec.build_lr_scheduler(self.optimizer, self.total_steps)
        # Per-rank randomness (nothing in bev_segnet draws any, but a model with dropout would).
        torch.manual_seed(cfg["seed"] * 1000 + 1 + self.rank)
        self.position = Position()
        self.resumed_from = self.resume() if job.resume else None
        self.train_model = backend.synchronize(self.model, self.optimizer)
        self.example: tuple[torch.Tensor, torch.Tensor] | None = None  # the last batch's first frame
        self.provenance = {
            **job.provenance, "run_id": job.run_id, "dataset": job.dataset.ref,
            "dataset_content_key": job.dataset.content_key, "model": cfg["model"],
            "model_options": self.model_config, "config": job.config, "classes": list(CLASSES),
            "backend": backend.name, "world": self.world,
            "input": MODEL_INPUT, "output": MODEL_OUTPUT}

    def resume(self) -> str | None:
        """Load the newest readable checkpoint on every rank (the backend then broadcasts rank 0's
        state); returns its path, or None when there is none."""
        found = ckpt.load_latest(self.job.state_dir, map_location=self.device, warn=log.warning)
        if found is None:
            return None
        path, state = found
        if state["world"] != self.world:
            raise ValueError(f"{path} was written by {state['world']} ranks, this job has {self.world}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"][self.rank])
        self.position = Position(**state["position"])
        log.info("resumed from %s at epoch %d step %d (global step %d)", path, self.position.epoch,
                 self.position.step, self.position.global_step)
        return path

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train to the last epoch and write the outputs; returns this rank's summary."""
        position = self.position
        self.reporter = Reporter(self.job, self.rank, purge_step=position.global_step if self.resumed_from else None)
        self.reporter.event("start", rank=self.rank, world=self.world, steps_per_epoch=self.steps, epochs=self.epochs,
                            total_steps=self.total_steps, global_step=position.global_step,
                            resumed_from=self.resumed_from)
        self.stop = StopRequest()
        try:
            stream = Prefetcher(train_stream(self.plan, position.epoch, self.epochs, skip=position.step),
                                depth=self.cfg["prefetch_batches"], name=f"prefetch-rank{self.rank}")
            steps_run: list[int] = []
            try:
                for epoch in range(position.epoch, self.epochs):
                    steps_run.append(self.train_epoch(epoch, stream))
                    self.report_epoch(epoch, self.validate_epoch())
                    self.position.start_epoch(epoch + 1)
                    self.save_checkpoint()
            finally:
                stream.close()
            summary = self.summary(steps_run)
            if self.is_chief:
                write_outputs(self.job, self.model, self.model_config, self.position, self.train_counts,
                              self.provenance, self.example or _val_example(self.plan))
                self.reporter.event("done", global_step=self.position.global_step)
            self.backend.barrier()
            return summary
        finally:
            self.reporter.close()
            self.stop.close()

    def train_epoch(self, epoch: int, stream: Prefetcher) -> int:
        """The steps of ``epoch`` not done yet; returns how many ran."""
        if self.position.step == 0:
            self.position.start_epoch(epoch)
        self.train_model.train()
        ran = 0
        for step in range(self.position.step, self.steps):
            started, waited = time.perf_counter(), stream.wait_s
            got_epoch, got_step, batch = next(stream)
            assert (got_epoch, got_step) == (epoch, step), f"data stream at {(got_epoch, got_step)}, loop at {(epoch, step)}"
            batch = batch.to(self.device)
            self.example = (batch.points[:1].cpu(), batch.valid[:1].cpu())
            local_loss = self.forward_backward(batch)
            mean_loss, stop_requested = self.agree(local_loss, epoch, step)
            self.optimizer_step()
            self.record_step(epoch, step, mean_loss, len(batch), time.perf_counter() - started, stream.wait_s - waited)
            ran += 1
            if stop_requested:
                self.save_checkpoint(torchscript=False)  # quick: the launcher's grace period is short
                self.backend.barrier()  # no rank exits (and gets its peers killed) before the checkpoint is on disk
                raise Terminated(f"stopped by a signal at epoch {epoch + 1} step {step + 1}; "
                                 f"checkpoint at global step {self.position.global_step}")
            if self.position.global_step % self.cfg["checkpoint_every"] == 0 and step + 1 < self.steps:
                self.save_checkpoint()
        return ran

    def forward_backward(self, batch: Batch) -> float:
        """Gradients of this rank's batch loss; returns the loss."""
        self.optimizer.zero_grad()  # set_to_none by default; Horovod's wrapper takes no arguments
        logits = self.train_model(batch.points, batch.valid)
        loss = self.loss_fn(logits, batch.labels, batch.sample_weight)
        loss.backward()
        return float(loss.detach())

    def agree(self, local_loss: float, epoch: int, step: int) -> tuple[float, bool]:
        """One small allreduce per step: every rank learns the mean loss, whether any rank's loss is not
        finite (``Diverged``, before the optimizer applies it) and whether any rank was asked to stop -
        and so all decide the same way. Returns (mean loss, stop requested)."""
        finite = math.isfinite(local_loss)
        flags = self.backend.allreduce_sum(torch.tensor(
            [local_loss if finite else 0.0, 0.0 if finite else 1.0, 1.0 if self.stop.event.is_set() else 0.0],
            dtype=torch.float64, device=self.device)).cpu().tolist()
        if flags[1] > 0:
            raise Diverged(f"the training loss is not finite at epoch {epoch + 1} step {step + 1} "
                           f"(global step {self.position.global_step + 1}) on {int(flags[1])} of {self.world} ranks")
        return flags[0] / self.world, flags[2] > 0

    def optimizer_step(self) -> None:
        """Apply the (averaged) gradients and advance the learning-rate schedule."""
        self.optimizer.step()
        self.scheduler.step()

    def record_step(self, epoch: int, step: int, mean_loss: float, batch_size: int, step_s: float,
                    wait_s: float) -> None:
        """Advance the position and its running totals; TensorBoard scalars and a progress event."""
        position, world = self.position, self.world
        position.step, position.global_step = step + 1, position.global_step + 1
        position.loss_sum += mean_loss
        position.steps_done += 1
        position.samples += batch_size * world
        position.step_s += step_s
        position.wait_s += wait_s
        self.reporter.scalars(position.global_step, train__loss=mean_loss, train__lr=self.scheduler.get_last_lr()[0],
                              train__samples_per_s=batch_size * world / max(step_s, 1e-9),
                              train__data_wait_fraction=wait_s / max(step_s, 1e-9))
        self.reporter.event("step", epoch=epoch, step=step + 1, steps=self.steps, global_step=position.global_step,
                            total_steps=self.total_steps, loss=mean_loss)

    def validate_epoch(self) -> dict[str, Any]:
        """mIoU on the val split, on rank 0's weights and statistics."""
        self.backend.broadcast_buffers(self.model)
        return validate(self.model, self.plan, self.backend, self.device)

    def report_epoch(self, epoch: int, val: dict[str, Any]) -> None:
        """The epoch's record (into the history, hence the checkpoint and metrics.json), scalars, an
        event and a log line."""
        position = self.position
        record = {
            "epoch": epoch + 1, "steps": self.steps, "global_step": position.global_step,
            "loss": position.loss_sum / max(1, position.steps_done),
            "val_miou": val["miou"], "val_iou": val["iou"], "val_points": val["points"],
            "val_label_points": val["label_points"],
            "samples_per_s": position.samples / max(position.step_s, 1e-9),
            "step_s": position.step_s / max(1, position.steps_done),
            "data_wait_fraction": position.wait_s / max(position.step_s, 1e-9),
            "lr": self.scheduler.get_last_lr()[0],
        }
        position.history.append(record)
        self.reporter.scalars(position.global_step, epoch__loss=record["loss"], val__miou=val["miou"],
                              epoch__samples_per_s=record["samples_per_s"],
                              epoch__data_wait_fraction=record["data_wait_fraction"],
                              **{f"val__iou__{name}": iou for name, iou in val["iou"].items()})
        self.reporter.event("epoch", **{k: v for k, v in record.items() if k != "val_iou"}, epochs=self.epochs)
        log.info("epoch %d/%d: loss %.4f, val mIoU %s, %.1f samples/s, data wait %.1f%%", epoch + 1, self.epochs,
                 record["loss"], "n/a" if val["miou"] is None else f"{val['miou']:.3f}",
                 record["samples_per_s"], 100 * record["data_wait_fraction"])

    def save_checkpoint(self, torchscript: bool = True) -> None:
        """All ranks: gather RNG states; rank 0: write the checkpoint, then ``model.ts`` beside it."""
        example = None
        if torchscript and self.is_chief:
            example = self.example if self.example is not None else _val_example(self.plan)
        rng = _gather_rng(self.backend)
        if not self.is_chief:
            return
        position = self.position
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "position": position.as_dict(), "rng": rng,
                 "world": self.world, "backend": self.backend.name, "model_name": self.cfg["model"],
                 "model_options": self.model_config, "run_id": self.job.run_id}
        path = ckpt.save(self.job.state_dir, state, position.global_step, keep=self.cfg["keep_checkpoints"])
        check = {}
        if example is not None:
            meta = {**self.provenance, "epoch": position.epoch, "step": position.step,
                    "global_step": position.global_step, "checkpoint": os.path.basename(path),
                    "created_at": time.time()}
            check = ckpt.save_torchscript(self.model, os.path.join(self.job.state_dir, "model.ts"), meta, example)
        self.reporter.event("checkpoint", path=path, global_step=position.global_step, **check)
        log.info("checkpoint %s (epoch %d, step %d)%s", path, position.epoch, position.step,
                 "" if not check else f", TorchScript max |diff| {check['torchscript_max_abs_diff']:.2e}")

    def summary(self, steps_run: list[int]) -> dict[str, Any]:
        """This rank's record of the run: steps run, parameter digests, memory."""
        device = self.device
        return {"rank": self.rank, "world": self.world, "backend": self.backend.name, "steps_per_epoch": self.steps,
                "steps_run": steps_run, "train_rows": self.plan.rows("train"),
                "global_step": self.position.global_step, "parameters_sha256": parameters_digest(self.model),
                "state_sha256": parameter_digest(self.model), "resumed_from": self.resumed_from,
                "peak_rss_mb": peak_memory_mb(),
                "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def validate(model: nn.Module, plan: ShardPlan, backend: Backend, device: torch.device) -> dict[str, Any]:
    """mIoU of ``model`` on the val split: every rank scores its shard, confusion matrices are summed."""
    model.eval()
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    batches = Prefetcher(val_batches(plan), depth=2, name=f"val-rank{plan.rank}")
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                predicted = model(batch.points, batch.valid).argmax(dim=-1)
                scored = batch.valid & (batch.labels != IGNORE)
                confusion += confusion_matrix(batch.labels[scored].cpu().numpy(), predicted[scored].cpu().numpy())
    finally:
        batches.close()
    model.train()
    total = backend.allreduce_sum(torch.from_numpy(confusion).to(device)).cpu().numpy()
    ious, miou = class_iou(total)
    return {"miou": miou, "iou": ious, "label_points": total.sum(axis=1).tolist(), "points": int(total.sum())}


def _val_example(plan: ShardPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A one-frame batch for the TorchScript check when this process ran no training step."""
    from training.data import train_batches

    for batch in train_batches(plan, 0):
        return batch.points[:1], batch.valid[:1]
    return None


def write_outputs(job: Job, model: nn.Module, model_config: dict, position: Position, train_counts: np.ndarray,
                  provenance: dict[str, Any], example: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Rank 0: the final weights, how to rebuild them, the TorchScript model and the metrics."""
    os.makedirs(job.final_dir, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt.atomic_torch_save(state_dict, os.path.join(job.final_dir, "model.pt"))
    ModelSpec.for_model(job.train["model"], model_config).save_to(job.final_dir)
    meta = {**provenance, "epoch": position.epoch, "global_step": position.global_step, "final": True,
            "created_at": time.time()}
    check = ckpt.save_torchscript(model, os.path.join(job.final_dir, "model.ts"), meta, example) if example else {}
    history = position.history
    last = history[-1] if history else {}
    # The baseline is scored on the same val points as the model (the last epoch's confusion totals).
    val_confusion = validate_confusion_from_history(history)
    TrainMetrics(
        model=job.train["model"], dataset=job.dataset.ref, epochs=history,
        final={"loss": last.get("loss"), "val_miou": last.get("val_miou"), "val_iou": last.get("val_iou"),
               "global_step": position.global_step},
        first_epoch_loss=history[0]["loss"] if history else None,
        majority_baseline=majority_baseline(val_confusion, train_counts) if val_confusion is not None else None,
        class_weights=dict(zip(CLASSES, class_weights(train_counts).tolist())),
        train_class_points=dict(zip(CLASSES, train_counts.tolist())),
        samples_per_s=last.get("samples_per_s"), data_wait_fraction=last.get("data_wait_fraction"),
        parameters_sha256=parameters_digest(model), state_sha256=parameter_digest(model),
        backend=provenance["backend"], world=provenance["world"], **check,
    ).save_to(job.final_dir)


def validate_confusion_from_history(history: list[dict[str, Any]]) -> np.ndarray | None:
    """The last validation's ground-truth points per class as a diagonal confusion matrix: all that
    scoring a constant predictor on the same points needs."""
    if not history or "val_label_points" not in history[-1]:
        return None
    counts = np.asarray(history[-1]["val_label_points"], dtype=np.float64)
    return np.diag(counts)


# ----------------------------------------------------------------------------------------- entry
def _redirect_output(logs_dir: str, rank: int) -> None:
    """Send this process's stdout and stderr (C++ libraries' too) to ``<logs>/rank-<r>.log``."""
    os.makedirs(logs_dir, exist_ok=True)
    fd = os.open(os.path.join(logs_dir, f"rank-{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.trainer JOB.json``: one rank. Exit 0 done, 3 diverged, 143 stopped, 1 error."""
    argv = sys.argv[1:] if argv is None else argv
    job = Job.load(argv[0])
    # The rank is known from the launcher's environment before the backend starts, so even the
    # backend's start-up messages land in this rank's log.
    env_rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "0")))
    _redirect_output(job.logs_dir, env_rank)
    # Where this rank runs: the model's provenance lists every rank's host, and a rank that vanishes
    # without an error report is named (with its host) in the failure message.
    atomic_write_json(os.path.join(job.logs_dir, f"host-rank-{env_rank}.json"),
                      {"rank": env_rank, "host": rank_host(), "pid": os.getpid()})
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank {env_rank} %(levelname)s %(message)s", force=True)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    code, error = 0, None
    backend = None
    try:
        backend = make_backend(job.backend, job.device)
        summary = Trainer(job, backend).run()
        atomic_write_json(os.path.join(job.logs_dir, f"rank-{backend.rank}.json"), summary)
    except Diverged as exc:
        code, error = EXIT_DIVERGED, {"kind": "diverged", "message": str(exc)}
    except Terminated as exc:
        code, error = EXIT_TERMINATED, {"kind": "terminated", "message": str(exc)}
    except BaseException as exc:  # everything else: the traceback goes to this rank's log
        traceback.print_exc()
        code, error = 1, {"kind": "error", "message": f"{type(exc).__name__}: {exc}"}
    if error is not None:
        log.error("%s", error["message"])
        atomic_write_json(os.path.join(job.logs_dir, f"error-rank-{env_rank}.json"), {**error, "rank": env_rank})
        sys.stdout.flush()
        sys.stderr.flush()
        # Peers may be gone or stuck in a collective: do not wait for the backend's orderly shutdown.
        os._exit(code)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
