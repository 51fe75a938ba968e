"""SMTP DATA taken apart in bulk: whatever the socket delivered, not one line per read.

The rules are those of RFC 5321 4.5.2 and 4.5.3.1.6 as the relay applies
them. Only CRLF ends a line: a bare LF or CR stays inside its line, for the
caller to reject, and so `\\n.\\r\\n` never ends the data (no smuggling). A
line that is exactly `.` ends it; any other line loses one leading dot. A
line longer than `MAX_LINE` octets with its CRLF, or data over the size limit,
is a problem: the first one met, in line order, is kept, and everything up to
the end is still read but no longer kept. So is a message whose kept bytes
would not fit the `Budget` all sessions share (`smtp.max_inflight_data`).
"""

from __future__ import annotations

import asyncio

from relay.core.room import SHORT_OF_MEMORY, Budget

MAX_LINE = 1000  # 998 octets + CRLF, RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
LINE_TOO_LONG = "554 5.6.0 Error: message line longer than 998 octets"

_CRLF = b"\r\n"
_END_LINE = b".\r\n"
_END = b"\r\n.\r\n"
_STUFFED = b"\r\n."


class DataReceiver:
    """The DATA of one message, fed as it arrives, in pieces of any size."""

    def __init__(self, max_size: int, budget: Budget | None = None) -> None:
        self.blocks: list[bytes] = [b""]  # index 0 left free for our Received header
        self.problem: str | None = None
        self._max_size = max_size
        self._budget = budget if budget is not None else Budget(max_size)
        self.held = 0  # bytes counted in the budget, until `release`
        self._size = 0
        self._partial = b""  # the start of a line whose CRLF has not arrived yet
        self._overlong = False  # inside a line already known to be too long

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes; return the offset in `chunk` just past the
        final `.` line, or -1 while the data goes on."""
        base = len(self._partial)  # bytes of `buf` that arrived before `chunk`
        buf = self._partial + chunk if base else chunk
        self._partial = b""
        start = 0
        if self._overlong:  # its CRLF is the first one: nothing before it is a line start
            eol = buf.find(_CRLF)
            if eol < 0:
                self._partial = b"\r" if buf.endswith(b"\r") else b""
                return -1
            self._overlong = False
            start = eol + 2
        if buf.startswith(_END_LINE, start):
            return start + len(_END_LINE) - base
        end = buf.find(_END, start)
        if end >= 0:
            self._take(buf[start:end + 2])
            return end + len(_END) - base
        last = buf.rfind(_CRLF, start)
        cut = start if last < 0 else last + 2
        if cut > start:
            self._take(buf[start:cut])
        self._hold(buf[cut:])
        return -1

    def _take(self, block: bytes) -> None:
        """Keep complete lines, unless they bring the first problem."""
        if self.problem is not None:
            return
        if block.startswith(b".") or _STUFFED in block:
            block = _unstuff(block)
        size = self._size + len(block)
        if size <= self._max_size and _lines_fit(block):
            if not self._budget.take(len(block)):
                self._fail(SHORT_OF_MEMORY)
                return
            self.blocks.append(block)
            self.held += len(block)
            self._size = size
            return
        self._fail(_first_problem(block, self._size, self._max_size))

    def release(self) -> None:
        """Give the bytes kept back to the budget: the message is stored or dropped."""
        self._budget.give(self.held)
        self.held = 0

    def _hold(self, partial: bytes) -> None:
        """Keep the start of an unfinished line, or only note that it is too long:
        with more than MAX_LINE octets and no CRLF yet it cannot end short
        enough, even after losing a stuffed dot and counting a trailing CR
        as half of its CRLF."""
        if len(partial) <= MAX_LINE:
            self._partial = partial
            return
        self._fail(LINE_TOO_LONG)
        self._overlong = True
        self._partial = b"\r" if partial.endswith(b"\r") else b""

    def _fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
            self.blocks = []
            self.release()


def _unstuff(block: bytes) -> bytes:
    """Drop the leading dot of every line of `block` (complete lines only)."""
    if block.startswith(b"."):
        block = block[1:]
    return block.replace(_STUFFED, _CRLF)


def _lines_fit(block: bytes) -> bool:
    """Whether every line of `block` (complete lines only) has at most MAX_LINE
    octets with its CRLF. Jumps to the last CRLF within MAX_LINE octets of each
    line start: a few searches per block, not one per line."""
    start, end = 0, len(block)
    while end - start > MAX_LINE:
        last = block.rfind(_CRLF, start, start + MAX_LINE)
        if last < 0:
            return False
        start = last + len(_CRLF)
    return True


def _first_problem(block: bytes, size: int, max_size: int) -> str:
    """Which problem the lines of `block` meet first, after `size` octets kept."""
    for line in block.split(_CRLF)[:-1]:
        length = len(line) + len(_CRLF)
        size += length
        if length > MAX_LINE:
            return LINE_TOO_LONG
        if size > max_size:
            return TOO_BIG
    raise AssertionError("a block with a problem has none")  # _take checked first


def give_back(reader: asyncio.StreamReader, rest: bytes) -> None:
    """Return what followed the final dot (pipelined commands) to the reader.

    `rest` ends a read that emptied the reader's buffer, with no await since,
    so appending puts it back in order for the command loop. After EOF the
    session is over (aiosmtpd cancels it) and the reader takes no more data.
    """
    if rest and not reader.at_eof():
        reader.feed_data(rest)
