"""OpenLineage (pipeline/lineage.py): the real DAG run by `airflow dags test` with the provider's file transport
emits one COMPLETE event per task, and the inputs and outputs of one run's events describe the same graph as
`avp registry lineage` of the package it built (refs, edges, content keys). No collector needs to exist."""

from __future__ import annotations

import json
import re

import pytest

from tests.dags.test_dag_run import airflow_env, dag_test, prepare, registry_for, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
REF = re.compile(r"\b(?:log|dataset|statistics|validation|model|metrics|package):[A-Za-z0-9._-]+@v\d+\b")


def test_a_runs_lineage_events_describe_the_registry_lineage(tmp_path):
    events_file = tmp_path / "openlineage.jsonl"
    transport = {"AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
        {"type": "file", "log_file_path": str(events_file), "append": True})}
    env = airflow_env(prepare(tmp_path, **transport), **transport)
    ok, log = dag_test(env, "2026-11-03")
    assert ok, log[-4000:]

    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    completes = {e["job"]["name"].split(".", 1)[1]: e for e in events
                 if e["eventType"] == "COMPLETE" and e["job"]["name"].startswith("avp_daily.")}
    assert {"ingest", "validate", "train", "evaluate", "serve"} <= set(completes), sorted(completes)
    assert len({e["run"]["facets"]["parent"]["run"]["runId"] for e in completes.values()}) == 1  # one DAG run
    outputs = {task: [o["name"] for o in e["outputs"]] for task, e in completes.items() if e["outputs"]}
    kinds = {task: [ref.split(":")[0] for ref in refs] for task, refs in outputs.items()}
    assert kinds == {"ingest": ["dataset"], "validate": ["validation"], "train": ["model"], "evaluate": ["metrics"],
                     "serve": ["package"]}
    edges = {(i["name"], o["name"]) for e in completes.values() for o in e["outputs"] for i in e["inputs"]}
    [package] = outputs["serve"]

    # the package's upstream in the events, walked edge by edge
    upstream, frontier = set(), {package}
    while frontier:
        frontier = {parent for parent, child in edges if child in frontier} - upstream
        upstream |= frontier

    # ... is what `avp registry lineage` prints, and every edge is a registry parent -> child edge
    printed = run({**env, "COLUMNS": "400"}, "avp", "registry", "lineage", package)
    assert printed.returncode == 0, printed.stderr
    assert set(REF.findall(printed.stdout)) - {package} == upstream
    registry = registry_for(env)
    assert all(a.ref in upstream for _depth, a in registry.lineage(package))
    for child in upstream | {package}:
        assert {p.ref for p in registry.parents(registry.get(child).id)} == {p for p, c in edges if c == child}, child
    # every dataset carries its content key and folder
    datasets = {d["name"]: d for e in completes.values() for d in e["inputs"] + e["outputs"]}
    for ref, d in datasets.items():
        art = registry.get(ref)
        assert d["namespace"] == f"avp+{registry.url}"
        assert d["facets"]["version"]["datasetVersion"] == art.content_key
        assert d["facets"]["symlinks"]["identifiers"][0]["name"] == art.location
