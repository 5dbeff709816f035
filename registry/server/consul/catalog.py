"""Our records in Consul's JSON shapes, and which instances a query selects: pure, no I/O.

The mapping (docs/consul.md has it for users):

* The whole cluster is one Consul datacenter with **one synthetic node**
  (``Site``): every instance is a service on that node.  A Consul node is an
  agent host; we have no such thing, and inventing one per registry node
  would make an instance's node depend on which node served the read.
* An instance is a Consul service instance: ``ServiceID`` is our instance
  id, ``ServiceName`` our service, ``ServiceWeights.Passing`` our weight
  (``Warning`` is always 1: we have one weight).
* Each instance has exactly one check, ``service:<id>``, of type ``ttl``,
  whose status is the instance's status and whose output is the note of the
  last status change this node saw.
* ``CreateIndex`` / ``ModifyIndex`` are the record's create and mod revisions.
* A service exists in Consul only while it has instances; ours can be empty,
  and an empty one is left out of ``/v1/catalog/services`` as Consul would.

``select_instances`` is the one definition of "the instances a query for
service S with tags T (and only passing) selects"; DNS uses it too.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from registry.fsm.model import Record

__all__ = [
    "CHECK_PREFIX",
    "HEALTH_STATES",
    "Site",
    "agent_self",
    "catalog_service_entry",
    "catalog_services",
    "check_id",
    "health_check",
    "health_entry",
    "health_state",
    "instance_id_of_check",
    "select_instances",
    "weights",
]

#: A check id is "service:" + the instance id: the id Consul gives a service's own TTL check.
CHECK_PREFIX: Final = "service:"
#: /v1/health/state/<state>: "any" or one status.
HEALTH_STATES: Final = ("any", "passing", "warning", "critical")


@dataclass(frozen=True, slots=True)
class Site:
    """The synthetic datacenter and node every instance lives on."""

    datacenter: str = "dc1"
    node_name: str = "regctl"
    #: The node's address, for tools that fall back to it when an instance has none (ours always have one).
    node_address: str = "127.0.0.1"

    @property
    def node_id(self) -> str:
        # Stable across restarts and equal on every registry node: derived from the names only.
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"regctl:{self.datacenter}:{self.node_name}"))

    def node(self, create_index: int = 1, modify_index: int = 1) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
            "Meta": {},
            "CreateIndex": create_index,
            "ModifyIndex": modify_index,
        }


def has_tags(instance: Record, tags: Iterable[str]) -> bool:
    """Every one of ``tags`` is on the instance (Consul's repeated ?tag=)."""
    own = instance["tags"]
    return all(tag in own for tag in tags)


def select_instances(instances: Iterable[Record], tags: Sequence[str] = (), passing_only: bool = False) -> list[Record]:
    """The instances a query for one service selects: all ``tags`` present, and passing if asked.

    Order is kept (the state gives instances sorted by id), so equal states give equal answers.
    """
    return [
        inst for inst in instances
        if (not passing_only or inst["status"] == "passing") and (not tags or has_tags(inst, tags))
    ]


def weights(instance: Record) -> dict[str, int]:
    return {"Passing": instance["weight"], "Warning": 1}


def check_id(instance_id: str) -> str:
    return CHECK_PREFIX + instance_id


def instance_id_of_check(check: str) -> str | None:
    """The instance id in a check id ``service:<id>``; None for any other check id."""
    if not check.startswith(CHECK_PREFIX) or len(check) == len(CHECK_PREFIX):
        return None
    return check[len(CHECK_PREFIX):]


def catalog_services(services: Iterable[tuple[str, Sequence[Record]]]) -> dict[str, list[str]]:
    """``/v1/catalog/services``: name -> the sorted union of its instances' tags; empty services left out."""
    out: dict[str, list[str]] = {}
    for name, instances in services:
        if not instances:
            continue
        tags: set[str] = set()
        for inst in instances:
            tags.update(inst["tags"])
        out[name] = sorted(tags)
    return out


def catalog_service_entry(site: Site, instance: Record) -> dict[str, Any]:
    """One element of ``/v1/catalog/service/:name`` (Consul's api.CatalogService)."""
    address = instance["address"]
    return {
        "ID": site.node_id,
        "Node": site.node_name,
        "Address": site.node_address,
        "Datacenter": site.datacenter,
        "TaggedAddresses": {"lan": site.node_address, "wan": site.node_address},
        "NodeMeta": {},
        "ServiceKind": "",
        "ServiceID": instance["id"],
        "ServiceName": instance["service"],
        "ServiceTags": list(instance["tags"]),
        "ServiceAddress": address,
        "ServiceTaggedAddresses": {},
        "ServiceWeights": weights(instance),
        "ServiceMeta": dict(instance["meta"]),
        "ServicePort": instance["port"],
        "ServiceEnableTagOverride": False,
        "ServiceProxy": {},
        "ServiceConnect": {},
        "CreateIndex": instance["create_revision"],
        "ModifyIndex": instance["mod_revision"],
    }


def health_check(site: Site, instance: Record, note: str = "") -> dict[str, Any]:
    """The one check of an instance (Consul's api.HealthCheck)."""
    return {
        "Node": site.node_name,
        "CheckID": check_id(instance["id"]),
        "Name": f"Service '{instance['service']}' check",
        "Status": instance["status"],
        "Notes": "",
        "Output": note,
        "ServiceID": instance["id"],
        "ServiceName": instance["service"],
        "ServiceTags": list(instance["tags"]),
        "Type": "ttl",
        "Definition": {},
        "CreateIndex": instance["create_revision"],
        "ModifyIndex": instance["mod_revision"],
    }


def agent_service(instance: Record) -> dict[str, Any]:
    """An instance as Consul's api.AgentService (the ``Service`` of a health entry)."""
    return {
        "Kind": "",
        "ID": instance["id"],
        "Service": instance["service"],
        "Tags": list(instance["tags"]),
        "Meta": dict(instance["meta"]),
        "Port": instance["port"],
        "Address": instance["address"],
        "TaggedAddresses": {},
        "Weights": weights(instance),
        "EnableTagOverride": False,
        "CreateIndex": instance["create_revision"],
        "ModifyIndex": instance["mod_revision"],
    }


def health_entry(site: Site, instance: Record, note: str = "") -> dict[str, Any]:
    """One element of ``/v1/health/service/:name`` (Consul's api.ServiceEntry)."""
    return {
        "Node": site.node(),
        "Service": agent_service(instance),
        "Checks": [health_check(site, instance, note)],
    }


def health_state(site: Site, instances: Iterable[Record], state: str,
                 notes: Mapping[tuple[str, str], str]) -> list[dict[str, Any]]:
    """``/v1/health/state/:state``: the checks in that state ("any": all), ordered by service then id."""
    if state not in HEALTH_STATES:
        raise ValueError(state)
    return [
        health_check(site, inst, notes.get((inst["service"], inst["id"]), ""))
        for inst in instances
        if state == "any" or inst["status"] == state
    ]


def agent_self(site: Site, revision: int, server_name: str) -> dict[str, Any]:
    """``/v1/agent/self``: the fields tools read (Prometheus reads Config.Datacenter)."""
    return {
        "Config": {
            "Datacenter": site.datacenter,
            "NodeName": site.node_name,
            "NodeID": site.node_id,
            "Server": True,
            "Revision": "",
            "Version": "1.17.0",
        },
        "Member": {"Name": site.node_name, "Addr": site.node_address, "Status": 1},
        "Meta": {},
        "Stats": {"regctl": {"revision": str(revision), "server": server_name}},
    }
