"""Training off this host: Horovod ranks as Spark tasks on a real standalone cluster (two workers on
127.0.0.2 and 127.0.0.3, one core each), a two-node DDP job whose nodes are started separately, a rank
SIGKILLed mid-training, and the GPU choices this CPU-only machine can still check.

Every run trains the tiny dataset of tests/training/test_trainer.py and is compared bit for bit with a
local run of the same world size: where the ranks run must not change the weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import config, stages
from pipeline.errors import UserError
from pipeline.registry import Registry
from pipeline.servers import free_port
from tests.spark_cluster import standalone_cluster
from tests.training.test_data import register_dataset
from tests.training.test_trainer import SETTINGS, metrics_of, quiet
from training.trainer import process_group_backend

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
RUN = {**SETTINGS, "train.epochs": 2, "train.rank_timeout_s": 60}
WORKERS = ("127.0.0.2", "127.0.0.3")


def make_cfg(home, **overrides):
    values = {"home": str(home), **RUN, **overrides}
    return config.load({k: str(v) for k, v in values.items()}, env={})


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster") / "home"
    register_dataset(Registry.open(make_cfg(root)))
    return root


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    with standalone_cluster(tmp_path_factory.mktemp("spark"), [(address, 1) for address in WORKERS]) as cluster:
        yield cluster


def local_run(home, backend):
    result = stages.invoke("train", make_cfg(home, **{"train.backend": backend}), say=quiet)
    return Registry.open(make_cfg(home)).get(result["ref"])


def avp_train(home, log_path, *args):
    """``avp train`` in its own session with the test's settings (``--force``: the same request as the
    local reference, which would otherwise be a cache hit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVP_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    sets = [a for key, value in RUN.items() for a in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "pipeline.cli", "train", "--home", str(home), *sets, "--force", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc, log_path, timeout=600):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, Path(log_path).read_text()


def same_weights(a, b):
    wa = torch.load(Path(a.location, "model.pt"), weights_only=True)
    wb = torch.load(Path(b.location, "model.pt"), weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def latest_model(home):
    return Registry.open(make_cfg(home)).list("model", "bev_segnet")[-1]


def test_horovod_on_spark_matches_local_horovod_and_records_the_executor_hosts(home, spark, tmp_path):
    reference = local_run(home, "horovod")
    proc = avp_train(home, tmp_path / "spark.log", "--backend", "horovod", "--np", "2", "--launcher", "spark",
                     "--spark-master", spark.master_url)
    code, log = finish(proc, tmp_path / "spark.log")
    assert code == 0, log[-3000:]
    model = latest_model(home)
    assert model.state == "succeeded" and model.ref != reference.ref
    assert metrics_of(model)["parameters_sha256"] == metrics_of(reference)["parameters_sha256"]
    assert same_weights(model, reference)
    # Provenance: the launcher, the master and the host each rank ran on (one per worker).
    assert model.meta["launcher"] == "spark" and model.meta["spark_master"] == spark.master_url
    assert sorted(h["host"] for h in model.meta["rank_hosts"]) == sorted(WORKERS)
    assert [h["rank"] for h in model.meta["rank_hosts"]] == [0, 1]
    job = json.loads(Path(model.location, "logs", "job.json").read_text())
    assert job["provenance"]["launcher"] == "spark" and job["provenance"]["spark_master"] == spark.master_url
    apps = spark.status()["completedapps"]
    assert (f"avp-train-{model.ref}", "FINISHED") in [(a["name"], a["state"]) for a in apps]


def test_a_rank_killed_on_the_cluster_fails_the_run_naming_its_host_and_resume_matches(home, spark, tmp_path):
    reference = local_run(home, "horovod")  # a cache hit after the test above
    args = ("--backend", "horovod", "--np", "2", "--launcher", "spark", "--spark-master", spark.master_url,
            "--set", "train.checkpoint_every=1")
    proc = avp_train(home, tmp_path / "killed.log", *args)
    folder = home / "checkpoints" / f"bev_segnet-{reference.content_key[:16]}"
    deadline = time.time() + 300
    while not list(folder.glob("ckpt-*.pt")):
        assert proc.poll() is None and time.time() < deadline, Path(tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.1)
    logs = max((p.parent for p in home.glob("runs/*/train/job.json")), key=lambda p: p.stat().st_mtime)
    victim = json.loads((logs / "host-rank-1.json").read_text())
    os.kill(victim["pid"], signal.SIGKILL)
    code, log = finish(proc, tmp_path / "killed.log", timeout=RUN["train.rank_timeout_s"] + 120)
    assert code == 1, log[-3000:]
    assert f"lost rank 1 on host {victim['host']}" in log and victim["host"] in WORKERS
    failed = latest_model(home)
    assert failed.state == "failed" and "lost rank 1" in failed.reason

    proc = avp_train(home, tmp_path / "resumed.log", *args, "--resume")
    code, log = finish(proc, tmp_path / "resumed.log")
    assert code == 0, log[-3000:]
    assert "resuming from" in log
    resumed = latest_model(home)
    assert resumed.state == "succeeded" and same_weights(resumed, reference)


def test_two_ddp_nodes_started_one_by_one_match_a_single_node_run(home, tmp_path):
    reference = local_run(home, "ddp")
    rdzv = f"127.0.0.2:{free_port()}"
    nodes = [avp_train(home, tmp_path / f"node-{rank}.log", "--backend", "ddp", "--np", "2", "--nnodes", "2",
                       "--node-rank", str(rank), "--rdzv", rdzv) for rank in (1, 0)]  # node 1 may come first
    results = [finish(proc, tmp_path / f"node-{rank}.log") for proc, rank in zip(nodes, (1, 0))]
    for code, log in results:
        assert code == 0, log[-3000:]
    model = latest_model(home)
    assert model.ref != reference.ref and model.meta["nnodes"] == 2 and model.meta["rdzv"] == rdzv
    assert same_weights(model, reference)
    assert f"ref: {model.ref}" in results[0][1]  # node 1 reports the model node 0 published
    assert [h["rank"] for h in model.meta["rank_hosts"]] == [0, 1]


def test_gpu_choices_use_the_real_builds(home):
    import horovod.torch as hvd

    assert process_group_backend("cuda") == "nccl" and process_group_backend("cpu") == "gloo"
    assert not hvd.nccl_built()  # this machine's Horovod: gloo CPU operations only
    with pytest.raises(UserError, match=r"no NCCL/CUDA support.*HOROVOD_GPU_OPERATIONS=NCCL"):
        stages.invoke("train", make_cfg(home, **{"train.backend": "horovod", "train.device": "cuda"}), say=quiet)


def test_placement_mistakes_are_refused_before_anything_starts(home):
    cases = {"train.launcher=spark needs|use --backend horovod": {"train.launcher": "spark", "train.backend": "ddp"},
             "has 4 slots but train.np is 2": {"train.launcher": "hosts", "train.hosts": "h1:2,h2:2"},
             "is not HOST:SLOTS": {"train.launcher": "hosts", "train.hosts": "h1"},
             "needs --backend ddp.*--rdzv HOST:PORT": {"train.nnodes": 2, "train.backend": "horovod"}}
    for message, overrides in cases.items():
        with pytest.raises(UserError, match=message):
            stages.invoke("train", make_cfg(home, **overrides), say=quiet)
