"""Lab fixtures: a lab brought up from a manifest in a private state dir, always torn down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lab.labkit import DEMO_CLUSTER, lab_netns, require_root
from netfence_lab import system
from netfence_lab.lab import Lab, load_manifests
from netfence_lab.state import StateStore


@pytest.fixture(scope="session", autouse=True)
def no_leaked_namespaces() -> Iterator[None]:
    """Whatever the lab tests do, they leave no nflab-* namespace behind."""
    before = lab_netns() if os.geteuid() == 0 else set()
    yield
    if os.geteuid() == 0:
        leaked = lab_netns() - before
        assert not leaked, f"lab tests leaked namespaces: {sorted(leaked)}"


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    require_root()
    d = tmp_path / "lab"
    monkeypatch.setenv("NETFENCE_LAB_DIR", str(d))
    monkeypatch.delenv("NETFENCE_LAB_NO_AGENT", raising=False)
    monkeypatch.delenv("NETFENCE_LAB_AGENT", raising=False)
    return d


LabFactory = Callable[..., Lab]


@pytest.fixture
def make_lab(lab_dir: Path) -> Iterator[LabFactory]:
    """make_lab(manifest=PATH|docs, nodes=None, agents=False) -> a Lab that is up; down at the end."""
    labs: list[Lab] = []

    def up(manifest: Path | list[dict[str, Any]] = DEMO_CLUSTER, nodes: int | None = None, agents: bool = False) -> Lab:
        docs = load_manifests([str(manifest)]) if isinstance(manifest, (str, Path)) else manifest
        lab = Lab(StateStore(lab_dir))
        labs.append(lab)
        lab.up(docs, nodes=nodes, agents=agents)
        return lab

    try:
        yield up
    finally:
        for lab in labs:
            state = lab.store.load()
            names = list(state.netns) if state else []
            lab.down()
            left = [n for n in names if system.netns_exists(n)]
            assert not left, f"lab down left namespaces: {left}"
