"""What every request handler shares: the console's state (database pool, sessions, login
throttle, templates) and the `page` / `action` wrappers that log the user in, check the role
and the CSRF token, and save the session."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import jinja2
import psycopg
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from outbox.core.errors import OutboxError
from outbox.web import users
from outbox.web.auth import LoginThrottle, Sessions, csrf_ok
from outbox.web.users import User

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("outbox.web", "templates"),
    autoescape=True,  # every value is HTML-escaped unless a template says otherwise (none does)
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


TEMPLATES.filters["when"] = _when


@dataclass
class Console:
    pool: ConnectionPool[psycopg.Connection[Any]]
    sessions: Sessions
    throttle: LoginThrottle = field(default_factory=LoginThrottle)


@dataclass
class Ctx:
    """One request: the form (POST), the user (None only on /login), the session."""

    request: Request
    console: Console
    conn: psycopg.Connection[Any]
    session: dict[str, Any]
    user: User | None
    form: FormData | None = None

    def render(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        flash = self.session.pop("flash", None)
        html = TEMPLATES.get_template(template).render(
            user=self.user, csrf=self.session["csrf"], flash=flash, path=self.request.url.path, **values
        )
        return HTMLResponse(html, status_code=status)

    def redirect(self, url: str, flash: str | None = None, error: bool = False) -> RedirectResponse:
        if flash:
            self.session["flash"] = {"text": flash, "error": error}
        return RedirectResponse(url, status_code=303)

    def error(self, status: int, text: str) -> HTMLResponse:
        return self.render("error.html", status=status, status_code=status, text=text)


def local_path(url: str | None, default: str = "/") -> str:
    """`url` when it is a path on this site (never another host: no open redirect)."""
    if url and url.startswith("/") and not url.startswith("//") and "\\" not in url:
        return url
    return default


def _current_user(conn: psycopg.Connection[Any], session: dict[str, Any]) -> User | None:
    name = session.get("user")
    if not isinstance(name, str):
        return None
    user = users.get(conn, name)
    if user is None or user.fingerprint != session.get("fp"):
        return None  # removed, or the password changed: the session is over
    return user


Handler = Callable[[Ctx], Response]


def _wrap(handler: Handler, *, role: str | None, post: bool) -> Callable[[Request], Awaitable[Response]]:
    """`role` None: the login page itself (no user needed)."""

    def run(request: Request, form: FormData | None) -> Response:
        console: Console = request.app.state.console
        session = console.sessions.load(request)
        with console.pool.connection() as conn:
            user = _current_user(conn, session)
            ctx = Ctx(request, console, conn, session, user, form)
            if role is not None and user is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response: Response = RedirectResponse(
                    "/login?" + urlencode({"next": target if not post else "/"}), status_code=303
                )
            elif post and not csrf_ok(session, form.get("csrf_token") if form is not None else None):
                response = ctx.error(
                    403, "The form was stale or forged (missing or wrong CSRF token): nothing was changed."
                )
            elif role is not None and user is not None and not user.can(role):
                response = ctx.error(
                    403, f"This needs the {role} role; you are {user.role}. Nothing was changed."
                )
            else:
                try:
                    response = handler(ctx)
                except OutboxError as exc:
                    conn.rollback()
                    status = 404 if isinstance(exc, LookupError) else 400
                    response = ctx.error(status, str(exc))
        console.sessions.save(request, response, session)
        return response

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        form = await request.form() if post else None
        return await run_in_threadpool(run, request, form)

    return endpoint


def page(role: str | None = "viewer") -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A GET handler for users with at least `role`; anyone else is sent to /login."""
    return lambda handler: _wrap(handler, role=role, post=False)


def action(role: str | None = "operator") -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A POST handler: a logged-in user with at least `role` and the session's CSRF token,
    or nothing happens (403)."""
    return lambda handler: _wrap(handler, role=role, post=True)
