"""Shared by the tests that use Airflow as an operator does: `airflow standalone` started on a free 127.0.0.1
port (scripts/airflow_standalone.sh, the same script as `make airflow`) and stopped with SIGINT to its
process group, and the system Chromium driven by Playwright (browsers cannot be downloaded here: Debian's
`chromium`, installed by scripts/install_servers.sh, or the one named by AVP_CHROMIUM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from pipeline.servers import free_port, stop_process_group
from tests.dags.test_dag_run import REPO, airflow_env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 2) -> Any:
    """The first truthy value of ``predicate()``, polled every ``interval`` s; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Standalone:
    """A running `airflow standalone`: its URL, environment (AVP_HOME, AIRFLOW_HOME, ...) and log."""

    base_url: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen

    def client(self, user: str | None = None, **kwargs: Any) -> httpx.Client:
        """An API client; with ``user`` (not every visitor is admin) it carries that user's bearer token."""
        if user is not None:
            kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": f"Bearer {self.token(user)}"}
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)

    def password(self, user: str) -> str:
        """The password the simple auth manager generated for ``user`` (AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS)."""
        path = Path(self.env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        return json.loads(path.read_text())[user]

    def token(self, user: str) -> str:
        """A JWT for ``user`` from the simple auth manager's token endpoint."""
        response = httpx.post(f"{self.base_url}/auth/token", json={"username": user, "password": self.password(user)},
                              timeout=30)
        response.raise_for_status()
        return response.json()["access_token"]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def run_end_state(self, client: httpx.Client, run_id: str, timeout: float = 900) -> str:
        """``success`` or ``failed``: how avp_daily's run ``run_id`` ended, polled through ``client``."""
        def finished() -> str | None:
            try:
                state = client.get(f"/api/v2/dags/avp_daily/dagRuns/{run_id}").json()["state"]
            except httpx.TimeoutException:  # an API server busy behind a locked SQLite: ask again
                return None
            return state if state in ("success", "failed") else None

        return wait_for(finished, timeout, f"run {run_id}")

    def healthy(self) -> dict | None:
        try:
            health = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        return health if health.get("scheduler", {}).get("status") == "healthy" else None


@contextmanager
def standalone_airflow(tmp_path: Path, *, simulate: bool = True, **extra_env: str) -> Iterator[Standalone]:
    """Start `airflow standalone` for the avp_daily DAG with the tiny test settings (tests.dags.test_dag_run.TINY)
    in ``tmp_path``; ``simulate`` records the simulated fleet's logs first. Every visitor is admin unless
    ``extra_env`` sets AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False (then the simple auth manager's
    users log in; its generated passwords are in AIRFLOW_HOME)."""
    port = free_port()
    env = airflow_env(tmp_path, **{"AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
                                   "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                                   "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", **extra_env})
    if simulate:
        simulated = subprocess.run(["avp", "simulate"], env=env, cwd=REPO, capture_output=True, text=True,
                                   timeout=600)
        assert simulated.returncode == 0, simulated.stderr[-2000:]
    log_path = tmp_path / "standalone.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "airflow_standalone.sh")], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    airflow = Standalone(f"http://127.0.0.1:{port}", env, log_path, proc)
    try:
        wait_for(airflow.healthy, 240, "the API server and scheduler")
        yield airflow
    finally:
        # SIGINT to the group is what Ctrl-C sends (SIGTERM leaves workers behind); a task still running
        # has a process group of its own and is ended after it.
        stop_process_group(proc, signal.SIGINT, 60, whole_group=True)


def chromium_executable() -> str:
    """The system Chromium for Playwright; skips (fails under CI=true) when there is none."""
    path = os.environ.get("AVP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path and os.access(path, os.X_OK):
        return path
    message = "no Chromium: apt-get install chromium (scripts/install_servers.sh does it as root) or set AVP_CHROMIUM"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def chromium_page(screenshots: Path, viewport: tuple[int, int] = (1400, 900)) -> Iterator[Any]:
    """A Playwright page in headless system Chromium; ``screenshots`` is created for the test's captures."""
    from playwright.sync_api import sync_playwright

    screenshots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()
