"""Secrets ShopML reads itself (the user-id key, the events token): one rule for all of them.

A secret comes from its setting (the environment: in Kubernetes from an existing Secret),
else from its file setting (a mounted Secret), else from a default file under
``$SHOPML_HOME/secrets``. Only the embedded profile, and only at that default path, makes a
new random one there (mode 0600) on first use: in production a secret made on one pod would
not be the next pod's.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from shopml.config import Profile, Settings

MIN_CHARS = 32


def load_secret(
    settings: Settings,
    value: SecretStr | None,
    file: Path | None,
    default: Path,
    *,
    env: str,
    what: str,
    helm_value: str,
    error: type[Exception],
    hint: str = "",
) -> str:
    """The secret ``what`` (see the module doc for where it comes from); ``error`` when it is
    missing where it cannot be made, or shorter than ``MIN_CHARS``."""
    if value is not None:
        return _checked(value.get_secret_value(), env, what, error)
    path = file or default
    if path.exists():
        return _checked(path.read_text().strip(), str(path), what, error)
    if settings.profile is Profile.PRODUCTION or file is not None:
        raise error(
            f"no {what}: set {env} (in Kubernetes from an existing Secret: helm value "
            f"{helm_value}) or {env}_FILE to a file that exists (looked for {path}). {hint}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return _checked(path.read_text().strip(), str(path), what, error)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return _checked(path.read_text().strip(), str(path), what, error)


def _checked(secret: str, where: str, what: str, error: type[Exception]) -> str:
    if len(secret) < MIN_CHARS:
        raise error(
            f"the {what} from {where} has {len(secret)} characters; use at least "
            f"{MIN_CHARS} random ones (e.g. `openssl rand -hex 32`)"
        )
    return secret
