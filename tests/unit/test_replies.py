"""worker.replies: SMTP replies parsed from whatever bytes arrive, however they are cut."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtplib import SMTPResponse
from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected

from worker.replies import Replies

GROUP = (
    b"250 2.1.0 sender ok\r\n"
    b"250-2.1.5 first line\r\n250-second\r\n250 2.1.5 last\r\n"
    b"550 5.1.1 no such user\r\n"
    b"354\r\n"
)
EXPECTED = [
    SMTPResponse(250, "2.1.0 sender ok"),
    SMTPResponse(250, "2.1.5 first line\nsecond\n2.1.5 last"),
    SMTPResponse(550, "5.1.1 no such user"),
    SMTPResponse(354, ""),
]


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.written: list[bytes] = []
        self.closed = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(bytes(data))


def read_all(chunks: list[bytes], count: int, lost: bool = False) -> list[SMTPResponse]:
    async def run() -> list[SMTPResponse]:
        replies = Replies(FakeTransport())
        for chunk in chunks:
            replies.data_received(chunk)
        if lost:
            replies.connection_lost(None)
        return [await replies.reply() for _ in range(count)]

    return asyncio.run(run())


@pytest.mark.parametrize("cut", range(1, len(GROUP)))
def test_a_group_cut_anywhere_gives_the_same_replies(cut):
    assert read_all([GROUP[:cut], GROUP[cut:]], 4) == EXPECTED


def test_a_group_in_one_chunk_or_byte_by_byte():
    assert read_all([GROUP], 4) == EXPECTED
    assert read_all([GROUP[i : i + 1] for i in range(len(GROUP))], 4) == EXPECTED


def test_bare_lf_line_ends_and_undecodable_bytes_are_taken():
    assert read_all([b"250 ok\n451 Empf\xe4nger\r\n"], 2) == [
        SMTPResponse(250, "ok"),
        SMTPResponse(451, "Empf\udce4nger"),
    ]


def test_replies_that_arrived_before_the_connection_was_lost_are_still_read():
    with pytest.raises(SMTPServerDisconnected):
        read_all([b"250 ok\r\n250 ok\r\n421 bye"], 3, lost=True)  # the last one never ended
    assert read_all([b"250 ok\r\n421 closing\r\n"], 2, lost=True)[1] == SMTPResponse(421, "closing")


@pytest.mark.parametrize("garbage", [b"25O ok\r\n", b"hello\r\n", b"250+ok\r\n", b"2" * 9000])
def test_a_malformed_or_endless_reply_fails_the_session(garbage):
    with pytest.raises(SMTPResponseException) as raised:
        read_all([garbage], 1)
    assert raised.value.code == -1


def test_a_reply_is_awaited_until_it_arrives_in_full():
    async def run() -> SMTPResponse:
        transport = FakeTransport()
        replies = Replies(transport)
        pending = asyncio.ensure_future(replies.command(b"NOOP"))
        await asyncio.sleep(0)
        replies.data_received(b"25")
        await asyncio.sleep(0)
        assert not pending.done()
        replies.data_received(b"0 fine\r\n")
        assert transport.written == [b"NOOP\r\n"]
        return await pending

    assert asyncio.run(run()) == SMTPResponse(250, "fine")
