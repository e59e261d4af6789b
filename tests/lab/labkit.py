"""Helpers for the lab tests (imported as lab.labkit; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from availability import unavailable
from netfence_lab import system

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
        unavailable(f"lab test {problem}")


def require_real_agent() -> None:
    r = subprocess.run([sys.executable, "-m", "netfence_cli", "agent", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"`netfence agent` is not available: {r.stderr.strip()[-200:]}")


def lab_netns() -> set[str]:
    return {n for n in system.netns_list() if n.startswith("nflab-")}


def netfence_lab_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m netfence_lab lab ARGS...` as a user would run it (env: os.environ + env)."""
    full_env = {**os.environ, **(env or {})}
    roots = [str(HERE.parents[1] / "agent"), str(HERE.parents[1] / "operator")]
    full_env["PYTHONPATH"] = os.pathsep.join(roots + [full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "netfence_lab", "lab", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
