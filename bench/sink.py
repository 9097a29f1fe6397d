"""The SMTP sink every system in the benchmark sends to.

Postfix's `smtp-sink` (a C event loop; Debian package `postfix`) when it is installed, else
the built-in asyncio sink below, run as its own process (`python -m bench.sink --port P`):
it answers 250 to everything, 354 to DATA, reads until CRLF.CRLF and answers 250 again. It
pipelines, takes many connections at once and keeps nothing; it only needs to be fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

SMTP_SINK = "/usr/sbin/smtp-sink"

_EHLO = (
    b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
    b"250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class _SinkProtocol(asyncio.Protocol):
    """One SMTP session: line commands until DATA, then raw bytes until CRLF.CRLF."""

    counter = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = bytearray()
        close = False
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    # Keep only a tail that may hold the start of a split end marker.
                    if len(self.buf) > 4:
                        del self.buf[:-4]
                    break
                del self.buf[: end + 5]
                self.in_data = False
                _SinkProtocol.counter += 1
                out += b"250 2.0.0 Ok: queued\r\n"
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self.buf[:nl]).strip()
            del self.buf[: nl + 1]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"LHLO"):
                out += _EHLO
            elif verb == b"DATA":
                out += b"354 End data with <CR><LF>.<CR><LF>\r\n"
                self.in_data = True
                # The marker is CRLF.CRLF; an empty body is just ".CRLF" after the DATA line.
                self.buf[:0] = b"\r\n"
            elif verb == b"QUIT":
                out += b"221 2.0.0 Bye\r\n"
                close = True
                break
            else:  # HELO, MAIL, RCPT, RSET, NOOP, anything: accepted
                out += b"250 2.0.0 Ok\r\n"
        if out and self.transport is not None:
            self.transport.write(bytes(out))
        if close and self.transport is not None:
            self.transport.close()


async def _serve(host: str, port: int, ready_fd: int | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_SinkProtocol, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
    async with server:
        await stop.wait()
    print(f"bench-sink received {_SinkProtocol.counter} messages", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.recv(100)  # the greeting
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SMTP sink did not listen on {host}:{port}") from None
            time.sleep(0.05)


@dataclass
class Sink:
    """A running sink process on 127.0.0.1:port."""

    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @classmethod
    def start(cls, prefer: str = "auto") -> Sink:
        """`prefer`: auto (smtp-sink if present), smtp-sink, builtin."""
        port = free_port()
        use_postfix = prefer in ("auto", "smtp-sink") and os.access(SMTP_SINK, os.X_OK)
        if prefer == "smtp-sink" and not use_postfix:
            raise RuntimeError(f"{SMTP_SINK} is not installed (apt-get install postfix)")
        if use_postfix:
            args = [SMTP_SINK, "-m", "1024"]
            if os.geteuid() == 0:
                args += ["-u", "nobody"]
            args += [f"127.0.0.1:{port}", "1024"]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kind = "postfix smtp-sink"
        else:
            args = [sys.executable, "-m", "bench.sink", "--port", str(port)]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kind = "built-in asyncio sink (bench/sink.py)"
        sink = cls(kind=kind, port=port, proc=proc)
        try:
            wait_listening("127.0.0.1", port)
        except Exception:
            sink.stop()
            raise
        return sink

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def smtp_source_path() -> str | None:
    path = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    return path if os.access(path, os.X_OK) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, None))


if __name__ == "__main__":
    main()
