"""SQL lives in `.sql` files as named blocks; this module loads them.

Format (as procrastinate's `queries.sql`)::

    -- name_of_query --
    -- one line that says what it does
    SELECT ...;
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

_BLOCK = re.compile(r"^-- ([a-z_]+) --\n", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a queries file into {name: statement}."""
    parts = _BLOCK.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


@cache
def queries(package: str) -> dict[str, str]:
    """The named queries of `package` (its `queries.sql`)."""
    return parse_queries(resources.files(package).joinpath("queries.sql").read_text())


def schema_sql() -> str:
    """The whole schema: from the wheel, or from the source checkout."""
    packaged = resources.files("outbox").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parents[2] / "schema.sql").read_text()
