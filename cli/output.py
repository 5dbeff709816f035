"""Rendering for the CLI: human tables by default, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

__all__ = ["emit", "table", "printable"]


def printable(text: str, *, keep: str = "") -> str:
    r"""``text`` with every non-printable character (but those in ``keep``) written as its Python escape.

    Metadata, keys' values and names come from whoever may write them; printed raw, a value
    such as ``"\x1b]0;...\x07"`` or ``"\x1b[2J"`` would drive the reader's terminal (retitle
    it, clear it, fake other rows).  JSON output (``-o json``) escapes them already.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[printable(str(h)) for h in headers]] + [
        ["" if c is None else printable(str(c)) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def emit(output: str, data: Any, text: str) -> None:
    if output == "json":
        click.echo(json.dumps(data, sort_keys=True, default=str))
    else:
        # Lines are the caller's; anything else that cannot be printed is escaped (see printable).
        click.echo(printable(text, keep="\n"))
