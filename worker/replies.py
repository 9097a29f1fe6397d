"""SMTP replies of a session's transactions, read by this package's own parser.

aiosmtplib connects, greets, secures and authenticates a session through its public API. The
transactions on it (MAIL, RCPT, DATA, the content, RSET, QUIT) are written and their replies
read here, with public asyncio APIs only: `Replies` becomes the transport's protocol
(`BaseTransport.set_protocol`) and parses every complete reply in whatever arrives, however
the bytes were cut into segments -- several replies in one, one reply split anywhere, over
TLS or not. That is what pipelining (RFC 2920) needs; aiosmtplib's reader parses one reply
per chunk received and keeps the rest in a private buffer.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiosmtplib import SMTP, SMTPResponse
from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected

# The longest reply line taken (aiosmtplib's limit; RFC 5321 says 512 octets, servers exceed it).
MAX_LINE_BYTES = 8192


class Replies(asyncio.Protocol):
    """The protocol of a session's transport once aiosmtplib has set the session up."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # of the reply being read
        self._ready: deque[SMTPResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        transport.set_protocol(self)

    @classmethod
    def of(cls, client: SMTP) -> Replies:
        """The session's reader: taken over from aiosmtplib on first use, which must come
        after aiosmtplib's last command (it reads nothing on its own between commands)."""
        transport = client.transport
        if transport is None or transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        protocol = transport.get_protocol()
        return protocol if isinstance(protocol, Replies) else cls(transport)  # type: ignore[arg-type]

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (end := self._buffer.find(b"\n")) >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[: end + 1]
                self._line(line)
            if len(self._buffer) > MAX_LINE_BYTES:
                raise SMTPResponseException(-1, "Response too long")
        except SMTPResponseException as exc:
            self._fail(exc)
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes, and connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)

    # -- reading and writing -----------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        code, sep = line[:3], line[3:4]
        if len(line) > MAX_LINE_BYTES:
            raise SMTPResponseException(-1, "Response too long")
        if len(code) != 3 or not code.isdigit() or sep not in (b"", b" ", b"-"):
            raise SMTPResponseException(-1, f"Malformed SMTP response line: {line[:80]!r}")
        self._lines.append(line[4:])
        if sep != b"-":
            message = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
            self._ready.append(SMTPResponse(int(code), message))
            self._lines = []

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def buffered(self) -> bool:
        """A complete reply is here already: `reply` returns it without waiting."""
        return bool(self._ready)

    async def reply(self) -> SMTPResponse:
        """The next reply, in order. Replies that arrived before the connection was lost are
        still returned; then the loss raises SMTPServerDisconnected."""
        while not self._ready:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._ready.popleft()

    def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def command(self, line: bytes) -> SMTPResponse:
        """One command (without its CRLF) and its reply."""
        self.write(line + b"\r\n")
        return await self.reply()
