"""Durations on the command line: 500ms, 10s, 2m, 1h, or a bare number of seconds."""

from __future__ import annotations

import re

import click

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration_ms(text: str) -> int:
    match = _PATTERN.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 10s, 2m, 1h)")
    value = float(match.group(1))
    return round(value * _UNITS_MS[match.group(2) or "s"])


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A click type giving milliseconds."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration_ms(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)
