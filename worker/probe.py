"""`outbox connector test`: Enate's Test Connection. Connects, secures, says EHLO and
authenticates exactly as a send would (an `oauth2` connector fetches its access token first),
then quits; sends no mail."""

from __future__ import annotations

import asyncio
from typing import Any

from outbox.core.connector_rules import effective_security
from outbox.core.resolve import Connector
from worker.transport import ConnectorPool

DONE = {
    "token": "access token received",
    "connect": "connected, greeting received",
    "ehlo": "EHLO accepted",
    "starttls": "TLS established",
    "auth": "authenticated",
}


def probe(connector: Connector, *, timeout: float, local_hostname: str) -> dict[str, Any]:
    return asyncio.run(_probe(connector, timeout=timeout, local_hostname=local_hostname))


async def _probe(connector: Connector, *, timeout: float, local_hostname: str) -> dict[str, Any]:
    pool = ConnectorPool(connector, local_hostname=local_hostname, timeout=timeout)
    steps: list[dict[str, Any]] = []
    current: list[str] = []

    def on_phase(phase: str) -> None:
        if current:
            steps.append({"step": current[-1], "ok": True, "detail": _done(connector, pool, current[-1])})
        current.append(phase)

    mode = effective_security(connector)
    try:
        client = await pool.open(on_phase)
    except Exception as exc:
        steps.append(
            {
                "step": current[-1] if current else "connect",
                "ok": False,
                "detail": f"{type(exc).__name__}: {exc}",
            }
        )
        return {"connector": connector.name, "ok": False, "security": mode, "steps": steps}
    on_phase("quit")
    tls = client.get_transport_info("sslcontext") is not None
    steps.append(
        {
            "step": "tls",
            "ok": tls or mode in ("none", "opportunistic"),
            "detail": "session encrypted" if tls else "session NOT encrypted",
        }
    )
    try:
        await client.quit()
    except Exception:
        client.close()
    ok = all(s["ok"] for s in steps)
    return {"connector": connector.name, "ok": ok, "security": mode, "steps": steps}


def _done(connector: Connector, pool: ConnectorPool, step: str) -> str:
    if connector.auth == "oauth2" and step == "token":
        return f"access token received from {pool.tokens.endpoint} (client {connector.oauth_client_id})"
    if connector.auth == "oauth2" and step == "auth":
        return f"authenticated with AUTH XOAUTH2 as {connector.username}"
    return DONE[step]
