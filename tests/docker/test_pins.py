"""The Docker images must install exactly what `make setup` installs."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def constraints():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def pins_in(text):
    return {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"([A-Za-z][A-Za-z0-9_.\-]*)==([0-9][^\s\"'\\;]*)", text)}


def test_there_are_images_for_airflow_and_training():
    assert {p.name for p in DOCKERFILES} == {"airflow.Dockerfile", "training.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_through_setup_with_the_constraints(dockerfile):
    text = dockerfile.read_text()
    assert "constraints.txt" in text and "scripts/setup.sh" in text
    python = re.search(r"^FROM python:(\d+\.\d+)", text, re.M)
    assert python and python.group(1) == "3.11"
    known = constraints()
    for name, version in pins_in(text).items():
        assert known.get(name) == version, f"{dockerfile.name} pins {name}=={version}, constraints say {known.get(name)}"


def test_setup_script_and_requirements_agree_with_constraints():
    known = constraints()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r"^TORCH_VERSION=(\S+)", setup, re.M).group(1) == known["torch"]
    assert re.search(r"^HOROVOD_VERSION=(\S+)", setup, re.M).group(1) == known["horovod"]
    for name, version in pins_in((REPO / "requirements.txt").read_text()).items():
        assert known.get(name) == version, f"requirements.txt pins {name}=={version}, constraints say {known.get(name)}"
    # every direct requirement is frozen in the constraints
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name = re.split(r"[=<>\[ ]", line.strip())[0].lower().replace("_", "-")
        if name and not name.startswith("#"):
            assert name in known, f"{name} is in requirements.txt but not in constraints.txt"
