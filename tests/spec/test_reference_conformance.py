"""The reference evaluator reproduces every table of the shared conformance sample.

The sample (../shared/conformance-sample next to the repo) is transcribed from the upstream
Kubernetes e2e NetworkPolicy suite. Clusters are built per step with the sample's own
check.py (build_cluster), so the evaluator sees exactly what `netfence matrix` is given, and
loopback cells are ignored as upstream does.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from availability import SHARED, shared_path
from reference.evaluator import reference_matrix

SAMPLE_DIR = SHARED / "conformance-sample"


def _sample_or_skip() -> Path:
    return shared_path("conformance-sample/check.py").parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("netpol_conformance_check", _sample_or_skip() / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case_files() -> list[Path]:
    return sorted((SAMPLE_DIR / "cases").glob("*.yaml")) if SAMPLE_DIR.is_dir() else []


def test_conformance_sample_is_present():
    sample = _sample_or_skip()
    assert _case_files(), f"no cases in {sample / 'cases'}"


@pytest.mark.parametrize("case_file", _case_files(), ids=lambda p: p.stem)
def test_reference_evaluator_matches_upstream_case(case_file: Path):
    check = _load_checker()
    base_docs = check.load_yaml_docs(str(SAMPLE_DIR / "cluster.yaml"))
    case = check.load_yaml_docs(str(case_file))[0]
    assert check.validate_case(case, base_docs) == []
    mismatches = []
    probes = 0
    for step_number, step in enumerate(case["steps"], 1):
        docs = check.build_cluster(base_docs, case, step) + list(step["apply"])
        for probe in step["probes"]:
            probes += 1
            got = reference_matrix(docs, probe["port"], probe["protocol"])
            assert got["port"] == f"{probe['port']}/{probe['protocol']}"
            _rows, _cols, cells = check.parse_table(probe["expect"])
            for (source, destination), want in cells.items():
                if source == destination:
                    continue  # upstream ignoreLoopback
                if got["matrix"][source][destination] != want:
                    mismatches.append(f"step {step_number} {got['port']} {source}->{destination}: "
                                      f"expected {'.' if want else 'X'}")
    assert probes > 0
    assert not mismatches, "\n".join(mismatches)
