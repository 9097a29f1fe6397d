"""django-post-office, run the way its docs say: emails queued in its table, then
`manage.py send_queued_mail` (its defaults: 5 threads per process, batches of 100) sending
through Django's SMTP backend to the benchmark's sink.

This module runs inside its own virtualenv (bench/.venv-django: Django + django-post-office +
psycopg), never the project's:

    python -m bench.django_po prepare --db NAME --n N     # migrate, queue N emails
    python -m bench.django_po send --db NAME --port P     # send_queued_mail until done

The harness (bench/run.py) creates and drops the database and times `send` from process
start until the last email is `sent` in the table.
"""

from __future__ import annotations

import argparse
import sys

import django
from django.conf import settings

from bench.common import FROM_ADDR, body, subject, to_addr

THREADS = 5
BATCH = 100


def configure(args: argparse.Namespace) -> None:
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        SECRET_KEY="bench-only",
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": args.db,
                "HOST": args.pg_host,
                "PORT": args.pg_port,
                "USER": args.pg_user,
            }
        },
        INSTALLED_APPS=["post_office"],
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=args.port,
        EMAIL_TIMEOUT=30,
        DEFAULT_FROM_EMAIL=FROM_ADDR,
        POST_OFFICE={
            "BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"},
            "THREADS_PER_PROCESS": THREADS,
            "BATCH_SIZE": BATCH,
        },
    )
    django.setup()


def prepare(n: int) -> None:
    from django.core.management import call_command
    from post_office.models import PRIORITY, STATUS, Email

    call_command("migrate", verbosity=0, interactive=False)
    emails = [
        Email(
            from_email=FROM_ADDR,
            to=[to_addr(i)],
            subject=subject(i),
            message=body(i),
            status=STATUS.queued,
            priority=PRIORITY.medium,
        )
        for i in range(1, n + 1)
    ]
    Email.objects.bulk_create(emails, batch_size=1000)


def send(lockfile: str) -> None:
    from django.core.management import call_command

    call_command("send_queued_mail", processes=1, lockfile=lockfile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["prepare", "send", "version"])
    parser.add_argument("--db", default="")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", default="5432")
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--port", type=int, default=25)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--lockfile", default="/tmp/outbox-bench-post-office")
    args = parser.parse_args()
    if args.command == "version":
        from importlib import metadata

        print(f"django {django.get_version()}, django-post-office {metadata.version('django-post-office')}")
        return
    configure(args)
    if args.command == "prepare":
        prepare(args.n)
    else:
        send(args.lockfile)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
