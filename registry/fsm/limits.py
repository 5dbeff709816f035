"""The replicated capacity limits of ``RegistryState``.

Every replica must refuse exactly the same commands, so these are passed to
the state machine as one frozen value (as h11's ``Connection`` takes
``max_incomplete_event_size``) rather than read from module globals that a
test or a plugin could patch on one node only.  The defaults are
``registry.fsm.model``'s documented limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.errors import InvalidArgument
from registry.fsm import model

__all__ = ["StateLimits"]


@dataclass(frozen=True, slots=True)
class StateLimits:
    #: Instances in one service, services, leases and keys (LimitExceeded beyond).
    instances_per_service_max: int = model.INSTANCES_PER_SERVICE_MAX
    services_max: int = model.SERVICES_MAX
    leases_max: int = model.LEASES_MAX
    keys_max: int = model.KEYS_MAX
    #: Remembered client request ids (FIFO-evicted).
    dedup_entries_max: int = model.DEDUP_ENTRIES_MAX
    #: Estimated bytes of services, instances and keys together (``RegistryState.state_bytes``):
    #: the per-record caps alone allowed 1M keys x 64 KiB, and a token with write on one key
    #: prefix could run every replica out of memory at once.  Writes that would grow the state
    #: past it fail with LIMIT_EXCEEDED; deletes always pass.
    state_bytes_max: int = 2 << 30

    def validate(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise InvalidArgument(f"state limit {name} must be a positive int, got {value!r}")
