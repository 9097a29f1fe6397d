"""Real SMTP servers for tests (aiosmtpd in the test process): plain, STARTTLS with AUTH,
implicit TLS; a recording handler with scripted faults."""

from __future__ import annotations

import asyncio
import email
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of `n` consecutive free ports, below the kernel's ephemeral range (32768
    and up) so that no outgoing connection takes one of them before the test binds it."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    @property
    def message(self) -> Message:
        return email.message_from_bytes(self.content)

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


@dataclass
class Recorder:
    """Keeps every accepted message. `rcpt_replies[addr]` and `data_replies` (a queue; one
    reply per DATA, then 250) script faults."""

    name: str = "smtp"
    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, deque[str]] = field(default_factory=dict)
    data_replies: deque[str] = field(default_factory=deque)
    mail_replies: deque[str] = field(default_factory=deque)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    sessions: int = 0
    # Each DATA takes this long (a slow server, to catch a worker mid-batch).
    data_delay: float = 0.0
    # When `gate` is set: DATA signals `data_started` and waits until `gate` is cleared.
    gate: threading.Event = field(default_factory=threading.Event)
    data_started: threading.Event = field(default_factory=threading.Event)
    # Offer PIPELINING (RFC 2920), as Postfix, Exchange and the big providers do. aiosmtpd
    # reads one command at a time from its stream, so it takes pipelined commands in order.
    pipelining: bool = True
    # Called (in the server's thread) with the number of messages kept so far, after each.
    on_keep: Callable[[int], None] | None = None
    # time.monotonic() when each kept message arrived (its final dot), in order
    arrival_times: list[float] = field(default_factory=list)
    # time.monotonic() when each kept message's transaction began (its MAIL FROM arrived):
    # the server's first sight of it, a few ms after the client's limiter admitted it
    mail_times: list[float] = field(default_factory=list)
    # TCP connections open now, and the most ever open at once (`--max-connections`)
    connections: int = 0
    most_connections: int = 0

    def connected(self, delta: int) -> None:
        with self.arrived:
            self.connections += delta
            self.most_connections = max(self.most_connections, self.connections)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if not getattr(session, "counted", False):
            session.counted = True
            self.sessions += 1
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mail_replies:
            return self.mail_replies.popleft()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.mail_at = time.monotonic()
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        script = self.rcpt_replies.get(address.lower())
        if script:
            reply = script.popleft() if len(script) > 1 else script[0]
            if reply == "drop":  # cut the connection in the middle of the envelope
                server.transport.abort()
                return "250 OK (never seen)"
            if reply.startswith("slow:"):  # accept, that late
                await asyncio.sleep(float(reply.split(":", 1)[1]))
                reply = "250 OK"
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """`data_replies` entries: an SMTP reply line, or `drop` (keep the message, then cut
        the connection before replying: an ambiguous outcome), or `slow:SECONDS` (keep it and
        reply 250 that late)."""
        action = self.data_replies.popleft() if self.data_replies else "250"
        if self.gate.is_set():
            # The whole content is here: keep it (the server may deliver it even if the
            # client never reads the reply), then hold the reply back.
            self._keep(envelope)
            self.data_started.set()
            while self.gate.is_set():
                await asyncio.sleep(0.01)
            return "250 2.0.0 OK queued"
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if action[0].isdigit() and not action.startswith("250"):
            return action
        self._keep(envelope)
        if action == "drop":
            server.transport.abort()
            return "250 OK (never seen)"
        if action.startswith("slow:"):
            await asyncio.sleep(float(action.split(":", 1)[1]))
        return "250 2.0.0 OK queued"

    def _keep(self, envelope: Any) -> None:
        with self.arrived:
            self.arrival_times.append(time.monotonic())
            self.mail_times.append(getattr(envelope, "mail_at", self.arrival_times[-1]))
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content or envelope.content,
                )
            )
            self.arrived.notify_all()
            count = len(self.received)
        if self.on_keep is not None:
            self.on_keep(count)

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= count, timeout=timeout)
        return list(self.received)

    def script_rcpt(self, addr: str, *replies: str) -> None:
        """Replies for RCPT TO addr, in turn; the last one repeats."""
        self.rcpt_replies[addr.lower()] = deque(replies)


class Authenticator:
    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username.encode(), password.encode()
        self.logins: list[str] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and (
            auth_data.login == self.username and auth_data.password == self.password
        ):
            self.logins.append(auth_data.login.decode())
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


class CountingSMTP(SMTP):
    """aiosmtpd's server, telling the recorder when a connection opens and closes."""

    def connection_made(self, transport: Any) -> None:
        self.event_handler.connected(1)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.connected(-1)
        super().connection_lost(error)


class CountingController(Controller):
    def factory(self) -> SMTP:
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class Server:
    controller: Controller
    recorder: Recorder
    port: int
    authenticator: Authenticator | None = None
    stopped: bool = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.controller.stop()


def start_server(
    *,
    mode: str = "plain",
    tls: ssl.SSLContext | None = None,
    auth: Authenticator | None = None,
    name: str = "smtp",
    recorder_factory: Callable[[], Recorder] | None = None,
    port: int | None = None,
    **extra: Any,
) -> Server:
    """mode: `plain` (no TLS offered), `starttls` (offered; required when `auth`), `tls`.
    `port`: listen there (a server coming back where a connector points); default a free one.
    `extra` goes to aiosmtpd's SMTP (e.g. enable_SMTPUTF8=True)."""
    recorder = (recorder_factory or Recorder)()
    recorder.name = name
    port = port or free_port()
    kwargs: dict[str, Any] = {"hostname": "localhost", "port": port, "server_hostname": "localhost"}
    smtp_params: dict[str, Any] = {"decode_data": False, **extra}
    if mode == "tls":
        kwargs["ssl_context"] = tls
    elif mode == "starttls":
        smtp_params["tls_context"] = tls
        smtp_params["require_starttls"] = auth is not None
    if auth is not None:
        smtp_params["authenticator"] = auth
        # aiosmtpd only counts STARTTLS as TLS; with implicit TLS the session is encrypted.
        smtp_params["auth_require_tls"] = mode != "tls"
    else:
        smtp_params["auth_require_tls"] = False
    controller = CountingController(recorder, **kwargs, **smtp_params)
    controller.start()
    return Server(controller, recorder, port, auth)
