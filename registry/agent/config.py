"""Agent configuration: one frozen value, built from flags and an optional TOML file.

``build_config`` takes the raw flag values (strings, as typed) and the file,
parses both, lets flags override the file's scalars and add to its lists,
and calls ``AgentConfig.validate()``, which checks every field and the
relations between them.  Every problem is a ``ConfigError`` whose message
names the flag or key and says what would be accepted.

File layout (every key optional)::

    endpoints = ["127.0.0.1:7001", "127.0.0.1:7002"]
    ttl = "10s"                 # lease TTL of the local instances
    http = "127.0.0.1:7300"     # /metrics and /healthz
    access_log = "access.log"
    name = "web"                # source service in the access log

    [[service]]                 # a local instance to register (repeatable)
    name = "web"
    id = "web-1"
    address = "127.0.0.1:8080"
    weight = 1
    tags = ["v1"]
    meta = { zone = "a" }
    check = "http:http://127.0.0.1:8080/health"
    check_interval = "2s"
    check_timeout = "1s"
    rise = 2
    fall = 3

    [[upstream]]                # a service to reach through a local port (repeatable)
    service = "api"
    listen = "127.0.0.1:9001"   # or: port = 9001
    policy = "p2c"

    [outlier]
    consecutive_failures = 3
    base_ejection = "1s"
    max_ejection = "30s"
    max_ejection_percent = 50
    panic_threshold_percent = 50
    connect_timeout = "1s"
    connect_attempts = 3

An upstream service that does not exist (yet) is not an error: it may be
registered later, and the agent picks it up from its watch.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.agent.errors import ConfigError
from registry.agent.health import CheckSpec, parse_check
from registry.agent.outlier import OutlierConfig
from registry.agent.policies import canonical_policy_name
from registry.client import DEFAULT_ENDPOINTS
from registry.config import parse_hostport
from registry.errors import BadRequest
from registry.fsm import model

__all__ = [
    "AgentConfig",
    "LocalService",
    "Upstream",
    "build_config",
    "load_file",
    "make_service",
    "parse_duration_s",
    "parse_upstream",
]

#: Connect attempts per client connection: each failed attempt reroutes to
#: another endpoint; beyond a few, the client has waited long enough.
CONNECT_ATTEMPTS_MAX = 10
#: A connect timeout above this only delays the reroute.
CONNECT_TIMEOUT_S_MAX = 60.0

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(value: Any, what: str) -> float:
    """``500ms``, ``2s``, ``1m``, ``1h`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a duration such as 500ms, 2s or 1m, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is not None:
            return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]
    raise ConfigError(f"{what} must be a duration such as 500ms, 2s or 1m, got {value!r}")


@dataclass(frozen=True, slots=True)
class LocalService:
    """One local instance the agent registers, keeps alive and health-checks."""

    name: str
    id: str
    address: str
    port: int
    weight: int = model.WEIGHT_DEFAULT
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    check: CheckSpec | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream service, proxied from a local port."""

    service: str
    port: int
    host: str = "127.0.0.1"
    policy: str = "round_robin"

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    endpoints: tuple[str, ...] = DEFAULT_ENDPOINTS
    token: str | None = None
    #: TLS to the registry (the CLI's --tls-ca/--tls-cert/--tls-key): CA file, client certificate and key.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    services: tuple[LocalService, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    #: Lease TTL of the local instances; renewed every third of it.
    ttl_ms: int = 10_000
    #: /metrics and /healthz; None: no HTTP.
    http: tuple[str, int] | None = None
    access_log: Path | None = None
    #: Source service in access-log lines (default: the first local service, else "agent").
    name: str = ""
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    connect_timeout_s: float = 1.0
    connect_attempts: int = 3
    #: Seed of the p2c policy's RNG (None: random); tests and benchmarks fix it.
    seed: int | None = None
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def source(self) -> str:
        return self.name or (self.services[0].name if self.services else "agent")

    def replace(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if not self.endpoints:
            raise ConfigError("no registry endpoints given")
        for endpoint in self.endpoints:
            _hostport(endpoint, "registry endpoint")
        if not model.LEASE_TTL_MS_MIN <= self.ttl_ms <= model.LEASE_TTL_MS_MAX:
            raise ConfigError(f"ttl must be {model.LEASE_TTL_MS_MIN / 1000:g}s..{model.LEASE_TTL_MS_MAX / 1000:g}s, "
                              f"got {self.ttl_ms / 1000:g}s")
        if not self.services and not self.upstreams:
            raise ConfigError("nothing to do: give a local service (--service) and/or an upstream (--upstream)")
        seen_ids: set[tuple[str, str]] = set()
        for svc in self.services:
            _validate_service(svc)
            if (svc.name, svc.id) in seen_ids:
                raise ConfigError(f"local instance {svc.name}/{svc.id} is given twice")
            seen_ids.add((svc.name, svc.id))
        listens: set[tuple[str, int]] = set()
        services: set[str] = set()
        for up in self.upstreams:
            _name(up.service, "upstream service")
            if up.service in services:
                # One table, balancer and metric series per service: a second listener would split them.
                raise ConfigError(f"upstream {up.service} is given twice (one local port per upstream service)")
            services.add(up.service)
            canonical_policy_name(up.policy)
            if not model.PORT_MIN <= up.port <= model.PORT_MAX:
                raise ConfigError(f"upstream {up.service}: port must be 1..65535, got {up.port}")
            if (up.host, up.port) in listens:
                raise ConfigError(f"two upstreams listen on {up.listen}")
            listens.add((up.host, up.port))
        if self.http is not None and self.http in listens:
            raise ConfigError(f"--http {self.http[0]}:{self.http[1]} is also an upstream's listen address")
        if self.name:
            _name(self.name, "name")
        self.outlier.validate()
        if not 0 < self.connect_timeout_s <= CONNECT_TIMEOUT_S_MAX:
            raise ConfigError(f"connect timeout must be in (0, {CONNECT_TIMEOUT_S_MAX:g}s], "
                              f"got {self.connect_timeout_s:g}s")
        if not 1 <= self.connect_attempts <= CONNECT_ATTEMPTS_MAX:
            raise ConfigError(f"connect attempts must be 1..{CONNECT_ATTEMPTS_MAX}, got {self.connect_attempts}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log format must be text or json, got {self.log_format!r}")


def _hostport(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_hostport(text, what=what)
    except BadRequest as err:
        raise ConfigError(err.message) from None


def _name(value: str, what: str) -> str:
    try:
        return model.check_name(what, value)
    except BadRequest as err:
        raise ConfigError(err.message) from None


def _validate_service(svc: LocalService) -> None:
    _name(svc.name, "service")
    _name(svc.id, "id")
    try:
        model.check_address("address", svc.address)
        model.check_port("port", svc.port)
        model.check_weight("weight", svc.weight)
        model.check_tags("tags", list(svc.tags))
        model.check_meta("meta", dict(svc.meta))
    except BadRequest as err:
        raise ConfigError(f"local service {svc.name}/{svc.id}: {err.message}") from None
    if svc.check is not None:
        svc.check.validate()


def parse_upstream(text: str) -> Upstream:
    """``NAME=PORT``, ``NAME=PORT:POLICY``, ``NAME=HOST:PORT`` or ``NAME=HOST:PORT:POLICY``."""
    name, sep, rest = text.partition("=")
    usage = "use --upstream NAME=LOCAL_PORT[:POLICY] or NAME=HOST:PORT[:POLICY]"
    if not sep or not name.strip() or not rest.strip():
        raise ConfigError(f"bad upstream {text!r}: {usage}")
    parts = rest.strip().split(":")
    policy = "round_robin"
    if len(parts) > 1 and not parts[-1].isdigit():
        policy = parts.pop()
    if len(parts) == 1:
        host, port_text = "127.0.0.1", parts[0]
    elif len(parts) == 2:
        host, port_text = parts
    else:
        raise ConfigError(f"bad upstream {text!r}: {usage}")
    if not port_text.isdigit():
        raise ConfigError(f"bad upstream {text!r}: {port_text!r} is not a port; {usage}")
    return Upstream(service=name.strip(), port=int(port_text), host=host, policy=canonical_policy_name(policy))


# -- file --------------------------------------------------------------------------

_TOP_KEYS = {"endpoints", "token", "ttl", "http", "access_log", "name", "service", "upstream", "outlier",
             "log_format", "log_level"}
_SERVICE_KEYS = {"name", "id", "address", "weight", "tags", "meta", "check", "check_interval", "check_timeout",
                 "rise", "fall"}
_UPSTREAM_KEYS = {"service", "listen", "port", "policy"}
_OUTLIER_KEYS = {"consecutive_failures", "base_ejection", "max_ejection", "max_ejection_percent",
                 "panic_threshold_percent", "connect_timeout", "connect_attempts"}


def _keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    return table


def _typed(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: {key} must be a {names}, got {value!r}")
    return value


def _service_from_table(table: Any, where: str) -> LocalService:
    t = _keys(table, _SERVICE_KEYS, where)
    name = _typed(t, "name", str, where)
    address = _typed(t, "address", str, where)
    if name is None or address is None:
        raise ConfigError(f"{where}: name and address are required")
    tags = _typed(t, "tags", list, where) or []
    meta = _typed(t, "meta", dict, where) or {}
    if not all(isinstance(x, str) for x in tags) or not all(isinstance(v, str) for v in meta.values()):
        raise ConfigError(f"{where}: tags and meta values must be strings")
    check = _typed(t, "check", str, where)
    return make_service(
        name, address, instance_id=_typed(t, "id", str, where), weight=_or(_typed(t, "weight", int, where), 1),
        tags=tags, meta=meta, check=check, check_interval=t.get("check_interval", "2s"),
        check_timeout=t.get("check_timeout", "1s"), rise=_or(_typed(t, "rise", int, where), 2),
        fall=_or(_typed(t, "fall", int, where), 3), where=where,
    )


def _upstream_from_table(table: Any, where: str) -> Upstream:
    t = _keys(table, _UPSTREAM_KEYS, where)
    service = _typed(t, "service", str, where)
    if service is None:
        raise ConfigError(f"{where}: service is required")
    listen = _typed(t, "listen", str, where)
    port = _typed(t, "port", int, where)
    if (listen is None) == (port is None):
        raise ConfigError(f"{where}: give exactly one of listen = \"HOST:PORT\" or port = N")
    host, port = _hostport(listen, f"{where} listen") if listen is not None else ("127.0.0.1", port)
    policy = canonical_policy_name(_typed(t, "policy", str, where) or "round_robin")
    return Upstream(service=service, port=port, host=host, policy=policy)


def load_file(path: Path) -> AgentConfig:
    """An ``AgentConfig`` from a TOML file (not yet validated: flags may still add to it)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    top = _keys(data, _TOP_KEYS, str(path))
    where = str(path)
    cfg = AgentConfig()
    endpoints = _typed(top, "endpoints", list, where)
    if endpoints is not None:
        if not all(isinstance(e, str) for e in endpoints):
            raise ConfigError(f"{where}: endpoints must be a list of \"HOST:PORT\" strings")
        cfg = cfg.replace(endpoints=tuple(endpoints))
    if "token" in top:
        cfg = cfg.replace(token=_typed(top, "token", str, where))
    if "ttl" in top:
        cfg = cfg.replace(ttl_ms=round(parse_duration_s(top["ttl"], f"{where}: ttl") * 1000))
    http = _typed(top, "http", str, where)
    if http:
        cfg = cfg.replace(http=_hostport(http, f"{where}: http"))
    access_log = _typed(top, "access_log", str, where)
    if access_log:
        cfg = cfg.replace(access_log=(path.parent / access_log))
    for key in ("name", "log_format", "log_level"):
        value = _typed(top, key, str, where)
        if value is not None:
            cfg = cfg.replace(**{key: value})
    services = _typed(top, "service", list, where) or []
    upstreams = _typed(top, "upstream", list, where) or []
    cfg = cfg.replace(
        services=tuple(_service_from_table(t, f"{where}: service #{i + 1}") for i, t in enumerate(services)),
        upstreams=tuple(_upstream_from_table(t, f"{where}: upstream #{i + 1}") for i, t in enumerate(upstreams)),
    )
    if "outlier" in top:
        o = _keys(top["outlier"], _OUTLIER_KEYS, f"{where}: [outlier]")
        w = f"{where}: [outlier]"
        base = OutlierConfig()
        outlier = OutlierConfig(
            consecutive_failures=_or(_typed(o, "consecutive_failures", int, w), base.consecutive_failures),
            base_ejection_s=parse_duration_s(o.get("base_ejection", base.base_ejection_s), f"{w} base_ejection"),
            max_ejection_s=parse_duration_s(o.get("max_ejection", base.max_ejection_s), f"{w} max_ejection"),
            max_ejection_percent=_or(_typed(o, "max_ejection_percent", int, w), base.max_ejection_percent),
            panic_threshold_percent=_or(_typed(o, "panic_threshold_percent", int, w), base.panic_threshold_percent),
        )
        cfg = cfg.replace(outlier=outlier)
        if "connect_timeout" in o:
            cfg = cfg.replace(connect_timeout_s=parse_duration_s(o["connect_timeout"], f"{w} connect_timeout"))
        if "connect_attempts" in o:
            cfg = cfg.replace(connect_attempts=_typed(o, "connect_attempts", int, w))
    return cfg


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def make_service(name: str, address: str, *, instance_id: str | None = None, weight: int = 1,
                 tags: Sequence[str] = (), meta: dict[str, str] | None = None, check: str | None = None,
                 check_interval: Any = "2s", check_timeout: Any = "1s", rise: int = 2, fall: int = 3,
                 where: str = "--service") -> LocalService:
    host, port = _hostport(address, f"{where} address")
    spec = None
    if check is not None:
        spec = parse_check(check, interval_s=parse_duration_s(check_interval, "check interval"),
                           timeout_s=parse_duration_s(check_timeout, "check timeout"), rise=rise, fall=fall)
    return LocalService(name=name, id=instance_id or f"{name}-{host}-{port}", address=host, port=port,
                        weight=weight, tags=tuple(tags), meta=tuple(sorted((meta or {}).items())), check=spec)


def build_config(
    file: Path | None = None,
    *,
    endpoints: Sequence[str] | None = None,
    token: str | None = None,
    service: str | None = None,
    instance_id: str | None = None,
    address: str | None = None,
    weight: int | None = None,
    tags: Sequence[str] = (),
    meta: Sequence[str] = (),
    ttl: str | None = None,
    check: str | None = None,
    check_interval: str = "2s",
    check_timeout: str = "1s",
    rise: int = 2,
    fall: int = 3,
    upstreams: Sequence[str] = (),
    http: str | None = None,
    access_log: Path | None = None,
    name: str | None = None,
    seed: int | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> AgentConfig:
    """The validated config from a file (optional) plus flags (raw strings, as given on the command line)."""
    cfg = load_file(file) if file is not None else AgentConfig()
    if endpoints:
        cfg = cfg.replace(endpoints=tuple(endpoints))
    if token is not None:
        cfg = cfg.replace(token=token)
    if tls_ca is not None or tls_cert is not None:
        cfg = cfg.replace(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    if ttl is not None:
        cfg = cfg.replace(ttl_ms=round(parse_duration_s(ttl, "--ttl") * 1000))
    if service is None:
        given = [flag for flag, value in (("--id", instance_id), ("--address", address), ("--check", check))
                 if value is not None]
        if given or tags or meta or weight is not None:
            raise ConfigError(f"{', '.join(given) or '--tag/--meta/--weight'} needs --service NAME")
    else:
        if address is None:
            raise ConfigError("--service needs --address HOST:PORT (where this instance listens)")
        meta_dict: dict[str, str] = {}
        for item in meta:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--meta must be KEY=VALUE, got {item!r}")
            meta_dict[key] = value
        svc = make_service(service, address, instance_id=instance_id, weight=_or(weight, 1), tags=tags,
                           meta=meta_dict, check=check, check_interval=check_interval,
                           check_timeout=check_timeout, rise=rise, fall=fall)
        cfg = cfg.replace(services=(*cfg.services, svc))
    if upstreams:
        cfg = cfg.replace(upstreams=(*cfg.upstreams, *(parse_upstream(u) for u in upstreams)))
    if http is not None:
        cfg = cfg.replace(http=_hostport(http, "--http"))
    if access_log is not None:
        cfg = cfg.replace(access_log=access_log)
    if name is not None:
        cfg = cfg.replace(name=name)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    if log_format is not None:
        cfg = cfg.replace(log_format=log_format)
    if log_level is not None:
        cfg = cfg.replace(log_level=log_level.upper())
    cfg.validate()
    return cfg
