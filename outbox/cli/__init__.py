"""The `outbox` command line. Errors are one line on stderr and a non-zero exit code.

Commands live in one module per group; importing them registers them on `cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import psycopg

from outbox.cli import connector, operate, read, run, schema, send, settings, user, web  # noqa: F401
from outbox.cli.base import EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_USAGE, cli
from outbox.core.errors import ConflictError, OutboxError, ValidationError

__all__ = ["cli", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one-line errors, no tracebacks for a user's mistake. Exit codes: 0 done,
    1 refused (nothing to do, not found, not allowed now), 2 usage or a bad value (nothing
    written), 3 a service that cannot be reached."""
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None, prog_name="outbox", standalone_mode=False
        )
    except click.exceptions.Abort:
        _fail("aborted", EXIT_ERROR)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except ConflictError as exc:
        _fail(str(exc), EXIT_ERROR)
    except ValidationError as exc:
        _fail(str(exc), EXIT_USAGE)
    except OutboxError as exc:
        _fail(str(exc), EXIT_ERROR)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        _fail("the outbox schema is missing or older than this code: run `outbox db migrate`", EXIT_ERROR)
    except (psycopg.errors.CheckViolation, psycopg.errors.NotNullViolation) as exc:
        _fail(f"refused by the database: {exc.diag.message_primary}", EXIT_USAGE)
    except psycopg.errors.IntegrityError as exc:
        _fail(f"refused by the database: {exc.diag.message_primary}", EXIT_ERROR)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0]
        if "does not exist" in reason and "database" in reason:
            reason += " (create it first, e.g. `createdb NAME`, then run `outbox db init`)"
        _fail(f"cannot reach the database: {reason}", EXIT_UNAVAILABLE)
    else:
        if isinstance(code, int) and code:  # a command's ctx.exit(code)
            sys.exit(code)


def _fail(message: str, code: int) -> None:
    click.echo(f"outbox: error: {message}", err=True)
    sys.exit(code)
