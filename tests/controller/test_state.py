"""ClusterState, the pure part of the controller: watch events in, compiler fed, problems out."""

from __future__ import annotations

import copy

from controller.harness import namespace, node, pod, policy
from netfence_operator.state import ClusterState, isolating_substitute


def with_uid(obj: dict, uid: str, **meta) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"].update(uid=uid, **meta)
    return obj


DENY_WEB = {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}
ALLOW_FROM_DB = {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]}


def base() -> ClusterState:
    state = ClusterState()
    state.observe("Namespace", with_uid(namespace("p"), "ns-p"))
    state.observe("Node", with_uid(node("n1", "10.244.1.0/24", "172.18.0.2"), "node-1"))
    state.observe("Pod", with_uid(pod("p", "web", "n1", "10.244.1.10", {"app": "web"}), "web-1"))
    state.observe("Pod", with_uid(pod("p", "db", "n1", "10.244.1.20", {"app": "db"}), "db-1"))
    return state


def web(state: ClusterState):
    return next(p for p in state.compiler.node_spec("n1").pods if p.key == "p/web")


def test_events_of_an_old_same_name_pod_do_not_override_the_new_one():
    state = base()
    old = with_uid(pod("p", "web", "n1", "10.244.1.10", {"app": "web"}), "web-1", deletionTimestamp="2026-01-01T00:00:00Z")
    new = with_uid(pod("p", "web", "n1", "10.244.1.11", {"app": "web"}), "web-2")
    state.observe("Pod", new)  # the new pod's worker got there first
    state.observe("Pod", old)  # a late MODIFIED of the terminating old one
    state.observe("NetworkPolicy", with_uid(policy("p", "deny", DENY_WEB), "np-1"))
    assert web(state).ips == ["10.244.1.11"]
    state.forget("Pod", old)  # the old one's DELETED must not remove the new one
    assert web(state).ips == ["10.244.1.11"]
    state.observe("Pod", old)  # and a straggler after its DELETED is ignored
    assert web(state).ips == ["10.244.1.11"]


def test_a_policy_that_turns_invalid_keeps_its_last_valid_version():
    state = base()
    state.observe("NetworkPolicy", with_uid(policy("p", "np", ALLOW_FROM_DB), "np-1"))
    good = web(state)
    assert good.ingress
    bad = copy.deepcopy(ALLOW_FROM_DB)
    bad["ingress"][0]["ports"] = [{"port": 80, "protocol": "ICMP"}]
    state.take_dirty()
    state.observe("NetworkPolicy", with_uid(policy("p", "np", bad), "np-1"))
    assert web(state) == good and state.take_dirty() == set()
    (problem,) = state.policy_problems()
    assert problem.reason == "InvalidPolicy" and problem.uid == "np-1"
    assert problem.message.startswith("spec.ingress[0].ports[0].protocol: unknown protocol 'ICMP'")
    assert "last valid version" in problem.message


def test_a_never_valid_policy_isolates_what_it_selects_with_no_allow_rules():
    state = base()
    bad = copy.deepcopy(ALLOW_FROM_DB)
    bad["ingress"][0]["from"][0]["ipBlock"] = {"cidr": "10.0.0.0/8"}  # ipBlock next to podSelector: invalid
    state.observe("NetworkPolicy", with_uid(policy("p", "np", bad), "np-1"))
    pod_rules = web(state)
    assert pod_rules.isolation.ingress and not pod_rules.isolation.egress and pod_rules.ingress == []
    db = next(p for p in state.compiler.node_spec("n1").pods if p.key == "p/db")
    assert not db.isolation.ingress
    (problem,) = state.policy_problems()
    assert "spec.ingress[0].from[0]" in problem.message and "stay isolated" in problem.message


def test_the_isolating_substitute_fails_closed_on_what_it_cannot_read():
    unreadable_selector = isolating_substitute(policy("p", "x", {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}))
    assert unreadable_selector.spec.podSelector.is_empty()  # every pod of the namespace
    assert unreadable_selector.spec.effective_policy_types() == {"Ingress"}
    odd_types = isolating_substitute(policy("p", "x", {"podSelector": {}, "policyTypes": ["Sideways"]}))
    assert odd_types.spec.effective_policy_types() == {"Ingress", "Egress"}
    egress = isolating_substitute(policy("p", "x", {"podSelector": {}, "egress": [{"to": "nonsense"}]}))
    assert egress.spec.effective_policy_types() == {"Ingress", "Egress"}
    assert egress.spec.ingress is None and egress.spec.egress is None


def test_deleting_an_invalid_policy_removes_its_isolation():
    state = base()
    body = with_uid(policy("p", "np", {"podSelector": {}, "policyTypes": ["Ingress"], "bogus": 1}), "np-1")
    state.observe("NetworkPolicy", body)
    assert web(state).isolation.ingress
    state.forget("NetworkPolicy", body)
    assert not web(state).isolation.ingress and state.policy_problems() == []


def test_objects_missed_behind_a_relist_are_dropped_by_uid():
    state = base()
    known = state.known_uids("Pod")
    assert known == {"web-1": "p/web", "db-1": "p/db"}
    state.observe("Pod", with_uid(pod("p", "late", "n1", "10.244.1.30"), "late-1"))  # seen after the list was taken
    dropped = state.forget_missing("Pod", known, present={"db-1"})
    assert dropped == ["p/web"]
    assert set(state.known_uids("Pod")) == {"db-1", "late-1"}
    assert state.counts()["Pod"] == 2


def test_terminating_pod_keeps_its_rules_and_finished_pod_does_not():
    state = base()
    state.observe("NetworkPolicy", with_uid(policy("p", "np", DENY_WEB), "np-1"))
    state.observe("Pod", with_uid(pod("p", "web", "n1", "10.244.1.10", {"app": "web"}), "web-1",
                                  deletionTimestamp="2026-01-01T00:00:00Z"))
    assert web(state).isolation.ingress
    state.observe("Pod", with_uid(pod("p", "web", "n1", "10.244.1.10", {"app": "web"}, phase="Succeeded"), "web-1",
                                  deletionTimestamp="2026-01-01T00:00:00Z"))
    assert all(p.key != "p/web" for p in state.compiler.node_spec("n1").pods)


def test_a_compiler_failure_is_repaired_by_a_rebuild():
    calls = {"n": 0}

    from netfence_operator.compile import Compiler

    class Flaky(Compiler):
        def upsert(self, obj):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("bug")
            return super().upsert(obj)

    state = ClusterState(compiler_factory=Flaky)
    state.observe("Node", with_uid(node("n1", "10.244.1.0/24", "172.18.0.2"), "node-1"))
    state.observe("NetworkPolicy", with_uid(policy("p", "np", DENY_WEB), "np-1"))
    state.observe("Pod", with_uid(pod("p", "web", "n1", "10.244.1.10", {"app": "web"}), "web-1"))  # fails
    state.rebuild_if_broken()
    assert web(state).isolation.ingress
    assert "n1" in state.take_dirty()
