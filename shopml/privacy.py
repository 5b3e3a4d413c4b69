"""Pseudonymous user ids and the right to be forgotten.

Every user id that enters ShopML is replaced, at ``land``, by its keyed hash: HMAC-SHA256
with a secret key, as 64 hex characters. The lake, the features, Feast, the MLflow
artifacts and the logs only ever hold that pseudonym; serving accepts the retailer's raw id
and hashes it with the same key (:class:`Pseudonymizer`), so the two meet without the raw id
being stored. A keyed hash rather than a plain one: anyone can hash every plausible id (a
customer number is a small integer) and invert an unkeyed SHA-256; without the key they
cannot.

The key comes from ``SHOPML_PRIVACY__KEY`` (in Kubernetes, from an existing Secret: see
the chart's ``privacy`` values) or from the file ``privacy.key_file`` names. It is never a
value in git. The embedded profile, with neither set, generates a random key once in
``$SHOPML_HOME/secrets/user-id.key`` (mode 0600); the production profile refuses to start
without one, since a key generated on one pod would not be the key of the next.

Rotating the key changes every pseudonym: history landed under the old key no longer joins
the new one, so personal recommendations start again from nothing until the lake is landed
anew (a backfill of every date from the source) and the models retrained. README,
"Privacy", says how.

``forget`` removes a user's rows from every Parquet file of the lake (raw, clean,
quarantine, features, precomputed lists) and of the run directories, deletes their Feast
online rows, and records the pseudonym in ``privacy/forgotten.jsonl`` so that ``land``
drops them on every later run, reruns and backfills included.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from shopml import schema as S
from shopml.config import Settings
from shopml.secret import load_secret

KEY_ENV = "SHOPML_PRIVACY__KEY"


class MissingKey(RuntimeError):
    """No HMAC key is configured where one cannot be generated (production)."""


def key_path(settings: Settings) -> Path:
    return settings.privacy.key_file or settings.paths.home / "secrets" / "user-id.key"


def load_key(settings: Settings) -> bytes:
    """The HMAC key: the setting, else the key file, else (embedded only) a new random one
    (``shopml.secret``)."""
    return load_secret(
        settings, settings.privacy.key, settings.privacy.key_file, key_path(settings),
        env=KEY_ENV, what="key to pseudonymize user ids", helm_value="privacy.existingSecret",
        error=MissingKey, hint="Use the same key everywhere: the pipeline and serving must "
        "hash alike.",
    ).encode()  # fmt: skip


def pseudonym(key: bytes, raw_id: str | None) -> str | None:
    """HMAC-SHA256 of the id's UTF-8 bytes, hex. No id (None or empty) stays no id, so that
    cleaning still quarantines it as a missing key."""
    if raw_id is None or raw_id == "":
        return None
    return hmac.new(key, raw_id.encode(), hashlib.sha256).hexdigest()


class Pseudonymizer:
    """``pseudonym`` with the key bound and recent ids remembered (serving hashes every
    request's id; the same users come back)."""

    def __init__(self, key: bytes, cache: int = 65_536) -> None:
        self._one = lru_cache(maxsize=cache)(lambda raw: pseudonym(key, raw))

    def __call__(self, raw_id: str) -> str:
        return self._one(raw_id)

    @classmethod
    def of(cls, settings: Settings) -> Pseudonymizer:
        return cls(load_key(settings))


# --- the right to be forgotten ------------------------------------------------------------


def ledger_path(settings: Settings) -> Path:
    return settings.paths.home / "privacy" / "forgotten.jsonl"


def forgotten(settings: Settings) -> set[str]:
    """Pseudonyms of every user who asked to be forgotten (``land`` drops them)."""
    path = ledger_path(settings)
    if not path.exists():
        return set()
    return {json.loads(line)["user"] for line in path.read_text().splitlines() if line.strip()}


@dataclass
class Forgotten:
    user: str  # the pseudonym: the ledger never holds a raw id
    files_rewritten: int
    rows_removed: int
    online_rows_removed: int

    def summary(self) -> dict[str, object]:
        return {
            "user": self.user,
            "files_rewritten": self.files_rewritten,
            "rows_removed": self.rows_removed,
            "online_rows_removed": self.online_rows_removed,
        }


def forget(settings: Settings, raw_id: str) -> Forgotten:
    """Remove one user everywhere ShopML keeps their rows, and remember the request.

    The request is recorded first, so that a failure half-way (a full disk, Redis down) still
    leaves ``land`` dropping the user from then on, and a rerun of ``forget`` finishes the
    job (every step is idempotent). What this does not touch: registry versions already
    trained hold the pseudonym inside their weights and serving bundles until the next
    nightly run replaces the champion (README, "Privacy").
    """
    from shopml import feast_store

    user = pseudonym(load_key(settings), raw_id)
    if user is None:
        raise ValueError("forget: the user id is empty")
    path = ledger_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    if user not in forgotten(settings):
        with path.open("a") as f:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            f.write(json.dumps({"user": user, "requested_at": stamp}) + "\n")
    p = settings.paths
    files = rows = 0
    for root in (p.lake, p.home / "runs"):
        for file in sorted(root.rglob("*.parquet")) if root.exists() else []:
            removed = _drop_user(file, user)
            files, rows = files + bool(removed), rows + removed
    online = feast_store.delete_online_rows(settings, S.USER_ID, [user])
    return Forgotten(user, files, rows, online)


def _drop_user(file: Path, user: str) -> int:
    """Rewrite one Parquet file without the user's rows (atomically); the rows removed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if S.USER_ID not in pq.read_schema(file).names:
        return 0
    table = pq.read_table(file, partitioning=None)
    mine = pc.fill_null(pc.equal(table[S.USER_ID], user), False)
    removed = pc.sum(mine).as_py() or 0
    if removed:
        tmp = file.with_name(f".{file.name}.forget")
        pq.write_table(table.filter(pc.invert(mine)), tmp)
        os.replace(tmp, file)
        # Spark checks a Hadoop side file against the data: a stale one fails every read
        file.with_name(f".{file.name}.crc").unlink(missing_ok=True)
    return removed
