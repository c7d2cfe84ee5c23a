"""A real ``avp serve-http`` process for the tests: started on a free loopback port with its output in a
file (a pipe would fill up and block the server under load), its RSS readable, stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from pipeline.servers import free_port


class LiveServer:
    """``avp serve-http <target args> --set serve.K=V ...``; use as a context manager."""

    def __init__(self, env: dict, log_dir: Path, *target: str, **settings):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"serve-http-{self.port}.log"
        sets = [arg for key, value in settings.items() for arg in ("--set", f"serve.{key}={value}")]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(["avp", "serve-http", *target, "--port", str(self.port), *sets], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def wait_healthy(self, timeout_s: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                return httpx.get(self.base + "/healthz", timeout=2.0).json()
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"server not healthy after {timeout_s} s: {self.log()[-3000:]}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def rss_kib(self) -> int:
        """Resident set size of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS for the server")

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        return 0.0

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "LiveServer":
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def segment(base: str, points, client: httpx.Client | None = None, **params) -> httpx.Response:
    """POST one cloud as binary, asking for binary labels."""
    http = client or httpx
    return http.post(base + "/v1/segment", content=points.astype("<f4").tobytes(), timeout=120,
                     headers={"Content-Type": "application/octet-stream"}, params={"format": "binary", **params})


def one_thread_env(env: dict) -> dict:
    """``env`` with torch on one thread a process, so several servers and clients share the cores."""
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "AVP_SERVE__THREADS": "1", **{
        k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
