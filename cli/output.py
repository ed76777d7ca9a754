"""What the commands print for machines and people: the `-o/--output` option
(table, yaml, json), the documents JSON and YAML carry (``apiVersion`` and
``kind`` on top, docs/cli.md has each kind's fields), and progress lines for long
operations (on stderr, so a script's stdout stays clean)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import yaml

F = TypeVar("F", bound=Callable[..., Any])

API_VERSION = "meshnode/v1"
FORMATS = ("table", "yaml", "json")
# Older spellings still accepted: `-o text` was the human form of status, workload ls.
_ALIASES = {"text": "table"}


class OutputFormat(click.Choice):
    """table, yaml or json; `text` means table (scripts written before `table`)."""

    def __init__(self) -> None:
        super().__init__(list(FORMATS), case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            value = _ALIASES.get(value.lower(), value)
        return super().convert(value, param, ctx)


def output_option(default: str = "table") -> Callable[[F], F]:
    """``-o/--output table|yaml|json``."""
    return click.option(
        "-o",
        "--output",
        type=OutputFormat(),
        default=default,
        show_default=True,
        help="table (for people; 'text' is the same), yaml, or json; docs/cli.md "
        "documents the fields.",
    )


def document(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """A document of `kind`: ``{"apiVersion": "meshnode/v1", "kind": kind, ...body}``."""
    return {"apiVersion": API_VERSION, "kind": kind, **body}


def item_list(kind: str, items: list[Any], **fields: Any) -> dict[str, Any]:
    """A list document, Kubernetes style: ``{"apiVersion", "kind", ..., "items": [...]}``."""
    return {"apiVersion": API_VERSION, "kind": kind, **fields, "items": items}


def to_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)


def to_yaml(doc: Any) -> str:
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


def emit(doc: Any, output: str, table: Callable[[], str]) -> None:
    """Print `doc` as JSON or YAML, or `table()` for people."""
    if output == "json":
        click.echo(to_json(doc))
    elif output == "yaml":
        click.echo(to_yaml(doc), nl=False)
    else:
        click.echo(table())


def columns(rows: list[list[str]]) -> str:
    """Rows (the first one the header) as left-aligned columns two spaces apart."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# --- progress ---------------------------------------------------------------------------


def progress_option(fn: F) -> F:
    """``--progress/--no-progress``: one line per step on stderr; by default only
    when stderr is a terminal."""
    return click.option(
        "--progress/--no-progress",
        default=None,
        help="Print one line per step on stderr [default: when stderr is a terminal].",
    )(fn)


def progress_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def progress_printer(flag: bool | None) -> Callable[[str], None] | None:
    """Where finished progress lines go: stderr, or nowhere (None)."""
    if not progress_enabled(flag):
        return None
    return lambda line: click.echo(line, err=True)


class Progress:
    """Counts the steps of one operation: ``[3/8] node3: enrolled (1.2 s)``, the
    time being since the step before (or the start)."""

    def __init__(
        self,
        total: int,
        out: Callable[[str], None] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.clock = clock
        self.last = clock()

    def step(self, what: str) -> None:
        self.done += 1
        now = self.clock()
        if self.out is not None:
            self.out(f"[{self.done}/{max(self.total, self.done)}] {what} ({now - self.last:.1f} s)")
        self.last = now
