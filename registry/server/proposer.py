"""Group commit: many concurrent client commands, one Raft entry.

Theory of operation
-------------------
Every write (and every linearizable read) that arrives on the asyncio loop
joins the *forming* batch.  While fewer than ``batch_inflight_max`` batches
are in flight, the forming batch is sealed at the end of the current loop
iteration and handed to pysyncobj as one entry.  Otherwise it keeps growing
until an in-flight batch commits.  So an idle node proposes a lone command
at once (low latency), and a busy one packs hundreds per entry (throughput),
with no timer anywhere.

Reads share barriers: a linearizable read only needs *some* entry proposed
after it arrived to commit before it reads local state, so all reads waiting
in one forming batch ride on that batch; a batch with reads and no writes
carries a single ``barrier`` no-op.  A partitioned or deposed leader cannot
commit, so its reads time out instead of answering stale.

Results come back from the Raft thread with one ``call_soon_threadsafe`` per
batch.

Writes wait for the leader's first entry.  A new leader's first command,
``leader_epoch``, carries the state byte budget every replica enforces (and
fences a deposed leader's lease expiries).  A write proposed before it
applied here would land ahead of it, under the previous term's budget (or,
on a new cluster, no budget), so writes are *held* while ``ready()`` is
false and released, in arrival order, by ``applied()`` once it is true.  A
held write that outlives its deadline fails with ``Unavailable``: it was
never proposed.  While the node knows no leader at all (``leader_known()``
false: an election, a partition) a write is refused at once with
``Unavailable`` instead, as pysyncobj refuses it, so a client moves on to
another node without waiting out its timeout.  Barriers and ``ungated``
commands (the announcement itself) are never held.

Timeouts.  A caller that waits longer than ``timeout_s`` gets ``Timeout``.
Rather than one ``asyncio.wait_for`` per command (a timer, a wrapper future
and callbacks each: ~10 us, a few percent of a node's CPU under load), every
waiter carries a deadline and one periodic sweep (``_SWEEP_S``) fails the
expired ones.  Waiters arrive in deadline order, so a sweep only looks at the
oldest.  A timed-out waiter's future is done, so a batch not yet sealed skips
it, exactly as a caller that went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from registry.errors import CODES, LimitExceeded, RegistryError, Timeout, Unavailable
from registry.fsm.commands import validate_command
from registry.raft.node import submit_error
from registry.server.metrics import NodeMetrics

__all__ = ["Proposer", "Submitter", "outcome_result"]

log = logging.getLogger("registry.server.proposer")

#: Normalised (as validate_command returns it), so replicas apply it without re-validating.
_BARRIER = validate_command({"op": "barrier"})
#: How often expired waiters are failed: a timeout fires within this much after its deadline.
_SWEEP_S = 0.1


class Submitter(Protocol):
    def submit(self, batch: bytes, done: Callable[[Any, int], None]) -> None: ...


def outcome_result(outcome: Any) -> dict[str, Any]:
    """A command's result from its batch outcome, or raise its error."""
    if outcome[0]:
        result: dict[str, Any] = outcome[1]
        return result
    raise CODES.get(outcome[1], RegistryError)(outcome[2])


class _Waiter:
    __slots__ = ("command", "deadline", "encoded", "future", "held")

    def __init__(self, command: dict[str, Any] | None, future: asyncio.Future[Any], deadline: float) -> None:
        self.command = command
        self.future = future
        self.deadline = deadline
        #: Waiting for ``ready()`` (see the module docstring), not yet proposed.
        self.held = False
        #: The command's msgpack bytes, once a batch has encoded it (kept if it had to wait for the next one).
        self.encoded: bytes | None = None


class Proposer:
    def __init__(
        self,
        submitter: Submitter,
        loop: asyncio.AbstractEventLoop,
        metrics: NodeMetrics,
        *,
        batch_commands_max: int,
        batch_bytes_max: int,
        batch_inflight_max: int,
        pending_max: int,
        timeout_s: float,
        ready: Callable[[], bool] = lambda: True,
        leader_known: Callable[[], bool] = lambda: True,
    ) -> None:
        self._submitter = submitter
        self._loop = loop
        self._metrics = metrics
        self._batch_max = batch_commands_max
        self._batch_bytes_max = batch_bytes_max
        self._packer = msgpack.Packer(use_bin_type=True)
        self._inflight_max = batch_inflight_max
        self._pending_max = pending_max
        self._timeout_s = timeout_s
        self._ready = ready
        self._leader_known = leader_known
        self._pending: deque[_Waiter] = deque()
        #: Writes waiting for ``ready()``, in arrival order.
        self._held: deque[_Waiter] = deque()
        #: Every waiter not yet known to be done, in arrival (= deadline) order, for the sweep.
        self._waiting: deque[_Waiter] = deque()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._inflight = 0
        self._flush_scheduled = False
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._held)

    async def write(self, command: dict[str, Any], *, validated: bool = False,
                    ungated: bool = False) -> dict[str, Any]:
        """Commit one command; return its result or raise its error.

        Every command is validated here, on the proposing node, before it
        enters the log (``validated=True``: the caller already did, with
        ``validate_command``): replicas then apply log entries without
        validating again (``RegistryState.apply(trusted=True)``).  ``ungated``:
        propose even before ``ready()`` (only the leader's announcement).
        """
        return outcome_result(await self.propose(command, validated=validated, ungated=ungated))

    def propose(self, command: dict[str, Any], *, validated: bool = False,
                ungated: bool = False) -> asyncio.Future[Any]:
        """``write`` without a coroutine: the future of the command's outcome (see ``outcome_result``).

        For callers that answer from a done-callback instead of a task (the
        server's request fast path).  Cancelling the future withdraws the
        command if its batch is not sealed yet, as a cancelled ``write`` does.
        """
        if not validated:
            command = validate_command(command)
        return self._add(command, gated=not ungated)

    async def barrier(self) -> None:
        """Return once an entry proposed after this call has committed and applied here."""
        await self._add(None)

    def barrier_future(self) -> asyncio.Future[Any]:
        """``barrier`` without a coroutine: a future done once the barrier has applied here."""
        return self._add(None)

    def applied(self) -> None:
        """Called on the loop after every applied batch: release held writes once ``ready()``."""
        if self._held and self._ready():
            self._release()

    def _release(self) -> None:
        held = self._held
        while held:
            waiter = held.popleft()
            waiter.held = False
            if not waiter.future.done():
                self._pending.append(waiter)
        self._schedule_flush()

    def _add(self, command: dict[str, Any] | None, *, gated: bool = True) -> asyncio.Future[Any]:
        if self._closed:
            raise Timeout("node is shutting down")
        gated = gated and command is not None
        hold = gated and not self._ready()
        if hold and not self._held and not self._leader_known():
            raise Unavailable("no raft leader at the moment; nothing was written, retry")
        if len(self._pending) + len(self._held) >= self._pending_max:
            raise LimitExceeded(f"more than {self._pending_max} proposals pending on this node; retry later")
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        waiter = _Waiter(command, future, loop.time() + self._timeout_s)
        self._waiting.append(waiter)
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(_SWEEP_S, self._sweep)
        if hold:
            waiter.held = True
            self._held.append(waiter)
            return future
        if self._held and gated:
            self._release()  # ready again: the held writes go first, in arrival order
        self._pending.append(waiter)
        self._schedule_flush()
        return future

    def _sweep(self) -> None:
        self._sweep_handle = None
        now = self._loop.time()
        waiting = self._waiting
        while waiting:
            waiter = waiting[0]
            if not waiter.future.done():
                if waiter.deadline > now:
                    break
                if waiter.held:
                    waiter.future.set_exception(Unavailable(
                        f"not proposed: no leader's first entry applied on this node within "
                        f"{self._timeout_s:g}s (an election, or this node lags); nothing was written, retry"
                    ))
                else:
                    waiter.future.set_exception(Timeout(
                        f"not committed within {self._timeout_s:g}s (no quorum or no leader?); "
                        "outcome unknown, a retry with the same request id is safe"
                    ))
            waiting.popleft()
        if waiting and not self._closed:
            self._sweep_handle = self._loop.call_later(_SWEEP_S, self._sweep)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._inflight < self._inflight_max:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending and self._inflight < self._inflight_max:
            self._send_one()

    def _send_one(self) -> None:
        """Seal one batch: at most ``batch_commands_max`` commands and ``batch_bytes_max`` bytes of them.

        The byte cap bounds a Raft entry (and so the largest Raft message, ``RaftWireLimits``):
        2,048 commands of a 1 MiB frame each would otherwise be one 2 GiB entry.  A command
        alone is always sent, whatever its size (a frame is at most ``frame_bytes_max``, which
        ``NodeConfig.validate`` keeps under the cap).
        """
        waiters: list[_Waiter] = []
        encoded: list[bytes] = []
        size = 0
        pending = self._pending
        while pending and len(encoded) < self._batch_max:
            waiter = pending[0]
            if waiter.future.done():  # its caller gave up; do not propose it
                pending.popleft()
                continue
            if waiter.command is not None:
                data = waiter.encoded
                if data is None:
                    data = waiter.encoded = self._packer.pack(waiter.command)
                if encoded and size + len(data) > self._batch_bytes_max:
                    break  # it opens the next batch
                encoded.append(data)
                size += len(data)
            pending.popleft()
            waiters.append(waiter)
        if not waiters:
            return
        if encoded:
            batch = self._packer.pack_array_header(len(encoded)) + b"".join(encoded)
        else:
            batch = msgpack.packb([_BARRIER], use_bin_type=True)
        self._inflight += 1
        started = time.perf_counter()
        self._metrics.batch_commands.observe(len(encoded))
        self._metrics.proposals.inc()

        def done(outcomes: Any, reason: int) -> None:  # Raft thread
            self._loop.call_soon_threadsafe(self._complete, waiters, outcomes, reason, started)

        try:
            self._submitter.submit(batch, done)
        except Exception as err:
            log.exception("submit failed")
            self._inflight -= 1
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(Timeout(f"submit failed: {err}"))

    def _complete(self, waiters: list[_Waiter], outcomes: Any, reason: int, started: float) -> None:
        self._inflight -= 1
        self._metrics.proposal_seconds.observe(time.perf_counter() - started)
        if reason != 0 or not isinstance(outcomes, list):
            err = submit_error(reason)
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(err)
        else:
            index = 0
            for waiter in waiters:
                outcome: Any = None
                if waiter.command is not None:
                    outcome = outcomes[index] if index < len(outcomes) else (False, "INTERNAL", "missing outcome")
                    index += 1
                if not waiter.future.done():
                    waiter.future.set_result(outcome)
                # Done waiters wait for the sweep to drop them; do not keep their commands alive.
                waiter.command = None
                waiter.encoded = None
        if self._pending:
            self._schedule_flush()

    def close(self) -> None:
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for queue in (self._pending, self._held):
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(Timeout("node is shutting down"))
