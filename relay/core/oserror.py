"""An OS error's cause in an operator's words: `permission denied`, `address already in use`.

Owns the short lower-case phrase that ends every error line naming a path or
an address, and `ListenError`, the one line a listener that cannot bind
gives. Refuses to decide what failed or what to do about it: the caller
names the path, the address or the listener.
"""

from __future__ import annotations

import errno
import os

_PHRASES = {
    errno.ENOENT: "no such directory",  # what a missing file's parent means to us
    errno.EEXIST: "a file is in the way",
    errno.ENOTDIR: "a file is in the way",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


def cause(exc: OSError) -> str:
    """`permission denied`, `address already in use`, ...; the message when there is no errno."""
    if exc.errno in _PHRASES:
        return _PHRASES[exc.errno]
    if exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


class ListenError(OSError):
    """A listening socket that could not be opened: which listener, where, why."""

    def __init__(self, listener: str, address: str, exc: OSError) -> None:
        self.listener = listener
        self.address = address
        super().__init__(exc.errno, f"cannot listen for {listener} on {address}: {cause(exc)}")

    def __str__(self) -> str:
        return str(self.strerror)
