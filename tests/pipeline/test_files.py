"""Atomic writes: the target holds the old content or the complete new one, never a part."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.files import TEMPORARY, atomic_file, atomic_path, atomic_write_json


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    with atomic_file(str(target)) as fh:
        fh.write(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(str(target)) as fh:
            fh.write(b"second, half written")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"first"
    assert os.listdir(target.parent) == ["data.bin"]  # the temporary file was removed


def test_atomic_path_for_path_writers_and_json(tmp_path):
    target = tmp_path / "table.txt"
    with atomic_path(str(target), durable=False) as tmp:
        assert TEMPORARY.match(os.path.basename(tmp)) and int(TEMPORARY.match(os.path.basename(tmp)).group(1)) == os.getpid()
        assert not target.exists()
        with open(tmp, "w") as fh:
            fh.write("rows")
    assert target.read_text() == "rows"
    atomic_write_json(str(tmp_path / "m.json"), {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": 1}


def test_a_killed_writer_leaves_no_partial_target(tmp_path):
    target = tmp_path / "big.bin"
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.files import atomic_file
        with atomic_file({str(target)!r}) as fh:
            fh.write(b"x" * 1000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and int(TEMPORARY.match(leftovers[0]).group(1)) == proc.pid
