"""Where each stage reads and writes, derived from one state directory and the run date.

Every output of a DAG run lives under a ``ds=YYYY-MM-DD`` partition of the logical date, so
rerunning a date overwrites that partition and never duplicates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path


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
        """Landed events, partitioned by ``event_date``."""
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

    # --- per-run outputs ----------------------------------------------------------------------
    def run(self, ds: date | str) -> Path:
        """Scratch and outputs of the DAG run for logical date ``ds``."""
        return self.home / "runs" / f"ds={_iso(ds)}"

    def quarantine_for(self, ds: date | str) -> Path:
        return self.quarantine / f"ds={_iso(ds)}"


def _iso(ds: date | str) -> str:
    return ds if isinstance(ds, str) else ds.isoformat()
