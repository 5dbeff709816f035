"""``regctl agent``: the thin agent beside an application (see registry/agent/runner.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from registry.agent.errors import ConfigError
from registry.agent.policies import POLICY_NAMES
from registry.client import DEFAULT_ENDPOINTS

from .base import EXIT_USAGE, Ctx, cli


def config_error(err: ConfigError) -> None:
    click.echo(f"error: agent configuration: {err.message}", err=True)
    sys.exit(EXIT_USAGE)


@cli.command(context_settings={"max_content_width": 110})
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file (see registry/agent/config.py); flags add to it and override its scalars.")
@click.option("--service", default=None, help="Register a local instance of this service.")
@click.option("--id", "instance_id", default=None, help="Its instance id (default SERVICE-HOST-PORT).")
@click.option("--address", default=None, help="HOST:PORT where the local instance listens.")
@click.option("--weight", type=int, default=None, help="Its weight for the weighted policy (1..1000).")
@click.option("--tag", "tags", multiple=True, help="Tag, repeatable.")
@click.option("--meta", multiple=True, help="KEY=VALUE metadata, repeatable.")
@click.option("--ttl", default=None, help="Lease TTL of the local instance(s), e.g. 10s (default 10s).")
@click.option("--check", default=None, help="Health check: http:URL, tcp:HOST:PORT or cmd:COMMAND.")
@click.option("--check-interval", default="2s", show_default=True)
@click.option("--check-timeout", default="1s", show_default=True)
@click.option("--rise", type=int, default=2, show_default=True, help="Passes in a row to become passing.")
@click.option("--fall", type=int, default=3, show_default=True, help="Failures in a row to become critical.")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=[HOST:]PORT[:POLICY]",
              help=f"Proxy service NAME on a local port, repeatable. POLICY: {', '.join(POLICY_NAMES)}.")
@click.option("--http", default=None, help="HOST:PORT for /metrics and /healthz.")
@click.option("--access-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append one JSON line per proxied connection to this file.")
@click.option("--name", default=None, help="Source service in the access log (default: the local service).")
@click.option("--seed", type=int, default=None, hidden=True, help="Seed of the p2c policy's RNG.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None)
@click.option("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR.")
@click.pass_obj
def agent(obj: Ctx, config_file: Path | None, service: str | None, instance_id: str | None, address: str | None,
          weight: int | None, tags: tuple[str, ...], meta: tuple[str, ...], ttl: str | None, check: str | None,
          check_interval: str, check_timeout: str, rise: int, fall: int, upstreams: tuple[str, ...],
          http: str | None, access_log: Path | None, name: str | None, seed: int | None, log_format: str | None,
          log_level: str | None) -> None:
    """Run the agent beside an application, until SIGTERM or Ctrl-C.

    It registers the local instance with a lease and keeps it alive, runs its
    health check and reports the status, and proxies each --upstream from a
    local port to healthy instances (rerouting failed connects, ejecting
    endpoints that keep failing). On SIGTERM or Ctrl-C it deregisters.

    \b
    Example:
      regctl agent --service web --address 127.0.0.1:8080 --check http:http://127.0.0.1:8080/health \\
                   --upstream api=9001:p2c --http 127.0.0.1:7300

    Exit codes: 0 stopped cleanly; 2 bad configuration (also: a port in use).
    """
    from registry.agent.config import build_config
    from registry.agent.runner import run_agent

    ctx = click.get_current_context()
    endpoints: list[str] | None = obj.endpoints
    # The group's --endpoints has a default: let a config file's endpoints win over the default only.
    if (ctx.parent is not None and ctx.parent.get_parameter_source("endpoints") == click.core.ParameterSource.DEFAULT
            and config_file is not None and list(obj.endpoints) == list(DEFAULT_ENDPOINTS)):
        endpoints = None
    try:
        config = build_config(
            config_file, endpoints=endpoints, token=obj.token, service=service, instance_id=instance_id,
            address=address, weight=weight, tags=tags, meta=meta, ttl=ttl, check=check,
            check_interval=check_interval, check_timeout=check_timeout, rise=rise, fall=fall, upstreams=upstreams,
            http=http, access_log=access_log, name=name, seed=seed, log_format=log_format, log_level=log_level,
            tls_ca=obj.tls_ca, tls_cert=obj.tls_cert, tls_key=obj.tls_key,
        )
        run_agent(config)
    except ConfigError as err:
        config_error(err)
