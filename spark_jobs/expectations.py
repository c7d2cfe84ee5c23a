"""The validation suite as code: Great Expectations (1.x) expectations over tables built from statistics.

The dataset itself is far too big for pandas, so the Spark pass (``spark_jobs.dataset_stats``) reduces it to
counts, and this module turns those counts into a few small DataFrames (``build_tables``) and runs real
GE validations over them (``run_suite``): GE does the checking and renders the Data Docs, we only
prepare the tables and put the verdicts into words.

Every expectation is a ``Check``: a stable ``name`` (what the gate, the tests and the report refer to),
the table it runs on, a one-line title, and a ``describe`` function that turns one failing row into a
sentence (or an ``explain`` function for an aggregate expectation). The suite is whatever is registered:
functions decorated ``@suite_tables`` make the tables, functions decorated ``@suite_checks`` the checks
over them, both from one ``SuiteInputs``. The built-in checks are:

==========================  ===============  ==========================================================
name                        table            expectation
==========================  ===============  ==========================================================
class_ids_in_taxonomy       class_ids        point labels and box classes are taxonomy ids (0..7)
required_classes_present    class_presence   every required class has at least ``min_class_points``
class_shares_within_bounds  class_shares     each class's share of points in [min, max]_class_share
no_missing_values           missing_values   no frame has a null or undecodable value, in any column
no_non_finite_values        non_finite       no NaN/inf in the ``finite_columns``
split_shares                split_shares     log share of train/test/val within ``split_tolerance``
                                             of the shares the dataset was built with (75/15/10)
frames_per_log              logs             frames per log in [min, max]_frames_per_log
log_in_one_split            logs             no log appears in two splits (no leakage)
manifest_logs_present       logs             every log the manifest lists has frames in the files
class_share_drift           class_drift      L-infinity: no class share moved more than
                                             ``max_linf_drift`` against the previous version
                                             (whole dataset, and per city: see ``city_drift_plan``)
class_kl_drift              class_samples    KL(current || previous) of the class distribution at
                                             most ``max_kl_drift`` (whole dataset, and per city)
==========================  ===============  ==========================================================

The two drift checks need the previous validated version of the dataset; without one they are skipped
(``build_checks`` leaves them out and the caller says so).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from pipeline.contracts import Manifest
from pipeline.taxonomy import CLASSES, NUM_CLASSES
from spark_jobs import dataset_stats as stats_mod
from spark_jobs.sources.registry import labelled_classes
from spark_jobs.split import SPLITS

# The KL check compares categorical distributions; GE computes them from a column of values, so each
# scope's distribution is written out as this many rows (largest-remainder rounding, error <= 1/2 row:
# 5e-5 of share, far below any useful threshold).
KL_SAMPLE_ROWS = 10_000
SCOPE_ALL = "all"


def scope_words(scope: str) -> str:
    """``all`` -> ``the whole dataset``, ``city:boston`` -> ``city boston``."""
    return "the whole dataset" if scope == SCOPE_ALL else scope.replace(":", " ", 1)


def class_name(class_id: int) -> str:
    return CLASSES[class_id] if 0 <= class_id < NUM_CLASSES else f"unknown-{class_id}"


@dataclass
class Check:
    """One expectation of the suite, with the words around it."""

    name: str
    table: str
    title: str
    expectation: Any  # a great_expectations.expectations.Expectation
    describe: Callable[[dict[str, Any]], str] | None = None  # a failing row -> a sentence
    # an aggregate expectation (no failing rows): GE's observed value -> (what to record, problems if it failed)
    explain: Callable[[Any], tuple[Any, list[str]]] | None = None
    scope: str = ""  # drift checks: the part of the dataset compared ("all", "city:<name>")
    key: str = ""  # unique within the suite; set by build_checks


@dataclass
class CheckResult:
    """The outcome of one check, JSON-ready."""

    name: str
    key: str
    table: str
    title: str
    success: bool
    observed: Any = None
    problems: list[str] = field(default_factory=list)  # one sentence per failing row

    def line(self) -> str:
        """One line for the stage's failure message: ``name: what is wrong``."""
        detail = "; ".join(self.problems[:5]) + (f"; ... {len(self.problems) - 5} more" if len(self.problems) > 5 else "")
        return f"{self.name}: {detail or self.title}"


@dataclass(frozen=True)
class SuiteInputs:
    """What every part of the suite is built from: one dataset version's statistics and manifest, the
    previous validated version's statistics (None: the first version, no drift checks), the thresholds
    (``ValidateConfig``) and the split shares the dataset was built with."""

    statistics: dict
    manifest: Manifest
    previous: dict | None
    vcfg: Any
    target_shares: dict[str, float]


# The suite is the ordered list of registered builders: table builders make the small DataFrames, check
# builders the expectations over them. Adding an expectation is one decorated function (see
# docs/architecture.md, "Add an expectation"); the order of registration is the order of the report.
TableBuilder = Callable[[SuiteInputs], dict[str, pd.DataFrame]]
CheckBuilder = Callable[[SuiteInputs], list[Check]]
TABLE_BUILDERS: list[TableBuilder] = []
CHECK_BUILDERS: list[CheckBuilder] = []


def suite_tables(builder: TableBuilder) -> TableBuilder:
    """Register a function that adds tables (``{name: DataFrame}``, each with a ``key`` column) to the suite."""
    TABLE_BUILDERS.append(builder)
    return builder


def suite_checks(builder: CheckBuilder) -> CheckBuilder:
    """Register a function that adds checks (expectations over the suite's tables) to the suite."""
    CHECK_BUILDERS.append(builder)
    return builder


# ----------------------------------------------------------------------------------------- config
def required_classes(setting: str, source: str) -> list[str]:
    """``validate.required_classes``: ``all`` (every class the dataset's source can label, from its label
    map: KITTI object labels no ground) or comma-separated class names."""
    if setting.strip().lower() == "all":
        return labelled_classes(source)
    names = [n.strip() for n in setting.split(",") if n.strip()]
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        from pipeline.errors import UserError

        raise UserError(f"config field validate.required_classes: unknown class(es) {', '.join(unknown)}; "
                        f"classes are {', '.join(CLASSES)}")
    return names


def finite_columns(setting: str) -> list[str]:
    """``validate.finite_columns``: comma-separated column names that must hold no NaN/inf."""
    from spark_jobs.schema import FrameSchema

    names = [n.strip() for n in setting.split(",") if n.strip()]
    unknown = [n for n in names if n not in FrameSchema.fields]
    if unknown:
        from pipeline.errors import UserError

        raise UserError(f"config field validate.finite_columns: unknown column(s) {', '.join(unknown)}; "
                        f"columns are {', '.join(FrameSchema.fields)}")
    return names


# ----------------------------------------------------------------------------------------- tables
def shares(counts: dict[int, int]) -> dict[int, float]:
    """Point share per taxonomy class (ids outside the taxonomy are not part of a distribution)."""
    inside = {c: n for c, n in counts.items() if 0 <= c < NUM_CLASSES}
    total = sum(inside.values())
    return {c: (inside.get(c, 0) / total if total else 0.0) for c in range(NUM_CLASSES)}


def apportion(weights: dict[str, float], rows: int) -> dict[str, int]:
    """Split ``rows`` over ``weights`` (summing to 1) by largest remainder: counts that sum to ``rows``."""
    exact = {k: w * rows for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = rows - sum(counts.values())
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:max(0, left)]:
        counts[k] += 1
    return counts


def city_drift_plan(current: dict, previous: dict, vcfg) -> tuple[list[str], dict[str, str]]:
    """(cities compared on their own, {city: why not}) for the per-city drift checks.

    A city is compared only when it has ``drift_min_city_logs`` logs in both versions: the log (one street
    scene) is the unit of variation, and with two or three scenes a city's class shares move by several
    points between clean versions by chance alone.
    """
    if not vcfg.drift_by_city:
        return [], {}
    now, before = stats_mod.logs_per_city(current), stats_mod.logs_per_city(previous)
    compared, skipped = [], {}
    for city in sorted(set(now) | set(before)):
        if city not in now or city not in before:
            skipped[city] = "not in both versions"
        elif min(now[city], before[city]) < vcfg.drift_min_city_logs:
            skipped[city] = (f"{before[city]} -> {now[city]} logs, fewer than "
                             f"validate.drift_min_city_logs={vcfg.drift_min_city_logs}")
        else:
            compared.append(city)
    return compared, skipped


def drift_scopes(current: dict, previous: dict, vcfg) -> dict[str, tuple[dict[int, float], dict[int, float]]]:
    """``{scope: (previous shares, current shares)}`` for the whole dataset and each compared city."""
    scopes = {SCOPE_ALL: (stats_mod.total_class_points(previous), stats_mod.total_class_points(current))}
    for city in city_drift_plan(current, previous, vcfg)[0]:
        scopes[f"city:{city}"] = (stats_mod.total_class_points(previous, city),
                                  stats_mod.total_class_points(current, city))
    out = {}
    for scope, (before, after) in scopes.items():
        if sum(v for c, v in before.items() if 0 <= c < NUM_CLASSES) and \
                sum(v for c, v in after.items() if 0 <= c < NUM_CLASSES):
            out[scope] = (shares(before), shares(after))
    return out


def build_tables(inputs: SuiteInputs) -> dict[str, pd.DataFrame]:
    """The small DataFrames the suite runs on, one per subject, from every registered table builder."""
    tables: dict[str, pd.DataFrame] = {}
    for builder in TABLE_BUILDERS:
        made = builder(inputs)
        clash = sorted(set(made) & set(tables))
        if clash:
            raise ValueError(f"suite table(s) {', '.join(clash)} built twice (second time by {builder.__name__})")
        tables.update(made)
    return tables


@suite_tables
def dataset_tables(inputs: SuiteInputs) -> dict[str, pd.DataFrame]:
    """One table per subject of one dataset version, each with a readable ``key`` column (shown in the
    Data Docs next to failing rows and used to find the row again for the sentence)."""
    statistics, vcfg = inputs.statistics, inputs.vcfg
    splits = statistics["splits"]
    columns = list(next(iter(splits.values()))["missing"]) if splits else []
    if not columns:
        from spark_jobs.schema import FrameSchema

        columns = list(FrameSchema.fields)

    class_ids = [
        {"key": f"{source}/{split}/{class_id}", "source": source, "split": split, "class_id": class_id,
         "class_name": class_name(class_id), "count": n}
        for split, s in splits.items()
        for source, counter in (("points", s["class_points"]), ("boxes", s["box_classes"]))
        for class_id, n in stats_mod.class_points_of(counter).items() if n > 0
    ]
    totals = stats_mod.total_class_points(statistics)
    all_points = sum(totals.values())
    labelled = labelled_classes(inputs.manifest.source)  # a class the source cannot label has no bounds
    class_shares = [{"key": class_name(c), "class_id": c, "class_name": class_name(c), "points": totals.get(c, 0),
                     "share": totals.get(c, 0) / all_points if all_points else 0.0}
                    for c in range(NUM_CLASSES) if class_name(c) in labelled]
    presence = [{"key": name, "class_name": name, "points": totals.get(CLASSES.index(name), 0)}
                for name in required_classes(vcfg.required_classes, inputs.manifest.source)]
    present_splits = [split for split in SPLITS if splits[split]["frames"]]
    missing = [{"key": f"{split}/{col}", "split": split, "column": col,
                "frames_with_missing_values": splits[split]["missing"].get(col, 0)}
               for split in present_splits for col in columns]
    non_finite = [{"key": f"{split}/{col}", "split": split, "column": col,
                   "frames_with_non_finite_values": splits[split]["non_finite"].get(col, 0)}
                  for split in present_splits for col in finite_columns(vcfg.finite_columns)]
    logs = [{"key": f"{split}/{log_id}", "split": split, "log_id": log_id, "city": log["city"],
             "frames": log["frames"]}
            for split, s in splits.items() for log_id, log in s["logs"].items()]
    log_counts = {split: len(splits[split]["logs"]) for split in SPLITS}
    total_logs = sum(log_counts.values())
    split_row = {"key": "dataset", "logs": total_logs}
    for split in SPLITS:
        split_row[f"{split}_logs"] = log_counts[split]
        split_row[f"{split}_log_share"] = log_counts[split] / total_logs if total_logs else 0.0

    return {
        "class_ids": pd.DataFrame(class_ids, columns=["key", "source", "split", "class_id", "class_name", "count"]),
        "class_presence": pd.DataFrame(presence, columns=["key", "class_name", "points"]),
        "class_shares": pd.DataFrame(class_shares, columns=["key", "class_id", "class_name", "points", "share"]),
        "missing_values": pd.DataFrame(missing, columns=["key", "split", "column", "frames_with_missing_values"]),
        "non_finite": pd.DataFrame(non_finite, columns=["key", "split", "column", "frames_with_non_finite_values"]),
        "split_shares": pd.DataFrame([split_row]),
        "logs": pd.DataFrame(logs, columns=["key", "split", "log_id", "city", "frames"]),
    }


@suite_tables
def drift_tables(inputs: SuiteInputs) -> dict[str, pd.DataFrame]:
    """Class shares before and after per scope (whole dataset, compared cities); none for a first version."""
    if inputs.previous is None:
        return {}
    statistics, previous, vcfg = inputs.statistics, inputs.previous, inputs.vcfg
    drift, samples = [], []
    for scope, (before, after) in drift_scopes(statistics, previous, vcfg).items():
        for c in range(NUM_CLASSES):
            drift.append({"key": f"{scope}/{class_name(c)}", "scope": scope, "class_name": class_name(c),
                          "previous_share": before[c], "current_share": after[c],
                          "abs_change": abs(after[c] - before[c])})
        rows = apportion({class_name(c): after[c] for c in range(NUM_CLASSES)}, KL_SAMPLE_ROWS)
        samples.append(pd.DataFrame({"key": scope, "scope": scope,
                                     "class_name": [n for n, k in rows.items() for _ in range(k)]}))
    return {
        "class_drift": pd.DataFrame(drift, columns=["key", "scope", "class_name", "previous_share",
                                                    "current_share", "abs_change"]),
        "class_samples": (pd.concat(samples, ignore_index=True) if samples
                          else pd.DataFrame(columns=["key", "scope", "class_name"])),
    }


# ----------------------------------------------------------------------------------------- checks
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def build_checks(inputs: SuiteInputs) -> list[Check]:
    """The suite for one dataset, from every registered check builder, each check keyed by its position."""
    checks = [check for builder in CHECK_BUILDERS for check in builder(inputs)]
    for i, check in enumerate(checks):
        check.key = f"{i:02d}-{check.name}"
        check.expectation.meta = {"check": check.name, "key": check.key, "notes": check.title}
    return checks


@suite_checks
def content_checks(inputs: SuiteInputs) -> list[Check]:
    """What the frames hold: taxonomy ids, required classes, class shares, missing and non-finite values."""
    import great_expectations.expectations as gxe

    vcfg = inputs.vcfg
    return [
        Check("class_ids_in_taxonomy", "class_ids",
              f"point labels and box class ids are taxonomy ids 0..{NUM_CLASSES - 1}",
              gxe.ExpectColumnValuesToBeInSet(column="class_id", value_set=list(range(NUM_CLASSES))),
              lambda r: f"class id {r['class_id']} ({r['count']} {r['source']} in {r['split']}) is outside "
                        f"the taxonomy 0..{NUM_CLASSES - 1}"),
        Check("required_classes_present", "class_presence",
              f"every required class has at least {vcfg.min_class_points} labelled point(s)",
              gxe.ExpectColumnValuesToBeBetween(column="points", min_value=vcfg.min_class_points),
              lambda r: f"class {r['class_name']} is missing: {r['points']} points "
                        f"(at least {vcfg.min_class_points} required)"),
        Check("class_shares_within_bounds", "class_shares",
              f"each class's share of points is within [{_pct(vcfg.min_class_share)}, {_pct(vcfg.max_class_share)}]",
              gxe.ExpectColumnValuesToBeBetween(column="share", min_value=vcfg.min_class_share,
                                                max_value=vcfg.max_class_share),
              lambda r: f"{r['class_name']} share {_pct(r['share'])} is outside "
                        f"[{_pct(vcfg.min_class_share)}, {_pct(vcfg.max_class_share)}]"),
        Check("no_missing_values", "missing_values",
              "no frame has a null or undecodable value in any column",
              gxe.ExpectColumnValuesToBeBetween(column="frames_with_missing_values", min_value=0, max_value=0),
              lambda r: f"{r['frames_with_missing_values']} frame(s) in {r['split']} have a missing {r['column']}"),
        Check("no_non_finite_values", "non_finite",
              f"no NaN or infinite values in {vcfg.finite_columns.replace(',', ', ')}",
              gxe.ExpectColumnValuesToBeBetween(column="frames_with_non_finite_values", min_value=0, max_value=0),
              lambda r: f"{r['frames_with_non_finite_values']} frame(s) in {r['split']} have NaN/inf "
                        f"values in {r['column']}"),
    ]


@suite_checks
def split_checks(inputs: SuiteInputs) -> list[Check]:
    """Each split holds the share of logs the dataset was built with."""
    import great_expectations.expectations as gxe

    vcfg, checks = inputs.vcfg, []
    # Whole logs go to a split, so n logs cannot meet a share closer than 1/n: a small import (a real
    # dataset of a few logs) is allowed one log either way when that is wider than split_tolerance.
    logs = sum(len(s["logs"]) for s in inputs.statistics["splits"].values())
    tolerance = max(vcfg.split_tolerance, 1.0 / logs if logs else 0.0)
    for split in SPLITS:
        target = inputs.target_shares.get(split, 0.0)
        lo, hi = max(0.0, target - tolerance), min(1.0, target + tolerance)
        checks.append(Check(
            "split_shares", "split_shares",
            f"{split} holds {_pct(target)} +- {_pct(tolerance)} of the logs",
            gxe.ExpectColumnValuesToBeBetween(column=f"{split}_log_share", min_value=lo, max_value=hi),
            lambda r, split=split, target=target: (
                f"{split} has {r[f'{split}_logs']} of {r['logs']} logs ({_pct(r[f'{split}_log_share'])}), "
                f"target {_pct(target)} +- {_pct(tolerance)}")))
    return checks


@suite_checks
def log_checks(inputs: SuiteInputs) -> list[Check]:
    """Per log: frame counts, no leakage between splits, and every manifest log present in the files."""
    import great_expectations.expectations as gxe

    vcfg = inputs.vcfg
    checks = [
        Check("frames_per_log", "logs",
              f"every log has {vcfg.min_frames_per_log}..{vcfg.max_frames_per_log} frames",
              gxe.ExpectColumnValuesToBeBetween(column="frames", min_value=vcfg.min_frames_per_log,
                                                max_value=vcfg.max_frames_per_log),
              lambda r: f"log {r['log_id']} ({r['split']}) has {r['frames']} frames, outside "
                        f"{vcfg.min_frames_per_log}..{vcfg.max_frames_per_log}"),
        Check("log_in_one_split", "logs", "no log has frames in two splits (no train/test leakage)",
              gxe.ExpectColumnValuesToBeUnique(column="log_id"),
              lambda r: f"log {r['log_id']} has frames in {r['split']} and another split"),
    ]
    manifest_logs = sorted(inputs.manifest.logs)
    if manifest_logs:
        # GE 1.x reports no observed value for this expectation (only a partial list of what is missing), so
        # the logs seen come from the statistics the table is built from.
        seen = {log for stats in inputs.statistics["splits"].values() for log in stats["logs"]}

        def explain(_observed: Any) -> tuple[Any, list[str]]:
            missing = sorted(set(manifest_logs) - seen)
            return ({"logs": len(seen)},
                    [f"{len(missing)} log(s) listed in the manifest have no frames: {', '.join(missing[:10])}"])

        checks.append(Check("manifest_logs_present", "logs", "every log the manifest lists has frames in the files",
                            gxe.ExpectColumnDistinctValuesToContainSet(column="log_id", value_set=manifest_logs),
                            explain=explain))
    return checks


@suite_checks
def drift_checks(inputs: SuiteInputs) -> list[Check]:
    """Class distribution against the previous validated version: L-infinity of shares and KL divergence,
    over the whole dataset and per compared city. None for a first version."""
    if inputs.previous is None:
        return []
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    vcfg = inputs.vcfg
    checks = [Check(
        "class_share_drift", "class_drift",
        f"no class share moved by more than {_pct(vcfg.max_linf_drift)} against the previous version "
        f"(L-infinity, whole dataset{' and per city' if vcfg.drift_by_city else ''})",
        gxe.ExpectColumnValuesToBeBetween(column="abs_change", min_value=0, max_value=vcfg.max_linf_drift),
        lambda r: f"{r['class_name']} share {_moved(r)} in {scope_words(r['scope'])} "
                  f"(moved {100 * r['abs_change']:.1f} points, more than {100 * vcfg.max_linf_drift:.1f})")]
    for scope, (before, _after) in drift_scopes(inputs.statistics, inputs.previous, vcfg).items():
        partition = {class_name(c): w for c, w in before.items() if w > 0}
        norm = sum(partition.values())

        def explain(observed: Any, scope: str = scope) -> tuple[Any, list[str]]:
            # None means infinite: a class appeared that the previous version lacked
            value = "infinite" if observed is None else f"{observed:.3f}"
            return observed, [f"KL divergence of the class distribution in {scope_words(scope)} is {value}, "
                              f"more than {vcfg.max_kl_drift}"]

        checks.append(Check(
            "class_kl_drift", "class_samples",
            f"KL(current || previous) of the class distribution in {scope_words(scope)} is at most {vcfg.max_kl_drift}",
            gxe.ExpectColumnKLDivergenceToBeLessThan(
                column="class_name", row_condition=(Column("scope") == scope),
                partition_object={"values": list(partition), "weights": [w / norm for w in partition.values()]},
                threshold=vcfg.max_kl_drift, tail_weight_holdout=vcfg.kl_tail_weight_holdout),
            explain=explain, scope=scope))
    return checks


def _moved(row: dict[str, Any]) -> str:
    before, after = float(row["previous_share"]), float(row["current_share"])
    return f"{'rose' if after > before else 'fell'} from {_pct(before)} to {_pct(after)}"


# ----------------------------------------------------------------------------------------- running
def _context(docs_dir: str):
    """An ephemeral GE context (in-memory stores, no analytics, no progress bars) whose Data Docs site
    is written to ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # never phone home from a pipeline stage
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={"validation": {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_suite(tables: dict[str, pd.DataFrame], checks: list[Check], docs_dir: str,
              run_name: str) -> list[CheckResult]:
    """Validate every table against its checks with GE, build the Data Docs into ``docs_dir``, and return
    one ``CheckResult`` per check (in the order of ``checks``)."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("statistics")
    run_id = RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.timezone.utc))
    by_key = {c.key: c for c in checks}
    results: dict[str, CheckResult] = {}
    for table, df in tables.items():
        mine = [c for c in checks if c.table == table]
        if not mine:
            continue
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole table")
        suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=[c.expectation for c in mine]))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = definition.run(batch_parameters={"dataframe": df}, run_id=run_id, result_format={
                "result_format": "COMPLETE", "unexpected_index_column_names": ["key"]})
        rows = {str(k): r for k, r in zip(df["key"], df.to_dict("records"))}
        for result in outcome.results:
            check = by_key[result.expectation_config.meta["key"]]
            results[check.key] = _interpret(check, result, rows)
    context.build_data_docs()
    return [results[c.key] for c in checks if c.key in results]


def _interpret(check: Check, result, rows: dict[str, dict]) -> CheckResult:
    """A GE result in words: which rows failed and why, or what was observed."""
    info = result.exception_info or {}
    raised = info.get("raised_exception") if isinstance(info, dict) else False
    body = result.result or {}
    out = CheckResult(check.name, check.key, check.table, check.title, bool(result.success))
    if raised:
        out.success = False
        out.problems.append(f"could not be evaluated: {info.get('exception_message')}")
        return out
    if "unexpected_index_list" in body:
        keys = [str(item["key"]) if isinstance(item, dict) else str(item) for item in body["unexpected_index_list"]]
        out.observed = {"unexpected": body.get("unexpected_count", len(keys)), "rows": body.get("element_count")}
        if not out.success:
            for key in dict.fromkeys(keys):
                row = rows.get(key)
                out.problems.append(check.describe(row) if (check.describe and row) else f"{key} is unexpected")
        return out
    observed = body.get("observed_value")
    if check.explain:
        out.observed, problems = check.explain(observed)
    else:
        out.observed, problems = observed, [f"observed {observed}"]
    if not out.success:
        out.problems.extend(problems)
    return out
