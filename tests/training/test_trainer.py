"""The train stage end to end: real multi-process Horovod and DDP runs on a tiny Petastorm dataset.

One module-scoped home holds a dataset with uneven shards (rank 0 gets 10 train rows, rank 1 gets 7)
and a reference run (Horovod, 2 ranks). Every other run is compared with it bit for bit: DDP, and a
run that is SIGKILLed after its first checkpoint, resumed, SIGTERMed, and resumed again to the end.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline import cli, config, stages
from pipeline.errors import StageFailed, UserError
from pipeline.registry import Registry
from tests.training.test_data import TRAIN_GROUPS, register_dataset
from training import checkpoint as ckpt
from training import data

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# A small bev_segnet (32 x 32 cells) so that a step takes milliseconds.
TINY_MODEL = json.dumps({"x_range_m": [-12.8, 12.8], "y_range_m": [-12.8, 12.8], "cell_size_m": 0.8,
                         "point_channels": [16], "backbone_channels": [16, 16], "neck_channels": 16,
                         "head_channels": 16})
SETTINGS = {"train.np": 2, "train.epochs": 3, "train.batch_size": 2, "train.max_points": 200, "train.lr": 0.05,
            "train.checkpoint_every": 4, "train.shuffle_buffer": 4, "train.model_options": TINY_MODEL}
STEPS = data.steps_per_epoch(TRAIN_GROUPS, 2, 2) * SETTINGS["train.epochs"]


def make_cfg(home, **overrides):
    values = {"home": str(home), **SETTINGS, **overrides}
    return config.load({k: str(v) for k, v in values.items()}, env={})


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "home"
    cfg = make_cfg(root)
    register_dataset(Registry.open(cfg))
    return root


@pytest.fixture(scope="module")
def reference(home):
    """The uninterrupted Horovod run every other run is compared with."""
    result = stages.invoke("train", make_cfg(home, **{"train.backend": "horovod"}), say=quiet)
    return result, Registry.open(make_cfg(home)).get(result["ref"])


def metrics_of(art):
    return json.loads(Path(art.location, "metrics.json").read_text())


def rank_summaries(art):
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(os.path.join(art.location, "logs", "rank-*.json")))]


def test_horovod_two_ranks_learn_and_end_identical(home, reference):
    result, art = reference
    metrics = metrics_of(art)
    losses = [e["loss"] for e in metrics["epochs"]]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
    assert metrics["final"]["val_miou"] > metrics["majority_baseline"]["miou"]
    ranks = rank_summaries(art)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"] == metrics["parameters_sha256"]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]  # BatchNorm statistics too
    # Uneven shards (10 and 7 rows), equal steps: min over ranks of full batches, every epoch.
    assert [r["train_rows"] for r in ranks] == [10, 7]
    assert ranks[0]["steps_run"] == ranks[1]["steps_run"] == [3, 3, 3]
    # What the registry and the artifact hold.
    assert art.kind == "model" and art.meta["dataset"] == "dataset:fleet-lidar@v1"
    assert [p.ref for p in Registry.open(make_cfg(home)).parents(art.id)] == ["dataset:fleet-lidar@v1"]
    for name in ("model.pt", "model.json", "model.ts", "metrics.json", "logs/rank-0.log", "logs/rank-1.log"):
        assert Path(art.location, name).exists(), name
    assert result["tables"][0][2][0][0] == 1  # per-epoch summary rows
    assert not glob.glob(str(home / "checkpoints" / f"bev_segnet-{art.content_key[:16]}" / "*.pt"))


def test_torchscript_model_matches_eager_and_carries_provenance(reference):
    from training.models import build_model

    _, art = reference
    spec = json.loads(Path(art.location, "model.json").read_text())
    eager = build_model(spec["model"], spec["options"])
    eager.load_state_dict(torch.load(Path(art.location, "model.pt"), weights_only=True))
    eager.eval()
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(Path(art.location, "model.ts")), _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert meta["dataset"] == "dataset:fleet-lidar@v1" and meta["run_id"] and meta["git_sha"]
    assert "diff_hash" in meta and meta["user"] and meta["config"]["train"]["backend"] == "horovod"
    points, valid = torch.randn(2, 300, 4) * 8, torch.ones(2, 300, dtype=torch.bool)
    valid[1, 250:] = False
    with torch.no_grad():
        assert torch.equal(scripted(points, valid), eager(points, valid))


def test_tensorboard_has_loss_miou_throughput_and_data_wait(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, art = reference
    events = EventAccumulator(str(Path(art.location, "tensorboard")))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/miou", "val/iou/ground", "train/samples_per_s", "train/data_wait_fraction"} <= tags
    assert len(events.Scalars("train/loss")) == STEPS


def test_unchanged_request_reuses_the_model(home, reference):
    _, art = reference
    again = stages.invoke("train", make_cfg(home, **{"train.backend": "horovod", "train.checkpoint_every": 1}),
                          say=quiet)
    assert again["cached"] and again["ref"] == art.ref  # checkpoint_every does not change the weights


def test_ddp_gives_the_same_weights_as_horovod(home, reference):
    _, hvd_art = reference
    result = stages.invoke("train", make_cfg(home, **{"train.backend": "ddp"}), say=quiet)
    art = Registry.open(make_cfg(home)).get(result["ref"])
    assert art.ref != hvd_art.ref and art.config["backend"] == "ddp"
    ranks = rank_summaries(art)
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"]
    assert metrics_of(art)["parameters_sha256"] == metrics_of(hvd_art)["parameters_sha256"]
    ddp_weights = torch.load(Path(art.location, "model.pt"), weights_only=True)
    hvd_weights = torch.load(Path(hvd_art.location, "model.pt"), weights_only=True)
    assert all(torch.equal(ddp_weights[k], hvd_weights[k]) for k in hvd_weights)


def test_a_dataset_that_has_not_passed_validation_is_refused(home):
    cfg = make_cfg(home)
    registry = Registry.open(cfg)
    unchecked = register_dataset(registry, name="unchecked", validation=None, seed=1)
    with pytest.raises(UserError, match=r"dataset:unchecked@v1 has not been validated.*avp validate"):
        stages.invoke("train", cfg, say=quiet, dataset="dataset:unchecked@v1")
    registry.update_meta(unchecked.id, validation="failed")
    with pytest.raises(UserError, match=r"failed validation.*avp validate --dataset dataset:unchecked@v1"):
        stages.invoke("train", cfg, say=quiet, dataset="unchecked@v1")
    assert cli.main(["train", "--home", str(home), "--dataset", "unchecked"]) == 2
    assert not registry.children(unchecked.id)  # nothing was built on it


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(home):
    # A learning rate of 1e30 turns the weights huge after one step and the loss NaN after two.
    cfg = make_cfg(home, **{"train.backend": "ddp", "train.np": 1, "train.lr": 1e30, "train.checkpoint_every": 1})
    with pytest.raises(StageFailed, match=r"diverged: the training loss is not finite at epoch 1 step 2 "
                                          r"\(global step 2\).*last good checkpoint is .*ckpt-00000001\.pt"):
        stages.invoke("train", cfg, say=quiet)
    registry = Registry.open(cfg)
    failed = registry.list("model", "bev_segnet", "failed")[-1]
    assert "diverged" in failed.reason
    folder = home / "checkpoints" / f"bev_segnet-{failed.content_key[:16]}"
    (step, path), = ckpt.list_checkpoints(str(folder))
    state = ckpt.load(path)  # weights_only=True
    assert step == 1 and state["position"]["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------- kill and resume
def start_cli(home, log_path, *extra):
    """``avp train`` in its own session, as a person or Airflow would start it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVP_")}
    sets = [a for key, value in SETTINGS.items() if key not in ("train.np", "train.epochs")
            for a in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "pipeline.cli", "train", "--home", str(home), "--backend", "horovod",
               "--np", "2", "--epochs", "3", *sets, "--set", "train.checkpoint_every=1", "--force", *extra]
    log = open(log_path, "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(predicate, proc, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_folder(home, log_path):
    """The run's checkpoint folder, from the content key it prints when the build starts."""
    match = re.search(r"building model:\S+ \(content key ([0-9a-f]{12})\)", Path(log_path).read_text())
    if match:
        found = [p for p in glob.glob(str(home / "checkpoints" / f"bev_segnet-{match.group(1)}*")) if os.path.isdir(p)]
        return found[0] if found else None
    return None


def kill_tree(proc):
    """SIGKILL the CLI and everything under it at once (ranks first): a lost machine, not a stop."""
    family = psutil.Process(proc.pid).children(recursive=True)
    for p in [*reversed(family), psutil.Process(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def test_killed_and_stopped_runs_resume_to_the_same_weights(home, reference, tmp_path):
    _, uninterrupted = reference
    registry = Registry.open(make_cfg(home))

    # 1. SIGKILL everything right after the first checkpoint.
    log1 = tmp_path / "run1.log"
    run = start_cli(home, log1)
    folder = wait_for(lambda: checkpoint_folder(home, log1), run, "the build to start")
    wait_for(lambda: ckpt.list_checkpoints(folder), run, "a checkpoint")
    kill_tree(run)
    saved = ckpt.list_checkpoints(folder)
    assert saved and saved[-1][0] < STEPS  # really interrupted
    killed_at = saved[-1][0]
    for path in (p for _s, p in saved):
        torch.load(path, weights_only=True)  # every complete checkpoint loads safely

    # 2. Resume; SIGTERM the CLI (what Airflow or a preempted node sends) a few checkpoints later.
    log2 = tmp_path / "run2.log"
    earlier_runs = set(glob.glob(str(home / "runs" / "*")))
    run = start_cli(home, log2, "--resume")
    wait_for(lambda: [s for s, _p in ckpt.list_checkpoints(folder) if s >= killed_at + 2], run, "progress")
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait(timeout=120) == 143
    run_dir, = set(glob.glob(str(home / "runs" / "*"))) - earlier_runs
    stopped = [json.loads(Path(p).read_text()) for p in glob.glob(os.path.join(run_dir, "train", "error-rank-*.json"))]
    assert stopped and {e["kind"] for e in stopped} == {"terminated"}
    stopped_at = ckpt.list_checkpoints(folder)[-1][0]
    assert killed_at + 2 <= stopped_at < STEPS
    assert f"checkpoint at global step {stopped_at}" in stopped[0]["message"]
    assert "resuming from" in log2.read_text()
    assert registry.list("model", "bev_segnet", "aborted")  # the stopped build is marked, not left 'building'

    # 3. Resume again, to the end.
    log3 = tmp_path / "run3.log"
    run = start_cli(home, log3, "--resume")
    assert run.wait(timeout=300) == 0, log3.read_text()[-3000:]
    resumed = registry.get(re.search(r"published (model:\S+@v\d+)", log3.read_text()).group(1))
    assert resumed.ref != uninterrupted.ref and resumed.content_key == uninterrupted.content_key
    assert metrics_of(resumed)["parameters_sha256"] == metrics_of(uninterrupted)["parameters_sha256"]
    a = torch.load(Path(resumed.location, "model.pt"), weights_only=True)
    b = torch.load(Path(uninterrupted.location, "model.pt"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)
    # The per-epoch record survives the interruptions too (losses and mIoU are deterministic).
    same = lambda art: [(e["loss"], e["val_miou"]) for e in metrics_of(art)["epochs"]]
    assert same(resumed) == same(uninterrupted)
    assert rank_summaries(resumed)[0]["resumed_from"].endswith(f"ckpt-{stopped_at:08d}.pt")
