"""Agent configuration from flags and TOML: what is accepted, and the message for what is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from registry.agent.config import AgentConfig, Upstream, build_config, parse_duration_s, parse_upstream
from registry.agent.errors import ConfigError
from registry.agent.outlier import OutlierConfig


def test_flags_only() -> None:
    cfg = build_config(service="web", address="127.0.0.1:8080", ttl="5s", check="tcp:127.0.0.1:8080",
                       check_interval="500ms", check_timeout="200ms", rise=1, fall=2,
                       upstreams=["api=9001", "db=127.0.0.2:9002:p2c"], http="127.0.0.1:7300", tags=["v1"],
                       meta=["zone=a"])
    (svc,) = cfg.services
    assert (svc.name, svc.id, svc.address, svc.port, svc.tags, svc.meta) == (
        "web", "web-127.0.0.1-8080", "127.0.0.1", 8080, ("v1",), (("zone", "a"),))
    assert svc.check is not None and (svc.check.interval_s, svc.check.timeout_s, svc.check.fall) == (0.5, 0.2, 2)
    assert cfg.ttl_ms == 5000
    assert cfg.upstreams == (Upstream("api", 9001), Upstream("db", 9002, "127.0.0.2", "p2c"))
    assert cfg.http == ("127.0.0.1", 7300)
    assert cfg.source == "web"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api=9001", Upstream("api", 9001)),
        ("api=9001:least_conn", Upstream("api", 9001, policy="least_conn")),
        ("api=9001:rr", Upstream("api", 9001, policy="round_robin")),
        ("api=0.0.0.0:9001", Upstream("api", 9001, "0.0.0.0")),
        ("api=localhost:9001:weighted", Upstream("api", 9001, "localhost", "weighted")),
    ],
)
def test_upstream_flag(text: str, expected: Upstream) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing to do"),
        ({"upstreams": ["api"]}, "bad upstream 'api'"),
        ({"upstreams": ["api=x"]}, "'x' is not a port"),
        ({"upstreams": ["api=9001:fastest"]}, "unknown load-balancing policy 'fastest'"),
        ({"upstreams": ["api=70000"]}, "port must be 1..65535"),
        ({"upstreams": ["a=9001", "b=9001"]}, "two upstreams listen on 127.0.0.1:9001"),
        ({"upstreams": ["a=9001", "a=9002"]}, "upstream a is given twice"),
        ({"upstreams": ["bad name=9001"]}, "not a valid name"),
        ({"upstreams": ["api=9001"], "http": "127.0.0.1:9001"}, "also an upstream's listen address"),
        ({"upstreams": ["api=9001"], "http": "nope"}, "--http must be HOST:PORT"),
        ({"service": "web"}, "--service needs --address"),
        ({"address": "127.0.0.1:80"}, "--address needs --service"),
        ({"check": "tcp:127.0.0.1:80", "upstreams": ["a=1"]}, "--check needs --service"),
        ({"service": "web", "address": "127.0.0.1"}, "address must be HOST:PORT"),
        ({"service": "web", "address": "127.0.0.1:80", "check": "ping:x"}, "use http:URL, tcp:HOST:PORT"),
        ({"service": "web", "address": "127.0.0.1:80", "check": "tcp:x:1", "check_interval": "soon"},
         "check interval must be a duration"),
        ({"service": "web", "address": "127.0.0.1:80", "ttl": "100ms"}, "ttl must be 1s..86400s"),
        ({"service": "web", "address": "127.0.0.1:80", "weight": 0}, "weight"),
        ({"service": "web", "address": "127.0.0.1:80", "meta": ["novalue"]}, "--meta must be KEY=VALUE"),
        ({"service": "-web", "address": "127.0.0.1:80"}, "not a valid name"),
        ({"upstreams": ["api=9001"], "endpoints": ["nohost"]}, "registry endpoint must be HOST:PORT"),
    ],
)
def test_flag_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(**kwargs)


GOOD_TOML = """
endpoints = ["127.0.0.1:7001", "127.0.0.1:7002"]
ttl = "4s"
http = "127.0.0.1:7300"
access_log = "access.log"

[[service]]
name = "web"
id = "web-1"
address = "127.0.0.1:8080"
weight = 3
tags = ["v1"]
meta = { zone = "a" }
check = "http:http://127.0.0.1:8080/health"
check_interval = "1s"
check_timeout = "500ms"
rise = 1
fall = 2

[[upstream]]
service = "api"
port = 9001
policy = "p2c"

[[upstream]]
service = "db"
listen = "127.0.0.1:9002"

[outlier]
consecutive_failures = 5
base_ejection = "2s"
max_ejection = "1m"
max_ejection_percent = 30
panic_threshold_percent = 0
connect_timeout = "250ms"
connect_attempts = 2
"""


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD_TOML)
    cfg = build_config(path)
    assert cfg.endpoints == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert cfg.ttl_ms == 4000
    assert cfg.access_log == tmp_path / "access.log"  # relative to the file
    (svc,) = cfg.services
    assert (svc.id, svc.weight, svc.meta) == ("web-1", 3, (("zone", "a"),))
    assert svc.check is not None and svc.check.kind == "http" and svc.check.rise == 1
    assert cfg.upstreams == (Upstream("api", 9001, policy="p2c"), Upstream("db", 9002))
    assert cfg.outlier == OutlierConfig(5, 2.0, 60.0, 30, 0)
    assert (cfg.connect_timeout_s, cfg.connect_attempts) == (0.25, 2)


def test_flags_add_to_and_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD_TOML)
    cfg = build_config(path, endpoints=["127.0.0.1:7009"], ttl="9s", upstreams=["cache=9003"],
                       service="worker", address="127.0.0.1:8081")
    assert cfg.endpoints == ("127.0.0.1:7009",)
    assert cfg.ttl_ms == 9000
    assert [u.service for u in cfg.upstreams] == ["api", "db", "cache"]
    assert [s.name for s in cfg.services] == ["web", "worker"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttl = ", "not valid TOML"),
        ("colour = 'blue'\n", "unknown key\\(s\\) colour"),
        ("[[upstream]]\nservice = 'api'\n", "give exactly one of listen"),
        ("[[upstream]]\nservice = 'api'\nport = 1\nlisten = '127.0.0.1:2'\n", "give exactly one of listen"),
        ("[[upstream]]\nport = 9001\n", "service is required"),
        ("[[upstream]]\nservice = 'api'\nport = '9001'\n", "port must be a int"),
        ("[[upstream]]\nservice = 'api'\nport = 9001\npolicy = 'random'\n", "unknown load-balancing policy"),
        ("[[service]]\nname = 'web'\n", "name and address are required"),
        ("[[service]]\nname = 'web'\naddress = '127.0.0.1:1'\ncheck = 'tcp:nope'\n", "tcp:HOST:PORT"),
        ("[[service]]\nname = 'web'\naddress = '127.0.0.1:1'\nweight = true\n", "weight must be a int"),
        ("[[service]]\nname = 'a'\naddress = '127.0.0.1:1'\n[[service]]\nname = 'a'\naddress = '127.0.0.1:1'\n",
         "given twice"),
        ("[outlier]\nmax_ejection_percent = 150\n[[upstream]]\nservice = 'a'\nport = 1\n", "max_ejection_percent"),
        ("[outlier]\nspeed = 1\n", "unknown key\\(s\\) speed"),
        ("endpoints = [1]\n", "endpoints must be a list"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(("value", "seconds"), [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1.5", 1.5), (3, 3.0)])
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration_s(value, "x") == seconds


def test_default_config_is_rejected_for_having_nothing_to_do() -> None:
    with pytest.raises(ConfigError, match="nothing to do"):
        AgentConfig().validate()


def test_cli_builds_the_config_and_a_file_beats_only_the_default_endpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import registry.agent.runner
    from cli.main import cli

    seen: list[AgentConfig] = []
    monkeypatch.setattr(registry.agent.runner, "run_agent", lambda config: seen.append(config))
    path = tmp_path / "agent.toml"
    path.write_text('endpoints = ["127.0.0.1:7101"]\n[[upstream]]\nservice = "api"\nport = 9001\n')
    runner = CliRunner()
    assert runner.invoke(cli, ["agent", "--config", str(path)]).exit_code == 0
    assert runner.invoke(cli, ["--endpoints", "127.0.0.1:7201", "agent", "--config", str(path),
                               "--upstream", "db=9002:p2c"]).exit_code == 0
    assert [c.endpoints for c in seen] == [("127.0.0.1:7101",), ("127.0.0.1:7201",)]
    assert [u.policy for u in seen[1].upstreams] == ["round_robin", "p2c"]
    bad = runner.invoke(cli, ["agent", "--upstream", "api=9001:fastest"])
    assert bad.exit_code == 2 and "unknown load-balancing policy 'fastest'" in bad.output
