"""Health checks without I/O: check specs, and the rise/fall state machine.

A check spec is text, as on the command line:

- ``http:URL``         passing on a 2xx answer to GET URL (http or https);
- ``tcp:HOST:PORT``    passing when a TCP connect succeeds;
- ``cmd:COMMAND``      passing when COMMAND (split like a shell, not run by
                       one) exits 0.

``HealthState`` turns check results into a status that does not flap: the
first result sets the status at once (so a new instance gets routable after
one good check), after that it takes ``rise`` passes in a row to go from
critical to passing and ``fall`` failures in a row to go the other way.  A
check that alternates pass/fail therefore leaves the status where it was.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

from registry.agent.errors import ConfigError
from registry.config import parse_hostport
from registry.errors import InvalidArgument

__all__ = ["CheckSpec", "HealthState", "parse_check", "CHECK_KINDS", "PASSING", "CRITICAL"]

PASSING = "passing"
CRITICAL = "critical"
CHECK_KINDS = ("http", "tcp", "cmd")

#: Shortest check interval: below this, checks cost the app more than they tell.
CHECK_INTERVAL_S_MIN = 0.05
#: Longest interval/timeout: a check that runs less often than this does not protect anyone.
CHECK_INTERVAL_S_MAX = 3600.0
#: rise/fall above this would take minutes to react at any sane interval.
RISE_FALL_MAX = 100


@dataclass(frozen=True, slots=True)
class CheckSpec:
    kind: str
    #: URL (http), HOST:PORT (tcp) or the command line (cmd), as given.
    target: str
    interval_s: float = 2.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 3

    @property
    def argv(self) -> list[str]:
        """The command's argv (cmd checks)."""
        return shlex.split(self.target)

    @property
    def hostport(self) -> tuple[str, int]:
        """HOST, PORT (tcp checks)."""
        return parse_hostport(self.target, what="tcp check")

    def describe(self) -> str:
        return f"{self.kind}:{self.target}"

    def validate(self) -> None:
        if self.kind not in CHECK_KINDS:
            raise ConfigError(f"check kind must be one of {', '.join(CHECK_KINDS)}, got {self.kind!r}")
        if self.kind == "http":
            _check_url(self.target)
        elif self.kind == "tcp":
            try:
                self.hostport  # noqa: B018  (parses, or raises)
            except InvalidArgument as err:
                raise ConfigError(f"bad check tcp:{self.target}: {err.message} (use tcp:HOST:PORT)") from None
        else:
            try:
                argv = self.argv
            except ValueError as err:
                raise ConfigError(f"bad check cmd:{self.target}: {err}") from None
            if not argv:
                raise ConfigError("bad check: cmd: needs a command (use cmd:COMMAND ARGS...)")
        if not CHECK_INTERVAL_S_MIN <= self.interval_s <= CHECK_INTERVAL_S_MAX:
            raise ConfigError(f"check interval must be {CHECK_INTERVAL_S_MIN:g}s..{CHECK_INTERVAL_S_MAX:g}s, "
                              f"got {self.interval_s:g}s")
        if not 0 < self.timeout_s <= self.interval_s:
            raise ConfigError(f"check timeout must be positive and at most the interval ({self.interval_s:g}s), "
                              f"got {self.timeout_s:g}s")
        for name, value in (("rise", self.rise), ("fall", self.fall)):
            if not 1 <= value <= RISE_FALL_MAX:
                raise ConfigError(f"check {name} must be 1..{RISE_FALL_MAX}, got {value}")


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"bad check http:{url}: the URL must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"bad check http:{url}: the URL has no host")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as err:
        raise ConfigError(f"bad check http:{url}: {err}") from None


def parse_check(text: str, *, interval_s: float = 2.0, timeout_s: float = 1.0, rise: int = 2,
                fall: int = 3) -> CheckSpec:
    """Parse ``KIND:TARGET`` and validate the whole check; ConfigError says what is wrong."""
    kind, sep, target = text.strip().partition(":")
    if not sep or kind not in CHECK_KINDS:
        raise ConfigError(f"bad check {text!r}: use http:URL, tcp:HOST:PORT or cmd:COMMAND")
    if not target.strip():
        raise ConfigError(f"bad check {text!r}: nothing after {kind}:")
    spec = CheckSpec(kind, target.strip(), interval_s, timeout_s, rise, fall)
    spec.validate()
    return spec


class HealthState:
    """Status from a stream of check results, with rise/fall counts (see the module docstring)."""

    def __init__(self, rise: int, fall: int, status: str | None = None) -> None:
        assert rise >= 1 and fall >= 1, "rise and fall are at least 1"
        assert status in (None, PASSING, CRITICAL)
        self.rise = rise
        self.fall = fall
        #: None until the first result.
        self.status = status
        #: Results in a row that disagree with the status.
        self._streak = 0

    def observe(self, ok: bool) -> str | None:
        """Feed one result; return the new status if it changed (the first result always does)."""
        if self.status is None:
            self.status = PASSING if ok else CRITICAL
            return self.status
        agrees = ok == (self.status == PASSING)
        if agrees:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < (self.rise if ok else self.fall):
            return None
        self._streak = 0
        self.status = PASSING if ok else CRITICAL
        return self.status
