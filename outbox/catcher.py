"""A local SMTP catcher for trying outbox-worker out: keeps every message it receives as an
`.eml` file in a directory. Not for production (no TLS, no AUTH, accepts everything)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any


class _Keeper:
    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        name = f"{time.time_ns()}-{self.count}.eml"
        header = (
            f"X-Envelope-From: {envelope.mail_from}\r\nX-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        tmp = self.maildir / f".{name}"
        tmp.write_bytes(header + envelope.original_content)
        tmp.rename(self.maildir / name)
        return "250 OK kept"


def serve(host: str, port: int, maildir: str) -> None:
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        raise SystemExit(
            "outbox: error: the catcher needs aiosmtpd: pip install 'outbox-worker[catcher]'"
        ) from None
    path = Path(maildir)
    path.mkdir(parents=True, exist_ok=True)
    controller = Controller(_Keeper(path), hostname=host, port=port)
    controller.start()
    print(f"catching mail on {host}:{port}, keeping it in {path}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()
