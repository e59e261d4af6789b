"""Shared fixtures: root checks and network namespaces that tests create and always remove."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from availability import shared_path, unavailable

REPO = Path(__file__).resolve().parent.parent


def need_root() -> None:
    """Kernel tests need root. In CI that is a hard failure; on a laptop they skip."""
    if os.geteuid() != 0:
        unavailable("this test needs root")


@pytest.fixture
def root() -> None:
    need_root()


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["netns", "exec", netns, "ip"] if netns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def in_netns(netns: str, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 30):
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], check=check, capture_output=True, text=True,
                          input=input, timeout=timeout)


@pytest.fixture
def netns_factory(root) -> Iterator:
    """Make named network namespaces (prefix nf-test-); every one is deleted, by name, afterwards."""
    made: list[str] = []

    def make(tag: str = "ns") -> str:
        name = f"nf-test-{tag}-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        made.append(name)
        in_netns(name, "ip", "link", "set", "lo", "up")
        return name

    yield make
    for name in reversed(made):
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@pytest.fixture
def netns(netns_factory) -> str:
    return netns_factory("t")


@pytest.fixture
def shared_dir() -> Path:
    return shared_path(".")
