"""Online features from Feast, as the arrays the ranker reads.

User features are read per request (they change with every basket the nightly job sees),
with the user's current session (pushed by the streaming job) in the same read;
item features of the whole catalog are read in bulk when a model version loads and again
every ``serving.item_feature_refresh_s`` (they are daily snapshots, and reading 200 items per
request would put 200 online-store keys on the hot path for values that change once a day).
Both come from the same Feast online store, SQLite embedded or Redis in production.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shopml import schema as S

USER_VIEW = "user_features"
ITEM_VIEW = "item_features"
SESSION_VIEW = "session_features"  # pushed by the streaming job (spark_jobs.streaming)
_CHUNK = 5000


class OnlineFeatures:
    """Reads of the Feast online store; every failure surfaces as :class:`FeaturesUnavailable`."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._user_refs = [f"{USER_VIEW}:{f}" for f in S.USER_FEATURES]
        self._item_refs = [f"{ITEM_VIEW}:{f}" for f in S.ITEM_FEATURES]
        self._session_refs = [
            f"{SESSION_VIEW}:{f}" for f in (S.SESSION_ITEMS, S.SESSION_LAST_EVENT_MS)
        ]
        self._has_sessions: bool | None = None  # whether the registry has the view (lazily)

    def _sessions_known(self) -> bool:
        """A registry applied before the session view existed has none: its users are read
        without sessions rather than failing every read."""
        if self._has_sessions is None:
            try:
                self.store.get_feature_view(SESSION_VIEW)
                self._has_sessions = True
            except Exception:  # FeatureViewNotFoundException, or a registry not reachable yet
                return False
        return self._has_sessions

    def _fetch(self, refs: list[str], key: str, ids: list[str]) -> dict[str, list]:
        """One online read; every failure is :class:`FeaturesUnavailable`."""
        try:
            return self.store.get_online_features(
                features=refs, entity_rows=[{key: i} for i in ids]
            ).to_dict()
        except Exception as exc:  # Feast raises backend-specific errors (sqlite3, redis, ...)
            raise FeaturesUnavailable(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _matrix(out: dict[str, list], names: tuple[str, ...], n: int) -> np.ndarray:
        """The ``names`` columns of a read as float32 ``(n, len(names))``, missing = NaN."""
        cols = [np.array([np.nan if v is None else v for v in out[c]], dtype=np.float32)
                for c in names]  # fmt: skip
        return np.stack(cols, axis=1) if cols else np.zeros((n, 0), np.float32)

    def _read(
        self, refs: list[str], key: str, ids: list[str], names: tuple[str, ...]
    ) -> np.ndarray:
        return self._matrix(self._fetch(refs, key, ids), names, len(ids))

    def users(self, user_ids: list[str]) -> np.ndarray:
        """``(n, len(USER_FEATURES))``; a user with no online row is all NaN."""
        return self._read(self._user_refs, S.USER_ID, user_ids, S.USER_FEATURES)

    def users_and_sessions(
        self, user_ids: list[str]
    ) -> tuple[np.ndarray, list[tuple[list[str], int] | None]]:
        """:meth:`users` and, in the same online read, each user's current session: its items
        (oldest first) and the epoch ms of its last event, or None (no session pushed)."""
        if not self._sessions_known():
            return self.users(user_ids), [None] * len(user_ids)
        out = self._fetch(self._user_refs + self._session_refs, S.USER_ID, user_ids)
        values = self._matrix(out, S.USER_FEATURES, len(user_ids))
        sessions = [
            (list(items), int(at)) if items and at is not None else None
            for items, at in zip(out[S.SESSION_ITEMS], out[S.SESSION_LAST_EVENT_MS], strict=True)
        ]
        return values, sessions

    def items(self, item_ids: list[str]) -> np.ndarray:
        """``(n, len(ITEM_FEATURES))`` for the whole catalog, read in chunks; missing = NaN."""
        parts = [
            self._read(self._item_refs, S.ITEM_ID, item_ids[lo : lo + _CHUNK], S.ITEM_FEATURES)
            for lo in range(0, len(item_ids), _CHUNK)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(S.ITEM_FEATURES)), np.float32)


class FeaturesUnavailable(RuntimeError):
    """The online store could not be read (down, unreachable, or not materialized)."""
