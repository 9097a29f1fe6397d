"""The SMTP transport on its own: what it writes on the wire, whatever reached it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from outbox.core.policy import Verdict
from outbox.core.resolve import Connector
from tests.faultsmtp import ScriptedServer, SegmentedServer
from worker.transport import ConnectorPool

CONTENT = b"Subject: hi\r\n\r\nbody\r\n"


def connector_for(port: int, **kw) -> Connector:
    fields: dict = dict(
        id=1,
        name="gw",
        direction="outgoing",
        address="gw@example.com",
        aliases=(),
        host="127.0.0.1",
        port=port,
        security="none",
        username=None,
        password_env=None,
        password_enc=None,
        ca_file=None,
        enabled=True,
        is_default_gateway=True,
    )
    return Connector(**(fields | kw))


def send_all(port: int, *messages: tuple[str, list[str]], **connector):
    """Send each (sender, recipients) through one pool, in turn; their outcomes."""

    async def run():
        pool = ConnectorPool(connector_for(port, **connector), local_hostname="outbox.test", timeout=10)
        try:
            return [await pool.send(sender, rcpts, CONTENT) for sender, rcpts in messages]
        finally:
            await pool.aclose()

    return asyncio.run(run())


@pytest.fixture(params=[True, False], ids=["pipelined", "lockstep"])
def server(request) -> Iterator[ScriptedServer]:
    s = ScriptedServer(pipelining=request.param)
    yield s
    s.stop()


@pytest.mark.parametrize(
    "sender, recipient",
    [
        ("a@example.com", "b\x00c@example.org"),
        ("a@example.com", "b@example.org\r\nRCPT TO:<evil@example.net>"),
        ("a@example.com", "b@example.org> NOTIFY=NEVER"),
        ("a@example.com", "b\u2028@example.org"),
        ("a\x01@example.com", "b@example.org"),
        ("a@example.com", "b@exa\x7fmple.org"),
    ],
)
def test_an_address_that_would_change_a_command_fails_the_message_and_writes_nothing(
    server, sender, recipient
):
    bad, good = send_all(server.port, (sender, [recipient]), ("a@example.com", ["ok@example.org"]))
    assert bad.verdicts == {recipient: Verdict.PERMANENT}
    assert bad.error.startswith("refusing to write "), bad.error
    assert "never go on an SMTP command line" in bad.error and "\x00" not in bad.error
    # nothing of the refused message went out; the session still served the next one
    assert good.verdicts == {"ok@example.org": Verdict.ACCEPTED}
    assert [c for c in server.commands if c[:4] in (b"MAIL", b"RCPT")] == [
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<ok@example.org>\r\n",
    ]
    assert server.accepted == 1


def test_a_control_character_that_reached_the_transport_fails_the_message(db, smtp, pipeline, monkeypatch):
    """With the worker's validation out of the way (as for any path that skipped it), a
    control character in a row's address is refused where the command is written: the message
    fails for good with the reason, and the server gets nothing of it."""
    from tests.helpers import add_gateway
    from worker import delivery

    monkeypatch.setattr(delivery, "checked", lambda row, attachments: row)
    add_gateway(db, smtp)
    [msg_id] = db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
        "VALUES ('a@example.com', %s, 's', 't') RETURNING id",
        [["b\x01@example.org"]],
    ).fetchone()
    pipeline.until_status(msg_id, "failed")
    [error] = db.execute("SELECT last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()
    assert "refusing to write RCPT with the address 'b\\x01@example.org'" in error, error
    assert smtp.recorder.received == []


# How a server's replies may be cut into TCP segments (or TLS records).
SPLITS = {
    "one-segment": lambda data: [data],
    "mid-line": lambda data: [p for line in data.splitlines(True) for p in (line[:7], line[7:])],
    "mid-code": lambda data: [p for line in data.splitlines(True) for p in (line[:1], line[1:2], line[2:])],
}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_pipelined_replies_are_read_however_they_are_segmented(split, tls, server_tls, ca_file):
    """All replies of a pipelined group in one segment, or each cut mid-line or mid-code: every
    reply is read, in order, and each message is sent once (tests/unit/test_replies.py cuts
    them at every byte)."""
    server = SegmentedServer(SPLITS[split], tls=server_tls if tls else None)
    try:
        rcpts = ["x@example.org", "y@example.org", "z@example.org"]
        security = {"security": "tls", "ca_file": ca_file, "host": "localhost"} if tls else {}
        first, second = send_all(
            server.port, ("a@example.com", rcpts), ("a@example.com", rcpts[:1]), **security
        )
        for outcome in (first, second):
            assert outcome.code == 250 and outcome.reply == "2.0.0 queued as 1", outcome
            assert set(outcome.verdicts.values()) == {Verdict.ACCEPTED}
        assert first.replies["y@example.org"] == (250, "2.0.0 queued as 1")
        assert server.accepted == 2
        assert [c[:4] for c in server.commands].count(b"MAIL") == 2
    finally:
        server.stop()
