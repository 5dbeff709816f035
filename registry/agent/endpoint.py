"""One instance of an upstream service, as the agent routes to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Endpoint", "ROUTABLE_STATUSES", "endpoint_from_record"]

#: Statuses that take traffic.  ``warning`` still serves (degraded, not down),
#: as in Consul; ``critical`` does not.
ROUTABLE_STATUSES = frozenset({"passing", "warning"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    service: str
    id: str
    address: str
    port: int
    weight: int = 1
    status: str = "passing"

    @property
    def hostport(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    @property
    def routable(self) -> bool:
        return self.status in ROUTABLE_STATUSES


def endpoint_from_record(record: dict[str, Any]) -> Endpoint:
    """An ``Endpoint`` from an instance record of a watch event or snapshot."""
    return Endpoint(
        service=str(record["service"]),
        id=str(record["id"]),
        address=str(record["address"]),
        port=int(record["port"]),
        weight=int(record.get("weight", 1)),
        status=str(record.get("status", "passing")),
    )
