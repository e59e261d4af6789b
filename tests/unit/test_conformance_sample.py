"""The shared conformance sample, run by its own checker against `netfence matrix` (offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_checker(sample: Path, *extra: str) -> subprocess.CompletedProcess:
    """A sample's own checker against `netfence matrix` of this checkout."""
    return subprocess.run(
        [sys.executable, str(sample / "check.py"), "--netfence", f"{sys.executable} -m netfence_cli", *extra],
        cwd=sample, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("sample_name", ["conformance-sample", "cnp-conformance-sample"])
def test_conformance_sample_offline(shared_dir, sample_name):
    """The NetworkPolicy sample and the ClusterNetworkPolicy one (upstream network-policy-api cases)."""
    r = run_checker(shared_dir / sample_name)
    last = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and last.endswith(" 0 failed"), r.stdout + r.stderr
    assert not last.startswith("0 passed")


def test_node_peer_cases_offline(shared_dir):
    """netfence's experimental node-peer cases (tests/lab/data/cnp-cases), on the cnp sample's cluster."""
    cases = Path(__file__).resolve().parents[1] / "lab" / "data" / "cnp-cases"
    r = run_checker(shared_dir / "cnp-conformance-sample", "--only", str(cases / "*.yaml"))
    assert r.stdout.strip().splitlines()[-1] == f"{len(list(cases.glob('*.yaml')))} passed, 0 failed", r.stdout + r.stderr
