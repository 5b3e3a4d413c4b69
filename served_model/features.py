"""Online features from Feast, as the arrays the ranker reads.

User features are read per request (they change with every basket the nightly job sees);
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
_CHUNK = 5000


class OnlineFeatures:
    """Reads of the Feast online store; every failure surfaces as :class:`FeaturesUnavailable`."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._user_refs = [f"{USER_VIEW}:{f}" for f in S.USER_FEATURES]
        self._item_refs = [f"{ITEM_VIEW}:{f}" for f in S.ITEM_FEATURES]

    def _read(
        self, refs: list[str], key: str, ids: list[str], names: tuple[str, ...]
    ) -> np.ndarray:
        try:
            out = self.store.get_online_features(
                features=refs, entity_rows=[{key: i} for i in ids]
            ).to_dict()
        except Exception as exc:  # Feast raises backend-specific errors (sqlite3, redis, ...)
            raise FeaturesUnavailable(f"{type(exc).__name__}: {exc}") from exc
        cols = [np.array([np.nan if v is None else v for v in out[n]], dtype=np.float32)
                for n in names]  # fmt: skip
        return np.stack(cols, axis=1) if cols else np.zeros((len(ids), 0), np.float32)

    def users(self, user_ids: list[str]) -> np.ndarray:
        """``(n, len(USER_FEATURES))``; a user with no online row is all NaN."""
        return self._read(self._user_refs, S.USER_ID, user_ids, S.USER_FEATURES)

    def items(self, item_ids: list[str]) -> np.ndarray:
        """``(n, len(ITEM_FEATURES))`` for the whole catalog, read in chunks; missing = NaN."""
        parts = [
            self._read(self._item_refs, S.ITEM_ID, item_ids[lo : lo + _CHUNK], S.ITEM_FEATURES)
            for lo in range(0, len(item_ids), _CHUNK)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(S.ITEM_FEATURES)), np.float32)


class FeaturesUnavailable(RuntimeError):
    """The online store could not be read (down, unreachable, or not materialized)."""
