"""Fixtures for the controller tests: a faithful fake API server and clients for it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import kubernetes
import pytest

from controller.fakeapi import FakeApiServer, kubeconfig_for


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.5).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(api_server: FakeApiServer, tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig.json"
    path.write_text(json.dumps(kubeconfig_for(api_server.url)))
    return str(path)


@pytest.fixture
def k8s(api_server: FakeApiServer) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config_dict(kubeconfig_for(api_server.url))
    try:
        yield client
    finally:
        client.close()


def read_watch(url: str, *, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Read up to `count` events (BOOKMARKs skipped) from a watch URL, or until it closes."""
    events: list[dict[str, Any]] = []
    with urllib.request.urlopen(url, timeout=timeout) as response:
        for line in response:
            if not line.strip():
                continue
            event = json.loads(line)
            if event["type"] == "BOOKMARK":
                continue
            events.append(event)
            if len(events) >= count:
                break
    return events
