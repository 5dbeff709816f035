"""The regctl command group, its shared context and how every command reports errors.

Subcommand modules import from here, and ``cli/main.py`` imports them all: no
module imports ``main``, so there is no import cycle.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import click

from registry.client import DEFAULT_ENDPOINTS, ConnectionFailed, SyncClient, client_ssl_context
from registry.config import parse_hostport
from registry.errors import RegistryError

from .output import printable

__all__ = ["EXIT_REFUSED", "EXIT_USAGE", "EXIT_UNAVAILABLE", "Ctx", "cli", "fail", "handles_errors"]

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Ctx:
    endpoints: list[str]
    output: str
    token: str | None
    timeout_s: float
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        try:
            return client_ssl_context(self.tls_ca, self.tls_cert, self.tls_key)
        except OSError as err:  # a missing file, or ssl.SSLError (an OSError) for a bad PEM
            raise click.UsageError(f"cannot load TLS files (--tls-ca/--tls-cert/--tls-key): {err}") from None

    def client(self) -> SyncClient:
        return SyncClient(self.endpoints, token=self.token, timeout_s=self.timeout_s, ssl_context=self.ssl_context())


def fail(err: RegistryError) -> None:
    if isinstance(err, ConnectionFailed) and err.wrong_ports and not err.hint:
        from .wrong_port import api_hint

        err.hint = api_hint(err)
    # A message can quote names and values others wrote (a lock's holder, a key): escaped (output.printable).
    click.echo(printable(f"error: {err.code}: {err.message}" + (f" (hint: {err.hint})" if err.hint else ""),
                         keep="\n"), err=True)
    sys.exit(EXIT_UNAVAILABLE if err.retryable else EXIT_REFUSED)


def handles_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RegistryError as err:
            fail(err)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoints", envvar="REGCTL_ENDPOINTS", default=",".join(DEFAULT_ENDPOINTS), show_default=True,
              help="Comma-separated API addresses (env REGCTL_ENDPOINTS).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--token", envvar="REGCTL_TOKEN", default=None, help="API token (env REGCTL_TOKEN).")
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds to keep retrying a request across nodes.")
@click.option("--tls-ca", envvar="REGCTL_TLS_CA", default=None, type=click.Path(dir_okay=False),
              help="Connect over TLS, trusting this CA file (env REGCTL_TLS_CA).")
@click.option("--tls-cert", envvar="REGCTL_TLS_CERT", default=None, type=click.Path(dir_okay=False),
              help="Client certificate for TLS (with --tls-key).")
@click.option("--tls-key", envvar="REGCTL_TLS_KEY", default=None, type=click.Path(dir_okay=False),
              help="Client private key for TLS.")
@click.pass_context
def cli(ctx: click.Context, endpoints: str, output: str, token: str | None, timeout_s: float,
        tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """raft-registry: a Raft-replicated service registry."""
    eps = [e.strip() for e in endpoints.split(",") if e.strip()]
    for endpoint in eps:
        try:
            parse_hostport(endpoint, what="endpoint")
        except RegistryError as err:
            raise click.UsageError(err.message) from None
    if not eps:
        raise click.UsageError("--endpoints is empty")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    ctx.obj = Ctx(eps, output, token, timeout_s, tls_ca, tls_cert, tls_key)
