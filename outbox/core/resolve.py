"""Connector resolution: which connector sends a message, from its From address.

The rules follow the outbound-email behaviour of Enate, the case-management product whose
connector model outbox-worker adopts (README, "Connectors"):
1. the From address matches, case-insensitively, the primary address or an alias of an
   `outgoing`/`both` connector (`incoming` connectors never send);
2. a match on an enabled connector sends through it; a match on a disabled one holds the
   message (it never silently goes through another connector);
3. no match: the enabled System Default Gateway sends it;
4. no match and no enabled gateway: the message fails with a clear reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

OUTBOUND = ("outgoing", "both")


@dataclass(frozen=True)
class Connector:
    id: int
    name: str
    direction: str
    address: str
    aliases: tuple[str, ...]
    host: str | None
    port: int | None
    security: str
    username: str | None
    password_env: str | None
    password_enc: bytes | None
    ca_file: str | None
    enabled: bool
    is_default_gateway: bool
    # the most concurrent SMTP sessions across all workers (None: each process keeps up to
    # `worker.transport.SESSIONS_PER_PROCESS`, with no cap across processes)
    max_connections: int | None = None
    timeout_seconds: float = 60.0
    updated_at: datetime | None = None
    failures: int = 0
    backoff_until: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    # `password` or `oauth2` (AUTH XOAUTH2 with a client-credentials access token)
    auth: str = "password"
    oauth_client_id: str | None = None
    oauth_client_secret_env: str | None = None
    oauth_client_secret_enc: bytes | None = None
    oauth_tenant: str | None = None
    oauth_token_url: str | None = None
    oauth_scopes: tuple[str, ...] = ()
    # Provider limits: canonical `N/unit` strings, and caps per transaction/session
    rate_limits: tuple[str, ...] = ()
    max_recipients: int | None = None
    max_messages_per_connection: int | None = None
    # Adaptive slow-down after throttling replies (written by the workers; outbox/core/limits.py)
    throttle_interval_seconds: float | None = None
    throttled_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Connector:
        fields = cls.__dataclass_fields__
        values = {k: row[k] for k in fields if k in row}
        values["aliases"] = tuple(row.get("aliases") or ())
        values["oauth_scopes"] = tuple(row.get("oauth_scopes") or ())
        values["rate_limits"] = tuple(row.get("rate_limits") or ())
        for secret in ("password_enc", "oauth_client_secret_enc"):
            if values.get(secret) is not None:
                values[secret] = bytes(values[secret])
        return cls(**values)

    @property
    def transport_key(self) -> tuple[Any, ...]:
        """What an SMTP session depends on: a change means new connections."""
        return (
            self.host,
            self.port,
            self.security,
            self.username,
            self.password_env,
            self.password_enc,
            self.ca_file,
            self.auth,
            self.oauth_client_id,
            self.oauth_client_secret_env,
            self.oauth_client_secret_enc,
            self.oauth_tenant,
            self.oauth_token_url,
            self.oauth_scopes,
            self.max_connections,
            self.timeout_seconds,
            self.updated_at,
        )

    @property
    def outbound(self) -> bool:
        return self.direction in OUTBOUND

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(a.lower() for a in (self.address, *self.aliases))

    @property
    def has_credentials(self) -> bool:
        return self.username is not None


@dataclass(frozen=True)
class Route:
    action: Literal["send", "hold", "fail"]
    connector: Connector | None
    reason: str


def resolve(from_addr: str, connectors: Iterable[Connector]) -> Route:
    """Apply the rules above. Pure: the caller loads the connectors."""
    sender = from_addr.lower()
    outbound = [c for c in connectors if c.outbound]
    matches = [c for c in outbound if sender in c.addresses]
    for c in matches:
        if c.enabled:
            return Route("send", c, f"From matches connector {c.name}")
    if matches:
        c = matches[0]
        return Route("hold", c, f"connector {c.name} for {from_addr} is disabled")
    gateway = next((c for c in outbound if c.is_default_gateway), None)
    if gateway is None:
        return Route("fail", None, f"no connector for {from_addr} and no System Default Gateway")
    if not gateway.enabled:
        return Route(
            "fail",
            None,
            f"no connector for {from_addr} and the System Default Gateway {gateway.name} is disabled",
        )
    return Route("send", gateway, f"no connector for {from_addr}: System Default Gateway")
