"""The CI rule for prerequisites from outside the repository (tests/prerequisites.py): a missing one skips
with its reason locally and fails under ``CI=true``; a present one runs the test either way. Checked by
running pytest on a small generated test file, as a person or CI would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SAMPLE = '''
import pytest
from tests.prerequisites import missing, requires

@requires(False, "needs the moon at /nowhere")
def test_marked_missing():
    pass

@requires(True, "needs nothing")
def test_marked_present():
    pass

@pytest.fixture
def server():
    missing("no database server: install postgresql")

def test_fixture_missing(server):
    pass
'''


def run_sample(tmp_path, ci: str | None):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.prerequisites", "-p", "no:cacheprovider",
                           "-q", "-rsf", "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
def test_locally_missing_prerequisites_skip_with_their_reason(tmp_path, ci):
    out = run_sample(tmp_path, ci)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 2 skipped" in out.stdout
    assert "needs the moon at /nowhere" in out.stdout and "no database server: install postgresql" in out.stdout


@pytest.mark.parametrize("ci", ["true", " TRUE "])
def test_under_ci_missing_prerequisites_fail_loudly(tmp_path, ci):
    out = run_sample(tmp_path, ci)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 passed, 2 errors" in out.stdout  # a failure in setup is an error, never a skip
    assert "CI=true and a prerequisite is missing: needs the moon at /nowhere" in out.stdout
    assert "CI=true and a prerequisite is missing: no database server: install postgresql" in out.stdout
