"""The benchmark's external tools: found on PATH, or an error that names the Debian package to install."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bench.etcdcluster import ensure_tool


def test_a_missing_tool_names_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"etcdctl is not installed \(Debian: apt-get install etcd-client\)"):
        ensure_tool("etcdctl", "etcd-client", install=False)
    if os.geteuid() != 0:
        with pytest.raises(RuntimeError, match=r"sudo apt-get install -y etcd-client"):
            ensure_tool("etcdctl", "etcd-client")


def test_a_tool_on_path_is_found_without_installing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = tmp_path / "etcdctl"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ensure_tool("etcdctl", "etcd-client", install=False) == str(tool)
