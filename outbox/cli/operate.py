"""outbox replay / cancel / send-now / prune: operator actions, audited."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
import psycopg

from outbox.admin import operations
from outbox.cli.base import EXIT_ERROR, cli, clip, emit, json_option, table, with_conn
from outbox.core.errors import OutboxError

# -- helpers -------------------------------------------------------------------------------

_VERBS = {
    "replay": ("replay", "replayed"),
    "cancel": ("cancel", "cancelled"),
    "send-now": ("send now", "made due now"),
}
_PREVIEW_LIMIT = 50


def _filter_options(statuses: tuple[str, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.argument("ids", nargs=-1, type=int),
            click.option(
                "--status",
                "statuses",
                multiple=True,
                type=click.Choice(statuses),
                help="Only messages in this status; repeat.",
            ),
            click.option("--connector", help="Only messages routed through this connector."),
            click.option("--from", "from_addr", help="Only messages from this address."),
            click.option(
                "--since",
                metavar="TIME",
                help="Last attempted (or created) at or after TIME: ISO 8601, or 2h / 3d ago.",
            ),
            click.option("--until", metavar="TIME", help="Last attempted (or created) before TIME."),
            click.option("--error-contains", metavar="TEXT", help="Last error contains TEXT (any case)."),
            click.option("--dry-run", is_flag=True, help="Print what would change; change nothing."),
            click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
            click.option("--actor", help="Who is doing this (default: the OS user); audited."),
            json_option,
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _selection(
    ids: tuple[int, ...],
    statuses: tuple[str, ...],
    connector: str | None,
    from_addr: str | None,
    since: str | None,
    until: str | None,
    error_contains: str | None,
) -> operations.Selection:
    return operations.Selection(
        ids=ids,
        statuses=statuses,
        connector=connector,
        from_addr=from_addr,
        since=operations.parse_time(since, "--since"),
        until=operations.parse_time(until, "--until"),
        error_contains=error_contains or None,
    )


def _rows_table(rows: list[dict[str, Any]]) -> str:
    shown = [
        {
            "id": r["id"],
            "status": r["status"],
            "connector": r["connector"],
            "from": r["from_addr"],
            "to": ", ".join(r["to_addrs"]),
            "subject": r["subject"] and clip(r["subject"], 40),
            "attempts": r["attempts"],
            "last_error": r["last_error"] and clip(r["last_error"], 60),
        }
        for r in rows[:_PREVIEW_LIMIT]
    ]
    text = table(shown, ["id", "status", "connector", "from", "to", "subject", "attempts", "last_error"])
    if len(rows) > _PREVIEW_LIMIT:
        text += f"\n... and {len(rows) - _PREVIEW_LIMIT} more"
    return text


def _skipped_lines(skipped: list[dict[str, Any]]) -> list[str]:
    return [f"skipped {s['id']} ({s['reason']})" for s in skipped]


def _render(data: dict[str, Any]) -> str:
    verb, done = _VERBS[data["action"]]
    lines = []
    if data["dry_run"]:
        if data["count"]:
            lines.append(f"would {verb} {data['count']} message(s):")
            lines.append(_rows_table(data["messages"]))
        else:
            lines.append(f"nothing to {verb}")
    elif data["count"]:
        lines.append(f"{done} {data['count']} message(s): {', '.join(map(str, data['ids']))}")
    else:
        lines.append(f"nothing to {verb}")
    lines += _skipped_lines(data["skipped"])
    return "\n".join(lines)


def _confirm(plan: operations.Plan, yes: bool, as_json: bool) -> None:
    """Ask before changing more than one message; without a terminal, refuse (use --yes)."""
    n = len(plan.rows)
    if yes or n <= 1:
        return
    verb = _VERBS[plan.action][0]
    if not sys.stdin.isatty():
        raise OutboxError(f"aborted: {n} messages would {verb}; confirm with --yes (no terminal to ask)")
    if not as_json:
        click.echo(_rows_table(plan.rows))
    click.confirm(f"{verb.capitalize()} these {n} messages?", abort=True, err=True)


def _run(
    conn: psycopg.Connection[Any],
    plan: operations.Plan,
    *,
    dry_run: bool,
    yes: bool,
    actor: str | None,
    as_json: bool,
) -> None:
    if not dry_run:
        _confirm(plan, yes, as_json)
    result = operations.apply(conn, plan, actor=actor, dry_run=dry_run).as_dict()
    emit(result, as_json, _render)
    if not dry_run and not result["count"] and result["skipped"]:
        # everything named was refused (e.g. `send-now` or `cancel` of a sent message): exit 1
        conn.commit()
        click.get_current_context().exit(EXIT_ERROR)


# -- commands ------------------------------------------------------------------------------


@cli.command("replay")
@_filter_options(operations.REPLAYABLE)
@click.option("--force", is_flag=True, help="Also replay messages already sent (everyone gets it again).")
@with_conn
def replay(
    conn: psycopg.Connection[Any],
    force: bool,
    dry_run: bool,
    yes: bool,
    actor: str | None,
    as_json: bool,
    **filters: Any,
) -> None:
    """Requeue failed or partial messages (by ID or filter) for a fresh round of retries.

    Keeps the Message-ID and the attempt history; recipients who accepted a partial message
    do not get it again. Without IDs or --status it takes failed and partial messages
    matching the filter. Asks before changing more than one message (--yes skips that).
    """
    plan = operations.plan_replay(conn, _selection(**filters), force=force)
    _run(conn, plan, dry_run=dry_run, yes=yes, actor=actor, as_json=as_json)


@cli.command("cancel")
@_filter_options(operations.CANCELLABLE)
@with_conn
def cancel(
    conn: psycopg.Connection[Any],
    dry_run: bool,
    yes: bool,
    actor: str | None,
    as_json: bool,
    **filters: Any,
) -> None:
    """Cancel messages not sent yet (by ID or filter): scheduled, waiting, pending retry, held.

    A message being sent at this moment is skipped (the server may already have it). Failed
    messages are cancelled only by ID or --status failed (that clears them from the Outbox
    view). Asks before changing more than one message (--yes skips that).
    """
    plan = operations.plan_cancel(conn, _selection(**filters))
    _run(conn, plan, dry_run=dry_run, yes=yes, actor=actor, as_json=as_json)


@cli.command("send-now")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--actor", help="Who is doing this (default: the OS user); audited.")
@json_option
@with_conn
def send_now(
    conn: psycopg.Connection[Any], ids: tuple[int, ...], dry_run: bool, actor: str | None, as_json: bool
) -> None:
    """Send scheduled messages (or ones pending a retry) now."""
    plan = operations.plan_send_now(conn, ids)
    _run(conn, plan, dry_run=dry_run, yes=True, actor=actor, as_json=as_json)
    for c in operations.backing_off(conn, plan):
        click.echo(
            f"warning: connector {c['name']} is backing off until {c['backoff_until'].isoformat()} "
            f"after: {c['last_error']}; its messages wait for it "
            f"(`outbox connector reset {c['name']}` ends the backoff once it is fixed)",
            err=True,
        )


@cli.command("prune")
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Finished (sent, partial, failed, cancelled) and unchanged for longer than AGE: 90d, 12h, 2w.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100000),
    default=1000,
    show_default=True,
    help="Messages deleted per transaction.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--actor", help="Who is doing this (default: the OS user); audited.")
@json_option
@with_conn
def prune(
    conn: psycopg.Connection[Any],
    older_than: str,
    batch_size: int,
    dry_run: bool,
    actor: str | None,
    as_json: bool,
) -> None:
    """Delete finished messages and their history (attempts, recipients, attachments)."""
    result = operations.prune(conn, older_than, batch_size=batch_size, actor=actor, dry_run=dry_run)

    def render(d: dict[str, Any]) -> str:
        what = (
            f"{d['messages']} message(s) ({d['attempts']} attempts, {d['recipients']} recipient "
            f"results, {d['attachments']} attachments) finished before {d['cutoff']}"
        )
        return f"would delete {what}" if d["dry_run"] else f"deleted {what}"

    emit(result.as_dict(), as_json, render)
