"""What dashboards read: the SQL views (Enate's Outbox view, Sent Items, connector health), the
read-only `outbox_dashboard` role, the Grafana dashboard's queries, and the Prometheus
endpoint of a running `outbox run` while mail flows through a real SMTP server."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.core.message import Attachment
from tests.conftest import wait_until
from tests.helpers import add_gateway
from tests.smtp import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "outbox.json"
VIEWS = ("outbox.outbox_view", "outbox.sent_items", "outbox.connector_health")


def gateway(db, server, name="gw", **kw):
    add_gateway(db, server, name, **kw)


def send(db, subject="s", to=("x@example.org",), from_addr="app@example.com", **kw):
    with db.transaction():
        return outbox.enqueue(db, from_addr=from_addr, to=list(to), subject=subject, text="t", **kw)


def rows(db, query, *params):
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(query, params).fetchall()


def test_views_show_the_outbox_sent_items_and_connector_health(db, smtp, pipeline):
    gateway(db, smtp)
    connectors.add(
        db,
        NewConnector(
            name="sales",
            direction="outgoing",
            address="sales@example.com",
            host="localhost",
            port=smtp.port,
            enabled=False,
        ),
    )
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 3600, retry_max_seconds = 3600")
    smtp.recorder.data_replies.append("554 5.7.1 rejected")
    failed = send(db, subject="failed")
    pipeline.until_status(failed, "failed")
    smtp.recorder.data_replies.append("451 4.3.0 try later")
    retrying = send(db, subject="retrying")
    pipeline.until_status(retrying, "retry")
    held = send(db, subject="held", from_addr="sales@example.com")
    pipeline.until_status(held, "held")
    sent = send(db, subject="sent")
    pipeline.until_status(sent, "sent")
    smtp.recorder.script_rcpt("gone@example.org", "550 5.1.1 no such user")
    partial = send(db, subject="partial", to=("ok@example.org", "gone@example.org"))
    pipeline.until_status(partial, "partial")
    when = datetime.now(UTC) + timedelta(days=2)
    scheduled = send(
        db,
        subject="scheduled",
        to=("a@example.org", "b@example.org"),
        send_after=when,
        importance="high",
        attachments=[Attachment(filename="a.txt", content=b"x", content_type="text/plain")],
    )

    view = {r["id"]: r for r in rows(db, "SELECT * FROM outbox.outbox_view")}
    assert {i: r["state"] for i, r in view.items()} == {
        failed: "Failed",
        retrying: "Pending Retry",
        held: "Connector Disabled",
        scheduled: "Queued",
    }
    enate_columns = {
        "connector",
        "importance",
        "system_generated",
        "last_attempt_at",
        "last_failure",
        "first_failed_at",
        "next_attempt_at",
        "retry_count",
        "attachment_count",
        "to_addrs",
        "to_list",
        "subject",
    }
    assert enate_columns <= set(view[failed])
    f = view[failed]
    assert f["connector"] == "gw" and "554" in f["last_failure"] and f["next_attempt_at"] is None
    assert f["first_failed_at"] is not None and f["last_attempt_at"] is not None and f["retry_count"] == 0
    r = view[retrying]
    assert "451" in r["last_failure"] and r["next_attempt_at"] > datetime.now(UTC) and r["attempts"] == 1
    assert view[held]["connector"] == "sales"
    s = view[scheduled]
    assert (s["importance"], s["attachment_count"], s["to_list"], s["subject"]) == (
        "high",
        1,
        "a@example.org, b@example.org",
        "scheduled",
    )
    assert s["next_attempt_at"] == when and s["last_failure"] is None

    items = {r["id"]: r for r in rows(db, "SELECT * FROM outbox.sent_items")}
    assert {i: r["status"] for i, r in items.items()} == {sent: "sent", partial: "partial"}
    assert items[sent]["sent_at"] is not None and items[sent]["from_addr"] == "app@example.com"

    health = {r["connector"]: r for r in rows(db, "SELECT * FROM outbox.connector_health")}
    gw, sales = health["gw"], health["sales"]
    assert (gw["sent_last_hour"], gw["failed_last_hour"]) == (1, 3)  # sent; failed, retry, partial
    assert gw["last_success_at"] is not None and "gone@example.org: 550" in gw["last_error"]
    assert gw["enabled"] and gw["is_default_gateway"] and gw["pending_retry"] == 1
    assert (sales["enabled"], sales["held"], sales["sent_last_hour"]) == (False, 1, 0)
    assert sales["last_error"] is None
    assert (gw["consecutive_failures"], gw["backoff_until"]) == (0, None)


# -- the read-only role ---------------------------------------------------------------------


@pytest.fixture
def dashboard_login(db, database_url) -> Iterator[str]:
    """A uniquely named login role granted outbox_dashboard (roles are cluster-wide)."""
    name = f"outbox_dash_test_{uuid.uuid4().hex[:10]}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE outbox_dashboard").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(database_url, user=name)
    finally:
        db.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _grafana_sql() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["rawSql"] for p in dashboard["panels"] for t in p.get("targets", []) if "rawSql" in t]


def test_dashboard_role_reads_the_views_and_nothing_else(db, dashboard_login, parked_gateway):
    msg_id = send(db)
    db.execute("UPDATE outbox.message SET status = 'failed', last_error = 'boom' WHERE id = %s", [msg_id])
    with psycopg.connect(dashboard_login, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0].startswith("outbox_dash_test_")
        for view in VIEWS:
            conn.execute(f"SELECT * FROM {view}").fetchall()
        assert conn.execute("SELECT id, last_failure FROM outbox.outbox_view").fetchall() == [
            (msg_id, "boom")
        ]
        # the Grafana dashboard's own queries run as this role
        for query in _grafana_sql():
            conn.execute(query).fetchall()
        refused = [
            "SELECT * FROM outbox.message",
            "SELECT * FROM outbox.connector",
            "SELECT * FROM outbox.settings",
            "SELECT * FROM outbox.attempt",
            "SELECT * FROM outbox.operator_audit",
            "SELECT * FROM outbox.replay_audit",
            "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
            "VALUES ('a@example.com', '{b@example.org}', 's', 't')",
            "UPDATE outbox.message SET status = 'queued'",
            "CREATE TABLE outbox.mine (x int)",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert db.execute("SELECT count(*), min(status) FROM outbox.message").fetchone() == (1, "failed")


def test_grafana_dashboard_reads_only_the_views_and_known_metrics():
    from prometheus_client import REGISTRY

    import worker.metrics  # noqa: F401  (registers the outbox_* metrics)

    dashboard = json.loads(DASHBOARD.read_text())
    for query in _grafana_sql():
        relations = set(re.findall(r"\b(?:FROM|JOIN)\s+([a-z_.]+)", query, flags=re.IGNORECASE))
        assert relations and relations <= set(VIEWS), query
    known = set()
    for family in REGISTRY.collect():
        known.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        known.update(family.name + s for s in suffixes.get(family.type, ()))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    used = {name for e in exprs for name in re.findall(r"\boutbox_[a-z_]+", e)}
    assert used and used <= known, used - known


# -- the Prometheus endpoint -----------------------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _scrape_all(ports: list[int]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every worker process's metrics, summed per series (as Prometheus' `sum` would)."""
    total: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for port in ports:
        for key, value in _scrape(port).items():
            total[key] = total.get(key, 0.0) + value
    return total


def _free_ports(n: int) -> list[int]:
    """n consecutive free ports (worker process i serves metrics on port + i)."""
    for _ in range(100):
        first = free_port()
        ports = list(range(first, first + n))
        try:
            for p in ports[1:]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return ports
    raise RuntimeError(f"no {n} consecutive free ports")


def test_metrics_endpoint_while_mail_flows(db, smtp, cli_env, tmp_path):
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.2, retry_max_seconds = 0.4")
    smtp.recorder.data_replies.append("451 4.3.0 try again later")
    # Two worker processes, each counting what it sent: the first try and the retry may be
    # sent by different processes, so the test adds up both endpoints like a dashboard would.
    ports = _free_ports(2)
    port = ports[0]
    env = dict(cli_env, OUTBOX_METRICS_REFRESH_SECONDS="0.2")
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "outbox.cli",
            "run",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--threads",
            "2",
            "--processes",
            "2",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        msg_id = send(db, subject="measured")
        wait_until(
            lambda: (
                db.execute("SELECT status FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
                == "sent"
            ),
            timeout=60,
            what="the message to be sent",
        )
        assert len(smtp.recorder.wait_for(1)) == 1

        def scraped():
            try:
                samples = _scrape_all(ports)
            except OSError:
                return None
            sends = _value(samples, "outbox_send_duration_seconds_count")
            return samples if _value(samples, "outbox_messages", status="sent") == 1 and sends == 2 else None

        samples = wait_until(scraped, timeout=30, what="the gauge to show it sent and both attempts counted")
        assert _value(samples, "outbox_sends_total", connector="gw", status="sent") == 1
        assert _value(samples, "outbox_sends_total", connector="gw", status="retry") == 1
        assert _value(samples, "outbox_retries_total", connector="gw") == 1
        assert _value(samples, "outbox_smtp_replies_total", code="250") == 1
        assert _value(samples, "outbox_smtp_replies_total", code="451") == 1
        assert _value(samples, "outbox_send_duration_seconds_count") == 2
        assert _value(samples, "outbox_dispatched_total") == 2
        assert _value(samples, "outbox_messages", status="queued") == 0
        assert _value(samples, "outbox_queue_lag_seconds") == 0
        assert _value(samples, "outbox_lease_expiries_total", state="sending") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
