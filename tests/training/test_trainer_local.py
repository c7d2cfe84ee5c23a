"""The Trainer in this process (``LocalBackend``, world size 1) on a tiny Petastorm dataset: repeatable
weights, a SIGTERM-stopped run that resumes to the same weights as an uninterrupted one, the outputs
and progress events, and a model registered from the test with its own train spec (the "add a model"
recipe of docs/architecture.md, done once)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import config
from pipeline.contracts import JobDataset
from pipeline.taxonomy import NUM_CLASSES
from tests.training.test_data import TEST_GROUPS, TRAIN_GROUPS, VAL_GROUPS, write_dataset
from tests.training.test_trainer import TINY_MODEL
from training import checkpoint as ckpt
from training import data, objectives
from training.models import registry
from training.trainer import Job, LocalBackend, Terminated, Trainer

EPOCHS = 2
STEPS = data.steps_per_epoch(TRAIN_GROUPS, 1, 2) * EPOCHS  # 17 rows, batches of 2: 8 steps an epoch
SETTINGS = {"epochs": EPOCHS, "batch_size": 2, "max_points": 200, "lr": 0.05, "checkpoint_every": 1000,
            "shuffle_buffer": 4, "prefetch_batches": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    location = tmp_path_factory.mktemp("dataset")
    manifest = write_dataset(str(location), {"train": TRAIN_GROUPS, "val": VAL_GROUPS, "test": TEST_GROUPS})
    return str(location), manifest


@pytest.fixture(autouse=True)
def torch_settings_restored():
    """The Trainer sets deterministic kernels and one thread for the whole process; put them back."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def make_job(folder: Path, dataset, resume: bool = False, model: str = "bev_segnet", options: str = TINY_MODEL,
             backend: str = "local", **train) -> Job:
    """A ``job.json`` as ``training.entry`` writes it, for one rank (in this process unless ``backend``
    says otherwise)."""
    values = {"home": str(folder / "home"), "train.model": model, "train.model_options": options,
              **{f"train.{k}": v for k, v in {**SETTINGS, **train}.items()}}
    cfg = config.load({k: str(v) for k, v in values.items()}, env={})
    location, manifest = dataset
    os.makedirs(folder / "logs", exist_ok=True)
    return Job(run_id=folder.name, backend=backend, world=1, device="cpu",
               train=config.resolved(cfg.train), model_options=json.loads(options),
               dataset=JobDataset(ref="dataset:tiny@v1", location=location, content_key="", manifest=manifest),
               state_dir=str(folder / "state"), final_dir=str(folder / "state" / "final"),
               logs_dir=str(folder / "logs"), progress_file=str(folder / "logs" / "progress.jsonl"),
               resume=resume, provenance={"git_sha": "test"}, config=config.resolved(cfg))


def train(job: Job, trainer_class=Trainer) -> dict:
    return trainer_class(job, LocalBackend()).run()


def metrics_of(job: Job) -> dict:
    return json.loads(Path(job.final_dir, "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    """One uninterrupted in-process run."""
    job = make_job(tmp_path_factory.mktemp("reference"), dataset)
    return job, train(job)


def test_two_runs_with_one_seed_give_identical_weights(tmp_path, dataset, reference):
    job, summary = reference
    assert (summary["world"], summary["backend"], summary["steps_run"]) == (1, "local", [8, 8])
    assert summary["global_step"] == STEPS and summary["resumed_from"] is None
    again = train(make_job(tmp_path, dataset))
    assert again["parameters_sha256"] == summary["parameters_sha256"]
    assert again["state_sha256"] == summary["state_sha256"]
    a = torch.load(Path(job.final_dir, "model.pt"), weights_only=True)
    b = torch.load(Path(tmp_path, "state", "final", "model.pt"), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A different seed is a different model: the digest really depends on the weights.
    other = train(make_job(tmp_path / "seed1", dataset, seed=1))
    assert other["parameters_sha256"] != summary["parameters_sha256"]


def test_outputs_metrics_and_progress_events(reference):
    job, summary = reference
    for name in ("model.pt", "model.json", "model.ts", "metrics.json"):
        assert Path(job.final_dir, name).exists(), name
    metrics = metrics_of(job)
    assert metrics["parameters_sha256"] == summary["parameters_sha256"]
    assert (metrics["backend"], metrics["world"]) == ("local", 1)
    losses = [e["loss"] for e in metrics["epochs"]]
    assert len(losses) == EPOCHS and losses[-1] < losses[0]
    assert metrics["final"]["val_miou"] > metrics["majority_baseline"]["miou"]
    events = [json.loads(line) for line in Path(job.progress_file).read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("step") == STEPS and kinds.count("epoch") == EPOCHS
    assert kinds.count("checkpoint") == EPOCHS  # checkpoint_every is larger than the run: epoch ends only
    assert [e["global_step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))


class StoppedAt(Trainer):
    """A Trainer that sends itself SIGTERM (as a preempted node would get) after global step ``at``."""

    at = 5

    def record_step(self, *args, **kwargs):
        super().record_step(*args, **kwargs)
        if self.position.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, dataset, reference):
    _, uninterrupted = reference
    before = signal.getsignal(signal.SIGTERM)
    job = make_job(tmp_path, dataset, checkpoint_every=3)
    with pytest.raises(Terminated, match=r"stopped by a signal at epoch 1 step 6; checkpoint at global step 6"):
        train(job, StoppedAt)  # the stop is agreed at the next step boundary, then checkpointed
    assert signal.getsignal(signal.SIGTERM) is before  # the run put the handler back
    assert [step for step, _ in ckpt.list_checkpoints(job.state_dir)] == [3, 6]
    assert not Path(job.final_dir).exists()

    resumed = train(make_job(tmp_path, dataset, resume=True, checkpoint_every=3))
    assert resumed["resumed_from"].endswith("ckpt-00000006.pt")
    assert resumed["steps_run"] == [2, 8] and resumed["global_step"] == STEPS
    assert resumed["parameters_sha256"] == uninterrupted["parameters_sha256"]
    assert resumed["state_sha256"] == uninterrupted["state_sha256"]


@pytest.mark.slow
def test_in_process_weights_equal_one_ddp_rank_started_by_torchrun(tmp_path, dataset, reference):
    """World size 1 either way: DDP's allreduce over one rank divides by 1, so the weights are the same."""
    from training.launch import launch

    _, in_process = reference
    job = make_job(tmp_path, dataset, backend="ddp")
    job_path = job.save_to(job.logs_dir)
    result = launch(job_path, "ddp", 1, job.logs_dir, job.progress_file, say=lambda _m: None, progress_bar=False)
    assert result.returncode == 0, Path(job.logs_dir, "rank-0.log").read_text()[-3000:]
    metrics = metrics_of(job)
    assert (metrics["backend"], metrics["world"]) == ("ddp", 1)
    assert metrics["parameters_sha256"] == in_process["parameters_sha256"]
    assert metrics["state_sha256"] == in_process["state_sha256"]


# ----------------------------------------------------------------------------------------- add a model
@dataclass
class PointMlpConfig:
    hidden: int = 8


class PointMlp(nn.Module):
    """Per-point MLP: the smallest model with the trainer's interface (points, valid) -> logits."""

    def __init__(self, config: PointMlpConfig):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, config.hidden), nn.ReLU(), nn.Linear(config.hidden, NUM_CLASSES))

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.layers(points) * valid.unsqueeze(-1).to(points.dtype)


def sgd(model: nn.Module, train: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=train["lr"], momentum=0.9)


def constant(optimizer: torch.optim.Optimizer, _total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


def test_a_model_registered_with_its_own_train_spec_trains_with_it(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_TRAIN_SPECS", dict(registry._TRAIN_SPECS))
    registry.register_model("point_mlp", PointMlpConfig, PointMlp, description="per-point MLP (test)")
    spec = registry.register_train_spec("point_mlp", registry.TrainSpec(
        build_loss=objectives.point_loss, build_optimizer=sgd, build_lr_scheduler=constant))
    assert registry.get_train_spec("point_mlp") is spec
    assert registry.get_train_spec("bev_segnet") is registry.DEFAULT_TRAIN_SPEC

    job = make_job(tmp_path, dataset, model="point_mlp", options='{"hidden": 16}', lr=0.01)
    trainer = Trainer(job, LocalBackend())
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.model.layers[0].out_features == 16
    trainer.run()
    metrics = metrics_of(job)
    assert metrics["model"] == "point_mlp"
    assert [e["lr"] for e in metrics["epochs"]] == [0.01] * EPOCHS  # the spec's constant schedule, not warm-up
    assert json.loads(Path(job.final_dir, "model.json").read_text())["options"] == {"hidden": 16}


def test_a_train_spec_for_an_unknown_model_is_refused():
    with pytest.raises(ValueError, match=r"unknown model 'no_such_net'; registered models: .*bev_segnet"):
        registry.register_train_spec("no_such_net", registry.DEFAULT_TRAIN_SPEC)
    with pytest.raises(ValueError, match=r"must be a TrainSpec, got dict"):
        registry.register_train_spec("bev_segnet", {})
