"""The ``train`` stage: a validated dataset -> a distributed training job -> a registered model.

``run`` is what ``avp train`` and the Airflow task call:

1. Resolve the dataset (a reference, a bare version of ``ingest.dataset_name``, or its latest succeeded
   version) and refuse one whose validation has not passed.
2. Check the request before starting any process (model name and options, backend, enough rows for
   one batch per rank).
3. ``registry.build("model", ...)``: content-keyed on the dataset, the code of ``training`` and
   ``pipeline`` and the training config, so an unchanged request reuses the model. The builder writes
   a job file, launches the ranks (``training.launch``), and copies the final weights, TorchScript
   model, metrics, TensorBoard events and per-rank logs into the staging folder.

Checkpoints live in ``<home>/checkpoints/<model>-<content key prefix>/``, outside the registry's staging
folder (which is deleted when a build fails), so ``avp train --resume`` after a killed, stopped or failed
run continues from the newest one and ends with the same weights as an uninterrupted run. Once the model
is published the folder is removed: everything worth keeping is in the artifact.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import importlib.util
import json
import os
import re
import shutil
import uuid
from typing import Any, Callable, Iterator

from pipeline import config as config_mod
from pipeline import provenance
from pipeline.config import PipelineConfig
from pipeline.contracts import JobDataset, Manifest, ModelSpec, TrainJob, TrainMetrics, verified_manifest
from pipeline.errors import StageFailed, UserError
from pipeline.registry import Artifact, Registry
from pipeline.stages import resolve_input

# TrainConfig fields that change how the job runs but not the weights it produces: left out of the
# content key. (np and backend stay in: averaging over a different number of ranks changes the sums,
# and the Horovod == DDP equality is only shown for the same np on CPU.)
EXECUTION_ONLY = ("checkpoint_every", "keep_checkpoints", "prefetch_batches", "launcher", "spark_master", "hosts",
                  "nnodes", "node_rank", "rdzv", "rank_timeout_s")  # where ranks run: same world size, same weights
OUTPUT_FILES = ("model.pt", ModelSpec.FILE, "model.ts", TrainMetrics.FILE)


# ----------------------------------------------------------------------------------------- inputs
def resolve_dataset(cfg: PipelineConfig, registry: Registry, dataset: str | None) -> Artifact:
    """The dataset to train on: a reference, a bare version of ``ingest.dataset_name``, or its latest."""
    return resolve_input(registry, "dataset", cfg.ingest.dataset_name, dataset,
                         hint="run `avp ingest` first or pass --dataset REF", purpose="trained on")


def require_validated(art: Artifact) -> None:
    """Training consumes only datasets the validate stage passed (its verdict is in the record's meta)."""
    verdict = art.meta.get("validation")
    if verdict != "passed":
        state = "has not been validated" if verdict is None else f"failed validation ({verdict})"
        raise UserError(f"dataset {art.ref} {state}; training only uses validated data: run "
                        f"`avp validate --dataset {art.ref}` and fix what it reports")


def model_options(cfg: PipelineConfig) -> dict[str, Any]:
    """``train.model_options`` (a JSON object) checked against the model's config."""
    from training.models import config_to_dict, list_models, make_config

    text = cfg.train.model_options.strip()
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"config field train.model_options: not JSON ({exc}); e.g. '{{\"cell_size_m\": 0.8}}'") from None
    if not isinstance(options, dict):
        raise UserError("config field train.model_options must be a JSON object")
    if cfg.train.model not in list_models():
        raise UserError(f"unknown model {cfg.train.model!r}; registered models: {', '.join(list_models())}")
    try:
        return config_to_dict(make_config(cfg.train.model, options)) if options else {}
    except ValueError as exc:
        raise UserError(str(exc)) from None


def resolve_device(cfg: PipelineConfig) -> str:
    """``cpu`` or ``cuda``. ``auto`` takes the GPU when there is one and the backend can use it."""
    import torch

    wanted = cfg.train.device
    has_cuda = torch.cuda.is_available()
    horovod_gpu = True
    if cfg.train.backend == "horovod" and (has_cuda or wanted == "cuda"):
        import horovod.torch as hvd

        horovod_gpu = bool(hvd.cuda_built() and hvd.nccl_built())
    if wanted == "cuda" and not horovod_gpu:
        raise UserError("this Horovod build has no NCCL/CUDA support (CPU operations over gloo only); use "
                        "--backend ddp for GPUs, or rebuild Horovod on a CUDA host: HOROVOD_GPU_OPERATIONS=NCCL "
                        "HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 pip install --no-cache-dir horovod "
                        "(with torch >= 2.1 patch its CMakeLists.txt to C++17 first; docs/training.md)")
    if wanted == "cuda" and not has_cuda:
        raise UserError("train.device is cuda but no CUDA device is available; use --set train.device=cpu")
    if wanted == "auto":
        return "cuda" if has_cuda and horovod_gpu else "cpu"
    return wanted


def check_request(cfg: PipelineConfig, manifest: Manifest, dataset: Artifact) -> int:
    """Refuse what cannot run before any process starts; returns the steps per epoch."""
    from training.data import rows_per_rank, steps_per_epoch

    t = cfg.train
    for path, value in (("train.checkpoint_every", t.checkpoint_every), ("train.max_points", t.max_points),
                        ("train.shuffle_buffer", t.shuffle_buffer), ("train.keep_checkpoints", t.keep_checkpoints),
                        ("train.prefetch_batches", t.prefetch_batches)):
        if value < 1:
            raise UserError(f"config field {path}: {value} must be at least 1")
    if not (t.lr > 0):
        raise UserError(f"config field train.lr: {t.lr} must be > 0")
    if t.backend == "horovod" and importlib.util.find_spec("horovod") is None:
        raise UserError("Horovod is not installed in this environment; use --backend ddp")
    check_placement(cfg)
    groups = manifest.splits["train"].row_groups
    steps = steps_per_epoch(groups, t.np, t.batch_size) if groups else 0
    if steps < 1:
        rows = rows_per_rank(groups, t.np) if groups else [0] * t.np
        raise UserError(f"dataset {dataset.ref} has {sum(groups)} train rows in {len(groups)} row groups; with "
                        f"--np {t.np} the smallest shard has {min(rows)} rows, fewer than one batch of "
                        f"{t.batch_size}: lower --np or train.batch_size, or ingest more logs")
    return steps


def check_placement(cfg: PipelineConfig) -> None:
    """``train.launcher`` and the multi-node fields fit together and with ``np`` (which counts all ranks)."""
    from training.launch import Placement

    t = cfg.train
    if t.launcher == "spark":
        if t.backend != "horovod":
            raise UserError("train.launcher=spark runs Horovod ranks as Spark tasks; use --backend horovod")
        if not t.spark_master:
            raise UserError("train.launcher=spark needs train.spark_master (e.g. spark://host:7077)")
    if t.launcher == "hosts" and t.nnodes == 1:
        try:
            slots = sum(n for _, n in Placement(hosts=t.hosts).host_slots())
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if slots != t.np:
            raise UserError(f"train.hosts {t.hosts!r} has {slots} slots but train.np is {t.np}: one rank per slot")
    if t.nnodes > 1:
        problems = [why for bad, why in (
            (t.backend != "ddp", "--backend ddp (Horovod's nodes start together: use train.hosts)"),
            (t.launcher == "spark", "a launcher other than spark"),
            (not re.fullmatch(r"[^:\s]+:\d+", t.rdzv), "--rdzv HOST:PORT of node 0"),
            (t.np % t.nnodes != 0, f"--np (all ranks) a multiple of --nnodes {t.nnodes}"),
            (t.node_rank >= t.nnodes, f"--node-rank below --nnodes {t.nnodes}")) if bad]
        if problems:
            raise UserError(f"a {t.nnodes}-node job (node {t.node_rank}) needs " + ", ".join(problems))


def key_config(cfg: PipelineConfig, device: str, options: dict[str, Any]) -> dict[str, Any]:
    """What determines the weights: the training config (minus execution-only fields) with the device
    resolved and the model options expanded to the model's full config."""
    train = {k: v for k, v in config_mod.resolved(cfg.train).items() if k not in EXECUTION_ONLY}
    train.update(device=device, model_options=options)
    return train


def code_modules(cfg: PipelineConfig) -> tuple[str, ...]:
    """The code that produces the weights: this module and its imports, the trainer (run by
    ``training.launch`` as ``python -m training.trainer``) and the model's modules (found by discovery)."""
    from training.models.registry import model_modules

    return ("training.entry", "training.trainer", *model_modules(cfg.train.model))


def checkpoint_dir(registry: Registry, model: str, content_key: str) -> str:
    """Where the checkpoints of one training request live: outside the staging folder, keyed by the
    model's content key so ``--resume`` finds exactly the run it continues."""
    return registry.home.join("checkpoints", f"{model}-{content_key[:16]}")


# ----------------------------------------------------------------------------------------- the stage
def run(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None] = print, run_id: str = "",
        dataset: str | None = None, resume: bool = False) -> dict[str, Any]:
    """The train stage; returns the model reference, a per-epoch summary table and the output paths."""
    if cfg.train.nnodes > 1 and cfg.train.node_rank > 0:
        return _run_node(cfg, registry, say)
    data = resolve_dataset(cfg, registry, dataset)
    require_validated(data)
    manifest = verified_manifest(data, say)  # every file checked before any reader opens one
    steps = check_request(cfg, manifest, data)
    options = model_options(cfg)
    device = resolve_device(cfg)
    run_id = run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-train-{uuid.uuid4().hex[:6]}"
    resume = str(resume).strip().lower() in ("1", "true", "yes", "on")
    say(f"training {cfg.train.model} on {data.ref} with {cfg.train.backend} x {cfg.train.np} on {device} "
        f"({steps} steps per epoch, {cfg.train.epochs} epochs)")

    def build(staging: str, record: Artifact) -> dict[str, Any]:
        """The registry builder for this request."""
        return _train_into(staging, record, cfg, registry, data, manifest, options, device, run_id, resume, say)

    art = registry.build("model", cfg.train.model, entry_point="training.entry:run",
                         config=key_config(cfg, device, options), builder=build, parents=[data],
                         code_modules=code_modules(cfg), force=cfg.force, say=say)
    state_dir = checkpoint_dir(registry, art.name, art.content_key)
    if not art.cached:
        # Published: the weights, TorchScript model, events and logs are in the artifact now, and the
        # checkpoints have done their job (a failed or stopped build keeps them for --resume).
        shutil.rmtree(state_dir, ignore_errors=True)
    return summarize(art, TrainMetrics.load_from(art.location))


def _run_node(cfg: PipelineConfig, registry: Registry, say: Callable[[str], None]) -> dict[str, Any]:
    """Node R > 0 of a multi-node DDP job: run this node's ranks of the job node 0 published, nothing
    else. Node 0 resolves the dataset, builds the model in the registry and publishes it; this node only
    needs the shared home, and exits with its ranks' status."""
    from training.launch import Placement, launch, wait_for_node_job

    check_placement(cfg)
    t = cfg.train
    say(f"node {t.node_rank} of {t.nnodes}: waiting for node 0's job at rendezvous {t.rdzv}")
    try:
        job_path = wait_for_node_job(registry.home.runs, t.rdzv, t.rank_timeout_s)
    except TimeoutError as exc:
        raise StageFailed(str(exc)) from None
    job = TrainJob.load(job_path)
    if job.world != t.np or job.backend != "ddp":
        raise UserError(f"node 0's job runs {job.backend} x {job.world}, this node was started "
                        f"with ddp x {t.np}: start every node with the same --np and --nnodes")
    ref = job.provenance["model_ref"]
    say(f"running ranks {t.node_rank * (t.np // t.nnodes)}..{(t.node_rank + 1) * (t.np // t.nnodes) - 1} "
        f"of {ref}")
    result = launch(job_path, "ddp", t.np, job.logs_dir, job.progress_file, say=say, progress_bar=False,
                    placement=Placement.from_train(config_mod.resolved(t)))
    if result.returncode != 0:
        raise _failure(result, job.logs_dir, job.state_dir)
    return {"ref": ref, "node_rank": t.node_rank, "logs": job.logs_dir, "tables": []}


def _train_into(staging: str, record: Artifact, cfg: PipelineConfig, registry: Registry, data: Artifact,
                manifest: Manifest, options: dict[str, Any], device: str, run_id: str, resume: bool,
                say: Callable[[str], None]) -> dict[str, Any]:
    """The registry builder: run the distributed job, then copy its outputs into ``staging``."""
    state_dir = checkpoint_dir(registry, cfg.train.model, record.content_key)
    with _exclusive(state_dir):
        return _run_job(staging, record, cfg, data, manifest, options, device, run_id, resume, say,
                        state_dir, registry.home.join("runs", run_id, "train"))


@contextlib.contextmanager
def _exclusive(state_dir: str) -> Iterator[None]:
    """Hold ``<state_dir>.lock`` for the job: ``--force`` skips the registry's in-flight check, and two
    jobs writing one checkpoint folder would corrupt each other's resume."""
    os.makedirs(os.path.dirname(state_dir), exist_ok=True)
    with open(state_dir + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another training run is writing {state_dir}; wait for it or stop it") from None
        yield


def _run_job(staging: str, record: Artifact, cfg: PipelineConfig, data: Artifact, manifest: Manifest,
             options: dict[str, Any], device: str, run_id: str, resume: bool, say: Callable[[str], None],
             state_dir: str, logs_dir: str) -> dict[str, Any]:
    """Prepare the checkpoint folder and the job file, launch the ranks, publish their outputs."""
    from pipeline.files import atomic_write_json
    from training.checkpoint import list_checkpoints
    from training.launch import Placement, launch, node_pointer, rank_hosts

    earlier = list_checkpoints(state_dir)
    if resume and earlier:
        say(f"resuming from {earlier[-1][1]}")
    elif resume:
        say(f"no checkpoint in {state_dir}: starting from the beginning")
    elif earlier:
        say(f"discarding {len(earlier)} checkpoint(s) of an earlier, unfinished run in {state_dir} "
            "(`avp train --resume` continues one instead)")
    if not resume:
        shutil.rmtree(state_dir, ignore_errors=True)
    final_dir = os.path.join(state_dir, "final")
    shutil.rmtree(final_dir, ignore_errors=True)  # written again by this job; never reuse a stale one
    os.makedirs(state_dir, exist_ok=True)
    shutil.rmtree(logs_dir, ignore_errors=True)
    os.makedirs(logs_dir, exist_ok=True)

    snap = provenance.snapshot()
    job = TrainJob(
        run_id=run_id, backend=cfg.train.backend, world=cfg.train.np, device=device,
        train=config_mod.resolved(cfg.train), model_options=options,
        dataset=JobDataset(ref=data.ref, location=data.location, content_key=data.content_key, manifest=manifest),
        state_dir=state_dir, final_dir=final_dir, logs_dir=logs_dir,
        progress_file=os.path.join(logs_dir, "progress.jsonl"), resume=resume,
        provenance={"git_sha": snap["git_sha"], "diff_hash": snap["diff_hash"], "user": snap["user"],
                    "host": snap["host"], "model_ref": record.ref, **placement_provenance(cfg)},
        config=config_mod.resolved(cfg),
    )
    job_path = job.save_to(logs_dir)
    placement = Placement.from_train(job.train)
    runs_dir = os.path.dirname(os.path.dirname(logs_dir))  # <home>/runs (logs: <home>/runs/<run id>/train)
    pointer = node_pointer(runs_dir, cfg.train.rdzv) if cfg.train.nnodes > 1 else None
    if pointer:  # the other nodes of a multi-node job read the job file from the shared home
        atomic_write_json(pointer, {"job": job_path, "model_ref": record.ref})
    try:
        result = launch(job_path, cfg.train.backend, cfg.train.np, logs_dir, job.progress_file, say=say,
                        placement=placement)
    finally:
        if pointer and os.path.exists(pointer):
            os.remove(pointer)
    if result.returncode != 0:
        raise _failure(result, logs_dir, state_dir)
    missing = [f for f in OUTPUT_FILES if not os.path.exists(os.path.join(final_dir, f))]
    if missing:
        raise StageFailed(f"training ended without writing {', '.join(missing)} in {final_dir}; see {logs_dir}")

    for name in OUTPUT_FILES:
        shutil.copy2(os.path.join(final_dir, name), os.path.join(staging, name))
    if os.path.isdir(os.path.join(state_dir, "tensorboard")):
        shutil.copytree(os.path.join(state_dir, "tensorboard"), os.path.join(staging, "tensorboard"))
    shutil.copytree(logs_dir, os.path.join(staging, "logs"))
    metrics = TrainMetrics.load_from(final_dir)
    baseline = metrics.majority_baseline or {}
    return {"dataset": data.ref, "run_id": run_id, "backend": cfg.train.backend, "np": cfg.train.np,
            "device": device, "epochs": len(metrics.epochs), "first_epoch_loss": metrics.first_epoch_loss,
            "final_loss": metrics.final["loss"], "val_miou": metrics.final["val_miou"],
            "baseline_miou": baseline.get("miou"), "parameters_sha256": metrics.parameters_sha256,
            "logs": logs_dir, "train_seconds": round(result.elapsed_s, 1), **placement_provenance(cfg),
            "rank_hosts": [{"rank": h["rank"], "host": h["host"]} for h in rank_hosts(logs_dir)]}


def placement_provenance(cfg: PipelineConfig) -> dict[str, Any]:
    """Where the ranks were asked to run, for the model's provenance (the hosts they ran on are added
    from the ranks' own reports)."""
    t = cfg.train
    where = {"spark": {"spark_master": t.spark_master}, "hosts": {"hosts": t.hosts}}.get(t.launcher, {})
    nodes = {"nnodes": t.nnodes, "rdzv": t.rdzv} if t.nnodes > 1 else {}
    return {"launcher": t.launcher, **where, **nodes}


def _failure(result: Any, logs_dir: str, state_dir: str) -> StageFailed:
    """A clear error for a job that did not finish: divergence, a stop, or a crash (with the log tail)."""
    from training.checkpoint import list_checkpoints
    from training.launch import lost_ranks

    saved = list_checkpoints(state_dir)
    last = (f"the last good checkpoint is {saved[-1][1]} (global step {saved[-1][0]})" if saved
            else "no checkpoint was written")
    lost = lost_ranks(logs_dir)
    if lost and result.returncode != 0:
        who = ", ".join(f"rank {h['rank']} on host {h['host']} (pid {h['pid']})" for h in lost)
        return StageFailed(f"training lost {who}: it ended without a report (killed, or its executor or host went "
                           f"away), and the job failed; {last}. Continue with `avp train --resume`. "
                           f"Per-rank logs: {logs_dir}")
    kinds = {e["kind"] for e in result.errors}
    if "diverged" in kinds:
        message = next(e["message"] for e in result.errors if e["kind"] == "diverged")
        return StageFailed(f"training diverged: {message}; {last}; nothing was published. Lower train.lr or "
                           f"check the dataset. Per-rank logs: {logs_dir}")
    if "error" in kinds:
        error = next(e for e in result.errors if e["kind"] == "error")
        tail = _tail(os.path.join(logs_dir, f"rank-{error['rank']}.log"))
        return StageFailed(f"training failed on rank {error['rank']}: {error['message']}; {last}. "
                           f"Per-rank logs: {logs_dir}\n{tail}")
    if "terminated" in kinds:
        return StageFailed(f"training was stopped by a signal; {last}. Continue with `avp train --resume`.")
    tail = _tail(os.path.join(logs_dir, "launcher.log"))
    return StageFailed(f"the training job exited with code {result.returncode}; {last}. Logs: {logs_dir}\n{tail}")


def _tail(path: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file (empty if it cannot be read)."""
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def summarize(art: Artifact, metrics: TrainMetrics) -> dict[str, Any]:
    """The stage result: reference, per-epoch table, baseline comparison and where everything is."""
    rows = [[e["epoch"], f"{e['loss']:.4f}", "n/a" if e["val_miou"] is None else f"{e['val_miou']:.3f}",
             f"{e['samples_per_s']:.1f}", f"{100 * e['data_wait_fraction']:.1f}%"] for e in metrics.epochs]
    title = art.ref + (" (cache hit)" if art.cached else "")
    tables = [(title, ["epoch", "loss", "val mIoU", "samples/s", "data wait"], rows)]
    baseline = metrics.majority_baseline
    if baseline:
        final = metrics.final["val_miou"]
        tables.append(("validation mIoU against the majority-class baseline", ["predictor", "val mIoU"], [
            [f"{metrics.model} (last epoch)", "n/a" if final is None else f"{final:.3f}"],
            [f"always '{baseline['class']}'", "n/a" if baseline["miou"] is None else f"{baseline['miou']:.3f}"]]))
    loc = art.location
    return {"ref": art.ref, "cached": art.cached, "location": loc, "model": os.path.join(loc, "model.pt"),
            "torchscript": os.path.join(loc, "model.ts"), "metrics": os.path.join(loc, TrainMetrics.FILE),
            "tensorboard": os.path.join(loc, "tensorboard"), "logs": os.path.join(loc, "logs"), "tables": tables}
