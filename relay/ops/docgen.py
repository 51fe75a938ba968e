"""The generated documentation: the configuration reference and the man pages.

Owns `docs/configuration.md` (written from the pydantic model of
`relay/core/config.py`: every section and key, its type, its default and the
docstring written under the field) and `docs/man/relay*.1` (plain roff written from the click
command tree: its help texts, usage lines and options). Run
`python -m relay.ops.docgen` after changing either; `tests/unit/test_docs_current.py`
fails while the committed files differ from what this writes.

Refuses hand-written prose (`docs/*.md` other than the configuration
reference are edited by hand) and the `relay` command itself: nothing in
the CLI imports this module, so `relay --help` never pays for it. Output is
deterministic (no dates, no versions), so regenerating unchanged sources
changes nothing.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import re
import sys
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types
import click
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from relay.core import config as configuration
from relay.core import values
from relay.core.values import HostPort

HEADER = "run python -m relay.ops.docgen"
CONFIG_DOC = "configuration.md"
MAN_DIR = "man"
_SECONDS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_BYTES = (("GB", 1000**3), ("MB", 1000**2), ("kB", 1000))


class DocError(Exception):
    """The sources cannot be documented as they are (a key without a docstring)."""


# -- configuration reference ---------------------------------------------------


def _validator(metadata: list[Any]) -> Any:
    for item in metadata:
        if isinstance(item, BeforeValidator):
            return item.func
    return None


def _split(annotation: Any) -> tuple[Any, list[Any]]:
    """An `Annotated[T, ...]` as (T, its metadata); anything else as (it, [])."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *metadata = typing.get_args(annotation)
        return base, list(metadata)
    return annotation, []


def type_name(annotation: Any, metadata: list[Any]) -> str:
    """How the TOML value is written, in words an operator reads."""
    annotation, extra = _split(annotation)
    metadata = [*metadata, *extra]
    special = {
        values.parse_duration: 'duration (`"30s"`, `"5m"`, `"4h"`, `"5d"` or seconds)',
        values.parse_size: 'size (`"35MB"`, `"512KiB"` or bytes)',
        values.listen_address: '`"ip:port"`',
    }
    func = _validator(metadata)
    if func in special:
        return special[func]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f'`"{v}"`' for v in typing.get_args(annotation))
    if origin is tuple:
        inner = typing.get_args(annotation)[0]
        words = type_name(inner, [])
        return "array of strings" if words == "string" else f"array of {words}"
    plain_words = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation not in plain_words:
        raise DocError(f"no words for the type {annotation!r}")
    name = plain_words[annotation]
    low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    if low is not None and high is not None:
        return f"{name}, {low} to {high}"
    if low is not None:
        return f"{name}, at least {low}"
    return name


def _duration(seconds: float) -> str:
    if seconds == 0:
        return '"0s"'
    for unit, size in _SECONDS:
        if seconds >= size and seconds % size == 0:
            return f'"{int(seconds // size)}{unit}"'
    return f'"{round(seconds * 1000)}ms"'


def _size(size: int) -> str:
    for unit, factor in _BYTES:
        if size >= factor and size % factor == 0:
            return f'"{size // factor}{unit}"'
    return str(size)


def toml_value(value: Any, metadata: list[Any]) -> str:
    """The default as it would be written in the TOML file."""
    func = _validator(metadata)
    if func is configuration.parse_duration:
        return _duration(float(value))
    if func is configuration.parse_size:
        return _size(int(value))
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v, []) for v in value) + "]"
    if isinstance(value, HostPort):
        return json.dumps(str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _sections() -> Iterator[tuple[str, type[BaseModel]]]:
    """(TOML table name, model) in the order of the Config model."""
    for name, field in configuration.Config.model_fields.items():
        if name == "source":  # where the config came from, not a key
            continue
        if name == "domains":
            domain_model = typing.get_args(field.annotation)[1]
            yield 'domains."NAME"', domain_model
            continue
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            raise DocError(f"Config.{name} is neither a section nor domains")
        yield name, field.annotation


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """The docstring written under each field of `model` (`key: T = default` then
    `\"\"\"...\"\"\"`), read from its source here rather than by pydantic's
    `use_attribute_docstrings`, which would parse the source on every `relay` start."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(model)))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, after in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _key_rows(table: str, model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo, str]]:
    docs = field_docs(model)
    for key, field in model.model_fields.items():
        description = field.description or docs.get(key)
        if not description:
            raise DocError(
                f"{inspect.getsourcefile(model)}: {table}.{key} has no docstring "
                f"(write one under the field; it is the reference's description)"
            )
        yield key, field, description


def configuration_reference() -> str:
    """docs/configuration.md, from the config model."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from relay/core/config.py (the field docstrings) by",
        "     `python -m relay.ops.docgen`: edit those, then run it. -->",
        "",
        "mx-relay reads one TOML file: the one named by `-c/--config PATH`, else",
        "`$RELAY_CONFIG`, else `config/relay.toml` if it exists, else it runs on the",
        "built-in defaults below. `relay check-config` validates a file and prints the",
        "effective settings; every problem is reported as one `file: key: problem` line.",
        "",
        "- Durations are strings like `\"30s\"`, `\"5m\"`, `\"4h\"`, `\"5d\"` (units `ms`, `s`,",
        "  `m`, `h`, `d`, `w`) or a number of seconds.",
        "- Sizes are strings like `\"35MB\"`, `\"512KiB\"` (`kB`/`MB`/`GB` are powers of",
        "  1000, `KiB`/`MiB`/`GiB` of 1024) or a number of bytes.",
        "- Unknown keys and unknown tables are errors, not ignored.",
        "- Relative file paths (`tls_cert`, `tls_key`, `recipients_file`) are relative",
        "  to the directory of the config file, and must exist when it is loaded.",
        "- Environment: `RELAY_QUEUE_URL` overrides `queue.url`; `RELAY_LISTEN`",
        "  (comma-separated `ip:port` list) overrides `smtp.listen`.",
        "",
    ]
    example: list[str] = []
    for table, model in _sections():
        summary = _one_line(model.__doc__).removeprefix(f"`[{table}]`: ")
        out += [f"## `[{table}]`", "", summary, ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        example.append(f"[{table}]" if table != 'domains."NAME"' else '[domains."example.com"]')
        for key, field, description in _key_rows(table, model):
            kind = type_name(field.annotation, field.metadata)
            default = toml_value(field.default, field.metadata)
            out.append(
                f"| `{key}` | {_cell(kind)} | `{_cell(default)}` "
                f"| {_cell(_one_line(description))} |"
            )
            example.append(f"{key} = {default}")
        out.append("")
        example.append("")
    out += [
        "## Every default, as a file",
        "",
        "Every key may be left out; a relay hosts only the domains given as",
        "`[domains.\"NAME\"]` tables.",
        "",
        "```toml",
        *example[:-1],
        "```",
        "",
    ]
    return "\n".join(out)


# -- man pages -------------------------------------------------------------------


_CODE = re.compile(r"`([^`]+)`")


def roff(text: str) -> str:
    """Text safe for roff: backslashes, hyphens, leading dots; `code` in bold."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = _CODE.sub(lambda m: f"\\fB{m[1]}\\fR", text)
    lines = []
    for line in text.splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _paragraphs(text: str) -> list[str]:
    parts = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.replace("\b", ""))]
    return [p for p in parts if p]


def _options(ctx: click.Context) -> list[str]:
    out = []
    for param in ctx.command.get_params(ctx):
        if isinstance(param, click.Argument):  # named in the synopsis
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out += [".TP", f"\\fB{roff(names)}\\fR", roff(help_text or "")]
    return out


def _synopsis(ctx: click.Context) -> list[str]:
    pieces = " ".join(ctx.command.collect_usage_pieces(ctx))
    return [f".B {roff(ctx.command_path)}", roff(pieces)]


def _title(page: str, summary: str) -> list[str]:
    return [
        '.\\" Generated by python -m relay.ops.docgen from the relay command tree.',
        f'.TH {page.upper()} 1 "" "mx-relay" "mx-relay manual"',
        ".SH NAME",
        f"{roff(page)} \\- {roff(summary)}",
    ]


_EXIT_STATUS = [
    ".SH EXIT STATUS",
    ".TP",
    ".B 0",
    "success",
    ".TP",
    ".B 1",
    "operational error (a bad config, an unknown queue ID, a database that cannot be "
    "reached); one line on standard error",
    ".TP",
    ".B 2",
    "usage error (unknown option, missing argument)",
]


def _command_section(ctx: click.Context) -> list[str]:
    """One subcommand of a group, as a subsection of the group's page."""
    command = ctx.command
    out = [f'.SS "{roff(ctx.command_path)} {roff(" ".join(command.collect_usage_pieces(ctx)))}"']
    for paragraph in _paragraphs(command.help or ""):
        out += [roff(paragraph), ".PP"]
    options = _options(ctx)
    if options:
        out += options
    return out


def _see_also(pages: list[str], this: str) -> list[str]:
    others = [p for p in pages if p != this]
    refs = ",\n".join(f".BR {p} (1)" for p in others)
    return [".SH SEE ALSO", refs, "", "The docs/ directory of mx-relay: configuration.md, "
            "cli.md, metrics.md, smtp\\-replies.md, operating.md."]


def man_pages(root: click.Group) -> dict[str, str]:
    """`relay.1` for the top level and `relay-<command>.1` per command."""
    top = click.Context(root, info_name="relay", **root.context_settings)
    names = [n for n in root.list_commands(top) if not root.commands[n].hidden]
    pages = ["relay", *(f"relay-{name}" for name in names)]
    result: dict[str, str] = {}

    out = _title("relay", _one_line(root.help).removeprefix("mx-relay: "))
    out += [".SH SYNOPSIS", *_synopsis(top), ".SH DESCRIPTION"]
    for paragraph in _paragraphs(root.help or ""):
        out += [roff(paragraph), ".PP"]
    out += [
        "Every command takes \\fB\\-c\\fR \\fIPATH\\fR before or after the command words.",
        ".SH OPTIONS", *_options(top), ".SH COMMANDS",
    ]
    for name in names:
        command = root.commands[name]
        out += [".TP", f"\\fBrelay {roff(name)}\\fR", roff(command.get_short_help_str(200))]
    out += [
        ".SH ENVIRONMENT",
        ".TP", ".B RELAY_CONFIG", "config file used when \\fB\\-c\\fR is not given",
        ".TP", ".B RELAY_QUEUE_URL", "overrides \\fBqueue.url\\fR of the config",
        ".TP", ".B RELAY_LISTEN", "overrides \\fBsmtp.listen\\fR (comma\\-separated ip:port)",
        ".SH FILES",
        ".TP", ".I config/relay.toml",
        "the config file used when neither \\fB\\-c\\fR nor \\fBRELAY_CONFIG\\fR names one",
        ".TP", ".I /var/lib/relay/queue.db",
        "the default SQLite queue (\\fBqueue.url\\fR)",
        *_EXIT_STATUS, *_see_also(pages, "relay"),
    ]
    result["relay.1"] = "\n".join(out) + "\n"

    for name in names:
        command = root.commands[name]
        ctx = click.Context(command, info_name=name, parent=top)
        page = f"relay-{name}"
        out = _title(page, _one_line(command.get_short_help_str(200)))
        out += [".SH SYNOPSIS", *_synopsis(ctx), ".SH DESCRIPTION"]
        for paragraph in _paragraphs(command.help or ""):
            out += [roff(paragraph), ".PP"]
        out += [".SH OPTIONS", *_options(ctx)]
        if isinstance(command, click.Group):
            out.append(".SH COMMANDS")
            for sub in command.list_commands(ctx):
                if command.commands[sub].hidden:
                    continue
                sub_ctx = click.Context(command.commands[sub], info_name=sub, parent=ctx)
                out += _command_section(sub_ctx)
        out += [*_EXIT_STATUS, *_see_also(pages, page)]
        result[f"{page}.1"] = "\n".join(out) + "\n"
    return result


# -- writing and checking ----------------------------------------------------------


def generate() -> dict[str, str]:
    """Every generated file, by its path under docs/."""
    from relay.ops.cli.main import command_tree

    files = {CONFIG_DOC: configuration_reference()}
    for name, text in man_pages(command_tree()).items():
        files[f"{MAN_DIR}/{name}"] = text
    return files


def stale(docs: Path) -> list[str]:
    """What differs between the generated files and those under `docs`."""
    files = generate()
    problems = [
        f"{docs / path}: {'missing' if not (docs / path).is_file() else 'out of date'}"
        for path, text in files.items()
        if not (docs / path).is_file() or (docs / path).read_text(encoding="utf-8") != text
    ]
    man = docs / MAN_DIR
    if man.is_dir():
        for page in sorted(man.iterdir()):
            if f"{MAN_DIR}/{page.name}" not in files:
                problems.append(f"{page}: no longer generated (no such command)")
    return problems


def write(docs: Path) -> list[str]:
    """Write every generated file under `docs`; remove man pages of gone commands."""
    files = generate()
    written = []
    for path, text in files.items():
        target = docs / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            written.append(str(target))
    man = docs / MAN_DIR
    for page in sorted(man.iterdir()):
        if f"{MAN_DIR}/{page.name}" not in files:
            page.unlink()
            written.append(f"{page} (removed)")
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m relay.ops.docgen [--check] [DOCS_DIR]` (default: ./docs)."""
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    rest = [a for a in args if a != "--check"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        print("usage: python -m relay.ops.docgen [--check] [DOCS_DIR]", file=sys.stderr)
        return 2
    docs = Path(rest[0] if rest else "docs")
    try:
        if check:
            problems = stale(docs)
            for problem in problems:
                print(f"{problem}: {HEADER}", file=sys.stderr)
            return 1 if problems else 0
        for path in write(docs):
            print(f"wrote {path}")
    except (DocError, OSError) as exc:
        print(f"docgen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
