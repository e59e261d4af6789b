"""The ClusterNetworkPolicy conformance sample, and netfence's node-peer cases, in the lab.

../shared/cnp-conformance-sample holds cases transcribed from the upstream network-policy-api
conformance suite; tests/lab/data/cnp-cases adds the experimental node-peer cases (a pod's
traffic to its own node and to other nodes), run by the same checker on the same cluster.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from availability import shared_path

REPO = Path(__file__).resolve().parents[2]
OWN_CASES = Path(__file__).resolve().parent / "data" / "cnp-cases"


def _check(lab_dir: Path, *args: str) -> subprocess.CompletedProcess:
    checker = shared_path("cnp-conformance-sample/check.py")
    env = {**os.environ, "NETFENCE": f"{sys.executable} -m netfence_cli",
           "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "agent")])}
    return subprocess.run([sys.executable, str(checker), *args], capture_output=True, text=True, env=env,
                          timeout=1800, cwd=lab_dir.parent)


@pytest.mark.slow
def test_cnp_conformance_sample_in_lab_mode(lab_dir):
    r = _check(lab_dir, "--mode", "lab")
    last = r.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), r.stdout + r.stderr
    assert r.returncode == 0


@pytest.mark.slow
def test_node_peer_cases_in_lab_mode(lab_dir):
    """Egress to nodes: the own node through the input hook, other nodes through forward."""
    r = _check(lab_dir, "--mode", "lab", "--only", str(OWN_CASES / "*.yaml"))
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"{len(list(OWN_CASES.glob('*.yaml')))} passed, 0 failed", r.stdout + r.stderr
