"""ClusterNetworkPolicy semantics, one hand-written table per rule of the API text.

Tiers and actions as apis/v1alpha2/clusternetworkpolicy_types.go (kubernetes-sigs/
network-policy-api) describes them: Admin tier by priority then rule order (Accept and Deny
end it, Pass skips to NetworkPolicy), NetworkPolicy, then Baseline only where no
NetworkPolicy isolates the pod, then allow. Every table was written by hand; each test runs
against the reference evaluator and against netfence (`engine` fixture).

small_world():  x/a app=web 10.244.1.10 node-1    y/a app=web    10.244.1.20 node-1
                x/b app=db  10.244.2.11 node-2    y/b app=client 10.244.2.21 node-2
namespaces x team=blue, y team=red; ports http=80/TCP alt=81/TCP http-udp=80/UDP
"""
from __future__ import annotations

import pytest

from reference.builders import pod, policy, small_world
from reference.builders_cnp import cnp, namespaces, rule, tcp
from reference.engines import assert_reachability, engine  # noqa: F401  (engine is a fixture)

BLUE, RED = namespaces(team="blue"), namespaces(team="red")
ALL = namespaces()


def test_admin_deny_overrides_a_network_policy_allow(engine):
    docs = small_world() + [
        policy("x/allow-all", {"podSelector": {}, "ingress": [{}]}),
        cnp("no-red-into-blue", "Admin", 10, BLUE, ingress=[rule("Deny", [RED])]),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)


def test_admin_accept_overrides_a_network_policy_deny(engine):
    docs = small_world() + [
        policy("x/deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        cnp("red-into-blue", "Admin", 10, BLUE, ingress=[rule("Accept", [RED])]),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_admin_egress_accept_still_needs_ingress_at_the_destination(engine):
    docs = small_world() + [
        policy("x/deny-in", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        policy("y/deny-out", {"podSelector": {}, "policyTypes": ["Egress"]}),
        cnp("red-out", "Admin", 10, RED, egress=[rule("Accept", [ALL], direction="egress")]),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)


def test_admin_pass_skips_the_rest_of_the_admin_tier_to_network_policy(engine):
    docs = small_world() + [
        cnp("a1-pass-red", "Admin", 1, BLUE, ingress=[rule("Pass", [RED])]),
        cnp("a2-deny-all", "Admin", 2, BLUE, ingress=[rule("Deny", [ALL])]),
        policy("x/web-from-red", {"podSelector": {"matchLabels": {"app": "web"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_admin_rules_apply_in_written_order(engine):
    docs = small_world() + [cnp("blue", "Admin", 1, BLUE, ingress=[
        rule("Accept", [RED], protocols=[tcp(80)]),
        rule("Deny", [ALL]),
    ])]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)
    assert_reachability(engine, docs, "81/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)


def test_baseline_applies_only_where_no_network_policy_isolates(engine):
    docs = small_world() + [
        cnp("default-deny", "Baseline", 10, ALL, ingress=[rule("Deny", [ALL])]),
        policy("x/db-from-web", {"podSelector": {"matchLabels": {"app": "db"}},
                                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   X   X
    x/b  X   .   X   X
    y/a  X   X   .   X
    y/b  X   X   X   .
    """)


def test_baseline_pass_goes_on_to_the_default_allow(engine):
    docs = small_world() + [
        cnp("b1-pass-red", "Baseline", 1, ALL, ingress=[rule("Pass", [RED])]),
        cnp("b2-deny-all", "Baseline", 2, ALL, ingress=[rule("Deny", [ALL])]),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   X   X
    x/b  X   .   X   X
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


@pytest.mark.parametrize("deny_name, accept_name, red_into_blue", [
    ("a-deny", "b-accept", False),
    ("b-deny", "a-accept", True),
])
def test_equal_priorities_are_ordered_by_name(engine, deny_name, accept_name, red_into_blue):
    """Upstream leaves the order of equal priorities to the implementation: netfence takes
    the policy name (documented in docs/cluster-network-policy.md)."""
    docs = small_world() + [
        cnp(deny_name, "Admin", 5, BLUE, ingress=[rule("Deny", [RED])]),
        cnp(accept_name, "Admin", 5, BLUE, ingress=[rule("Accept", [RED])]),
        policy("x/deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
    ]
    cell = "." if red_into_blue else "X"
    assert_reachability(engine, docs, "80/TCP", f"""
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  {cell}   {cell}   .   .
    y/b  {cell}   {cell}   .   .
    """)


def test_networks_peers_match_pod_addresses_too(engine):
    docs = small_world() + [cnp("no-node-2-pods", "Admin", 1, RED, egress=[
        rule("Deny", [{"networks": ["10.244.2.0/24"]}], direction="egress")])]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   X   .   X
    y/b  .   X   .   .
    """)


def _with_host_pods() -> list[dict]:
    return small_world() + [
        pod("h/n1", "172.18.0.2", labels={"app": "node"}, node_name="node-1", host_network=True),
        pod("h/n2", "172.18.0.3", labels={"app": "node"}, node_name="node-2", host_network=True),
    ]


def test_nodes_peers_reach_a_pods_own_node_while_network_policy_allows_it(engine):
    """A pod's traffic to its own node: ClusterNetworkPolicy egress rules apply (upstream's
    node-peer tests deny it); NetworkPolicy keeps allowing it (y is egress-isolated)."""
    docs = _with_host_pods() + [
        cnp("no-node-1", "Admin", 1, BLUE, egress=[
            rule("Deny", [{"nodes": {"matchLabels": {"kubernetes.io/hostname": "node-1"}}}], direction="egress")]),
        policy("y/no-egress", {"podSelector": {}, "policyTypes": ["Egress"]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -     x/a x/b y/a y/b h/n1 h/n2
    x/a   .   .   .   .   X    .
    x/b   .   .   .   .   X    .
    y/a   X   X   .   X   .    X
    y/b   X   X   X   .   X    .
    h/n1  .   .   .   .   .    .
    h/n2  .   .   .   .   .    .
    """)


def test_baseline_egress_reaches_a_pods_own_node_unless_network_policy_isolates(engine):
    docs = _with_host_pods() + [
        cnp("no-nodes", "Baseline", 1, ALL, egress=[rule("Deny", [{"nodes": {}}], direction="egress")]),
        policy("y/egress-to-web", {"podSelector": {}, "policyTypes": ["Egress"],
                                   "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -     x/a x/b y/a y/b h/n1 h/n2
    x/a   .   .   .   .   X    X
    x/b   .   .   .   .   X    X
    y/a   X   X   .   X   .    X
    y/b   X   X   .   .   X    .
    h/n1  .   .   .   .   .    .
    h/n2  .   .   .   .   .    .
    """)


def test_named_ports_resolve_on_the_destination_pod(engine):
    docs = small_world() + [
        cnp("no-alt-into-blue", "Admin", 1, BLUE, ingress=[rule("Deny", [ALL], protocols=[{"destinationNamedPort": "alt"}])]),
        cnp("no-http-udp-from-red", "Admin", 1, RED, egress=[
            rule("Deny", [{"pods": {"podSelector": {"matchLabels": {"app": "db"}}}}], direction="egress",
                 protocols=[{"destinationNamedPort": "http-udp"}])]),
    ]
    assert_reachability(engine, docs, "81/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)
    assert_reachability(engine, docs, "80/UDP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """)
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_port_ranges(engine):
    docs = small_world() + [cnp("no-high-ports", "Admin", 1, ALL, ingress=[
        rule("Deny", [ALL], protocols=[{"tcp": {"destinationPort": {"range": {"start": 81, "end": 9000}}}}])])]
    closed = """
    -    x/a x/b y/a y/b
    x/a  .   X   X   X
    x/b  X   .   X   X
    y/a  X   X   .   X
    y/b  X   X   X   .
    """
    assert_reachability(engine, docs, "81/TCP", closed)
    assert_reachability(engine, docs, "9000/TCP", closed)
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)
