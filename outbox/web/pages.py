"""What the console shows: login, the Outbox, Sent Items, one message (its HTML body apart,
sandboxed; its raw .eml), connectors and the audit."""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row
from starlette.responses import HTMLResponse, JSONResponse, Response

from outbox.admin import connectors, operations, report
from outbox.core.errors import NotFoundError, ValidationError
from outbox.core.message import Attachment, render_row
from outbox.store.sql import queries
from outbox.web import lists
from outbox.web.auth import CSP_SANDBOX
from outbox.web.console import Ctx, action, local_path, page
from outbox.web.users import authenticate

Q = queries("outbox.web")


@page(role=None)
def login_form(ctx: Ctx) -> Response:
    if ctx.user is not None:
        return ctx.redirect(local_path(ctx.request.query_params.get("next")))
    return ctx.render("login.html", next=local_path(ctx.request.query_params.get("next")), username="")


@action(role=None)
def login(ctx: Ctx) -> Response:
    assert ctx.form is not None
    name = str(ctx.form.get("username") or "").strip()
    password = str(ctx.form.get("password") or "")
    target = local_path(str(ctx.form.get("next") or ""))
    client = ctx.request.client.host if ctx.request.client else "?"
    key = (name.lower(), client)
    wait = ctx.console.throttle.wait_seconds(key)
    if wait > 0:
        text = f"Too many failed logins: try again in {int(wait) + 1} seconds."
        return ctx.render("login.html", status=429, next=target, username=name, problem=text)
    user = authenticate(ctx.conn, name, password) if name and password else None
    if user is None:
        ctx.console.throttle.failed(key)
        return ctx.render(
            "login.html", status=401, next=target, username=name, problem="Wrong user name or password."
        )
    ctx.console.throttle.succeeded(key)
    ctx.session.clear()
    ctx.session.update(ctx.console.sessions.new(user.name, user.fingerprint))
    return ctx.redirect(target)


@action(role="viewer")
def logout(ctx: Ctx) -> Response:
    ctx.session.clear()
    ctx.session.update(ctx.console.sessions.new("", ""))
    ctx.session.pop("user")
    return ctx.redirect("/login", "Logged out.")


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        raise ValidationError(f"{value!r} is not a number") from None


def _list(ctx: Ctx, listing: lists.Listing) -> Response:
    q = ctx.request.query_params
    flt = lists.Filter.from_form(q)
    problem = None
    try:
        result = lists.page(ctx.conn, listing, flt, before=_int(q.get("before")), after=_int(q.get("after")))
    except ValidationError as exc:
        ctx.conn.rollback()
        problem, result = str(exc), lists.Page([], None, None)
    return ctx.render(
        "list.html",
        listing=listing,
        flt=flt,
        page=result,
        counts=lists.counts(ctx.conn, listing),
        connector_names=[c.name for c in connectors.load_all(ctx.conn) if c.outbound],
        problem=problem,
        here=listing.path + (f"?{ctx.request.url.query}" if ctx.request.url.query else ""),
    )


@page()
def outbox_list(ctx: Ctx) -> Response:
    return _list(ctx, lists.OUTBOX)


@page()
def sent_list(ctx: Ctx) -> Response:
    return _list(ctx, lists.SENT)


@page()
def counts(ctx: Ctx) -> Response:
    """GET /counts?list=outbox|sent: the counts per status, for the list page to refresh."""
    listing = lists.LISTINGS.get(ctx.request.query_params.get("list", "outbox"), lists.OUTBOX)
    return JSONResponse(
        {c["status"]: {"n": c["n"], "capped": c["capped"]} for c in lists.counts(ctx.conn, listing)}
    )


def _message_id(ctx: Ctx) -> int:
    return int(ctx.request.path_params["id"])


def _bodies(ctx: Ctx, message_id: int) -> dict[str, Any]:
    with ctx.conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(Q["message_bodies"], {"id": message_id}).fetchone()
    if row is None:
        raise NotFoundError(f"no message with id {message_id}")
    return row


@page()
def message(ctx: Ctx) -> Response:
    m = report.show(ctx.conn, _message_id(ctx))
    bodies = _bodies(ctx, m["id"])
    with ctx.conn.cursor(row_factory=dict_row) as cur:
        attachments = cur.execute(Q["attachments_of_message"], {"id": m["id"]}).fetchall()
    return ctx.render(
        "message.html",
        m=m,
        bodies=bodies,
        attachments=attachments,
        replayable=operations.REPLAYABLE,
        cancellable=operations.CANCELLABLE,
    )


@page()
def message_html(ctx: Ctx) -> Response:
    """The HTML body alone, for the message page's sandboxed iframe: the CSP sandbox gives it
    an opaque origin with scripts, forms and plugins off, and it loads nothing remote."""
    html = _bodies(ctx, _message_id(ctx))["html_body"] or ""
    return HTMLResponse(
        html,
        headers={"content-security-policy": CSP_SANDBOX, "x-frame-options": "SAMEORIGIN"},
    )


@page()
def message_eml(ctx: Ctx) -> Response:
    """The message as it goes on the wire (bytes rendered at enqueue, or built from the row)."""
    m = report.show(ctx.conn, _message_id(ctx))
    bodies = _bodies(ctx, m["id"])
    data = bodies["content"]
    if data is None:
        with ctx.conn.cursor() as cur:
            parts = [
                Attachment(f, c, t) for f, t, c in cur.execute(Q["attachments_with_content"], {"id": m["id"]})
            ]
        data = render_row(m | bodies, parts, date=m["created_at"])
    return Response(
        bytes(data),
        media_type="message/rfc822",
        headers={"content-disposition": f'attachment; filename="message-{m["id"]}.eml"'},
    )


@page()
def connector_list(ctx: Ctx) -> Response:
    with ctx.conn.cursor(row_factory=dict_row) as cur:
        health = {r["connector"]: r for r in cur.execute(Q["connector_health"]).fetchall()}
    rows = []
    for c in connectors.load_all(ctx.conn):
        d = connectors.describe(c)
        d.pop("password")  # how it is kept is not for the console either
        rows.append(d | {"usage": health.get(c.name)})
    return ctx.render("connectors.html", connectors=rows, result=ctx.session.pop("probe", None))


@page()
def audit(ctx: Ctx) -> Response:
    before = _int(ctx.request.query_params.get("before"))
    with ctx.conn.cursor(row_factory=dict_row) as cur:
        actions = cur.execute(Q["operator_audit"], {"before": before, "limit": 101}).fetchall()
        events = cur.execute(Q["connector_events"], {"limit": 50}).fetchall() if before is None else []
    older = actions[99]["id"] if len(actions) > 100 else None
    return ctx.render("audit.html", actions=actions[:100], events=events, older=older)
