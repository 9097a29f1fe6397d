"""The `outbox` command's entry point.

Start-up creates what the process keeps for good (modules, classes, compiled patterns): the
cyclic garbage collector would walk all of it again each time it grows, which cost about a
sixth of a start-up. It stays off while the command line is imported; long-running
commands freeze what start-up made (`worker.runner.tune_gc`)."""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    try:
        from outbox.cli import main as run
    finally:
        gc.enable()
    run()
