"""The partial path on the real kernel: own-pod events rendered by render_update and loaded by
partial transactions leave exactly what a fresh full load of the same rule set gives.

Two ways: random histories (tests/reference/node_events.py) of node-1 of random clusters, through
render_update + plan; and a fixed sequence of own-pod events (born, new IP, relabelled,
deleted) and a peer change elsewhere through the agent's own sync loop (daemon.Agent, holds
included), each compared with a second agent that loads the same inputs with a full sync into a
namespace of its own. Compared: `list table` of both tables as JSON (every chain, rule, set
element, map entry, counter and comment; tests/kernel/conftest.py `normalized`).
"""

from __future__ import annotations

import copy
from collections import Counter as Tally

import pytest
from hypothesis import HealthCheck, given, settings

from kernel.conftest import driven_agent, normalized
from netfence_api import NodeRuleSet
from netfence_agent.nft.transaction import plan
from netfence_agent.render import render, render_update
from netfence_cli.offline import synthetic_port
from reference.builders import namespace, node, pod, policy
from reference.node_events import histories, node_specs, ports_of, steps_of

pytestmark = pytest.mark.kernel


def test_partial_renders_of_any_history_load_what_a_fresh_full_load_gives(kernel_in):
    agent_ns, fresh_ns = kernel_in("rua"), kernel_in("rub")
    kinds: Tally = Tally()

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(histories())
    def check(history):
        # A new agent on an empty node: a full sync over the example before would keep counters
        # of the same name with their old comments (by design: counts outlive comments), and
        # a ClusterNetworkPolicy Deny rule's counter keeps its name when its priority changes.
        agent_ns.delete_tables()
        previous = None
        for docs, veths, holds, options in steps_of(history):
            spec = node_specs(docs)["node-1"]
            ports = ports_of(spec, veths)
            result = render(spec, ports, options, holds=holds) if previous is None else \
                render_update(previous, spec, ports, options, holds)
            tx = plan(result.ruleset, previous.ruleset if previous else None, agent_ns.inventory)
            kinds[tx.kind] += 1
            agent_ns.apply(tx)
            previous = result
            fresh_ns.delete_tables()
            fresh_ns.apply(plan(render(spec, ports, options, holds=holds).ruleset, None, fresh_ns.inventory))
            assert normalized(agent_ns.ruleset_json()) == normalized(fresh_ns.ruleset_json()), tx.kind

    check()
    assert {"full", "partial", "elements"} <= set(kinds), kinds


# --------------------------------------------------------------------------- through the agent
def cluster() -> list[dict]:
    """node-1 with ten pods of x and y, node-2 with four; policies that give node-1's pods
    chains (ingress and egress), peer groups, a named-port group, an ipBlock interval set."""
    docs = [node("node-1", "10.244.1.0/24", "172.18.0.2"), node("node-2", "10.244.2.0/24", "172.18.0.3"),
            namespace("x", {"team": "blue"}), namespace("y", {"team": "red"})]
    apps = ["web", "db", "client"]
    docs += [pod(f"{'xy'[i % 2]}/p{i}", f"10.244.1.{10 + i}", labels={"app": apps[i % 3]}, node_name="node-1")
             for i in range(10)]
    docs += [pod(f"{'xy'[i % 2]}/q{i}", f"10.244.2.{10 + i}", labels={"app": apps[i % 3]}, node_name="node-2")
             for i in range(4)]
    docs += [
        policy("x/deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        policy("x/web", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}, "podSelector": {"matchLabels": {"app": "client"}}}],
             "ports": [{"port": 80}, {"port": 81}]}]}),
        policy("y/client", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}]}]}),
        policy("y/db", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.2.0/24"]}}], "ports": [{"port": 81}]}]}),
    ]
    return docs


def find(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == name)


def test_the_agent_loads_own_pod_events_partially_and_ends_where_a_full_load_does(kernel_in, tmp_path):
    agent_ns, fresh_ns = kernel_in("rua"), kernel_in("rub")
    agent = driven_agent("node-1", agent_ns, tmp_path / "agent")
    docs = cluster()
    generation = 0

    def sync(veths: dict | None = None, extra: dict | None = None) -> str:
        """node-1's rule set for `docs`, and its pods' veths (ports_of: `veths` says which are
        lost or renamed; `extra`: veths of pods the rule set does not name yet). The agent syncs;
        a fresh agent loads the same in full next door; both kernels must hold the same."""
        nonlocal generation
        generation += 1
        spec = node_specs(docs)["node-1"]
        ports = {**ports_of(spec, veths or {}), **(extra or {})}
        rule_set = NodeRuleSet.for_node(spec, generation)
        agent.set_ports(ports)
        agent.set_rule_set(rule_set)
        outcome = agent.sync_once()
        fresh_ns.delete_tables()
        fresh = driven_agent("node-1", fresh_ns, tmp_path / f"fresh-{generation}")
        fresh.set_ports(ports)
        fresh.set_rule_set(rule_set)
        assert fresh.sync_once().kind == "full"
        assert normalized(agent_ns.ruleset_json()) == normalized(fresh_ns.ruleset_json()), outcome
        return outcome.kind

    assert sync() == "full"
    kinds = []
    # Born: the CNI plugin wires it (its veth and IP, held closed), then the rule set names it.
    born = copy.deepcopy(find(docs, "p1"))
    born["metadata"].update(name="born", labels={"app": "web"})
    born["status"].update(podIP="10.244.1.50", podIPs=[{"ip": "10.244.1.50"}])
    kinds.append(sync(extra={"10.244.1.50": synthetic_port("y", "born")}))
    docs.append(born)
    kinds.append(sync())
    # A new IP (a new sandbox): the old veth goes and a new one comes, held; then the rule set.
    moved = find(docs, "p3")
    kinds.append(sync(veths={("y", "p3"): "lost"}, extra={"10.244.1.60": synthetic_port("y", "p3-new")}))
    moved["status"].update(podIP="10.244.1.60", podIPs=[{"ip": "10.244.1.60"}])
    kinds.append(sync(veths={("y", "p3"): "renamed"}))
    # Relabelled: its rules, its chains' comments and the groups it is in change.
    find(docs, "p4")["metadata"]["labels"] = {"app": "client"}
    kinds.append(sync(veths={("y", "p3"): "renamed"}))
    find(docs, "p0")["metadata"]["labels"] = {"app": "db"}
    kinds.append(sync(veths={("y", "p3"): "renamed"}))
    # A veth known without its MAC (anti-spoofing by source address only), then with it.
    kinds.append(sync(veths={("y", "p3"): "renamed", ("y", "p5"): "no_mac"}))
    kinds.append(sync(veths={("y", "p3"): "renamed"}))
    # Deleted, its veth gone with it.
    docs.remove(find(docs, "p2"))
    kinds.append(sync(veths={("y", "p3"): "renamed"}))
    # A pod elsewhere joins a group of node-1's rules: group members only.
    find(docs, "q1")["metadata"]["labels"] = {"app": "web"}
    kinds.append(sync(veths={("y", "p3"): "renamed"}))
    assert "full" not in kinds, kinds
    assert kinds[-1] == "elements", kinds
