"""Durations on the command line: 500ms, 10s, 2m, 1h, or a bare number of seconds."""

from __future__ import annotations

import re

import click

from registry.fsm.model import LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN

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


def format_duration_ms(ms: int) -> str:
    """The largest whole unit: 86400000 -> "24h", 1000 -> "1s", 1500 -> "1500ms"."""
    for unit in ("h", "m", "s"):
        if ms and ms % _UNITS_MS[unit] == 0:
            return f"{ms // _UNITS_MS[unit]}{unit}"
    return f"{ms}ms"


class LeaseTtl(Duration):
    """A lease TTL: checked against the registry's bounds here, in the user's units, before any request."""

    name = "ttl"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        ms = super().convert(value, param, ctx)
        if not LEASE_TTL_MS_MIN <= ms <= LEASE_TTL_MS_MAX:
            self.fail(f"TTL must be {format_duration_ms(LEASE_TTL_MS_MIN)}..{format_duration_ms(LEASE_TTL_MS_MAX)}, "
                      f"got {value}", param, ctx)
        return ms
