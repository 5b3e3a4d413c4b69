"""The event stream as a Spark source, with Spark 4's Python Data Source API.

Spark cannot load a Kafka or Redis connector jar here (no Maven), so the source is written in
Python: ``spark.readStream.format("shopml_events")`` over the stream of ``shopml.stream``
(a Redis Stream in production, a directory of entries embedded). The offset is the id of
the last entry read (``{"entry": "<ms>-<seq>"}``), which Spark records in the query's
checkpoint: a restarted query resumes after it, so no entry is read twice or skipped.

``partitions`` and ``read`` run in Spark's Python workers, which get the stream's address
as options and open their own connection (``shopml.stream.open_stream``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition

from shopml import schema as S
from shopml.stream import START, open_stream

NAME = "shopml_events"
ENTRY_ID = "entry_id"
SCHEMA = (
    f"{ENTRY_ID} string, {S.USER_ID} string, {S.ITEM_ID} string, {S.EVENT_TYPE} string, "
    f"{S.TIMESTAMP} timestamp, {S.SESSION_ID} string, {S.QUERY} string"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class EntryRange(InputPartition):
    """The entries ``after < id <= upto``: one Spark task."""

    after: str
    upto: str


class EventStreamReader(DataSourceStreamReader):
    def __init__(self, options: dict[str, str]) -> None:
        self.options = dict(options)

    def initialOffset(self) -> dict[str, str]:
        return {"entry": START}

    def latestOffset(self, start: dict | None = None, limit: object = None) -> dict[str, str]:
        """The newest entry (Spark 4.2 passes the start and a read limit; all is read)."""
        return {"entry": open_stream(self.options).last_id() or START}

    def partitions(self, start: dict, end: dict) -> list[EntryRange]:
        if start["entry"] == end["entry"]:
            return []
        return [EntryRange(start["entry"], end["entry"])]

    def read(self, partition: EntryRange) -> Iterator[tuple]:
        stream = open_stream(self.options)
        for entry, events in stream.read(partition.after, partition.upto):
            for e in events:
                yield (
                    entry,
                    e[S.USER_ID],
                    e[S.ITEM_ID],
                    e[S.EVENT_TYPE],
                    _EPOCH + timedelta(microseconds=int(e[S.TIMESTAMP])),
                    e.get(S.SESSION_ID),
                    e.get(S.QUERY),
                )

    def commit(self, end: dict) -> None:
        """Nothing to release: entries stay until the lake holds them (``land`` archives
        them; trimming the Redis Stream is an operator's retention setting)."""


class EventStreamSource(DataSource):
    """``spark.readStream.format("shopml_events").options(**stream_options(settings))``."""

    @classmethod
    def name(cls) -> str:
        return NAME

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema: object) -> EventStreamReader:
        return EventStreamReader(self.options)


def register(spark) -> None:
    """Make ``format("shopml_events")`` known to this session (idempotent)."""
    spark.dataSource.register(EventStreamSource)
