"""The reference evaluator reproduces every probe of the shared ClusterNetworkPolicy
conformance sample (../shared/cnp-conformance-sample, transcribed from the upstream
network-policy-api conformance suite). Clusters are built per step with the sample's own
check.py (build_cluster), so the evaluator sees exactly what `netfence matrix` is given.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from availability import SHARED, shared_path
from reference.evaluator import reference_matrix

SAMPLE_DIR = SHARED / "cnp-conformance-sample"
OWN_CASES = Path(__file__).resolve().parents[1] / "lab" / "data" / "cnp-cases"  # node peers, same cluster


def _load_checker():
    path = shared_path("cnp-conformance-sample/check.py")
    spec = importlib.util.spec_from_file_location("cnp_conformance_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case_files() -> list[Path]:
    shared = sorted((SAMPLE_DIR / "cases").glob("*.yaml")) if SAMPLE_DIR.is_dir() else []
    return shared + sorted(OWN_CASES.glob("*.yaml"))


def test_cnp_conformance_sample_is_present():
    assert _case_files(), f"no cases in {shared_path('cnp-conformance-sample/check.py').parent / 'cases'}"


@pytest.mark.parametrize("case_file", _case_files(), ids=lambda p: p.stem)
def test_reference_evaluator_matches_upstream_cnp_case(case_file: Path):
    check = _load_checker()
    base_docs = check.load_yaml_docs(str(SAMPLE_DIR / "cluster.yaml"))
    case = check.load_yaml_docs(str(case_file))[0]
    assert check.validate_case(case, base_docs) == []
    mismatches = []
    for step_number, step in enumerate(case["steps"], 1):
        docs = check.build_cluster(base_docs, case, step) + list(step["apply"])
        for probe in step["probes"]:
            got = reference_matrix(docs, probe["port"], probe["protocol"])["matrix"][probe["from"]][probe["to"]]
            if got != probe["expect"]:
                mismatches.append(f"step {step_number} {probe['from']} -> {probe['to']} "
                                  f"{probe['port']}/{probe['protocol']}: expected {probe['expect']}, got {got}")
    assert not mismatches, "\n".join(mismatches)
