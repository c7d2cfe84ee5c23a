"""Content keys cover the code a stage runs and nothing else: ``provenance.code_closure`` follows a module's
project imports (function-level and relative ones too), and each stage declares what it loads by name.

Edits are made on copies of the repository's packages under ``tmp_path``, never on the real tree; each
edit gets its own copy (``code_version`` is cached per root).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import config, provenance

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "spark_jobs", "training", "evaluation", "serving")


def copy_repo(dest: Path) -> Path:
    """The repository's Python packages copied under ``dest`` (no caches)."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def stage_modules() -> dict[str, tuple[str, ...]]:
    """What each stage passes to ``Registry.build`` as its code (with the default config)."""
    from evaluation import entry as evaluate
    from serving import entry as serve
    from spark_jobs import ingest
    from training import entry as train

    cfg = config.load({}, env={})
    return {"ingest": ingest.code_modules(cfg), "train": train.code_modules(cfg),
            "evaluate": evaluate.code_modules(cfg.train.model), "serve": serve.code_modules(cfg.train.model)}


def version_after_edit(tmp_path: Path, stage: str, edited: str) -> tuple[str, str]:
    """(code version of ``stage`` on a copy of the repository, the same after appending a line to ``edited``)."""
    root = copy_repo(tmp_path / f"{stage}-{edited.replace('/', '_')}")
    modules = stage_modules()[stage]
    before = provenance.code_version(*modules, root=root)
    path = root / edited
    assert path.is_file(), edited
    path.write_text(path.read_text() + "\n# an edit\n")
    provenance.code_version.cache_clear()
    provenance.code_closure.cache_clear()
    return before, provenance.code_version(*modules, root=root)


@pytest.mark.parametrize("stage, edited, changes", [
    # ingest: the CLI, the GE suite and other importers are not its code; the Spark workers' row encoder is
    ("ingest", "pipeline/ui.py", False),
    ("ingest", "spark_jobs/expectations.py", False),
    ("ingest", "spark_jobs/simulator.py", False),
    ("ingest", "spark_jobs/sources/kitti.py", False),
    ("ingest", "spark_jobs/rows.py", True),
    ("ingest", "spark_jobs/sources/mcap_log.py", True),  # the importer, loaded by name
    # train: the trainer runs in the ranks it launches (python -m training.trainer), the model by discovery
    ("train", "evaluation/scoring.py", False),
    ("train", "spark_jobs/rows.py", False),
    ("train", "training/trainer.py", True),
    ("train", "training/models/bev_segnet.py", True),
    # evaluate
    ("evaluate", "serving/package.py", True),  # the variants' agreement with eager: package.compare_logits
    ("evaluate", "training/trainer.py", False),
    ("evaluate", "evaluation/hardware.py", True),
    ("evaluate", "training/models/bev_segnet.py", True),
    # serve
    ("serve", "serving/http.py", False),
    ("serve", "evaluation/report.py", False),
    ("serve", "serving/package.py", True),
    ("serve", "training/models/bev_segnet.py", True),
])
def test_a_stage_key_changes_only_with_the_code_it_runs(tmp_path, stage, edited, changes):
    before, after = version_after_edit(tmp_path, stage, edited)
    assert (before != after) is changes


def test_the_version_depends_on_relative_paths_and_bytes_not_on_where_the_repo_is(tmp_path):
    modules = stage_modules()["ingest"]
    copy = copy_repo(tmp_path / "copy")
    assert provenance.code_version(*modules, root=copy) == provenance.code_version(*modules)
    assert provenance.code_closure(modules, copy) == provenance.code_closure(modules)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_closure_follows_function_level_relative_and_submodule_imports(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/entry.py": "import json\n\ndef run():\n    from . import helper\n    return helper.x\n",
        "pkg/helper.py": "from .sub.deep import x\nfrom other import thing\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "import numpy\nfrom .. import leaf as _leaf\nx = 1\n",
        "pkg/leaf.py": "",
        "pkg/unused.py": "import pkg.entry\n",
        "other/__init__.py": "",
        "other/thing.py": "",
        "other/untouched.py": "",
        "script.py": "",  # a top-level module, not a package: never part of a closure
    })
    assert provenance.code_closure(("pkg.entry",), root) == (
        "other/__init__.py", "other/thing.py", "pkg/__init__.py", "pkg/entry.py", "pkg/helper.py", "pkg/leaf.py",
        "pkg/sub/__init__.py", "pkg/sub/deep.py")


def test_the_version_hashes_the_closure_in_path_order(tmp_path):
    import hashlib

    root = write_package(tmp_path, {"pkg/__init__.py": "import pkg.b\n", "pkg/b.py": "VALUE = 1\n"})
    digest = hashlib.sha256()
    for rel in ("pkg/__init__.py", "pkg/b.py"):
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    assert provenance.code_version("pkg", root=root) == digest.hexdigest()


def test_a_declared_module_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="spark_jobs.no_such_module"):
        provenance.code_version("spark_jobs.ingest", "spark_jobs.no_such_module")
