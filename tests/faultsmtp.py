"""A scripted SMTP server: any reply at any phase (greeting, EHLO, MAIL, RCPT, the DATA
command, after the final dot) — faults aiosmtpd cannot make. Runs on its own event loop
thread; counts the messages it accepted.

With `pipelining=True` it offers PIPELINING and counts the commands it read while the next
one was already waiting (`pipelined`); without, it is strict, as Postfix is: a command sent
before the reply to the one ahead of it gets "554 5.5.0 improper command pipelining"
(`improper` counts them)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable

from tests.smtp import free_port

PHASES = ("greeting", "ehlo", "mail", "rcpt", "data", "dot")


class ScriptedServer:
    def __init__(
        self, *, pipelining: bool = False, tls: ssl.SSLContext | None = None, **replies: str
    ) -> None:
        unknown = set(replies) - set(PHASES)
        assert not unknown, unknown
        self.pipelining = pipelining
        self.tls = tls  # implicit TLS
        self.pipelined = 0
        self.improper = 0
        self.replies = {
            "greeting": "220 fault.test ESMTP",
            "ehlo": "250-fault.test\r\n250 PIPELINING" if pipelining else "250 fault.test",
            "mail": "250 OK",
            "rcpt": "250 OK",
            "data": "354 go ahead",
            "dot": "250 OK queued",
        } | replies
        self.port = free_port()
        self.accepted = 0
        self.commands: list[bytes] = []  # every command line read, in order
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", self.port, ssl=self.tls)
        )
        self._ready.set()
        self.loop.run_forever()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(text: str) -> bool:
            writer.write(f"{text}\r\n".encode("utf-8", "surrogateescape"))  # "\udcXX": raw byte XX
            await writer.drain()
            return not text.startswith("421")

        phases = {b"EHLO": "ehlo", b"HELO": "ehlo", b"MAIL": "mail", b"RCPT": "rcpt", b"DATA": "data"}
        try:
            if not await reply(self.replies["greeting"]):
                return
            while line := await reader.readline():
                self.commands.append(line)
                verb = line[:4].upper()
                if reader._buffer:  # the next command came before this one's reply
                    if not self.pipelining:
                        self.improper += 1
                        await reply("554 5.5.0 improper command pipelining")
                        return
                    self.pipelined += 1
                if verb == b"QUIT":
                    await reply("221 bye")
                    return
                text = self.replies[phases[verb]] if verb in phases else "250 OK"
                if not await reply(text):
                    return
                if verb == b"DATA" and text.startswith("354"):
                    while (chunk := await reader.readline()) and chunk != b".\r\n":
                        pass
                    if not chunk:  # the client hung up before the final dot
                        return
                    final = self.replies["dot"]
                    if final.startswith("250"):
                        self.accepted += 1
                    if not await reply(final):
                        return
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in sessions:
                t.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class SegmentedServer(ScriptedServer):
    """Offers PIPELINING and answers each pipelined group (MAIL, RCPT..., DATA), once it has
    read all of it, with all its replies written in the pieces `split` cuts them into (one
    write each, flushed, a pause between pieces so that each travels in its own TCP segment or
    TLS record); the reply to the final dot too. Replies to RCPT are two-line replies."""

    def __init__(self, split: Callable[[bytes], list[bytes]], **kw: object) -> None:
        self.split = split
        super().__init__(pipelining=True, **kw)  # type: ignore[arg-type]

    async def _pieces(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        pieces = self.split(data)
        assert b"".join(pieces) == data
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.02)  # a segment of its own, not a wait for a condition
            writer.write(piece)
            await writer.drain()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 segmented.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                self.commands.append(line)
                verb = line[:4].upper()
                if verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-segmented.test\r\n250 PIPELINING\r\n")
                elif verb == b"MAIL":
                    group = [line]
                    while not group[-1].upper().startswith(b"DATA"):
                        group.append(await reader.readline())
                    self.commands.extend(group[1:])
                    rcpts = len(group) - 2
                    await self._pieces(
                        writer,
                        b"250 2.1.0 sender ok\r\n"
                        + b"250-2.1.5 recipient ok\r\n250 2.1.5 and welcome\r\n" * rcpts
                        + b"354 go ahead\r\n",
                    )
                    while (chunk := await reader.readline()) and chunk != b".\r\n":
                        pass
                    self.accepted += 1
                    await self._pieces(writer, b"250 2.0.0 queued as 1\r\n")
                else:
                    writer.write(b"250 OK\r\n")
        finally:
            writer.close()
