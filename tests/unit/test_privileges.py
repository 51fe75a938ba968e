"""`node.user`: the lookup, the not-root branch of `privileges.drop`, and the
config refusing a user that does not exist. The drop itself runs end to end
(tests/e2e/test_privileges.py): it cannot be undone inside this process."""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

import pytest

from relay.core import config, privileges


def test_account_has_the_users_ids_and_groups() -> None:
    nobody = pwd.getpwnam("nobody")
    who = privileges.account("nobody")
    assert (who.uid, who.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert nobody.pw_gid in who.groups
    with pytest.raises(KeyError):
        privileges.account("no-such-user-mx")


def test_not_root_warns_once_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    queue = tmp_path / "queue.db"
    queue.write_bytes(b"")
    before = queue.stat()
    ids = (os.getresuid(), os.getresgid(), os.getgroups())
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the branch's input: who started us
    with caplog.at_level(logging.INFO, logger="relay.privileges"):
        assert privileges.drop("nobody", [str(queue)]) is None
    assert [r.getMessage() for r in caplog.records] == [
        "node.user = 'nobody' is ignored: not started as root (uid 1000)"]
    assert caplog.records[0].levelno == logging.WARNING
    after = queue.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert (os.getresuid(), os.getresgid(), os.getgroups()) == ids


def test_config_refuses_a_user_that_does_not_exist() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.from_mapping({"node": {"user": "no-such-user-mx"}}, source="relay.toml")
    assert caught.value.problems == ["relay.toml: node.user: no such user 'no-such-user-mx'"]
    assert config.from_mapping({"node": {"user": "nobody"}}).node.user == "nobody"
    assert config.from_mapping({}).node.user == ""
