"""A bare SMTP client for tests: exact command lines out, whole replies in.

Owns reading one reply over a real socket, multi-line ones included
(`250-...` continues, `250 ...` ends), each line within a deadline, and
handing it to the test in the shape its assertions compare (`shaped`: the
whole reply, its last line, code and texts...). A connection closed before
a reply ends fails the test with what was read.

Refuses SMTP itself: no dot-stuffing, no EHLO parsing, no checking of codes
or of the order of commands; the tests send what they mean and judge what
comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

R = TypeVar("R")

LOOPBACK = "127.0.0.1"


@dataclass
class Reply:
    """One SMTP reply, every line of it."""

    code: int
    lines: list[str]  # each line's text after the code and its separator
    raw: list[str]  # each line as sent, without its CRLF

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def last(self) -> str:
        return f"{self.code} {self.lines[-1]}"


class LineClient(Generic[R]):
    """One SMTP session, a line at a time; subclasses say what a reply looks like."""

    deadline = 20.0  # seconds for each line of a reply

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: tuple[str, int] | int) -> Self:
        """Connected, the greeting not read yet; a bare port means loopback."""
        host, port = (LOOPBACK, address) if isinstance(address, int) else address
        return cls(*await asyncio.open_connection(host, port))

    @classmethod
    async def greeted(cls, address: tuple[str, int] | int) -> Self:
        """Connected, past a 220 greeting."""
        client = await cls.connect(address)
        greeting = await client.read_reply()
        assert greeting.code == 220, greeting
        return client

    def shaped(self, reply: Reply) -> R:
        """The reply as this client's tests compare it."""
        raise NotImplementedError

    async def read_reply(self) -> Reply:
        lines: list[str] = []
        raw: list[str] = []
        while True:
            data = await asyncio.wait_for(self.reader.readline(), self.deadline)
            assert data.endswith(b"\r\n"), f"connection closed after {raw!r}: {data!r}"
            line = data[:-2].decode("utf-8")
            raw.append(line)
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), lines, raw)

    async def reply(self) -> R:
        return self.shaped(await self.read_reply())

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> R:
        """`line` and CRLF; the reply."""
        await self.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def quit(self) -> None:
        """QUIT, then close."""
        await self.cmd("QUIT")
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
