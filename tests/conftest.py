from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.support.agents import Fleet
from tests.support.cluster import Cluster


def _print_logs_if_failed(request: pytest.FixtureRequest, logs: Callable[[], str]) -> None:
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(logs())


def started_cluster(tmp_path: Path, request: pytest.FixtureRequest,
                    extra_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """The body of a cluster fixture: start, yield, print the logs if the test failed, always close."""
    c = Cluster(tmp_path / "cluster", 3, extra_args=extra_args)
    try:
        c.start()
        yield c
    finally:
        _print_logs_if_failed(request, c.logs)
        c.close()


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A started three-node cluster of real processes; killed after the test, pass or fail."""
    yield from started_cluster(tmp_path, request)


@pytest.fixture
def acl_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The same, with ACLs on (``regctl server --acl``); bootstrap it with ``acl_bootstrap``."""
    yield from started_cluster(tmp_path, request, extra_args=("--acl",))


@pytest.fixture
def fleet(cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """Echo backends and agents against ``cluster``; every process killed after the test."""
    f = Fleet(tmp_path / "fleet", cluster.endpoints)
    f.root.mkdir()
    try:
        yield f
    finally:
        _print_logs_if_failed(request, f.logs)
        f.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
