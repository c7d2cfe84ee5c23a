"""Shared fixtures: a throwaway pipeline home and registry per test, and paths to the real data; the
``requires`` mark and its CI rule come from ``tests.prerequisites``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.prerequisites import pytest_configure, pytest_runtest_setup  # noqa: F401 (hooks of this conftest)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "real-data"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def cfg(tmp_path):
    from pipeline import config

    return config.load({"home": str(tmp_path / "home")}, env={})


@pytest.fixture
def registry(cfg):
    from pipeline.registry import Registry

    return Registry.open(cfg)


@pytest.fixture
def avp_env(tmp_path):
    """Environment for running the real `avp` CLI in a subprocess against a temporary home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVP_")}
    env["AVP_HOME"] = str(tmp_path / "home")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env
