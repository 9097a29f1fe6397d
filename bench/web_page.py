"""The web console on a big table: server time per page for N messages (default 1,000,000).

    .venv/bin/python -m bench.web_page                 # 1,000,000 messages (generation ~1-2 min)
    .venv/bin/python -m bench.web_page --n 100000 --requests 20

It makes its own database (outbox_bench_*, dropped at the end), fills it with one SQL
statement (mostly sent, with failed, retry, held, scheduled, partial and cancelled rows spread
over 30 days, three connectors), serves the console from this process (uvicorn on a free
loopback port, as `outbox web` does) and requests each page `--requests` times after warming
up. The time is measured inside the server, from the request's arrival to the last byte of
the response handed to uvicorn (an ASGI wrapper around the app), so the client's cost is left
out. Prints one Markdown table (median and p95 per page). A benchmark, not a test: it asserts
nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.infra import PG_ADMIN_DEFAULT, Databases, load_average
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.store.sql import schema_sql
from outbox.web import users
from outbox.web.app import create_app

PASSWORD = "bench password 1"

# One statement: status by id (1% failed, 1% retry, 0.5% held, 0.5% scheduled, 1% partial,
# 1% cancelled, the rest sent), created over the last 30 days, oldest first. Triggers are off
# for the load (session_replication_role), so it fills message_id and next_attempt_at itself.
FILL = """
INSERT INTO outbox.message (status, from_addr, to_addrs, subject, text_body, connector_id,
                            attempts, last_error, created_at, updated_at, send_after,
                            next_attempt_at, sent_at, last_attempt_at, message_id)
SELECT s.status,
       (ARRAY['sales@example.com', 'billing@example.com', 'noreply@example.com'])[1 + g %% 3],
       ARRAY['customer' || (g %% 50000) || '@example.org'],
       (ARRAY['Invoice ', 'Your order ', 'Reset your password ', 'Weekly digest '])[1 + g %% 4] || g,
       'Hello',
       (SELECT id FROM outbox.connector ORDER BY id LIMIT 1 OFFSET g %% 3),
       CASE WHEN s.status IN ('queued', 'held') THEN 0 ELSE 1 + g %% 3 END,
       CASE WHEN s.status IN ('failed', 'retry', 'partial') THEN '550 5.1.1 mailbox unavailable' END,
       t.at, t.at,
       CASE WHEN s.status = 'queued' THEN now() + interval '1 day' END,
       CASE WHEN s.status = 'queued' THEN now() + interval '1 day' ELSE t.at END,
       CASE WHEN s.status IN ('sent', 'partial') THEN t.at + interval '2 seconds' END,
       CASE WHEN s.status NOT IN ('queued', 'held') THEN t.at + interval '1 second' END,
       '<bench-' || g || '@example.com>'
  FROM generate_series(1, %(n)s) AS g,
       LATERAL (SELECT now() - (%(n)s - g) * (interval '30 days' / %(n)s) AS at) t,
       LATERAL (SELECT CASE
           WHEN g %% 200 IN (0, 1) THEN 'failed'
           WHEN g %% 200 IN (2, 3) THEN 'retry'
           WHEN g %% 200 = 4 THEN 'held'
           WHEN g %% 200 = 5 THEN 'queued'
           WHEN g %% 200 IN (6, 7) THEN 'partial'
           WHEN g %% 200 IN (8, 9) THEN 'cancelled'
           ELSE 'sent' END AS status) s
"""


class Timed:
    """ASGI wrapper: server time per request path (and query), in milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.times: dict[str, list[float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        await self.app(scope, receive, send)
        key = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
        self.times.setdefault(key, []).append((time.perf_counter() - start) * 1000)


def fill(url: str, n: int) -> float:
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(schema_sql())  # type: ignore[arg-type]
        for name in ("relay", "sales", "billing"):
            connectors.add(
                conn,
                NewConnector(
                    name=name,
                    direction="outgoing",
                    address=f"{name}@relay.example",
                    host="127.0.0.1",
                    port=9,
                    default_gateway=name == "relay",
                ),
            )
        users.add(conn, "bench", "operator", PASSWORD)
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(FILL, {"n": n})
        conn.execute("VACUUM ANALYZE outbox.message")
    return time.monotonic() - started


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def pages(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        mid = conn.execute("SELECT max(id) / 2 FROM outbox.message").fetchone()[0]
        failed = conn.execute("SELECT max(id) FROM outbox.message WHERE status = 'failed'").fetchone()[0]
    return [
        ("Outbox, first page", "/"),
        ("Outbox, a page deep in the middle", f"/?before={mid}"),
        ("Outbox, status failed", "/?status=failed"),
        ("Outbox, status held", "/?status=held"),
        ("Outbox, connector sales", "/?connector=sales"),
        ("Outbox, From contains billing", "/?from_addr=billing"),
        ("Outbox, recipient customer4242", "/?recipient=customer4242%40"),
        ("Outbox, subject contains invoice", "/?subject=invoice"),
        ("Outbox, created in the last 2 h", "/?since=2h"),
        ("Sent Items, first page", "/sent"),
        ("Sent Items, subject contains 'order 99999'", "/sent?subject=order+99999"),
        ("one message", f"/messages/{failed}"),
        ("connectors", "/connectors"),
        ("audit", "/audit"),
    ]


def measure(base: str, app: Timed, targets: list[tuple[str, str]], requests: int) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=base, timeout=120) as client:
        login = client.get("/login")
        token = login.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        response = client.post(
            "/login", data={"csrf_token": token, "username": "bench", "password": PASSWORD}
        )
        assert response.status_code == 303, response.text
        for label, path in targets:
            for _ in range(3):  # warm up (plans, caches)
                assert client.get(path).status_code == 200, path
            app.times.pop(path, None)
            for _ in range(requests):
                client.get(path)
            times = sorted(app.times[path])
            p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
            median = statistics.median(times)
            rows.append({"page": label, "path": path, "median_ms": median, "p95_ms": p95})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.web_page", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="messages in the table")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page")
    parser.add_argument("--pg-admin", default=PG_ADMIN_DEFAULT)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    dbs = Databases(args.pg_admin)
    try:
        url = dbs.url(dbs.create("web"))
        print(f"filling {args.n:,} messages ...", file=sys.stderr)
        took = fill(url, args.n)
        print(f"filled in {took:.0f} s; load average {load_average()}", file=sys.stderr)
        app = Timed(create_app(url, secret="bench"))
        with serve(app) as base:
            rows = measure(base, app, pages(url), args.requests)
    finally:
        dbs.drop_all()
    print(f"\n## Web console page time ({args.n:,} messages, {args.requests} requests each, server time)\n")
    print("| page | URL | median ms | p95 ms |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['page']} | `{r['path']}` | {r['median_ms']:.1f} | {r['p95_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
