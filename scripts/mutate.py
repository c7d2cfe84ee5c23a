"""Mutation testing of the modules whose mistakes are silent (``make mutate``), one module at a time.

For each module mutmut 3 copies the packages into ``./mutants``, writes every mutant of that module into
the copy behind a trampoline, finds which of the module's fast tests (the list below, run with
``-m "not slow"``) reach each mutated function, and runs only those against each mutant. A mutant is
*killed* when a test fails, *survived* when they all pass. The score is killed / (killed + survived +
timeouts that were not kills + "no tests"), so a mutant no listed test reaches counts against the module.

The editable install puts the main checkout on the venv's path, after ``./mutants`` (mutmut inserts it
first and drops the repository root), so the tests import the mutated copy; ``PYTHONPATH`` is set to
``./mutants`` for the subprocesses the tests start (the registry's crash tests) so they do too. Every
package is copied, so no import falls through to the main checkout. mutmut's "forced fail" step then proves the
mutated code is what runs: it makes every trampoline raise and stops if the tests still pass.

Usage::

    python scripts/mutate.py                          # every module, one after the other
    python scripts/mutate.py spark_jobs/split.py      # one module
    python scripts/mutate.py --again spark_jobs/split.py   # only the mutants the last run did not kill,
                                                           # against today's tests (after adding some)
    MUTATE_JOBS=1 python scripts/mutate.py ...        # parallel mutants (default 2)

Each module's result goes to ``mutants-results/<module>.json`` (score, counts, the mutants not killed
and their changed lines) and one summary line per module to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "mutants-results"

# Module -> the fast tests that cover it (pytest arguments: files, then options such as -k). Keep each list to
# the tests that exercise the module directly: every mutant runs the subset of these that reaches the
# mutated function. A listed file that does not exist yet is left out.
MODULES: dict[str, list[str]] = {
    "spark_jobs/split.py": ["tests/spark_jobs/test_split.py", "tests/spark_jobs/test_split_rules.py"],
    "spark_jobs/quality.py": ["tests/spark_jobs/test_quality.py", "tests/spark_jobs/test_quality_rules.py"],
    "evaluation/blessing.py": ["tests/evaluation/test_blessing.py", "tests/evaluation/test_blessing_boundaries.py"],
    "evaluation/segmentation.py": ["tests/evaluation/test_segmentation.py",
                                   "tests/evaluation/test_segmentation_rules.py"],
    # test_config_bounds.py without its three CLI tests (subprocesses)
    "pipeline/config.py": ["tests/pipeline/test_config.py", "tests/pipeline/test_config_rules.py",
                           "tests/pipeline/test_config_bounds.py", "-k",
                           "not exit_2 and not writable_folder and not simulate_force"],
    # SQLite tests without worker processes, plus the two PostgreSQL tests of how a session is set up (its
    # idle timeout, reconnecting): the other PostgreSQL cases and the crash, concurrency, cross-host and CLI
    # tests start servers and processes (seconds each, for every mutant they reach); `make test` runs them.
    "pipeline/registry.py": ["tests/pipeline/test_registry.py", "tests/pipeline/test_registry_rules.py",
                             "tests/pipeline/test_registry_lease.py", "tests/pipeline/test_registry_lifecycle.py",
                             "-k", "(not postgresql or left_idle or reconnects) and not sigkilled "
                                   "and not two_processes and not another_host and not test_cli_"],
    # Only the tests that need no model: the others build and export a package in a session fixture, which
    # each mutant's fresh pytest run would repeat (minutes per mutant).
    "serving/package.py": ["tests/serving/test_package_rules.py", "tests/serving/test_package.py",
                           "-k", "escaping_member or with_a_link or not_a_package or rules"],
}

# Functions of a module left out of its score: what its fast tests cannot reach in reasonable time (their
# mutants have no tests and are listed as "not scored"). serving/package.py's scope is the manifest,
# verification and tarball; building a package (export, compile, timing) is tested by test_package.py's
# model fixtures, which each mutant's fresh pytest run would have to rebuild.
NOT_SCORED: dict[str, tuple[str, ...]] = {
    # package_int8 ships the int8 program evaluate compiled: its test (tests/serving/test_variants.py) compiles one
    "serving/package.py": ("build_package", "package_int8", "synthetic_scan", "_write_raw", "main"),
}

# mutmut exit codes (mutmut.stats.status_by_exit_code) grouped the way the score counts them.
KILLED = "killed"


def run_one(module: str, jobs: int, again: bool = False) -> dict:
    """Mutate ``module`` and run its tests against every mutant (in this process: mutmut keeps global state).
    With ``again``, keep the last run's results in ./mutants and rerun only the mutants it did not kill: tests
    only ever get added, so a mutant killed then is killed now."""
    os.chdir(REPO)
    names: tuple[str, ...] = ()
    if again:
        survivors = survivors_of_last_run(module)
        if survivors is None:
            print(f"mutate: no usable earlier run of {module} in ./mutants: every mutant runs")
        elif not survivors:
            return summarise(module, MODULES[module])
        else:
            names = survivors
    if not names:
        shutil.rmtree("mutants", ignore_errors=True)
    os.environ["PYTHONPATH"] = str(REPO / "mutants")  # for the subprocesses tests start; mutmut sets sys.path

    import mutmut.configuration as mutmut_config

    tests = [t for t in MODULES[module] if not t.endswith(".py") or (REPO / t).exists()]
    base = mutmut_config._load_config()
    mutmut_config._config = dataclasses.replace(base, only_mutate=[module], pytest_add_cli_args_test_selection=tests)

    from mutmut.__main__ import _run

    try:
        _run(names, jobs)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    return summarise(module, tests)


def survivors_of_last_run(module: str) -> tuple[str, ...] | None:
    """The mutants of ``module`` that the last run in ./mutants did not kill, or None when that run cannot be
    reused: ./mutants keeps only the module run last, and once the module changed its mutants are new ones
    (mutmut forgets the old results)."""
    copy = REPO / "mutants" / module
    if not copy.exists() or (REPO / module).stat().st_mtime > copy.stat().st_mtime:
        return None
    last = summarise(module, MODULES[module])
    if not last["counts"]:
        return None
    return tuple(name for names in last["not_killed"].values() for name in names)


def summarise(module: str, tests: list[str]) -> dict:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    data = SourceFileMutationData(path=Path(module))
    data.load()
    statuses: dict[str, list[str]] = {}
    prefix = module[:-3].replace("/", ".")
    left_out = tuple(f"{prefix}.x_{function}__mutmut_" for function in NOT_SCORED.get(module, ()))
    for name, code in sorted(data.exit_code_by_key.items()):
        statuses.setdefault("not scored" if name.startswith(left_out) else status_by_exit_code[code], []).append(name)
    counts = {status: len(names) for status, names in statuses.items()}
    tested = sum(counts.values()) - counts.get("skipped", 0) - counts.get("not scored", 0)
    killed = counts.get(KILLED, 0)
    not_killed = {status: names for status, names in statuses.items()
                  if status not in (KILLED, "skipped", "not scored")}
    return {
        "module": module, "tests": tests, "counts": counts, "tested": tested, "killed": killed,
        "score": round(100.0 * killed / tested, 1) if tested else None, "not_killed": not_killed,
        # the changed lines of each mutant not killed, for judging whether it is equivalent
        "diffs": {name: changed_lines(name, module)
                  for status, names in not_killed.items() if status != "no tests" for name in names},
    }


def changed_lines(name: str, module: str) -> list[str]:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    try:
        diff = get_diff_for_mutant(name, path=Path(module)).splitlines()
    except Exception as exc:  # a diff is a convenience: never lose the scores over it
        return [f"(no diff: {type(exc).__name__}: {exc})"]
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def write_result(module: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / (module.replace("/", ".") + ".json")).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--summary"]:  # the result of the last run in ./mutants again (e.g. after an interruption)
        write_result(argv[1], summarise(argv[1], MODULES[argv[1]]))
        return 0
    if argv[:1] in (["--one"], ["--one-again"]):
        jobs = int(os.environ.get("MUTATE_JOBS", "2"))
        write_result(argv[1], run_one(argv[1], jobs, again=argv[0] == "--one-again"))
        return 0
    again = argv[:1] == ["--again"]
    modules = argv[again:] or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"mutate: unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    lines, failed = [], False
    for module in modules:
        started = time.monotonic()
        done = subprocess.run([sys.executable, __file__, "--one-again" if again else "--one", module], cwd=REPO,
                              env=env)
        minutes = (time.monotonic() - started) / 60
        if done.returncode != 0:
            failed = True
            lines.append(f"{module}: mutmut failed (exit {done.returncode}) after {minutes:.1f} min")
            continue
        result = json.loads((RESULTS / (module.replace("/", ".") + ".json")).read_text())
        lines.append(f"{module}: {result['score']}% killed ({result['killed']}/{result['tested']}; "
                     f"{result['counts']}) in {minutes:.1f} min")
    print("\nmutation scores")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
