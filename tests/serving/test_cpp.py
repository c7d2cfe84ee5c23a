"""serving/cpp: the LibTorch consumer builds with cmake + g++, runs a real package (TorchScript and the
AOTInductor .pt2), matches the expected output, and fails loudly when it does not."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.prerequisites import requires

BUILD_SCRIPT = REPO / "serving" / "cpp" / "build.sh"

pytestmark = [
    pytest.mark.slow,
    requires(shutil.which("cmake") and shutil.which("g++"), "needs cmake and g++"),
]


@pytest.fixture(scope="module")
def consumer() -> str:
    """Build (or incrementally re-build) serving/cpp/build/avp_consumer; returns its path."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], env={**os.environ, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    path = out.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK)
    return path


def run_consumer(consumer: str, folder: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([consumer, folder, "--runs", "5", *args], capture_output=True, text=True, timeout=300)


def fields(output: str, runtime: str) -> dict[str, str]:
    line = next(line for line in output.splitlines() if line.startswith(f"runtime={runtime} "))
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_consumer_runs_torchscript_and_aoti_and_matches(consumer, aoti_served):
    out = run_consumer(consumer, aoti_served[3]["location"], "--runtime", "all")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("RESULT: OK")
    for runtime in ("torchscript", "aoti"):
        report = fields(out.stdout, runtime)
        assert report["match"] == "yes" and report["real_mismatches"] == "0"
        assert float(report["class_match_rate"]) == 1.0 and report["points"] == "2000"
        assert float(report["max_abs_logit_diff"]) <= float(report["tolerance"])
        assert float(report["p50_ms"]) > 0 and report["runs"] == "5"


def test_consumer_skips_aoti_for_an_exported_program_package(consumer, served):
    out = run_consumer(consumer, served[3]["location"], "--runtime", "all")
    assert out.returncode == 0 and "runtime=aoti skipped=" in out.stdout, out.stdout + out.stderr
    assert fields(out.stdout, "torchscript")["match"] == "yes"


def test_consumer_exits_1_when_the_output_does_not_match(consumer, aoti_served, tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(aoti_served[3]["location"], folder)
    logits = np.fromfile(folder / "expected_logits.bin", dtype="<f4").reshape(2000, -1)
    logits[:10] += 1.0  # ten points' logits moved well past the tolerance
    logits.astype("<f4").tofile(folder / "expected_logits.bin")
    out = run_consumer(consumer, str(folder), "--runtime", "torchscript")
    assert out.returncode == 1 and "RESULT: MISMATCH" in out.stdout
    assert fields(out.stdout, "torchscript")["match"] == "no"

    classes = np.fromfile(folder / "expected_output.bin", dtype="<i8")
    shutil.copy(os.path.join(aoti_served[3]["location"], "expected_logits.bin"), folder / "expected_logits.bin")
    top = np.fromfile(folder / "expected_logits.bin", dtype="<f4").reshape(2000, -1)
    margins = np.sort(top, axis=1)[:, -1] - np.sort(top, axis=1)[:, -2]
    confident = int(np.argmax(margins))
    classes[confident] = (classes[confident] + 1) % top.shape[1]  # a confident point's class changed
    classes.astype("<i8").tofile(folder / "expected_output.bin")
    out = run_consumer(consumer, str(folder), "--runtime", "torchscript")
    assert out.returncode == 1 and fields(out.stdout, "torchscript")["real_mismatches"] == "1"


def test_consumer_exits_2_on_bad_input(consumer, aoti_served, tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(aoti_served[3]["location"], folder)
    with open(folder / "example_input.bin", "ab") as fh:
        fh.write(b"\x00" * 5)
    out = run_consumer(consumer, str(folder))
    assert out.returncode == 2 and "not N x 4 float32" in out.stderr
    out = subprocess.run([consumer, str(folder), "--runs", "many"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "non-negative integer" in out.stderr
