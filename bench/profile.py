"""Where the time goes: py-spy (sampling, every process and thread, on-CPU only) around an
end-to-end run, summarised by function and by area of the code.

py-spy lives in its own virtualenv (bench/.venv-tools), installed from PyPI on first use.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

TOOLS_VENV = Path(__file__).resolve().parent / ".venv-tools"

# Areas, matched in order against "function (path)" frames: the first match names the area.
AREAS: list[tuple[str, str]] = [
    ("MIME build+render (email.*)", r"\(email/"),
    ("outbox message build (outbox/core/message.py)", r"\(outbox/core/message\.py"),
    ("logging (structlog, logging)", r"\(structlog/|\(logging/"),
    ("psycopg / pool", r"\(psycopg"),
    ("aiosmtplib", r"\(aiosmtplib/"),
    ("dramatiq", r"\(dramatiq/"),
    ("redis client", r"\(redis/"),
    ("pydantic / settings", r"\(pydantic"),
    ("tenacity", r"\(tenacity/"),
    ("prometheus_client", r"\(prometheus_client/"),
    ("asyncio event loop and sockets", r"\(asyncio/|\(selectors\.py"),
    ("worker/ (delivery, transport, policy)", r"\(worker/"),
    ("outbox/ (other)", r"\(outbox/"),
    ("threading / queue", r"\(threading\.py|\(queue\.py"),
    ("imports", r"\(<frozen importlib"),
]

_FRAME_LINE = re.compile(r":\d+\)$")


@dataclass
class Profile:
    samples: int
    self_top: list[tuple[str, int]]
    inclusive_top: list[tuple[str, int]]
    areas: list[tuple[str, int]]  # inclusive: samples with any frame in the area (first match per sample)
    raw_path: Path

    def lines(self, top: int = 15) -> list[str]:
        def pct(n: int) -> str:
            return f"{100 * n / max(1, self.samples):5.1f}%"

        out = [
            f"py-spy: {self.samples} on-CPU samples (all processes and threads); raw stacks: {self.raw_path}"
        ]
        out.append("")
        out.append("by area (a sample counts for the innermost area on its stack):")
        out += [f"  {pct(n)}  {name}" for name, n in self.areas]
        out.append("")
        out.append(f"top {top} functions by own time:")
        out += [f"  {pct(n)}  {name}" for name, n in self.self_top[:top]]
        out.append("")
        out.append(f"top {top} functions by inclusive time:")
        out += [f"  {pct(n)}  {name}" for name, n in self.inclusive_top[:top]]
        return out


def py_spy() -> Path:
    """The py-spy binary, installing it into bench/.venv-tools on first use."""
    exe = TOOLS_VENV / "bin" / "py-spy"
    if not exe.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(TOOLS_VENV)], check=True, timeout=300)
        subprocess.run(
            [str(TOOLS_VENV / "bin" / "pip"), "install", "-q", "py-spy>=0.3.14"],
            check=True,
            timeout=600,
        )
    return exe


def record_wrapper(out: Path, rate: int = 250) -> list[str]:
    return [
        str(py_spy()),
        "record",
        "--format",
        "raw",
        "--rate",
        str(rate),
        "--subprocesses",
        "--nonblocking",
        "-o",
        str(out),
        "--",
    ]


def _area(frame: str) -> str | None:
    for name, pattern in AREAS:
        if re.search(pattern, frame):
            return name
    return None


def summarise(raw_path: Path) -> Profile:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_FRAME_LINE.sub(")", f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
        area = next((a for a in map(_area, reversed(frames)) if a is not None), "other (interpreter, C)")
        areas[area] += count
    return Profile(
        samples=total,
        self_top=own.most_common(40),
        inclusive_top=inclusive.most_common(40),
        areas=areas.most_common(),
        raw_path=raw_path,
    )
