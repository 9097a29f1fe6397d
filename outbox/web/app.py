"""The console's routes, and `serve` for `outbox web` (uvicorn)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from outbox.web import actions, pages
from outbox.web.auth import LoginThrottle, SecurityHeaders, Sessions

log = logging.getLogger("outbox.web")

ROUTES = [
    Route("/login", pages.login_form, methods=["GET"]),
    Route("/login", pages.login, methods=["POST"]),
    Route("/logout", pages.logout, methods=["POST"]),
    Route("/", pages.outbox_list, methods=["GET"]),
    Route("/sent", pages.sent_list, methods=["GET"]),
    Route("/counts", pages.counts, methods=["GET"]),
    Route("/messages/{id:int}", pages.message, methods=["GET"]),
    Route("/messages/{id:int}/html", pages.message_html, methods=["GET"]),
    Route("/messages/{id:int}/eml", pages.message_eml, methods=["GET"]),
    Route("/connectors", pages.connector_list, methods=["GET"]),
    Route("/audit", pages.audit, methods=["GET"]),
    Route("/actions", actions.messages, methods=["POST"]),
    Route("/connectors/{name}/test", actions.connector_test, methods=["POST"]),
    Route("/connectors/{name}/reset", actions.connector_reset, methods=["POST"]),
    Route("/connectors/{name}/enable", actions.connector_enable, methods=["POST"]),
    Route("/connectors/{name}/disable", actions.connector_disable, methods=["POST"]),
]


def secret_from_env() -> str:
    """$OUTBOX_WEB_SECRET, or a random one for this process (sessions end at a restart)."""
    secret = os.environ.get("OUTBOX_WEB_SECRET", "")
    if secret:
        return secret
    log.warning("OUTBOX_WEB_SECRET is not set: signing sessions with a secret made for this process")
    return secrets.token_urlsafe(32)


def create_app(
    database_url: str, *, secret: str | None = None, throttle: LoginThrottle | None = None, pool_size: int = 8
) -> Starlette:
    """The console as an ASGI app on `database_url` (its pool opens with the app's lifespan)."""
    from outbox.web.console import Console

    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        database_url,
        min_size=1,
        max_size=pool_size,
        kwargs={"autocommit": True, "application_name": "outbox-web"},
        open=False,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool.open(wait=True, timeout=10)
        try:
            yield
        finally:
            pool.close()

    static = StaticFiles(directory=str(resources.files("outbox.web").joinpath("static")))
    app = Starlette(
        routes=[*ROUTES, Mount("/static", static, name="static")],
        middleware=[Middleware(SecurityHeaders)],
        lifespan=lifespan,
    )
    app.state.console = Console(pool, Sessions(secret or secret_from_env()), throttle or LoginThrottle())
    return app


def serve(database_url: str, *, host: str, port: int) -> None:
    """`outbox web`: serve the console until interrupted."""
    import uvicorn

    with psycopg.connect(database_url, connect_timeout=10) as conn:
        # fails at once, on one line (the CLI's), when the database or the schema is missing
        if conn.execute("SELECT count(*) FROM outbox.web_user").fetchone() == (0,):
            log.warning("no users yet: add one with `outbox user add NAME --role admin --password-stdin`")
    app = create_app(database_url)
    uvicorn.run(
        app,
        host=host,
        port=port,
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        log_level="info",
        server_header=False,
    )
