"""What the console changes: Replay, Cancel and Send now on one message, a selection or
everything matching a filter (through `outbox.operations`, audited with the user's name), and
a connector's Test connection, Reset backoff, Enable and Disable."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from outbox.admin import connectors, operations
from outbox.config import Config
from outbox.core.errors import ValidationError
from outbox.store.settings import load as load_settings
from outbox.web import lists
from outbox.web.console import Ctx, action, local_path

# action -> (button label, past tense)
VERBS = {
    "replay": ("Replay", "Replayed"),
    "cancel": ("Cancel", "Cancelled"),
    "send-now": ("Send now", "Made due now"),
}
_PREVIEW = 20


def _ids(values: list[Any]) -> list[int]:
    try:
        return sorted({int(v) for v in values}, reverse=True)
    except ValueError:
        raise ValidationError("message ids must be numbers") from None


def _plan(ctx: Ctx, verb: str, ids: list[int]) -> tuple[operations.Plan, bool]:
    """The plan for `ids`, and whether it sends something already sent again (replay only)."""
    sel = operations.Selection(ids=tuple(ids))
    if verb == "cancel":
        return operations.plan_cancel(ctx.conn, sel), False
    if verb == "send-now":
        return operations.plan_send_now(ctx.conn, ids), False
    forced = operations.plan_replay(ctx.conn, sel, force=True)
    if any(r["status"] == "sent" for r in forced.rows):
        return forced, True
    return operations.plan_replay(ctx.conn, sel), False


@action("operator")
def messages(ctx: Ctx) -> Response:
    """POST /actions: `action` (replay, cancel, send-now) on `ids` (scope `selected`) or on
    every message the filter fields match in list `list` (scope `filter`). More than one
    message, a filter or a second copy of a sent message asks for confirmation first."""
    assert ctx.form is not None
    form = ctx.form
    verb = str(form.get("action") or "")
    if verb not in VERBS:
        raise ValidationError("unknown action")
    back = local_path(str(form.get("return_to") or ""))
    listing = lists.LISTINGS.get(str(form.get("list") or "outbox"), lists.OUTBOX)
    scope = "filter" if form.get("scope") == "filter" else "selected"
    flt = lists.Filter.from_form(form)
    if scope == "filter":
        max_id = int(str(form["max_id"])) if form.get("max_id") else None
        ids = lists.matching_ids(ctx.conn, listing, flt, max_id=max_id)
    else:
        ids = _ids(form.getlist("ids"))
    label, done = VERBS[verb]
    if not ids:
        what = "No message matches this filter" if scope == "filter" else "Select at least one message"
        return ctx.redirect(back, f"{what}: nothing to {label.lower()}.", error=True)
    plan, resend = _plan(ctx, verb, ids)
    if form.get("confirmed") != "yes" and (scope == "filter" or len(ids) > 1 or resend):
        return ctx.render(
            "confirm.html",
            verb=verb,
            label=label,
            scope=scope,
            listing=listing,
            flt=flt,
            ids=ids,
            max_id=max(ids),
            plan=plan,
            preview=plan.rows[:_PREVIEW],
            resend=resend,
            back=back,
        )
    if scope == "filter":
        plan.options["filter"] = flt.given | {"list": listing.name}
    plan.options["via"] = "web console"
    result = operations.apply(ctx.conn, plan, actor=ctx.user.name if ctx.user else None)
    text = f"{done} {result.count} message(s)" + (
        f": {', '.join(map(str, result.ids[:20]))}" if result.count else ""
    )
    if len(result.ids) > 20:
        text += f" and {len(result.ids) - 20} more"
    if result.skipped:
        reasons = sorted({s["reason"] for s in result.skipped})
        text += f". Left alone {len(result.skipped)}: " + "; ".join(reasons[:3])
    return ctx.redirect(back, text + ".", error=not result.count)


def _connector(ctx: Ctx) -> str:
    return connectors.get(ctx.conn, str(ctx.request.path_params["name"])).name


@action("operator")
def connector_test(ctx: Ctx) -> Response:
    """Enate's Test connection: connect, secure, EHLO, AUTH, send nothing; a pass ends a backoff."""
    from worker.probe import probe

    c = connectors.get(ctx.conn, _connector(ctx))
    timeout = min(load_settings(ctx.conn).smtp_timeout_seconds, c.timeout_seconds)
    ctx.conn.commit()  # hold no transaction open while talking to the server
    result = probe(c, timeout=timeout, local_hostname=Config().local_hostname)
    text = f"Test connection {c.name}: {'passed' if result['ok'] else 'FAILED'}."
    if result["ok"]:
        ended = connectors.reset_backoff(
            ctx.conn, c.name, by="test", actor=ctx.user.name if ctx.user else None
        )
        if ended.reset:
            text += " " + ended.summary().capitalize() + "."
    ctx.session["probe"] = {"connector": c.name, "steps": result["steps"]}
    return ctx.redirect("/connectors", text, error=not result["ok"])


@action("operator")
def connector_reset(ctx: Ctx) -> Response:
    done = operations.reset_connector(ctx.conn, _connector(ctx), actor=ctx.user.name if ctx.user else None)
    if not done["reset"]:
        return ctx.redirect(
            "/connectors", f"{done['connector']} is healthy and no mail waits for it: nothing to reset."
        )
    ended = [
        *(["backoff ended"] if done["backoff_reset"] else []),
        *(["slow-down after throttling ended"] if done["slowdown_ended"] else []),
    ]
    return ctx.redirect(
        "/connectors",
        f"{done['connector']}: {' and '.join(ended)}; {done['count']} waiting message(s) due now.",
    )


def _set_enabled(ctx: Ctx, enabled: bool) -> Response:
    name = _connector(ctx)
    done = connectors.set_enabled(ctx.conn, name, enabled, actor=ctx.user.name if ctx.user else None)
    text = f"{name} {'enabled' if enabled else 'disabled'}"
    if enabled and done.released_held:
        text += f"; {done.released_held} held message(s) released"
    return ctx.redirect("/connectors", text + ".")


@action("admin")
def connector_enable(ctx: Ctx) -> Response:
    return _set_enabled(ctx, True)


@action("admin")
def connector_disable(ctx: Ctx) -> Response:
    return _set_enabled(ctx, False)
