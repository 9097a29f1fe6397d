"""worker.db.array_literal: the claim's ids and tokens as Postgres array literals."""

from __future__ import annotations

import uuid

import pytest

from worker.db import array_literal

TOKEN = str(uuid.UUID(int=7))


def test_ids_and_uuids_become_array_literals():
    assert array_literal([1, 22, 333]) == "{1,22,333}"
    assert array_literal([TOKEN, TOKEN.upper()]) == f"{{{TOKEN},{TOKEN.upper()}}}"
    assert array_literal([]) == "{}"
    assert array_literal(i for i in (5,)) == "{5}"


@pytest.mark.parametrize(
    "bad",
    [
        [f"{TOKEN},{TOKEN}"],  # two values in one: the arrays would no longer line up
        ["1,2"],
        ["x"],
        [TOKEN + "}"],
        ['"quoted"'],
        [TOKEN[:-1]],
        [""],
        [-1],
        ["NULL"],
    ],
)
def test_anything_else_is_refused(bad):
    with pytest.raises(ValueError, match="not ids or UUIDs"):
        array_literal(bad)
