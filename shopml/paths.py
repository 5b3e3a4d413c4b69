"""Where each stage reads and writes, derived from one state directory and the run date.

Every output of a DAG run lives under a ``ds=YYYY-MM-DD`` partition of the logical date, so
rerunning a date overwrites that partition and never duplicates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path


def end_of_day(ds: date) -> datetime:
    """Exclusive upper bound of a logical date: the next midnight, UTC.

    Why one rule: cleaning drops events after it, Feast materializes up to it, and the
    training set's snapshots are valid from it; a second definition would let them disagree.
    """
    return datetime.combine(ds + timedelta(days=1), time.min, tzinfo=UTC)


def partition(base: Path, ds: date | str) -> Path:
    """``base/ds=YYYY-MM-DD``: the one spelling of a logical date's partition."""
    return base / f"ds={_iso(ds)}"


@dataclass(frozen=True)
class Paths:
    """The file layout of one ShopML state directory (``SHOPML_HOME``)."""

    home: Path

    # --- the lake -------------------------------------------------------------------------
    @property
    def lake(self) -> Path:
        return self.home / "lake"

    @property
    def raw_events(self) -> Path:
        """Landed events: one ``ds=`` snapshot per logical date, by ``event_date`` inside."""
        return self.lake / "raw" / "events"

    @property
    def raw_items(self) -> Path:
        return self.lake / "raw" / "items"

    @property
    def clean_events(self) -> Path:
        return self.lake / "clean" / "events"

    @property
    def clean_items(self) -> Path:
        return self.lake / "clean" / "items"

    @property
    def features(self) -> Path:
        return self.lake / "features"

    @property
    def user_features(self) -> Path:
        return self.features / "user"

    @property
    def item_features(self) -> Path:
        return self.features / "item"

    @property
    def recommendations(self) -> Path:
        """Precomputed top-k per user (``shopml batch-score``), by ``ds``, and ``latest``."""
        return self.lake / "recommendations"

    @property
    def quarantine(self) -> Path:
        return self.lake / "quarantine"

    # --- services' embedded state -----------------------------------------------------------
    @property
    def feast(self) -> Path:
        return self.home / "feast"

    @property
    def mlflow(self) -> Path:
        return self.home / "mlflow"

    @property
    def airflow(self) -> Path:
        return self.home / "airflow"

    @property
    def data_docs(self) -> Path:
        """Great Expectations project (suites, results and the Data Docs HTML site)."""
        return self.home / "gx"

    # --- one logical date's partitions ------------------------------------------------------
    def raw_events_for(self, ds: date | str) -> Path:
        """What ``land`` took from the source on ``ds`` (a rerun replaces only this)."""
        return partition(self.raw_events, ds)

    def raw_items_for(self, ds: date | str) -> Path:
        """The catalog snapshot landed on ``ds``."""
        return partition(self.raw_items, ds)

    def clean_events_for(self, ds: date | str) -> Path:
        return partition(self.clean_events, ds)

    def clean_items_for(self, ds: date | str) -> Path:
        return partition(self.clean_items, ds)

    def features_for(self, ds: date | str) -> Path:
        """The feature snapshot Feast's sources point at after ``feast apply`` for ``ds``."""
        return partition(self.features, ds)

    def recommendations_for(self, ds: date | str) -> Path:
        return partition(self.recommendations, ds)

    def run(self, ds: date | str) -> Path:
        """Scratch and outputs of the DAG run for logical date ``ds``."""
        return partition(self.home / "runs", ds)

    def quarantine_for(self, ds: date | str) -> Path:
        return partition(self.quarantine, ds)

    @property
    def profiles(self) -> Path:
        """What validation measured on each date that passed (the next run's reference)."""
        return self.lake / "profiles"

    def profile_for(self, ds: date | str) -> Path:
        return partition(self.profiles, ds)

    # --- search (dags/search_retrain.py) ----------------------------------------------------
    @property
    def search(self) -> Path:
        """The search pipeline's lake: ``corpus``, ``queries`` and ``pairs``, by ``ds``."""
        return self.lake / "search"

    def search_table_for(self, table: str, ds: date | str) -> Path:
        """``corpus`` (one row per product), ``queries`` (held-out titles with their split)
        or ``pairs`` (graded training pairs with hard negatives) of ``ds``."""
        return partition(self.search / table, ds)

    def search_run(self, ds: date | str) -> Path:
        """Scratch and outputs of the search DAG run of ``ds`` (models, bundle, evaluation)."""
        return partition(self.home / "search_runs", ds)

    def intraday_run(self, until: datetime) -> Path:
        """Scratch and outputs of the intraday update whose window ends at ``until`` (UTC)."""
        return self.home / "runs" / "intraday" / f"until={until.astimezone(UTC):%Y-%m-%dT%H%M%SZ}"

    # --- real-time events (shopml.stream, spark_jobs.streaming) ------------------------------
    @property
    def event_stream(self) -> Path:
        """The embedded profile's event stream: one JSON file per accepted batch."""
        return self.home / "stream" / "events"

    @property
    def stream_checkpoints(self) -> Path:
        """Spark Structured Streaming checkpoints, one directory per query."""
        return self.home / "stream" / "checkpoints"

    @property
    def streamed_events(self) -> Path:
        """Accepted events archived from the stream (Spark's exactly-once file sink, by
        ``event_date``): an input ``land`` reads beside the source."""
        return self.lake / "stream" / "events"

    @property
    def session_features(self) -> Path:
        """The session push source's offline copy (Feast ``session_push``'s batch source)."""
        return self.lake / "stream" / "session_features"


def _iso(ds: date | str) -> str:
    return ds if isinstance(ds, str) else ds.isoformat()
