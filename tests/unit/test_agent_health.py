"""Check specs and the rise/fall state machine."""

from __future__ import annotations

import pytest

from registry.agent.errors import ConfigError
from registry.agent.health import CRITICAL, PASSING, HealthState, parse_check

P, F = True, False


# Each row: rise, fall, a stream of results, and the status after each one.
@pytest.mark.parametrize(
    ("rise", "fall", "results", "statuses"),
    [
        # The first result decides at once.
        (2, 3, [P], ["passing"]),
        (2, 3, [F], ["critical"]),
        # Three failures in a row to fall, two passes in a row to rise.
        (2, 3, [P, F, F, F, P, P], ["passing", "passing", "passing", "critical", "critical", "passing"]),
        # A flapping check does not flap the status.
        (2, 3, [P, F, P, F, F, P, F, F], ["passing"] * 8),
        (2, 2, [F, P, F, P, F, P], ["critical"] * 6),
        # rise 1 / fall 1: every change shows.
        (1, 1, [P, F, P], ["passing", "critical", "passing"]),
    ],
)
def test_rise_and_fall(rise: int, fall: int, results: list[bool], statuses: list[str]) -> None:
    state = HealthState(rise, fall)
    assert [(state.observe(ok), state.status)[1] for ok in results] == statuses


def test_observe_returns_only_changes() -> None:
    state = HealthState(2, 2)
    assert [state.observe(ok) for ok in [P, P, F, F, F, P, P]] == [PASSING, None, None, CRITICAL, None, None, PASSING]


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        ("http:http://127.0.0.1:8080/health", "http", "http://127.0.0.1:8080/health"),
        ("http:https://svc.local/ready", "http", "https://svc.local/ready"),
        ("tcp:127.0.0.1:5432", "tcp", "127.0.0.1:5432"),
        ("tcp:[::1]:5432", "tcp", "[::1]:5432"),
        ("cmd:test -f /tmp/ready", "cmd", "test -f /tmp/ready"),
        ("cmd:sh -c 'exit 0'", "cmd", "sh -c 'exit 0'"),
    ],
)
def test_good_specs(text: str, kind: str, target: str) -> None:
    spec = parse_check(text)
    assert (spec.kind, spec.target) == (kind, target)


def test_spec_parts() -> None:
    assert parse_check("tcp:127.0.0.1:5432").hostport == ("127.0.0.1", 5432)
    assert parse_check("cmd:sh -c 'exit 3'").argv == ["sh", "-c", "exit 3"]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("ping:127.0.0.1", {}, "use http:URL, tcp:HOST:PORT or cmd:COMMAND"),
        ("127.0.0.1:80", {}, "use http:URL"),
        ("http:", {}, "nothing after http:"),
        ("http:127.0.0.1:8080/health", {}, "must start with http:// or https://"),
        ("http:http:///health", {}, "no host"),
        ("http:http://h:99999/", {}, "out of range"),
        ("tcp:localhost", {}, "tcp:HOST:PORT"),
        ("tcp:localhost:0", {}, "port must be 1..65535"),
        ("cmd:'unclosed", {}, "No closing quotation"),
        ("tcp:127.0.0.1:80", {"interval_s": 0.001}, "interval must be"),
        ("tcp:127.0.0.1:80", {"interval_s": 1.0, "timeout_s": 2.0}, "at most the interval"),
        ("tcp:127.0.0.1:80", {"rise": 0}, "rise must be 1..100"),
        ("tcp:127.0.0.1:80", {"fall": 1000}, "fall must be 1..100"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_check(text, **kwargs)  # type: ignore[arg-type]
