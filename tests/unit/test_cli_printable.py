"""CLI text output escapes what could drive a terminal (issue #20, finding 10)."""

from __future__ import annotations

import pytest

from cli.output import printable, table


@pytest.mark.parametrize(
    ("text", "keep", "expected"),
    [
        ("plain text", "", "plain text"),
        ("ünïcödé ok", "", "ünïcödé ok"),
        ("\x1b[2J", "", "\\x1b[2J"),  # clear the screen
        ("\x1b]0;pwned\x07", "", "\\x1b]0;pwned\\x07"),  # retitle the terminal
        ("a\nfake row", "", "a\\nfake row"),
        ("a\nb", "\n", "a\nb"),
        ("tab\there", "", "tab\\there"),
        ("\x9b31m", "", "\\x9b31m"),  # the 8-bit CSI
        ("zero\u200bwidth", "", "zero\\u200bwidth"),
    ],
)
def test_printable(text: str, keep: str, expected: str) -> None:
    assert printable(text, keep=keep) == expected


def test_table_cells_are_escaped() -> None:
    out = table([["web-1", "owner=\x1b[31mroot\x1b[0m"]], ["ID", "META"])
    assert "\x1b" not in out
    assert "\\x1b[31mroot" in out
