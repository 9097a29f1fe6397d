"""SMTP transport: aiosmtplib connections pooled per connector, one phase-tracked
transaction (MAIL, RCPT each, DATA, final dot) per message; when the server offers
PIPELINING, the envelope and DATA go out in one write (two round trips per message, not 3+n).
aiosmtplib sets each session up (connect, EHLO, STARTTLS, AUTH: its public API); the
transactions on it are written here and their replies read by `worker.replies.Replies`.

The envelope is always explicit; nothing is derived from headers. Credentials are only ever
sent over TLS: a connector with AUTH whose server stops offering STARTTLS fails loudly. An
`oauth2` connector logs in with AUTH XOAUTH2 and an access token from its pool's
`worker.oauth.TokenSource` (fetched in the phase "token", before connecting).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
from aiosmtplib import SMTP, SMTPResponse
from aiosmtplib.errors import SMTPAuthenticationError, SMTPResponseException

from outbox.core.connector_rules import effective_security
from outbox.core.errors import ConfigurationError
from outbox.core.policy import Verdict, classify, is_connector_problem
from outbox.core.resolve import Connector
from outbox.store.secrets import password_for
from worker import metrics
from worker.limiter import SESSION_LEASE_SECONDS, Seats
from worker.oauth import TokenSource, basic_auth_refused, oauth_hint
from worker.replies import Replies

# While a large message's upload drains, how often to look at its progress.
UPLOAD_POLL_SECONDS = 0.05
# Sessions one worker process keeps to a connector without `--max-connections`.
SESSIONS_PER_PROCESS = 4
# A connector with `--max-connections`: an idle session is closed after this, giving its seat
# back to the other workers; and once no seat freed in time, messages that would need a new
# session go back to the queue at once for this long (no other one waits it out again).
IDLE_SECONDS = 1.0
NO_SEAT_SECONDS = 0.5


class TLSRequiredError(aiosmtplib.SMTPException):
    """The connector requires TLS (STARTTLS or AUTH) but the session is not encrypted."""


@dataclass
class Outcome:
    """What happened to one message on the wire."""

    phase: str = "connect"
    code: int | None = None
    reply: str | None = None
    error: str | None = None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    replies: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)
    seconds: float = 0.0
    # Not tried: the connector was resting after this failure of an earlier message.
    rested_after: str | None = None
    # Not sent: `admit` refused it (its connector's rate limit has no slot soon enough), or
    # no session could be had (`--max-connections` across workers: `waiting_for` says so).
    not_admitted: bool = False
    waiting_for: str | None = None

    @property
    def summary(self) -> str:
        if self.code is not None:
            return f"{self.code} {self.reply or ''}".strip()
        return self.error or ""


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verified TLS (hostname and chain), 1.2 at least; a connector may bring its own CA."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _encode_address(addr: str) -> tuple[str, bool]:
    """Envelope form: IDN domain as punycode. Returns (address, needs SMTPUTF8)."""
    if addr.isascii():  # the IDNA codec gives an ASCII domain back as it is (or refuses it)
        return addr, False
    local, _, domain = addr.rpartition("@")
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")
    address = f"{local}@{domain}"
    return address, not address.isascii()


_DOT = re.compile(rb"^\.", re.MULTILINE)


def _dot_stuff(content: bytes) -> bytes:
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if b"\n." in content or content.startswith(b"."):  # most messages have no line to stuff
        content = _DOT.sub(b"..", content)
    return content + b".\r\n"


# What never goes into a path on an SMTP command line, whatever validated the address before:
# control characters (NUL, CR, LF, C1), any kind of space or line separator, the brackets
# that end a path, lone surrogates.
_UNSAFE_IN_PATH = re.compile("[\x00-\x20\x7f-\x9f<>\u2028\u2029\ud800-\udfff\\s]")
_UNSAFE_ON_LINE = re.compile(rb"[\x00-\x1f\x7f]")


class UnsafeCommand(ValueError):
    """An address that would change the SMTP command it goes into: the message fails for good,
    and nothing of it is written."""


def _check_path(verb: bytes, address: str) -> None:
    if not address or _UNSAFE_IN_PATH.search(address):
        raise UnsafeCommand(
            f"refusing to write {verb.decode()} with the address {address!r}: control characters, "
            "spaces and angle brackets never go on an SMTP command line"
        )


def _command(verb: bytes, prefix: bytes, address: str, options: list[bytes], encoding: str) -> bytes:
    """`MAIL FROM:<a> OPTIONS` or `RCPT TO:<a>`: every command line of a transaction is made
    here, and one that a control character (or a space, or a bracket) in the address would
    change raises UnsafeCommand before anything is written."""
    _check_path(verb, address)
    line = b" ".join([verb, prefix + b"<" + address.encode(encoding) + b">", *options])
    if _UNSAFE_ON_LINE.search(line):  # pragma: no cover  (the address check covers it)
        raise UnsafeCommand(f"refusing to write an SMTP command with a control character: {line!r}")
    return line


class ReplyTimer:
    """Each server reply gets `seconds`, measured by one timer per transaction that is moved
    before each command (`arm`). Used as `async with`; running out cancels the transaction's
    task there and raises aiosmtplib's read timeout, as aiosmtplib would (as `asyncio.timeout`
    does: a cancellation from elsewhere passes through).

    Moving a deadline later only records it: the loop's timer is set again when it goes off
    before the deadline (at most once per reply time), or when a deadline comes earlier. Each
    move of an `asyncio.timeout` cancels and schedules a timer, several times per message:
    about 15 µs of a worker's CPU per message, against about 3 µs here. (Before either,
    aiosmtplib's own per-reply timeout, an asyncio.wait_for per command, cost about a tenth of
    the client's CPU per message.)"""

    __slots__ = ("_cancelling", "_deadline", "_expired", "_handle", "_loop", "_seconds", "_task")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    async def __aenter__(self) -> ReplyTimer:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task, self._cancelling = task, task.cancelling()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc

    def arm(self, seconds: float | None = None) -> None:
        deadline = self._deadline = self._loop.time() + (self._seconds if seconds is None else seconds)
        handle = self._handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(deadline, self._went_off)

    def disarm(self) -> None:
        self._deadline = None  # a timer that goes off now finds no deadline

    def _went_off(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None or self._expired:
            return
        if self._loop.time() < deadline:  # moved since it was set
            self._handle = self._loop.call_at(deadline, self._went_off)
            return
        self._expired = True
        self._task.cancel()


def readable(text: str) -> str:
    """Server text as Postgres can store it: bytes that were not UTF-8 (aiosmtplib keeps them
    as surrogate escapes) become U+FFFD and NUL is dropped; otherwise an outcome with an old
    server's Latin-1 reply could not be written, and the message would be sent again."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\x00", "")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return readable(f"{type(exc).__name__}: {text}"[:500])


class Exchange:
    """The commands and replies of one transaction on a ready session, after its envelope is
    made: written and read through `Replies` (public asyncio APIs, every reply in whatever
    the server's bytes arrive in), not by aiosmtplib. Each reply is awaited under `timer`;
    each recipient's verdict goes into `outcome`; `phase` hears the transaction move on;
    `before_data` (the lease check) is asked before any content can go out."""

    __slots__ = ("before_data", "client", "outcome", "phase", "replies", "timer")

    def __init__(
        self,
        client: SMTP,
        outcome: Outcome,
        phase: Callable[[str], None],
        timer: ReplyTimer,
        before_data: Callable[[], Awaitable[bool]] | None,
    ) -> None:
        self.client = client
        self.replies = Replies.of(client)
        self.outcome = outcome
        self.phase = phase
        self.timer = timer
        self.before_data = before_data

    async def pipelined(self, sender: str, recipients: Sequence[str], commands: list[bytes]) -> list[str]:
        """RFC 2920: the envelope and DATA in one write, their replies read in order. The
        lease check that guards DATA therefore comes before anything is written. Returns the
        recipients accepted once the server waits for the content; none: the transaction
        ended here."""
        replies, timer = self.replies, self.timer
        if self.before_data is not None and not await self.before_data():
            self.lease_lost(recipients)
            return []
        replies.write(b"\r\n".join([*commands, b"DATA", b""]))
        timer.arm()
        self.mail_reply(sender, await replies.reply())
        self.phase("rcpt")
        accepted = []
        for original in recipients:  # the group's replies mostly arrive together: the timer
            if not replies.buffered:  # moves only for a reply still to come
                timer.arm()
            if self.rcpt_reply(original, await replies.reply()):
                accepted.append(original)
        self.phase("data")
        if not replies.buffered:
            timer.arm()
        resp = await replies.reply()
        if not accepted:
            self.outcome.phase = "rcpt"
            self.outcome.code, self.outcome.reply = self.outcome.replies[recipients[-1]]
            if resp.code == 354:  # a server that takes DATA without recipients: hang up
                self.client.close()
            else:
                timer.arm()
                await replies.command(b"RSET")
            return []
        self.data_reply(resp)
        return accepted

    async def stepwise(self, sender: str, recipients: Sequence[str], commands: list[bytes]) -> list[str]:
        """Without PIPELINING: each command waits for its reply; the lease is checked once the
        recipients are known, just before DATA. Returns the recipients accepted once the
        server waits for the content; none: the transaction ended here."""
        replies, timer = self.replies, self.timer
        timer.arm()
        self.mail_reply(sender, await replies.command(commands[0]))
        self.phase("rcpt")
        accepted = []
        for original, command in zip(recipients, commands[1:], strict=True):
            timer.arm()
            if self.rcpt_reply(original, await replies.command(command)):
                accepted.append(original)
        if not accepted:
            self.outcome.code, self.outcome.reply = self.outcome.replies[recipients[-1]]
            timer.arm()
            await replies.command(b"RSET")
            return []
        timer.disarm()  # the lease check has its own timeouts
        if self.before_data is not None and not await self.before_data():
            self.lease_lost(accepted)
            timer.arm()
            await replies.command(b"RSET")
            return []
        self.phase("data")
        timer.arm()
        self.data_reply(await replies.command(b"DATA"))
        return accepted

    async def upload(self, data: bytes, dot_timeout: float) -> SMTPResponse:
        """Write the content and the final dot; return the server's verdict on it. The phase
        becomes "dot" (the server may have the message) and the final-dot timeout starts only
        once every byte has left this process: an upload that stalls for a command timeout is
        a failure in "data", which the server cannot have accepted."""
        replies, timer = self.replies, self.timer
        transport = replies.transport
        replies.write(data)
        if not transport.get_write_buffer_size():  # the usual case
            self.phase("dot")
            timer.arm(dot_timeout)
            return await replies.reply()
        reply = asyncio.ensure_future(replies.reply())
        try:
            left = transport.get_write_buffer_size()
            timer.arm()
            while left and not reply.done():
                await asyncio.wait([reply], timeout=UPLOAD_POLL_SECONDS)
                now_left = transport.get_write_buffer_size()
                if now_left < left:
                    timer.arm()  # progress: the command timeout counts from here
                left = now_left
            self.phase("dot")
            timer.arm(dot_timeout)
            return await reply
        finally:
            if not reply.done():
                reply.cancel()

    @staticmethod
    def mail_reply(sender: str, resp: SMTPResponse) -> None:
        if resp.code != 250:
            raise aiosmtplib.SMTPSenderRefused(resp.code, resp.message, sender)

    def rcpt_reply(self, recipient: str, resp: SMTPResponse) -> bool:
        """Record one RCPT reply; True when the recipient was accepted. 421 (the server is
        closing) raises: the remaining recipients wait for next time."""
        if resp.code in (250, 251):
            self.outcome.verdicts[recipient] = Verdict.ACCEPTED
            self.outcome.replies[recipient] = (resp.code, readable(resp.message))
            return True
        if resp.code == 421:
            raise aiosmtplib.SMTPRecipientRefused(resp.code, resp.message, recipient)
        self.outcome.verdicts[recipient] = classify("rcpt", resp.code)
        self.outcome.replies[recipient] = (resp.code, readable(resp.message))
        return False

    @staticmethod
    def data_reply(resp: SMTPResponse) -> None:
        if resp.code != 354:
            raise aiosmtplib.SMTPDataError(resp.code, resp.message)

    def dot_reply(self, accepted: Sequence[str], resp: SMTPResponse) -> None:
        """The server's verdict on the content is each accepted recipient's; 421 closes."""
        outcome = self.outcome
        outcome.code, outcome.reply = resp.code, readable(resp.message)
        verdict = classify("dot", resp.code)
        for r in accepted:
            outcome.verdicts[r] = verdict
            outcome.replies[r] = (resp.code, outcome.reply)
        if resp.code == 421:
            self.client.close()

    def lease_lost(self, recipients: Sequence[str]) -> None:
        """Our lease ran out (the process was stopped, or stalled): another worker may own the
        row now, so this one must not send the content."""
        self.outcome.error = "lease lost before DATA: the message is left to its new owner"
        for r in recipients:
            self.outcome.verdicts[r] = Verdict.TRANSIENT
            self.outcome.replies[r] = (None, self.outcome.error)


class ConnectorPool:
    """SMTP sessions to one connector, kept open between messages: up to `max_connections`
    across all workers (each session holds a seat on Redis, `worker.limiter.Seats`; idle ones
    give theirs back after IDLE_SECONDS), or up to SESSIONS_PER_PROCESS in this process.

    The first failure to reach, greet, secure or log in to the connector puts the pool at
    rest: messages still queued for a session return at once with the same problem instead
    of each waiting out a connect timeout (`rest_until` then says how long, from the
    connector's backoff in Postgres). An operator's change to the connector brings a new pool.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        local_hostname: str,
        timeout: float,
        dot_timeout: float = 600.0,
        seats: Seats | None = None,
    ) -> None:
        self.connector = connector
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.dot_timeout = dot_timeout
        self.cap = connector.max_connections
        self._slots = asyncio.Semaphore(self.cap or SESSIONS_PER_PROCESS)
        self._seats = seats if self.cap is not None else None
        self._seat_of: dict[int, str] = {}  # seat of each idle session (id of its client)
        self._idle_since: dict[int, float] = {}
        self._held: set[str] = set()  # seats of every session open now, idle or busy
        self._lost: set[str] = set()  # seats whose lease ran out: their sessions close
        self._no_seat_until = 0.0
        self._keeper: asyncio.Task[None] | None = None
        self._idle: list[SMTP] = []
        self._used: dict[int, int] = {}  # transactions per open session (id of its client)
        self._ctx: ssl.SSLContext | None = None
        self._tripped: str | None = None  # the problem, until the backoff's end is known
        self._rest_until: datetime | None = None
        self._rest_error = ""
        self.rested_at = 0.0  # time.monotonic() when rest() was last called
        self._tokens: TokenSource | None = None

    @property
    def tokens(self) -> TokenSource:
        """The access tokens of an `oauth2` connector, kept with its pool (in memory only)."""
        if self._tokens is None:
            self._tokens = TokenSource(self.connector, timeout=self.timeout)
        return self._tokens

    def rest(self, until: datetime, error: str) -> None:
        """Send nothing through this connector before `until`."""
        self._tripped, self._rest_until, self._rest_error = None, until, error
        self.rested_at = time.monotonic()

    def wake(self) -> None:
        """End the rest early (the connector's backoff in Postgres was lifted)."""
        self._rest_until = None

    @property
    def rest_until(self) -> datetime | None:
        return self._rest_until

    def resting(self) -> str | None:
        """The failure that rests this connector now, or None."""
        if self._tripped is not None:
            return self._tripped
        if self._rest_until is not None and datetime.now(UTC) < self._rest_until:
            return self._rest_error
        return None

    def _tls(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = tls_context(self.connector.ca_file)
        return self._ctx

    async def open(self, on_phase: Callable[[str], None]) -> SMTP:
        """Connect, greet, secure and authenticate: a session ready for MAIL."""
        c = self.connector
        mode = effective_security(c)
        if c.auth == "oauth2":
            on_phase("token")
            secret = await self.tokens.get()
        else:
            secret = password_for(c) if c.has_credentials else None
        client = SMTP(
            hostname=c.host,
            port=c.port,
            use_tls=mode == "tls",
            start_tls=False,
            tls_context=self._tls() if mode == "tls" else None,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
        )
        on_phase("connect")
        await client.connect()
        try:
            await self._secure(client, mode, secret, on_phase)
        except BaseException:
            client.close()  # a session that failed to come up is never pooled or leaked
            raise
        return client

    async def _secure(
        self, client: SMTP, mode: str, secret: str | None, on_phase: Callable[[str], None]
    ) -> None:
        """EHLO, STARTTLS where required or offered, AUTH only over TLS. `secret` is the
        password, or the access token of an `oauth2` connector."""
        c = self.connector
        on_phase("ehlo")
        await client.ehlo()
        if mode == "starttls" or (mode == "opportunistic" and client.supports_extension("starttls")):
            if not client.supports_extension("starttls"):
                raise TLSRequiredError(
                    f"{c.host}:{c.port} does not offer STARTTLS, which connector {c.name} requires"
                )
            on_phase("starttls")
            await client.starttls(tls_context=self._tls())
            on_phase("ehlo")
            await client.ehlo()
        if c.has_credentials:
            if client.get_transport_info("sslcontext") is None:
                raise TLSRequiredError(
                    f"refusing to send credentials of connector {c.name} over an unencrypted session"
                )
            on_phase("auth")
            assert c.username is not None and secret is not None
            if c.auth == "oauth2":
                await self._xoauth2(client, c.username, secret)
                return
            try:
                await client.login(c.username, secret)
            except SMTPAuthenticationError as exc:
                if basic_auth_refused(exc.message):  # say how to move to OAuth
                    raise SMTPAuthenticationError(exc.code, f"{exc.message} ({oauth_hint(c)})") from exc
                raise

    async def _xoauth2(self, client: SMTP, username: str, token: str) -> None:
        """AUTH XOAUTH2; a refused token (revoked, or expired early) is replaced once."""
        if "xoauth2" not in client.server_auth_methods:
            offered = " ".join(client.server_auth_methods).upper() or "none"
            raise SMTPAuthenticationError(
                -1, f"{self.connector.host} does not offer AUTH XOAUTH2 (offers: {offered})"
            )
        try:
            await client.auth_xoauth2(username, token)
        except SMTPAuthenticationError:
            await client.auth_xoauth2(username, await self.tokens.get(refused=token))

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        before_data: Callable[[], Awaitable[bool]] | None = None,
        on_phase: Callable[[str], None] | None = None,
        admit: Callable[[], Awaitable[bool]] | None = None,
        seat_wait: float = 2.0,
    ) -> Outcome:
        """Send one message to `recipients`; never raises for SMTP or network trouble.
        `on_phase` hears each phase as it starts ("waiting" while queued for a session).
        `admit` (the connector's rate limit) is asked once a session is ready, just before
        MAIL, so a paced message goes out when its slot says, not a connection setup later;
        False sends nothing (`not_admitted`)."""
        started = time.monotonic()
        outcome = Outcome()

        def phase(p: str) -> None:
            outcome.phase = p
            if on_phase is not None:
                on_phase(p)

        if on_phase is not None:
            on_phase("waiting")
        async with self._slots:
            problem = self.resting()
            if problem is not None:  # a message before this one found the connector down
                self._rested(outcome, problem, recipients)
                outcome.seconds = time.monotonic() - started
                return outcome
            client = self._idle.pop() if self._idle else None
            seat = self._seat_of.pop(id(client), None) if client is not None else None
            try:
                client, seat = await self._send(
                    client, seat, sender, recipients, content, outcome, phase, before_data, admit, seat_wait
                )
            finally:
                await self._settle(client, seat)
            if is_connector_problem(outcome.phase, outcome.verdicts) and self._tripped is None:
                self._tripped = outcome.summary
        outcome.seconds = time.monotonic() - started
        return outcome

    async def _send(
        self,
        client: SMTP | None,
        seat: str | None,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        outcome: Outcome,
        phase: Callable[[str], None],
        before_data: Callable[[], Awaitable[bool]] | None,
        admit: Callable[[], Awaitable[bool]] | None,
        seat_wait: float,
    ) -> tuple[SMTP | None, str | None]:
        """The body of `send` with a session slot held: returns the session (None when it was
        closed) and its seat, for `_settle`."""
        current, done = list(recipients), 0
        for reused in (client is not None, False):
            try:
                if client is None or not client.is_connected:
                    if seat is None and self._seats is not None:
                        seat = await self._take_seat(seat_wait)
                        if seat is None:
                            outcome.not_admitted = True
                            outcome.waiting_for = f"a connection (max-connections {self.cap})"
                            break
                    client = await self.open(phase)
                    self._used.pop(id(client), None)  # a new session: none used yet
                if admit is not None:
                    admitted, admit = await admit(), None  # asked once per message
                    if not admitted:
                        outcome.not_admitted = True
                        break
                # --max-recipients: one transaction per group of recipients, same content
                for i, group in enumerate(self._groups(recipients)):
                    done, current = i, group  # groups finished before this one
                    async with ReplyTimer(self.timeout) as timer:
                        await self._transaction(
                            client, sender, group, content, outcome, phase, timer, before_data
                        )
            except Exception as exc:  # network, TLS, protocol: recorded, never raised
                self._fail(outcome, exc, current)  # earlier groups keep their verdicts
                for r in recipients[recipients.index(current[-1]) + 1 :]:
                    outcome.verdicts.setdefault(r, Verdict.TRANSIENT)  # groups not reached
                    outcome.replies.setdefault(r, (outcome.code, outcome.reply or outcome.error))
                if client is not None:
                    client.close()
                client = None
                if reused and not done and outcome.phase == "mail" and outcome.code in (None, 421):
                    # A pooled session the server had dropped: nothing was sent yet.
                    outcome.__dict__.update(Outcome().__dict__)
                    continue
            break
        return client, seat

    async def _settle(self, client: SMTP | None, seat: str | None) -> None:
        """After a message: its session back to the idle ones (with its seat), or closed and
        its seat given back."""
        if client is not None and client.is_connected:
            if self._spent(client) or (seat is not None and seat in self._lost):
                await self._quit(client)  # --max-messages-per-connection: a fresh session next
            else:
                self._idle.append(client)
                if seat is not None:
                    self._seat_of[id(client)] = seat
                    self._idle_since[id(client)] = time.monotonic()
                return
        if seat is not None:
            await self._give_back(seat)

    async def _take_seat(self, wait: float) -> str | None:
        """A seat for a new session across all workers, or None (none freed within `wait`;
        then the messages behind this one go back to the queue at once for NO_SEAT_SECONDS)."""
        assert self._seats is not None and self.cap is not None
        if time.monotonic() < self._no_seat_until:
            return None
        seat = await self._seats.take(self.connector, self.cap, max_wait_seconds=wait)
        if seat is None:
            self._no_seat_until = time.monotonic() + NO_SEAT_SECONDS
            return None
        self._held.add(seat)
        metrics.SESSIONS.labels(self.connector.name).set(len(self._held))
        if self._keeper is None:
            self._keeper = asyncio.ensure_future(self._keep())
        return seat

    async def _give_back(self, seat: str) -> None:
        self._held.discard(seat)
        self._lost.discard(seat)
        metrics.SESSIONS.labels(self.connector.name).set(len(self._held))
        if self._seats is not None:
            await self._seats.give_back(self.connector, seat)

    async def _keep(self) -> None:
        """While this pool lives: close sessions idle for IDLE_SECONDS (their seats go back to
        the other workers) and renew the leases of the seats held."""
        assert self._seats is not None
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(IDLE_SECONDS / 2)
            now = time.monotonic()
            for client in [c for c in self._idle if now - self._idle_since.get(id(c), now) >= IDLE_SECONDS]:
                self._idle.remove(client)
                self._idle_since.pop(id(client), None)
                seat = self._seat_of.pop(id(client), None)
                await self._quit(client)
                if seat is not None:
                    await self._give_back(seat)
            if now - renewed >= SESSION_LEASE_SECONDS / 3 and self._held:
                renewed = now
                self._lost |= await self._seats.renew(self.connector, sorted(self._held))

    def _groups(self, recipients: Sequence[str]) -> list[list[str]]:
        cap = self.connector.max_recipients or len(recipients) or 1
        return [list(recipients[i : i + cap]) for i in range(0, len(recipients), cap)]

    def _spent(self, client: SMTP) -> bool:
        """Count one more transaction on this session; True once it has had the connector's
        `max_messages_per_connection`."""
        cap = self.connector.max_messages_per_connection
        if cap is None:
            return False
        used = self._used.get(id(client), 0) + 1
        if used >= cap:
            self._used.pop(id(client), None)
            return True
        self._used[id(client)] = used
        return False

    @staticmethod
    async def _quit(client: SMTP) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(Replies.of(client).command(b"QUIT"), timeout=2)
        client.close()

    def _rested(self, outcome: Outcome, problem: str, recipients: Sequence[str]) -> None:
        outcome.phase, outcome.rested_after = "connect", problem
        outcome.error = f"connector {self.connector.name} is backing off after: {problem}"
        for r in recipients:
            outcome.verdicts[r] = Verdict.TRANSIENT
            outcome.replies[r] = (None, outcome.error)

    @staticmethod
    def _fail(outcome: Outcome, exc: BaseException, recipients: Sequence[str]) -> None:
        if isinstance(exc, SMTPResponseException) and exc.code > 0:
            outcome.code, outcome.reply = exc.code, readable(exc.message)
        outcome.error = _describe(exc)
        if isinstance(exc, ConfigurationError):
            verdict = Verdict.TRANSIENT
        else:
            verdict = classify(outcome.phase, outcome.code)
        for r in recipients:
            if outcome.verdicts.get(r) in (None, Verdict.ACCEPTED):
                outcome.verdicts[r] = verdict
                outcome.replies[r] = (outcome.code, outcome.reply)

    async def _transaction(
        self,
        client: SMTP,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        outcome: Outcome,
        phase: Callable[[str], None],
        timer: ReplyTimer,
        before_data: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """One transaction on a ready session (MAIL, RCPT each, DATA, the content): each
        recipient's verdict lands in `outcome`. Network and protocol trouble raises, for
        `_send` to record."""
        commands = self._envelope(client, sender, recipients, content, outcome)
        if commands is None:
            return
        phase("mail")
        exchange = Exchange(client, outcome, phase, timer, before_data)
        if client.supports_extension("pipelining"):
            accepted = await exchange.pipelined(sender, recipients, commands)
        else:
            accepted = await exchange.stepwise(sender, recipients, commands)
        if accepted:
            exchange.dot_reply(accepted, await exchange.upload(_dot_stuff(content), self.dot_timeout))

    def _envelope(
        self, client: SMTP, sender: str, recipients: Sequence[str], content: bytes, outcome: Outcome
    ) -> list[bytes] | None:
        """The MAIL and RCPT commands, or None when this session cannot carry the message (an
        unsafe address, or SMTPUTF8 needed and not offered: refused in `outcome`)."""
        envelope_from, utf8 = _encode_address(sender)
        rcpts = [_encode_address(r) for r in recipients]
        try:  # checked again as each command is made
            _check_path(b"MAIL", envelope_from)
            for addr, _ in rcpts:
                _check_path(b"RCPT", addr)
        except UnsafeCommand as exc:  # nothing of this message is written
            self._refuse(outcome, "mail", readable(str(exc)), recipients)
            return None
        # UTF-8 headers (a non-ASCII local part anywhere) need SMTPUTF8 too; bodies are 7-bit.
        if utf8 or any(u for _, u in rcpts) or not content.isascii():
            if not client.supports_extension("smtputf8"):
                self._refuse(
                    outcome, "mail", "non-ASCII address but the server does not offer SMTPUTF8", recipients
                )
                return None
            options, encoding = [b"SMTPUTF8"], "utf-8"
        else:
            options, encoding = [], "ascii"
        return [
            _command(b"MAIL", b"FROM:", envelope_from, options, encoding),
            *(_command(b"RCPT", b"TO:", addr, [], encoding) for addr, _ in rcpts),
        ]

    @staticmethod
    def _refuse(outcome: Outcome, phase: str, error: str, recipients: Sequence[str]) -> None:
        """The message cannot go out through this session, now or later: it fails for good."""
        outcome.phase, outcome.error = phase, error
        for r in recipients:
            outcome.verdicts[r] = Verdict.PERMANENT
            outcome.replies[r] = (None, error)

    async def aclose(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        while self._idle:
            client = self._idle.pop()
            await self._quit(client)  # its replies are read by `Replies` by now
            seat = self._seat_of.pop(id(client), None)
            if seat is not None:
                await self._give_back(seat)


class Transport:
    """Connection pools keyed by connector (a changed connector gets a fresh pool)."""

    def __init__(self, *, local_hostname: str, seats: Seats | None = None) -> None:
        self.local_hostname = local_hostname
        self.seats = seats
        self._pools: dict[int, ConnectorPool] = {}
        self._retired: set[asyncio.Future[None]] = set()

    def pool(self, connector: Connector, *, timeout: float, dot_timeout: float = 600.0) -> ConnectorPool:
        """The connector's pool. A connector an operator changed (updated, enabled, reset) gets
        a fresh one: new sessions, and no rest left from failures before the change."""
        timeout = min(timeout, connector.timeout_seconds)
        current = self._pools.get(connector.id)
        if (
            current is None
            or current.connector.transport_key != connector.transport_key
            or current.connector.updated_at != connector.updated_at
            or current.timeout != timeout
            or current.dot_timeout != dot_timeout
        ):
            if current is not None:
                self._retired.add(asyncio.ensure_future(current.aclose()))
            current = ConnectorPool(
                connector,
                local_hostname=self.local_hostname,
                timeout=timeout,
                dot_timeout=dot_timeout,
                seats=self.seats,
            )
            self._pools[connector.id] = current
        return current

    async def aclose(self) -> None:
        for p in self._pools.values():
            await p.aclose()
        self._pools.clear()
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
