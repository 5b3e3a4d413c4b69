"""Run the suites with Great Expectations and turn failures into actionable errors.

A failing raw suite quarantines the offending ``event_date`` partitions (copied, never
deleted, with the GX result beside them) and raises :class:`ValidationFailed`, which fails the
Airflow task so the DAG stops before training and the champion stays. Data Docs HTML for
every run is written under ``SHOPML_HOME/gx``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shopml import schema as S
from shopml.config import Settings
from validation import behaviour, suites

if TYPE_CHECKING:
    import pandas as pd


class ValidationFailed(RuntimeError):
    """A suite failed; the message lists each failed expectation, its column and counts."""


@dataclass
class SuiteReport:
    suite: str
    success: bool
    failures: list[dict[str, Any]] = field(default_factory=list)
    bad_partitions: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"suite '{self.suite}': {'passed' if self.success else 'FAILED'}"]
        for f in self.failures:
            where = f" on column '{f['column']}'" if f.get("column") else ""
            lines.append(
                f"  - {f['expectation']}{where}: {f.get('unexpected_count', '?')} unexpected "
                f"({f.get('unexpected_percent', 0.0):.2f}% of rows) {f.get('detail', '')}".rstrip()
            )
        if self.bad_partitions:
            lines.append(f"  bad partitions: {', '.join(self.bad_partitions)}")
        return "\n".join(lines)


def _context(settings: Settings):
    """The file-backed GX project under SHOPML_HOME. Analytics stay off through
    ``GX_ANALYTICS_ENABLED=false``, set where processes start (scripts/env.sh, the image, the
    chart's profile ConfigMap), since GX reads it when it is imported."""
    import great_expectations as gx

    root = settings.paths.data_docs
    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    ctx.variables.progress_bars = {"globally": False}
    return ctx


def site_dir(settings: Settings) -> Path:
    """The Data Docs site (open ``index.html``)."""
    return settings.paths.data_docs / "gx" / "uncommitted" / "data_docs" / "local_site"


def validate_frame(
    settings: Settings,
    suite_name: str,
    expectations: list,
    df: pd.DataFrame,
    partition_column: str | None = None,
    *,
    ds: date | None = None,
    table: str | None = None,
) -> SuiteReport:
    """Validate ``df`` with a GX checkpoint (results stored, Data Docs updated).

    With ``partition_column``, failing rows are traced back to the partitions they came from.
    ``ds`` names the GX run (``nightly-<ds>``, as the MLflow run is named) and ``table`` is what
    Data Docs show as the data asset (the lake path that was read): GX's dataframe assets
    leave both empty (``__none__`` and ``None``), so nobody could tell which date a
    validation belongs to.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    from validation import data_docs

    ctx = _context(settings)
    source = ctx.data_sources.add_or_update_pandas("shopml")
    try:
        asset = source.get_asset(suite_name)
    except LookupError:
        asset = source.add_dataframe_asset(suite_name)
    try:
        batch_def = asset.get_batch_definition("whole")
    except KeyError:
        batch_def = asset.add_batch_definition_whole_dataframe("whole")
    suite = gx.ExpectationSuite(name=suite_name, expectations=expectations)
    suite = ctx.suites.add_or_update(suite)
    vd = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite_name, data=batch_def, suite=suite)
    )
    result_format: dict[str, Any] = {"result_format": "SUMMARY"}
    if partition_column:
        result_format = {
            "result_format": "COMPLETE",
            "unexpected_index_column_names": [partition_column],
        }
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=suite_name,
            validation_definitions=[vd],
            actions=[],  # Data Docs are built below, once the result names its table
            result_format=result_format,
        )
    )
    run_id = RunIdentifier(run_name=f"nightly-{ds.isoformat()}" if ds else None)
    result = checkpoint.run(batch_parameters={"dataframe": df}, run_id=run_id)
    for key, validation in result.run_results.items():
        validation.meta.setdefault("batch_spec", {})["data_asset_name"] = table or suite_name
        ctx.validation_results_store.set(key, validation)
    ctx.build_data_docs(resource_identifiers=list(result.run_results))
    data_docs.localize(site_dir(settings))
    report = SuiteReport(suite=suite_name, success=bool(result.success))
    bad: set[str] = set()
    for run in result.run_results.values():
        for r in run.results:
            if r.success:
                continue
            cfg = r.expectation_config
            res = r.result or {}
            failure = {
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column") or cfg.kwargs.get("column_list"),
                "unexpected_count": res.get("unexpected_count", res.get("observed_value")),
                "unexpected_percent": float(res.get("unexpected_percent") or 0.0),
                "detail": _detail(r),
            }
            report.failures.append(failure)
            if partition_column:
                bad.update(
                    str(row[partition_column])
                    for row in res.get("unexpected_index_list") or []
                    if isinstance(row, dict) and partition_column in row
                )
    report.bad_partitions = sorted(bad)
    return report


def _detail(r: Any) -> str:
    if r.exception_info and r.exception_info.get("raised_exception"):
        return f"(error: {r.exception_info.get('exception_message')})"
    if "observed_value" in (r.result or {}) and "unexpected_count" not in r.result:
        return f"(observed {r.result['observed_value']})"
    return ""


def _table(settings: Settings, path: Path) -> str:
    """A lake path as Data Docs show it: relative to SHOPML_HOME, e.g. lake/raw/events/ds=…"""
    return str(path.resolve().relative_to(settings.paths.home))


def _read_parquet(path: Path, **filters: Any) -> pd.DataFrame:
    import pyarrow.dataset as pads

    dataset = pads.dataset(str(path), format="parquet", partitioning="hive")
    expr = None
    for col, (op, value) in filters.items():
        term = pads.field(col) <= value if op == "<=" else pads.field(col) == value
        expr = term if expr is None else expr & term
    return dataset.to_table(filter=expr).to_pandas()


def _quarantine_partitions(settings: Settings, ds: date, report: SuiteReport) -> Path:
    """Copy bad raw partitions and the suite report to quarantine; the lake is untouched."""
    target = settings.paths.quarantine_for(ds)
    for part in report.bad_partitions:
        src = settings.paths.raw_events_for(ds) / f"{S.EVENT_DATE}={part}"
        if src.exists():
            shutil.copytree(src, target / "partitions" / src.name, dirs_exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{report.suite}.json").write_text(json.dumps(report.__dict__, indent=2, default=str))
    return target


def _raise_on_failure(settings: Settings, ds: date, reports: list[SuiteReport]) -> None:
    failed = [r for r in reports if not r.success]
    if not failed:
        return
    where = [str(_quarantine_partitions(settings, ds, r)) for r in failed][0]
    docs = site_dir(settings) / "index.html"
    raise ValidationFailed(
        "\n".join(r.summary() for r in failed)
        + f"\nQuarantined copies and reports: {where}\nData Docs: {docs}\n"
        "Fix or replace the source data, then rerun this date; nothing downstream ran."
    )


def partition_profile(events: pd.DataFrame) -> pd.DataFrame:
    """One row per ``event_date``: its row count and the share of each kind of bad value."""
    import pandas as pd

    by = events[S.EVENT_DATE]
    cols = {"rows": events.groupby(by).size()}
    for c in S.EVENT_REQUIRED:
        values = events[c] if c in events else pd.Series(None, index=events.index)
        cols[suites.null_share_column(c)] = values.isna().groupby(by).mean()
    unknown = ~events[S.EVENT_TYPE].isin(S.EVENT_TYPES) if S.EVENT_TYPE in events else by.isna()
    cols[suites.UNKNOWN_EVENT_TYPE_SHARE] = unknown.groupby(by).mean()
    return pd.DataFrame(cols).rename_axis(S.EVENT_DATE).reset_index()


def validate_raw(settings: Settings, ds: date) -> list[SuiteReport]:
    """The raw events landed on ``ds`` (event dates up to ``ds``) and the catalog snapshot."""
    paths = settings.paths
    events = _read_parquet(paths.raw_events_for(ds), **{S.EVENT_DATE: ("<=", ds.isoformat())})
    events[S.EVENT_DATE] = events[S.EVENT_DATE].astype(str)
    items = _read_parquet(paths.raw_items_for(ds))
    events_table, items_table = (
        _table(settings, paths.raw_events_for(ds)),
        _table(settings, paths.raw_items_for(ds)),
    )
    reports = [
        validate_frame(settings, "raw_events", suites.raw_events(), events, S.EVENT_DATE,
                       ds=ds, table=events_table),
        validate_frame(settings, "raw_event_partitions", suites.raw_event_partitions(),
                       partition_profile(events), S.EVENT_DATE, ds=ds,
                       table=f"{events_table} (per {S.EVENT_DATE})"),
        validate_frame(settings, "raw_items", suites.raw_items(), items, ds=ds,
                       table=items_table),
    ]  # fmt: skip
    cfg = settings.validation
    profile = behaviour.event_profile(events, items, cfg, behaviour.previous_profile(settings, ds))
    reports.append(
        validate_frame(settings, "raw_event_behaviour", behaviour.event_suite(cfg), profile,
                       S.EVENT_DATE, ds=ds, table=f"{events_table} (behaviour per day)")
    )  # fmt: skip
    _raise_on_failure(settings, ds, reports)
    behaviour.save_profile(settings, ds, median_rows=float(profile["rows"].median()))
    return reports


def validate_features(settings: Settings, ds: date) -> list[SuiteReport]:
    """The run's user and item feature snapshots."""
    root = settings.paths.features_for(ds)
    checks: list[tuple[str, Callable[[], list], Path]] = [
        ("user_features", suites.user_features, root / "user"),
        ("item_features", suites.item_features, root / "item"),
    ]
    previous = behaviour.previous_profile(settings, ds)
    events = _read_parquet(settings.paths.clean_events_for(ds))
    counts = {"user_features": (S.USER_ID, S.USER_N_EVENTS),
              "item_features": (S.ITEM_ID, S.ITEM_N_EVENTS)}  # fmt: skip
    reports, means = [], {}
    for name, make, path in checks:
        frame, table = _read_parquet(path), _table(settings, path)
        reports.append(validate_frame(settings, name, make(), frame, ds=ds, table=table))
        drift = behaviour.feature_drift(frame, previous, name)
        reports.append(
            validate_frame(settings, f"{name}_drift", behaviour.drift_suite(settings.validation),
                           drift, ds=ds, table=f"{table} (means against the previous run)")
        )  # fmt: skip
        means[name] = dict(zip(drift["feature"], drift["mean"], strict=True))
        leaks = behaviour.leakage(frame, events, *counts[name])
        reports.append(
            validate_frame(settings, f"{name}_point_in_time", behaviour.leakage_suite(), leaks,
                           ds=ds, table=f"{table} (counts against the events before valid-from)")
        )  # fmt: skip
    _raise_on_failure(settings, ds, reports)
    behaviour.save_profile(settings, ds, feature_means=means)
    return reports
