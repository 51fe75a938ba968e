"""Dropping root for `relay serve` (SPEC `node.user`).

Owns the mechanics: looking the user up, handing the queue's files to it,
and giving up every id and group root had (real, effective and saved uid and
gid; the user's own groups only), with one log line saying so. Started as
any other user it changes nothing and warns. Refuses to decide when to drop
(`relay.service` does, once the sockets are bound and the queue is open) and
which files are the queue's (the caller names them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from relay.core.oserror import cause

log = logging.getLogger("relay.privileges")


class PrivilegeError(OSError):
    """Root could not become `node.user`: one line for the operator, exit 1."""


@dataclass(frozen=True, slots=True)
class Account:
    """Who `node.user` names, as the kernel knows it."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def account(name: str) -> Account:
    """The user's ids and groups; KeyError for a user that does not exist."""
    entry = pwd.getpwnam(name)
    groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def drop(user: str, files: Iterable[str]) -> Account | None:
    """Become `user` for good, after giving it `files` (those that exist).

    Groups first and the uid last: once the uid is gone nothing else may be
    changed. Not root: a warning, and None (the relay runs as it was started).
    """
    if os.geteuid() != 0:
        log.warning("node.user = %r is ignored: not started as root (uid %d)",
                    user, os.geteuid())
        return None
    try:
        who = account(user)
    except KeyError:  # removed since the config was read
        raise PrivilegeError(f"node.user: no such user {user!r}") from None
    try:
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, who.uid, who.gid, follow_symlinks=False)
        os.setgroups(list(who.groups))
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)
    except OSError as exc:  # a container without CAP_SETUID, a read-only queue
        raise PrivilegeError(f"cannot drop privileges to {user}: {cause(exc)}") from None
    log.info("dropped privileges to %s (uid %d, gid %d)", who.name, who.uid, who.gid)
    return who
