"""The agent's two errors, placed in the registry's one hierarchy.

::

    InvalidArgument (INVALID_ARGUMENT)
    └── ConfigError          a bad flag, config file, check spec, policy name, or a port in use
    Unavailable (UNAVAILABLE)
    └── NoEndpoint           no endpoint of the upstream can take a connection now

Both keep their parent's wire code: they never travel on the wire, but a
caller that handles ``InvalidArgument`` or retries ``Unavailable`` handles
them too.  ``regctl agent`` exits 2 on a ``ConfigError``.
"""

from __future__ import annotations

from registry.errors import InvalidArgument, Unavailable

__all__ = ["ConfigError", "NoEndpoint"]


class ConfigError(InvalidArgument):
    """The agent cannot start with this configuration; the message says what to change."""


class NoEndpoint(Unavailable):
    """The upstream has no endpoint to route to (none known yet, or every one failed)."""
