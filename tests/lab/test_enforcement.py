"""The real agent in the lab: policies change what real packets do (root, nftables in namespaces)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from availability import shared_path
from lab.labkit import DEMO_CLUSTER, HERE, require_real_agent
from netfence_lab.lab import metric_lines

pytestmark = pytest.mark.lab

REPO = HERE.parents[1]


@pytest.fixture(autouse=True)
def real_agent():
    require_real_agent()


def policy(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def blocked(matrix):
    return sorted(f"{s}->{d}" for s, row in matrix.items() for d, ok in row.items() if not ok)


def test_default_deny_ingress_then_removal(make_lab):
    lab = make_lab(DEMO_CLUSTER, agents=True)
    pods = [p.key for p in lab.store.load().lab_plan().pods]
    lab.apply([policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    expect = sorted(f"{s}->{d}" for s in pods for d in pods if d.startswith("x/") and s != d)
    for proto in ("TCP", "UDP"):
        assert blocked(lab.probe(80, proto)) == expect, proto
    # nodes always reach their pods, isolated or not
    assert blocked(lab.probe(80, "TCP", from_nodes=True)) == []
    # the agents count what they dropped, per pod and direction
    plan = lab.store.load().lab_plan()
    counted = {}
    for n in plan.nodes:
        for line in metric_lines(lab.node_metrics(n.name), "netfence_dropped_packets_total"):
            labels, value = line.rsplit(" ", 1)
            counted[labels] = float(value)
    x_ingress = {k: v for k, v in counted.items() if 'namespace="x"' in k and 'direction="ingress"' in k}
    assert len(x_ingress) == 3 and all(v > 0 for v in x_ingress.values()), counted
    # declarative: an apply without the policy removes it
    lab.apply([])
    assert blocked(lab.probe(80, "TCP")) == []


def test_egress_only_dns(make_lab):
    lab = make_lab(DEMO_CLUSTER, agents=True)
    pods = [p.key for p in lab.store.load().lab_plan().pods]
    dns_only = policy("x", "dns-only", {"podSelector": {}, "policyTypes": ["Egress"],
                                        "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]})
    lab.apply([dns_only])
    expect = sorted(f"{s}->{d}" for s in pods for d in pods if s.startswith("x/") and s != d)
    assert blocked(lab.probe(81, "UDP")) == expect


@pytest.mark.slow
def test_conformance_sample_in_lab_mode(lab_dir):
    checker = shared_path("conformance-sample/check.py")
    env = {**os.environ, "NETFENCE": f"{sys.executable} -m netfence_cli",
           "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "agent")])}
    r = subprocess.run([sys.executable, str(checker), "--mode", "lab"], capture_output=True,
                       text=True, env=env, timeout=900, cwd=lab_dir.parent)
    assert r.stdout.strip().splitlines()[-1].endswith(" 0 failed"), r.stdout + r.stderr
    assert r.returncode == 0
