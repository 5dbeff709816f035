"""Background threads for integration tests: a stop flag, crash capture, clean joins."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["Worker", "running"]


class Worker(threading.Thread):
    """A daemon thread with a stop flag that records an unexpected exception instead of dying silently."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self.crashed: BaseException | None = None

    def run(self) -> None:
        try:
            self.body()
        except BaseException as exc:
            self.crashed = exc

    def body(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()

    def check(self) -> None:
        assert self.crashed is None, f"{self.name} crashed: {self.crashed!r}"


@contextlib.contextmanager
def running(*workers: Worker, join_s: float = 20.0, check: bool = False) -> Iterator[None]:
    """Start the workers; stop and join them on the way out, pass or fail (then ``check`` them if asked)."""
    for w in workers:
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.join(timeout=join_s)
        assert not any(w.is_alive() for w in workers), "a worker thread did not stop"
    if check:
        for w in workers:
            w.check()
