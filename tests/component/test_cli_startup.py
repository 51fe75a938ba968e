"""What each `relay` command imports: operators script these commands, so
`relay --help` loads neither pydantic nor SQLAlchemy, and a queue command on a
database at head loads no Alembic. Checked in a fresh interpreter each time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.ops.cli.queue_select import shipped_head
from relay.queue import db

PROBE = """
import json, sys
from relay.ops.cli.main import main
sys.argv = ["relay", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit:
    pass
roots = {name.partition(".")[0] for name in sys.modules}
print(json.dumps(sorted(roots & {"alembic", "pydantic", "sqlalchemy", "psycopg"})),
      file=sys.stderr)
"""


def imported(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)],
                            capture_output=True, text=True, timeout=60, check=False)
    return json.loads(result.stderr.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    engine.dispose()
    path = tmp_path / "relay.toml"
    path.write_text(f'[queue]\nurl = "sqlite:///{tmp_path}/queue.db"\n')
    return path


def test_help_imports_no_database_or_config_library() -> None:
    assert imported("--help") == []
    assert imported("queue", "--help") == []
    assert imported("queue", "flush") == []  # a usage error comes before any of them


def test_a_queue_command_on_a_current_database_skips_alembic(config: Path) -> None:
    assert imported("-c", str(config), "queue", "stats") == ["pydantic", "sqlalchemy"]
    assert imported("-c", str(config), "queue", "flush", "--all") == ["pydantic", "sqlalchemy"]


def test_the_head_read_from_the_migration_scripts_is_alembics(config: Path) -> None:
    engine = db.connect(f"sqlite:///{config.parent}/queue.db")
    try:
        assert shipped_head() == db.revision(engine).head
    finally:
        engine.dispose()
