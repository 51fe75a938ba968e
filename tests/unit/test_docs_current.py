"""The documentation in docs/ matches the code it describes.

Generated files (configuration reference, man pages) must equal what
`python -m relay.ops.docgen` writes now; hand-written pages must at least name
every command, option, metric, rejection reason and SMTP reply code the code has.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from relay.core.config import Config, SmtpConfig
from relay.ops import docgen

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def test_generated_docs_are_current(tmp_path: Path) -> None:
    assert docgen.write(tmp_path)  # writes into an empty directory
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            name = path.relative_to(tmp_path)
            committed = DOCS / name
            assert committed.is_file(), f"docs/{name} is missing: run python -m relay.ops.docgen"
            assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
                f"docs/{name} is out of date: run python -m relay.ops.docgen"
            )
    generated = {p.name for p in (tmp_path / "man").iterdir()}
    committed_pages = {p.name for p in (DOCS / "man").iterdir()}
    assert committed_pages == generated, "run python -m relay.ops.docgen"


def test_check_mode_names_the_fix(tmp_path: Path) -> None:
    docgen.write(tmp_path)
    assert docgen.main(["--check", str(tmp_path)]) == 0
    page = tmp_path / "man" / "relay-queue.1"
    page.write_text(page.read_text() + ".\\\" edited by hand\n")
    (tmp_path / "man" / "relay-gone.1").write_text("old\n")
    problems = docgen.stale(tmp_path)
    assert problems == [
        f"{page}: out of date",
        f"{tmp_path / 'man' / 'relay-gone.1'}: no longer generated (no such command)",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "relay.ops.docgen", "--check", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 1
    assert "relay-queue.1: out of date: run python -m relay.ops.docgen" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_config_key_is_in_the_reference() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for name, section in Config.model_fields.items():
        if name == "source":
            continue
        model = section.annotation if name != "domains" else Config.model_fields[
            "domains"].annotation.__args__[1]  # type: ignore[union-attr]
        for key in model.model_fields:  # type: ignore[union-attr]
            assert re.search(rf"^\| `{key}` \|", text, re.M), f"{name}.{key}"


class _Undocumented(BaseModel):
    documented: int = 1
    """Has its docstring."""
    bare: str = ""


def test_field_docstrings_are_read_from_the_source() -> None:
    assert docgen.field_docs(_Undocumented) == {"documented": "Has its docstring."}
    docs = docgen.field_docs(SmtpConfig)
    assert docs["max_recipients"] == "Recipients per message; more get `452 4.5.3`."


def test_a_key_without_docstring_is_refused() -> None:
    with pytest.raises(docgen.DocError, match=r"test\.bare has no docstring"):
        list(docgen._key_rows("test", _Undocumented))


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0, '"0s"'), (300.0, '"5m"'), (432000.0, '"5d"'), (90.0, '"90s"'),
                          (0.25, '"250ms"'), (5400.0, '"90m"')],
)
def test_durations_written_as_an_operator_would(seconds: float, text: str) -> None:
    metadata = SmtpConfig.model_fields["command_timeout"].metadata
    assert docgen.toml_value(seconds, metadata) == text


def test_roff_escapes() -> None:
    assert docgen.roff(".hidden --all `hold` a\\b") == "\\&.hidden \\-\\-all \\fBhold\\fR a\\eb"


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff here")
@pytest.mark.parametrize("page", sorted(p.name for p in (DOCS / "man").glob("*.1")))
def test_man_page_renders_without_warnings(page: str) -> None:
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(DOCS / "man" / page)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0
    assert result.stderr == ""
