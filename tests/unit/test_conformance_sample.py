"""The shared conformance sample, run by its own checker against `netfence matrix` (offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_conformance_sample_offline(shared_dir):
    sample = shared_dir / "conformance-sample"
    r = subprocess.run(
        [sys.executable, str(sample / "check.py"), "--netfence", f"{sys.executable} -m netfence_cli"],
        cwd=sample, capture_output=True, text=True, timeout=600,
    )
    last = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and last.endswith(" 0 failed"), r.stdout + r.stderr
    assert not last.startswith("0 passed")


def test_cnp_conformance_sample_offline(shared_dir):
    """The ClusterNetworkPolicy sample (upstream network-policy-api conformance cases)."""
    sample = shared_dir / "cnp-conformance-sample"
    r = subprocess.run(
        [sys.executable, str(sample / "check.py"), "--netfence", f"{sys.executable} -m netfence_cli"],
        cwd=sample, capture_output=True, text=True, timeout=600,
    )
    last = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and last.endswith(" 0 failed"), r.stdout + r.stderr
    assert not last.startswith("0 passed")


def test_node_peer_cases_offline(shared_dir):
    """netfence's experimental node-peer cases (tests/lab/data/cnp-cases), on the cnp sample's cluster."""
    cases = Path(__file__).resolve().parents[1] / "lab" / "data" / "cnp-cases"
    sample = shared_dir / "cnp-conformance-sample"
    r = subprocess.run(
        [sys.executable, str(sample / "check.py"), "--netfence", f"{sys.executable} -m netfence_cli",
         "--only", str(cases / "*.yaml")],
        cwd=sample, capture_output=True, text=True, timeout=600,
    )
    assert r.stdout.strip().splitlines()[-1] == f"{len(list(cases.glob('*.yaml')))} passed, 0 failed", r.stdout + r.stderr
