"""Lab fixtures: a lab brought up from a manifest in a private state dir, always torn down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from netfence_lab import system
from netfence_lab.lab import Lab, load_manifests
from netfence_lab.state import StateStore

HERE = Path(__file__).resolve().parent
DEMO_CLUSTER = HERE.parents[1] / "agent" / "netfence_lab" / "data" / "demo-cluster.yaml"
K3S_CLUSTER = HERE / "data" / "k3s-style-cluster.yaml"
ACK_ONLY_AGENT = HERE / "ack_only_agent.py"


def require_root() -> None:
    """Root and `ip netns` are needed; under CI their absence is a failure, elsewhere a skip."""
    problem = None
    if os.geteuid() != 0:
        problem = "needs root (network namespaces)"
    elif subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        problem = "`ip netns` does not work here"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"lab test {problem} (CI=true: not skipping)")
        pytest.skip(problem)


def lab_netns() -> set[str]:
    return {n for n in system.netns_list() if n.startswith("nflab-")}


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


def netfence_lab_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m netfence_lab lab ARGS...` as a user would run it (env: os.environ + env)."""
    full_env = {**os.environ, **(env or {})}
    roots = [str(HERE.parents[1] / "agent"), str(HERE.parents[1] / "operator")]
    full_env["PYTHONPATH"] = os.pathsep.join(roots + [full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "netfence_lab", "lab", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
