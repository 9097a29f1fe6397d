"""Connector passwords: never stored in plaintext.

Either a reference to an environment variable of the worker (`--password-env VAR`), or
encrypted with Fernet under `$OUTBOX_SECRET_KEY` (comma-separated keys; the first encrypts,
all decrypt, so keys can be rotated).
"""

from __future__ import annotations

import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from outbox.errors import ConfigurationError
from outbox.resolve import Connector

KEY_ENV = "OUTBOX_SECRET_KEY"


def _fernet() -> MultiFernet:
    raw = os.environ.get(KEY_ENV, "")
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if not keys:
        raise ConfigurationError(
            f"${KEY_ENV} is not set: it is needed to store or read encrypted passwords "
            f"(make one with: python -c 'from cryptography.fernet import Fernet; "
            f"print(Fernet.generate_key().decode())')"
        )
    try:
        return MultiFernet([Fernet(k) for k in keys])
    except ValueError as exc:
        raise ConfigurationError(f"${KEY_ENV} holds an invalid Fernet key") from exc


def encrypt(password: str) -> bytes:
    return _fernet().encrypt(password.encode())


def rotate(token: bytes, name: str) -> bytes:
    """Re-encrypt under the first key of $OUTBOX_SECRET_KEY (any listed key may decrypt)."""
    try:
        return _fernet().rotate(token)
    except InvalidToken as exc:
        raise ConfigurationError(
            f"connector {name}: password cannot be decrypted with any key in ${KEY_ENV}"
        ) from exc


def password_for(connector: Connector) -> str | None:
    """The connector's password, read where it is needed (on the worker)."""
    if connector.password_env:
        value = os.environ.get(connector.password_env)
        if value is None:
            raise ConfigurationError(
                f"connector {connector.name}: environment variable "
                f"{connector.password_env} is not set on this host"
            )
        return value
    if connector.password_enc is not None:
        try:
            return _fernet().decrypt(connector.password_enc).decode()
        except InvalidToken as exc:
            raise ConfigurationError(
                f"connector {connector.name}: password cannot be decrypted with ${KEY_ENV}"
            ) from exc
    return None


def describe(connector: Connector) -> str:
    """How the password is kept, for listings (never the value)."""
    if connector.password_env:
        return f"env:{connector.password_env}"
    if connector.password_enc is not None:
        return "encrypted"
    return "none"
