"""The shell commands of a Markdown document, by section, for tests that run them.

Tests take their commands from the documents instead of copying them, so a
document change that breaks a command fails a test.  Only fenced blocks
whose info string is ``sh`` hold commands; other fences (``yaml``, ``text``)
are not commands.  A command is one line of such a block, with its trailing
``# comment`` removed and a backslash-continued line joined to the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REPO", "Command", "commands", "find_command", "split_comment"]

REPO = Path(__file__).resolve().parents[2]

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_FENCE = re.compile(r"^(```+|~~~+)\s*(\S*)")


@dataclass(frozen=True)
class Command:
    """One shell command of a document: the text to run, where it sits, and the comment beside it."""

    text: str
    section: str
    line: int
    comment: str


def split_comment(line: str) -> tuple[str, str]:
    """``(command, comment)``: the first ``#`` outside quotes that starts a word begins the comment."""
    quote: str | None = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def commands(path: Path) -> list[Command]:
    """Every command of every ``sh`` block in ``path``, in document order, under its nearest ``##`` heading."""
    out: list[Command] = []
    section = ""
    fence: str | None = None
    is_shell = False
    pending = ""
    pending_line = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if fence is None:
            heading = _HEADING.match(raw)
            if heading and len(heading.group(1)) == 2:
                section = heading.group(2)
            opened = _FENCE.match(raw)
            if opened:
                fence, is_shell = opened.group(1), opened.group(2) == "sh"
            continue
        if raw.startswith(fence):
            assert not pending, f"{path.name}:{pending_line}: a command ends in a backslash at the block's end"
            fence = None
            continue
        if not is_shell:
            continue
        text, comment = split_comment(raw)
        if not pending:
            pending_line = number
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        joined = (pending + text.strip()).strip()
        pending = ""
        if joined:
            out.append(Command(joined, section, pending_line, comment))
    assert fence is None, f"{path.name}: a code fence is never closed"
    return out


def find_command(path: Path, prefix: str) -> Command:
    """The one command of ``path`` that starts with ``prefix`` (a test's anchor into the document)."""
    found = [c for c in commands(path) if c.text.startswith(prefix)]
    assert len(found) == 1, f"{path.name}: {len(found)} commands start with {prefix!r}, expected one"
    return found[0]
