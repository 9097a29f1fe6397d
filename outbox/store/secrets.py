"""Connector secrets (passwords and OAuth client secrets): never stored in plaintext.

Either a reference to an environment variable of the worker (`--password-env VAR`,
`--oauth-client-secret-env VAR`), or encrypted with Fernet under `$OUTBOX_SECRET_KEY`
(comma-separated keys; the first encrypts, all decrypt, so keys can be rotated).
"""

from __future__ import annotations

import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from outbox.core.errors import ConfigurationError
from outbox.core.resolve import Connector

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


def rotate(token: bytes, name: str, what: str = "password") -> bytes:
    """Re-encrypt under the first key of $OUTBOX_SECRET_KEY (any listed key may decrypt)."""
    try:
        return _fernet().rotate(token)
    except InvalidToken as exc:
        raise ConfigurationError(
            f"connector {name}: {what} cannot be decrypted with any key in ${KEY_ENV}"
        ) from exc


def _read(name: str, what: str, env: str | None, enc: bytes | None) -> str | None:
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigurationError(f"connector {name}: environment variable {env} is not set on this host")
        return value
    if enc is not None:
        try:
            return _fernet().decrypt(enc).decode()
        except InvalidToken as exc:
            raise ConfigurationError(f"connector {name}: {what} cannot be decrypted with ${KEY_ENV}") from exc
    return None


def password_for(connector: Connector) -> str | None:
    """The connector's password, read where it is needed (on the worker)."""
    return _read(connector.name, "password", connector.password_env, connector.password_enc)


def client_secret_for(connector: Connector) -> str | None:
    """The OAuth client secret of an `oauth2` connector, read where it is needed (on the worker)."""
    return _read(
        connector.name,
        "OAuth client secret",
        connector.oauth_client_secret_env,
        connector.oauth_client_secret_enc,
    )


def _kept(env: str | None, enc: bytes | None) -> str:
    if env:
        return f"env:{env}"
    return "encrypted" if enc is not None else "none"


def describe(connector: Connector) -> str:
    """How the password is kept, for listings (never the value)."""
    return _kept(connector.password_env, connector.password_enc)


def describe_client_secret(connector: Connector) -> str:
    """How the OAuth client secret is kept, for listings (never the value)."""
    return _kept(connector.oauth_client_secret_env, connector.oauth_client_secret_enc)
