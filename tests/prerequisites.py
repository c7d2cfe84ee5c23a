"""Tests that need something from outside the repository (``../shared/real-data``, cmake and g++, a
database server): ``requires(available, reason)`` marks them. Locally a missing prerequisite skips the
test with its reason (``-ra`` lists it in the summary); under CI (``CI=true``) it fails the test instead,
so a CI run without its data or tools cannot pass by skipping. Loaded by ``tests/conftest.py``."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def missing(reason: str) -> None:
    """Stop the running test (or fixture) for a missing prerequisite: skip locally, fail under CI."""
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def requires(available: bool, reason: str) -> pytest.MarkDecorator:
    """Mark a test (or a module via ``pytestmark``) as needing a prerequisite that ``available`` says is there."""
    return pytest.mark.requires(bool(available), reason=reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(available, reason): a prerequisite from outside the repository; "
                                       "skipped when missing, failed under CI=true")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        if not mark.args[0]:
            missing(mark.kwargs["reason"])
