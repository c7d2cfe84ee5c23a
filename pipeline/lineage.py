"""OpenLineage for the DAG: every stage task reports the registry artifacts it read and wrote.

With apache-airflow-providers-openlineage configured (``AIRFLOW__OPENLINEAGE__TRANSPORT``, see
docs/airflow.md), Airflow emits a START and a COMPLETE (or FAIL) event per task. ``report`` adds the task's
artifacts to it: the artifact a stage published (or reused: a cache hit is the same artifact) is the output
dataset, its registry parents are the inputs, so the events of one DAG run describe the same graph as
``avp registry lineage``. A dataset is named by its artifact reference (``dataset:fleet-lidar@v3``) in the
namespace of the registry (``avp+<registry url>``), and carries its content key as the dataset version and
its folder as a symlink (``file`` namespace), for collectors that join on storage paths.

The provider's Python extractor, finding no inputs or outputs of its own, reads the task's inlets and outlets
(``ExtractorManager.extract_inlets_and_outlets``); ``report`` appends OpenLineage datasets to them while the
task runs (Airflow itself only acts on the ``Asset`` objects among them). Outside a running task (the CLI,
tests), or when the provider is not installed, it does nothing.
"""

from __future__ import annotations

from typing import Any

# The dataset namespace of every artifact: the registry it is recorded in.
NAMESPACE_PREFIX = "avp+"


def namespace(registry: Any) -> str:
    return NAMESPACE_PREFIX + registry.url


def dataset(registry: Any, art: Any) -> Any:
    """The OpenLineage dataset of one artifact: its reference, content key and location."""
    from openlineage.client.event_v2 import Dataset
    from openlineage.client.facet_v2 import dataset_version_dataset, symlinks_dataset

    facets: dict[str, Any] = {
        "version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=art.content_key)}
    if art.location:
        facets["symlinks"] = symlinks_dataset.SymlinksDatasetFacet(identifiers=[
            symlinks_dataset.Identifier(namespace="file", name=art.location, type="DIRECTORY")])
    return Dataset(namespace=namespace(registry), name=art.ref, facets=facets)


def report(cfg: Any, ref: str | None) -> bool:
    """Make artifact ``ref`` (and its parents) the running task's OpenLineage output (and inputs); True if it did."""
    from pipeline.registry import Registry

    if not ref:
        return False
    try:
        from airflow.sdk import get_current_context

        context = get_current_context()
        import openlineage.client  # noqa: F401  (the provider's client; absent: no lineage to report)
    except Exception:  # not inside a running Airflow task, or no OpenLineage: nothing to report to
        return False
    registry = Registry.open(cfg)
    art = registry.get(ref)
    task = context["task"]
    task.inlets = [*task.inlets, *(dataset(registry, parent) for parent in registry.parents(art.id))]
    task.outlets = [*task.outlets, dataset(registry, art)]
    return True
