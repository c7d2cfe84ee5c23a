"""``avp serve-http`` refuses to start when the packaged example no longer gives the packaged answer on this
host: a package whose checksums are all consistent (the manifest rewritten after the change, and no registry
record to compare with because it is served by path) but whose expected logits are wrong must fail the
startup self-check with exit 2 and the file named, instead of serving."""

from __future__ import annotations

import os
import subprocess

import numpy as np

from pipeline.servers import free_port
from serving.package import EXPECTED_LOGITS, verify_package, write_manifest


def test_serve_http_refuses_a_consistent_package_whose_example_disagrees(package_copy, avp_env):
    path = os.path.join(package_copy, EXPECTED_LOGITS)
    logits = np.fromfile(path, dtype="<f4")
    (-logits).astype("<f4").tofile(path)  # every point's class changes; the file keeps its size
    write_manifest(package_copy)
    verify_package(package_copy)  # the checksums alone cannot see it
    out = subprocess.run(["avp", "serve-http", "--package", package_copy, "--port", str(free_port())],
                         env=avp_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{EXPECTED_LOGITS}: the torchscript runtime on this host gives logits" in out.stderr
    assert "serving " not in out.stdout  # it never got as far as binding the port
