"""A scripted SMTP server for faults aiosmtpd cannot make: any reply to the greeting or to
EHLO. Runs on its own event loop thread; answers 250 to everything else."""

from __future__ import annotations

import asyncio
import threading

from tests.smtp import free_port


class ScriptedServer:
    def __init__(self, *, greeting: str = "220 fault.test ESMTP", ehlo: str = "250 fault.test") -> None:
        self.greeting, self.ehlo = greeting, ehlo
        self.port = free_port()
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", self.port)
        )
        self._ready.set()
        self.loop.run_forever()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(f"{self.greeting}\r\n".encode())
            await writer.drain()
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    reply = self.ehlo
                elif verb == b"QUIT":
                    reply = "221 bye"
                else:
                    reply = "250 OK"
                writer.write(f"{reply}\r\n".encode())
                await writer.drain()
                if verb == b"QUIT" or reply.startswith("421"):
                    break
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
