"""`lab apply` plumbing: declarative policy set, label updates, rule files, waiting for agents.

These run an ack-only stand-in agent (tests/lab/ack_only_agent.py): it acknowledges generations
and enforces nothing, so they check what the lab hands the agents and how it waits - never
reachability. Enforcement with the real agent is in test_enforcement.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from lab.labkit import ACK_ONLY_AGENT, DEMO_CLUSTER, netfence_lab_cli
from netfence_api import NodeRuleSet
from netfence_lab import system
from netfence_lab.model import ManifestError

pytestmark = pytest.mark.lab


def policy(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


DENY_X = policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})
ALLOW_NS_Y = policy("x", "allow-y", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})


@pytest.fixture
def stub_agent(monkeypatch):
    def use(mode="ack"):
        monkeypatch.setenv("NETFENCE_LAB_AGENT", f"{sys.executable} {ACK_ONLY_AGENT} --mode {mode}")
    use()
    return use


def rules(lab, node) -> NodeRuleSet:
    return NodeRuleSet.model_validate_json((lab.store.node_dir(node) / "rules.json").read_text())


def isolated(lab) -> set[str]:
    plan = lab.store.load().lab_plan()
    out = set()
    for n in plan.nodes:
        for p in rules(lab, n.name).spec.pods:
            if p.isolation.ingress:
                out.add(p.key)
    return out


def test_apply_hands_every_node_its_rules_and_waits(make_lab, stub_agent):
    lab = make_lab(DEMO_CLUSTER, agents=True)
    plan = lab.store.load().lab_plan()
    assert lab.store.load().generation == 1  # lab up published the cluster file's (empty) policy set
    for n in plan.nodes:
        rs = rules(lab, n.name)
        assert rs.metadata.name == n.name and rs.metadata.generation == 1 and rs.spec.nodeName == n.name
        status = json.loads((lab.store.node_dir(n.name) / "status.json").read_text())
        assert status["observedGeneration"] == 1
    assert [n["observedGeneration"] for n in lab.status()["nodes"]] == [1] * len(plan.nodes)
    assert lab.apply([DENY_X]) == 2
    assert isolated(lab) == {"x/a", "x/b", "x/c"}
    assert all(rules(lab, n.name).metadata.generation == 2 for n in plan.nodes)
    # declarative: what is not named is removed
    assert lab.apply([]) == 3
    assert isolated(lab) == set() and lab.store.load().policies == []


def test_namespace_and_pod_labels_update_the_lab_objects(make_lab, stub_agent):
    lab = make_lab(DEMO_CLUSTER, agents=True)

    def y_group_size():
        for n in lab.store.load().lab_plan().nodes:
            for g in rules(lab, n.name).spec.peerGroups:
                if "ns" in g.selector and "y" in g.selector:
                    return len(g.cidrs)
        return 0

    lab.apply([DENY_X, ALLOW_NS_Y])
    assert y_group_size() == 3
    relabel = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y", "labels": {"ns": "elsewhere"}}}
    lab.apply([relabel, DENY_X, ALLOW_NS_Y])
    assert y_group_size() == 0
    ns_y = next(ns for ns in lab.store.load().lab_plan().namespaces if ns["metadata"]["name"] == "y")
    assert ns_y["metadata"]["labels"] == {"ns": "elsewhere", "kubernetes.io/metadata.name": "y"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "z", "labels": {"pod": "zz"}}}
    lab.apply([pod])
    obj = next(o for o in lab.store.load().lab_plan().pod_objects if o["metadata"]["namespace"] == "z" and o["metadata"]["name"] == "a")
    assert obj["metadata"]["labels"] == {"pod": "zz"}
    assert obj["status"]["podIP"]  # the lab's own fields stay


def test_bad_input_is_rejected_and_changes_nothing(make_lab, stub_agent):
    lab = make_lab(DEMO_CLUSTER, agents=True)
    lab.apply([DENY_X])
    before = lab.store.load()
    bad = policy("x", "bad", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]})
    with pytest.raises(ManifestError, match="x/bad"):
        lab.apply([bad])
    with pytest.raises(ManifestError, match="Pod x/nope"):
        lab.apply([{"kind": "Pod", "metadata": {"name": "nope", "namespace": "x"}}])
    after = lab.store.load()
    assert (after.generation, after.policies) == (before.generation, before.policies)


def test_cli_apply_exit_codes(make_lab, stub_agent, tmp_path):
    make_lab(DEMO_CLUSTER, agents=True)
    f = tmp_path / "p.yaml"
    f.write_text("# no policies at all\n")
    r = netfence_lab_cli("apply", "-f", str(f))
    assert r.returncode == 0 and "0 NetworkPolicies" in r.stdout, r.stderr
    f.write_text("kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}, policyTypes: [Sideways]}\n")
    r = netfence_lab_cli("apply", "-f", str(f))
    assert r.returncode == 2 and "x/p" in r.stderr


def test_apply_times_out_naming_the_node(make_lab, stub_agent, monkeypatch):
    lab = make_lab(DEMO_CLUSTER, agents=True)
    # replace node-2's agent by one that never acknowledges
    state = lab.store.load()
    rec = next(p for p in state.processes if p.role == "agent" and p.owner == "node-2")
    system.terminate([(rec.pid, rec.starttime)])
    state.processes.remove(rec)
    lab.store.save(state)
    stub_agent("never")
    lab._start_agent(state, "node-2")
    monkeypatch.setenv("NETFENCE_LAB_APPLY_TIMEOUT", "1")
    with pytest.raises(system.LabError, match=r"generation 2 within 1s \(node-2: observedGeneration 1\)"):
        lab.apply([DENY_X])


def test_apply_reports_a_failed_or_dead_agent(make_lab, stub_agent):
    stub_agent("fail")
    with pytest.raises(system.LabError, match="agent of node node-1 failed to apply generation 1: StubFailure") as failed:
        make_lab(DEMO_CLUSTER, agents=True)
    # every failing node is named, whichever wrote its status first
    assert "agent of node node-2 failed to apply generation 1: StubFailure" in str(failed.value)
    stub_agent("ack")
    lab = make_lab(DEMO_CLUSTER, agents=True)
    state = lab.store.load()
    rec = next(p for p in state.processes if p.role == "agent" and p.owner == "node-1")
    system.terminate([(rec.pid, rec.starttime)])
    with pytest.raises(system.LabError, match="agent of node node-1 is not running"):
        lab.apply([DENY_X])
