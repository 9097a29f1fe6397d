"""Client baselines against the same sink, each in its own process:

- raw aiosmtplib, 8 persistent connections, messages pre-rendered to bytes before the clock
  starts (`--mode prerendered`);
- raw aiosmtplib, 8 persistent connections, an `email.message.EmailMessage` built and
  rendered per message inside the timed loop (`--mode emailmessage`);
- Postfix's C client `smtp-source` (8 sessions, connections reused), the ceiling of this
  machine, when it is installed.

`python -m bench.baselines --mode M --port P --n N` prints one JSON line:
{"n": N, "seconds": S, "rate": N/S, "cpu_ms_per_msg": client CPU per message}.
"""

from __future__ import annotations

import argparse
import asyncio
import email.policy
import json
import resource
import subprocess
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import aiosmtplib

from bench.common import FROM_ADDR, body, subject, to_addr

POLICY = email.policy.SMTP


def build(i: int) -> EmailMessage:
    msg = EmailMessage(policy=POLICY)
    msg["From"] = FROM_ADDR
    msg["To"] = to_addr(i)
    msg["Subject"] = subject(i)
    msg["Message-ID"] = make_msgid(domain="bench.example")
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg.set_content(body(i))
    return msg


async def _run(mode: str, host: str, port: int, n: int, connections: int) -> tuple[float, float]:
    prerendered = [build(i).as_bytes() for i in range(n)] if mode == "prerendered" else None
    clients = [aiosmtplib.SMTP(hostname=host, port=port, timeout=30) for _ in range(connections)]
    await asyncio.gather(*(c.connect() for c in clients))
    next_index = 0

    async def drain(client: aiosmtplib.SMTP) -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            if prerendered is not None:
                await client.sendmail(FROM_ADDR, [to_addr(i)], prerendered[i])
            else:
                await client.send_message(build(i))

    started, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(drain(c) for c in clients))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
    return seconds, cpu


def run_aiosmtplib(mode: str, host: str, port: int, n: int, connections: int = 8) -> tuple[float, float]:
    return asyncio.run(_run(mode, host, port, n, connections))


def run_smtp_source(path: str, host: str, port: int, n: int, sessions: int = 8) -> tuple[float, float]:
    """Postfix's C client: `sessions` parallel sessions, each connection reused (-d)."""
    args = [path, "-d", "-s", str(sessions), "-m", str(n), "-l", "300", "-M", "bench.example"]
    args += ["-f", FROM_ADDR, "-t", to_addr(0), f"{host}:{port}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(args, check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["prerendered", "emailmessage", "smtp-source"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--smtp-source", default="/usr/sbin/smtp-source")
    args = parser.parse_args()
    if args.mode == "smtp-source":
        seconds, cpu = run_smtp_source(args.smtp_source, args.host, args.port, args.n, args.connections)
    else:
        seconds, cpu = run_aiosmtplib(args.mode, args.host, args.port, args.n, args.connections)
    result = {
        "n": args.n,
        "seconds": seconds,
        "rate": args.n / seconds,
        "cpu_ms_per_msg": cpu * 1000 / args.n,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
