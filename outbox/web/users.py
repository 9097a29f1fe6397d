"""Web console users: a name, a role and an argon2id password hash (argon2-cffi).

Roles are cumulative: `viewer` reads everything but secrets; `operator` also replays,
cancels, sends now and tests or resets connectors; `admin` also enables and disables them.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg.rows import dict_row

from outbox.core.errors import ConflictError, NotFoundError, ValidationError
from outbox.store.sql import queries

Q = queries("outbox.web")
ROLES = ("viewer", "operator", "admin")
MIN_PASSWORD_LENGTH = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HASHER = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters


@functools.cache
def _dummy_hash() -> str:
    """Verified when the name is unknown, so a wrong name costs as long as a wrong password.
    Made on first use: hashing takes ~0.2 s, which every `outbox` command paid at import."""
    return _HASHER.hash("not a password of anyone")


@dataclass(frozen=True)
class User:
    name: str
    role: str
    # Changes whenever the password does: a session made before a `passwd` ends with it.
    fingerprint: str

    def can(self, role: str) -> bool:
        """Whether this user has `role` or a stronger one."""
        return ROLES.index(self.role) >= ROLES.index(role)


def _fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValidationError(
            f"user name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}")
    return role


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def add(conn: psycopg.Connection[Any], name: str, role: str, password: str) -> None:
    """Create a user; a name taken already is an error."""
    params = {"name": check_name(name), "role": check_role(role), "password_hash": hash_password(password)}
    with conn.transaction():
        if conn.execute(Q["insert_user"], params).fetchone() is None:
            raise ConflictError(f"a user named {name!r} exists already")


def passwd(conn: psycopg.Connection[Any], name: str, password: str) -> None:
    """Replace a user's password; the user's open sessions end."""
    with conn.transaction():
        if (
            conn.execute(
                Q["set_user_password"], {"name": name, "password_hash": hash_password(password)}
            ).fetchone()
            is None
        ):
            raise NotFoundError(f"no user named {name!r}")


def remove(conn: psycopg.Connection[Any], name: str) -> None:
    """Delete a user; the user's open sessions end."""
    with conn.transaction():
        if conn.execute(Q["delete_user"], {"name": name}).fetchone() is None:
            raise NotFoundError(f"no user named {name!r}")


def list_all(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every user: name, role, created_at, updated_at (never the hash)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(Q["users"]).fetchall()


def get(conn: psycopg.Connection[Any], name: str) -> User | None:
    """The user as a session sees it, or None when there is no such user (any more)."""
    row = conn.execute(Q["user_by_name"], {"name": name}).fetchone()
    return User(row[0], row[1], _fingerprint(row[2])) if row else None


def authenticate(conn: psycopg.Connection[Any], name: str, password: str) -> User | None:
    """The user when `password` is theirs, else None (as slow for an unknown name). A hash
    made with older parameters is upgraded on the way."""
    row = conn.execute(Q["user_by_name"], {"name": name}).fetchone()
    try:
        _HASHER.verify(row[2] if row else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    stored = row[2]
    if _HASHER.check_needs_rehash(stored):
        stored = _HASHER.hash(password)
        with conn.transaction():
            conn.execute(Q["set_user_password"], {"name": row[0], "password_hash": stored})
    return User(row[0], row[1], _fingerprint(stored))


def describe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
