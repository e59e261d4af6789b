"""One test (or a few) per rule of DESIGN.md §3, each with a small hand-written cluster.

Every expected table below was written by hand from the Kubernetes API reference, not
computed. Each test runs twice: against the reference evaluator and against netfence's
in-process matrix (`engine` fixture), so both must agree with the hand-written answer.

Unless a test builds its own cluster it uses reference.builders.small_world():
    x/a app=web 10.244.1.10 node-1     y/a app=web    10.244.1.20 node-1
    x/b app=db  10.244.2.11 node-2     y/b app=client 10.244.2.21 node-2
    namespaces x team=blue, y team=red; ports http=80/TCP alt=81/TCP http-udp=80/UDP
"""
from __future__ import annotations

from reference.builders import namespace, node, pod, policy, small_world
from reference.engines import assert_reachability, engine  # noqa: F401  (engine is a fixture)

ALL_OPEN = """
-    x/a x/b y/a y/b
x/a  .   .   .   .
x/b  .   .   .   .
y/a  .   .   .   .
y/b  .   .   .   .
"""


def web(key: str, *rules) -> dict:
    return policy(key, dict(rules))


def host_pod(key: str, node_name: str, address: str, labels=None) -> dict:
    return pod(key, address, labels=labels or {"app": "web"}, node_name=node_name, host_network=True)


# ---------------------------------------------------------------- isolation and policyTypes
def test_no_policy_allows_everything(engine):
    assert_reachability(engine, small_world(), "80/TCP", ALL_OPEN)


def test_default_deny_ingress_isolates_only_the_policy_namespace(engine):
    docs = small_world() + [policy("x/deny", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)


def test_policy_pod_selector_isolates_only_matching_pods(engine):
    docs = small_world() + [policy("x/deny-db", {"podSelector": {"matchLabels": {"app": "db"}},
                                                 "policyTypes": ["Ingress"]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """)


def test_policy_never_selects_pods_of_another_namespace(engine):
    # app=web exists in x and y; a policy in y selects only y/a
    docs = small_world() + [policy("y/deny-web", {"podSelector": {"matchLabels": {"app": "web"}},
                                                  "policyTypes": ["Ingress"]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   X   .
    x/b  .   .   X   .
    y/a  .   .   .   .
    y/b  .   .   X   .
    """)


def test_policy_types_unset_with_only_ingress_rules_does_not_restrict_egress(engine):
    docs = small_world() + [policy("x/web", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  X   .   .   .
    y/b  X   .   .   .
    """)


def test_policy_types_unset_with_egress_rules_isolates_both_directions(engine):
    docs = small_world() + [policy("x/web", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   X   X
    x/b  X   .   .   .
    y/a  X   .   .   .
    y/b  X   .   .   .
    """)


def test_policy_types_unset_with_empty_egress_list_does_not_isolate_egress(engine):
    docs = small_world() + [policy("x/web", {
        "podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}], "egress": [],
    })]
    assert_reachability(engine, docs, "80/TCP", ALL_OPEN)


def test_egress_only_policy_does_not_restrict_ingress(engine):
    docs = small_world() + [policy("x/egress-only", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_ingress_rules_of_an_egress_only_policy_open_nothing(engine):
    docs = small_world() + [
        policy("x/egress-only", {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
        }),
        policy("x/deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)


def test_default_deny_all_blocks_both_directions(engine):
    docs = small_world() + [policy("x/deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   X   X
    x/b  X   .   X   X
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)


def test_empty_ingress_rule_allows_all_ingress(engine):
    docs = small_world() + [
        policy("x/deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        policy("x/allow-all", {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", ALL_OPEN)


def test_empty_egress_rule_allows_all_egress(engine):
    docs = small_world() + [
        policy("x/deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        policy("x/allow-egress", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """)


# ---------------------------------------------------------------- union, both ends
def test_rules_of_all_policies_selecting_a_pod_are_united(engine):
    docs = small_world() + [
        policy("x/from-db", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]}),
        policy("x/from-red-clients", {
            "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}},
                                   "podSelector": {"matchLabels": {"app": "client"}}}]}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  X   .   .   .
    y/b  .   .   .   .
    """)


def test_each_rule_pairs_its_own_peers_with_its_own_ports(engine):
    docs = small_world() + [policy("x/web", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 80}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}], "ports": [{"port": 81}]},
        ],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  X   .   .   .
    y/b  X   .   .   .
    """)
    assert_reachability(engine, docs, "81/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  X   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_connection_needs_egress_at_source_and_ingress_at_destination(engine):
    docs = small_world() + [
        policy("x/db-egress", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Egress"],
                               "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]}),
        policy("y/web-ingress", {
            "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}},
                                   "podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  X   .   X   .
    y/a  .   .   .   .
    y/b  .   .   X   .
    """)


# ---------------------------------------------------------------- peers
def _db_ingress_from(*peers) -> list[dict]:
    return small_world() + [policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}},
                                            "policyTypes": ["Ingress"], "ingress": [{"from": list(peers)}]})]


def test_pod_selector_peer_matches_only_pods_of_the_policy_namespace(engine):
    docs = _db_ingress_from({"podSelector": {"matchLabels": {"app": "web"}}})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """)


def test_namespace_selector_peer_matches_every_pod_of_selected_namespaces(engine):
    docs = _db_ingress_from({"namespaceSelector": {"matchLabels": {"team": "red"}}})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_pod_and_namespace_selector_in_one_peer_must_both_match(engine):
    docs = _db_ingress_from({"namespaceSelector": {"matchLabels": {"team": "red"}},
                             "podSelector": {"matchLabels": {"app": "web"}}})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   X   .   .
    """)


def test_separate_peers_are_alternatives(engine):
    docs = small_world() + [policy("x/web", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "red"}}, "podSelector": {"matchLabels": {"app": "client"}}},
            {"podSelector": {"matchLabels": {"app": "db"}}},
        ]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  X   .   .   .
    y/b  .   .   .   .
    """)


def test_empty_pod_selector_peer_matches_all_pods_of_the_policy_namespace(engine):
    docs = _db_ingress_from({"podSelector": {}})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """)


def test_empty_namespace_selector_matches_every_namespace(engine):
    docs = small_world() + [policy("y/web", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   X   .
    y/a  .   .   .   .
    y/b  .   .   X   .
    """)


def test_missing_from_allows_every_source(engine):
    docs = small_world() + [policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}},
                                            "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 81}]}]})]
    assert_reachability(engine, docs, "81/TCP", ALL_OPEN)
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """)


def test_empty_from_list_allows_every_source(engine):
    docs = small_world() + [policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}},
                                            "policyTypes": ["Ingress"],
                                            "ingress": [{"from": [], "ports": [{"port": 80}]}]})]
    assert_reachability(engine, docs, "80/TCP", ALL_OPEN)
    assert_reachability(engine, docs, "81/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """)


def test_ip_block_matches_pod_addresses(engine):
    docs = _db_ingress_from({"ipBlock": {"cidr": "10.244.1.0/24"}})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   X   .   .
    """)


def test_ip_block_except_carves_out_addresses(engine):
    docs = _db_ingress_from({"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.20/32"]}})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   .   .   .
    """)


def test_egress_ip_block_with_except(engine):
    docs = small_world() + [policy("x/web-out", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.244.2.0/24", "except": ["10.244.2.11/32"]}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   X   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_namespace_without_object_carries_its_name_label(engine):
    docs = small_world() + [pod("w/a", "10.244.1.30", labels={"app": "web"}, node_name="node-1")]
    docs += [policy("x/db", {
        "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "w"}}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b w/a
    x/a  .   X   .   .   .
    x/b  .   .   .   .   .
    y/a  .   X   .   .   .
    y/b  .   X   .   .   .
    w/a  .   .   .   .   .
    """)


def test_namespace_name_label_is_present_even_if_manifest_omits_it(engine):
    docs = [d for d in small_world() if not (d["kind"] == "Namespace" and d["metadata"]["name"] == "y")]
    docs += [namespace("y", {"team": "red"}, with_name_label=False)]
    docs += [policy("x/db", {
        "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


# ---------------------------------------------------------------- label selector operators
def _db_ingress_from_pods_matching(selector: dict) -> list[dict]:
    """small_world plus y/c (no labels); x/b accepts pods of any namespace matching `selector`."""
    return small_world() + [
        pod("y/c", "10.244.2.22", labels={}, node_name="node-2"),
        policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": selector}]}]}),
    ]


def test_match_expression_in(engine):
    docs = _db_ingress_from_pods_matching(
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["client", "cache"]}]})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b y/c
    x/a  .   X   .   .   .
    x/b  .   .   .   .   .
    y/a  .   X   .   .   .
    y/b  .   .   .   .   .
    y/c  .   X   .   .   .
    """)


def test_match_expression_not_in_also_matches_pods_without_the_key(engine):
    docs = _db_ingress_from_pods_matching(
        {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b y/c
    x/a  .   X   .   .   .
    x/b  .   .   .   .   .
    y/a  .   X   .   .   .
    y/b  .   .   .   .   .
    y/c  .   .   .   .   .
    """)


def test_match_expression_exists(engine):
    docs = _db_ingress_from_pods_matching({"matchExpressions": [{"key": "app", "operator": "Exists"}]})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b y/c
    x/a  .   .   .   .   .
    x/b  .   .   .   .   .
    y/a  .   .   .   .   .
    y/b  .   .   .   .   .
    y/c  .   X   .   .   .
    """)


def test_match_expression_does_not_exist(engine):
    docs = _db_ingress_from_pods_matching({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]})
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b y/c
    x/a  .   X   .   .   .
    x/b  .   .   .   .   .
    y/a  .   X   .   .   .
    y/b  .   X   .   .   .
    y/c  .   .   .   .   .
    """)


def test_match_labels_and_match_expressions_must_all_hold(engine):
    # pod side: app=web AND no kubernetes.io/metadata.name label AND app not db; namespace side: team in (red)
    docs = small_world() + [
        pod("y/c", "10.244.2.22", labels={}, node_name="node-2"),
        policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{
                            "namespaceSelector": {"matchExpressions": [
                                {"key": "team", "operator": "In", "values": ["red"]}]},
                            "podSelector": {
                                "matchLabels": {"app": "web"},
                                "matchExpressions": [
                                    {"key": "kubernetes.io/metadata.name", "operator": "DoesNotExist"},
                                    {"key": "app", "operator": "NotIn", "values": ["db"]}]},
                        }]}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b y/c
    x/a  .   X   .   .   .
    x/b  .   .   .   .   .
    y/a  .   .   .   .   .
    y/b  .   X   .   .   .
    y/c  .   X   .   .   .
    """)


# ---------------------------------------------------------------- ports
def _db_ingress_ports(*ports, peers=None) -> list[dict]:
    rule: dict = {"ports": list(ports)} if ports else {}
    if peers is not None:
        rule["from"] = peers
    return small_world() + [policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}},
                                            "policyTypes": ["Ingress"], "ingress": [rule]})]


DB_CLOSED = """
-    x/a x/b y/a y/b
x/a  .   X   .   .
x/b  .   .   .   .
y/a  .   X   .   .
y/b  .   X   .   .
"""


def test_missing_ports_allow_every_port_and_protocol(engine):
    docs = _db_ingress_ports(peers=[{"podSelector": {"matchLabels": {"app": "web"}}}])
    expected = """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """
    for probe in ("80/TCP", "81/TCP", "80/UDP", "5000/SCTP"):
        assert_reachability(engine, docs, probe, expected)


def test_numeric_port_allows_only_that_port_and_protocol(engine):
    docs = _db_ingress_ports({"port": 80, "protocol": "TCP"})
    assert_reachability(engine, docs, "80/TCP", ALL_OPEN)
    assert_reachability(engine, docs, "81/TCP", DB_CLOSED)
    assert_reachability(engine, docs, "80/UDP", DB_CLOSED)


def test_protocol_defaults_to_tcp(engine):
    docs = _db_ingress_ports({"port": 80})
    assert_reachability(engine, docs, "80/TCP", ALL_OPEN)
    assert_reachability(engine, docs, "80/UDP", DB_CLOSED)
    assert_reachability(engine, docs, "80/SCTP", DB_CLOSED)


def test_udp_and_sctp_ports(engine):
    docs = _db_ingress_ports({"port": 53, "protocol": "UDP"}, {"port": 9000, "protocol": "SCTP"})
    assert_reachability(engine, docs, "53/UDP", ALL_OPEN)
    assert_reachability(engine, docs, "53/TCP", DB_CLOSED)
    assert_reachability(engine, docs, "9000/SCTP", ALL_OPEN)
    assert_reachability(engine, docs, "9000/TCP", DB_CLOSED)
    assert_reachability(engine, docs, "9000/UDP", DB_CLOSED)


def test_end_port_range_is_inclusive(engine):
    docs = _db_ingress_ports({"port": 8000, "endPort": 8002})
    assert_reachability(engine, docs, "7999/TCP", DB_CLOSED)
    assert_reachability(engine, docs, "8000/TCP", ALL_OPEN)
    assert_reachability(engine, docs, "8001/TCP", ALL_OPEN)
    assert_reachability(engine, docs, "8002/TCP", ALL_OPEN)
    assert_reachability(engine, docs, "8003/TCP", DB_CLOSED)
    assert_reachability(engine, docs, "8001/UDP", DB_CLOSED)


def test_port_entry_with_only_a_protocol_allows_every_port_of_it(engine):
    docs = _db_ingress_ports({"protocol": "UDP"})
    assert_reachability(engine, docs, "80/UDP", ALL_OPEN)
    assert_reachability(engine, docs, "5353/UDP", ALL_OPEN)
    assert_reachability(engine, docs, "80/TCP", DB_CLOSED)


def _named_port_world() -> list[dict]:
    """x/a web=8080, x/b web=9090, y/a web=8080 and dns=53/UDP, y/b no names; src x/a has web=7070."""
    return [
        node("node-1", "10.244.1.0/24", "172.18.0.2"),
        node("node-2", "10.244.2.0/24", "172.18.0.3"),
        namespace("x", {"team": "blue"}),
        namespace("y", {"team": "red"}),
        pod("x/a", "10.244.1.10", labels={"app": "web"}, ports=[(8080, "TCP", "web"), (7070, "TCP", "admin")]),
        pod("x/b", "10.244.2.11", labels={"app": "db"}, node_name="node-2", ports=[(9090, "TCP", "web")]),
        pod("y/a", "10.244.1.20", labels={"app": "web"}, ports=[(8080, "TCP", "web"), (53, "UDP", "dns"),
                                                                 (53, "TCP", None)]),
        pod("y/b", "10.244.2.21", labels={"app": "client"}, node_name="node-2", ports=[(8080, "TCP", None)]),
    ]


def test_named_port_on_ingress_resolves_on_each_destination_pod(engine):
    docs = _named_port_world() + [policy("x/web", {"podSelector": {}, "policyTypes": ["Ingress"],
                                                   "ingress": [{"ports": [{"port": "web"}]}]})]
    assert_reachability(engine, docs, "8080/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  .   .   .   .
    y/a  .   X   .   .
    y/b  .   X   .   .
    """)
    assert_reachability(engine, docs, "9090/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   .
    x/b  X   .   .   .
    y/a  X   .   .   .
    y/b  X   .   .   .
    """)


def test_named_port_that_resolves_on_no_pod_opens_nothing(engine):
    docs = _named_port_world() + [policy("x/nope", {"podSelector": {}, "policyTypes": ["Ingress"],
                                                    "ingress": [{"ports": [{"port": "no-such-port"}]}]})]
    expected = """
    -    x/a x/b y/a y/b
    x/a  .   X   .   .
    x/b  X   .   .   .
    y/a  X   X   .   .
    y/b  X   X   .   .
    """
    for probe in ("8080/TCP", "9090/TCP", "80/TCP"):
        assert_reachability(engine, docs, probe, expected)


def test_named_port_must_match_the_container_port_protocol(engine):
    dns_tcp = policy("y/dns", {"podSelector": {}, "policyTypes": ["Ingress"],
                               "ingress": [{"ports": [{"port": "dns"}]}]})  # TCP by default; dns is UDP
    y_closed = """
    -    x/a x/b y/a y/b
    x/a  .   .   X   X
    x/b  .   .   X   X
    y/a  .   .   .   X
    y/b  .   .   X   .
    """
    assert_reachability(engine, _named_port_world() + [dns_tcp], "53/TCP", y_closed)
    assert_reachability(engine, _named_port_world() + [dns_tcp], "53/UDP", y_closed)
    dns_udp = policy("y/dns", {"podSelector": {}, "policyTypes": ["Ingress"],
                               "ingress": [{"ports": [{"port": "dns", "protocol": "UDP"}]}]})
    assert_reachability(engine, _named_port_world() + [dns_udp], "53/UDP", """
    -    x/a x/b y/a y/b
    x/a  .   .   .   X
    x/b  .   .   .   X
    y/a  .   .   .   X
    y/b  .   .   .   .
    """)
    assert_reachability(engine, _named_port_world() + [dns_udp], "53/TCP", y_closed)


def test_named_port_on_egress_resolves_on_the_destination_pod(engine):
    docs = _named_port_world() + [policy("x/out", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "web"}]}],
    })]
    assert_reachability(engine, docs, "8080/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   .   X
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)
    assert_reachability(engine, docs, "9090/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   .   X   X
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


def test_named_port_on_egress_is_not_resolved_on_the_source(engine):
    # x/a names 7070 "admin"; nobody else has "admin", so x/a may reach no one on 7070
    docs = _named_port_world() + [policy("x/out", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "admin"}]}],
    })]
    assert_reachability(engine, docs, "7070/TCP", """
    -    x/a x/b y/a y/b
    x/a  .   X   X   X
    x/b  .   .   .   .
    y/a  .   .   .   .
    y/b  .   .   .   .
    """)


# ---------------------------------------------------------------- the pod itself, nodes, hostNetwork
def test_pod_to_itself_is_always_allowed(engine):
    docs = small_world() + [
        policy("x/deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        policy("y/deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    ]
    expected = """
    -    x/a x/b y/a y/b
    x/a  .   X   X   X
    x/b  X   .   X   X
    y/a  X   X   .   X
    y/b  X   X   X   .
    """
    assert_reachability(engine, docs, "80/TCP", expected)
    assert_reachability(engine, docs, "4242/UDP", expected)


def test_host_network_pod_is_never_policed(engine):
    docs = small_world() + [host_pod("x/h", "node-1", "172.18.0.2"),
                            policy("x/deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b x/h
    x/a  .   X   X   X   .
    x/b  X   .   X   X   X
    y/a  X   X   .   .   .
    y/b  X   X   .   .   .
    x/h  .   X   .   .   .
    """)


def test_traffic_from_the_pods_own_node_is_always_allowed(engine):
    docs = small_world() + [host_pod("x/h", "node-2", "172.18.0.3"),
                            policy("x/deny", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b x/h
    x/a  .   X   .   .   .
    x/b  X   .   .   .   .
    y/a  X   X   .   .   .
    y/b  X   X   .   .   .
    x/h  X   .   .   .   .
    """)


def test_host_network_source_is_not_matched_by_pod_selectors(engine):
    docs = small_world() + [host_pod("x/h", "node-1", "172.18.0.2"),
                            policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b x/h
    x/a  .   .   .   .   .
    x/b  .   .   .   .   .
    y/a  .   X   .   .   .
    y/b  .   X   .   .   .
    x/h  .   X   .   .   .
    """)


def test_host_network_source_on_another_node_is_not_its_internal_ip(engine):
    # x/h (node-1's network) reaches x/b on node-2 through flannel.1, so its packets carry
    # node-1's flannel.1 address 10.244.1.0, not the InternalIP 172.18.0.2 (measured in the lab).
    docs = small_world() + [host_pod("x/h", "node-1", "172.18.0.2"),
                            policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                                            "ingress": [{"from": [{"ipBlock": {"cidr": "172.18.0.2/32"}}]}]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b x/h
    x/a  .   X   .   .   .
    x/b  .   .   .   .   .
    y/a  .   X   .   .   .
    y/b  .   X   .   .   .
    x/h  .   X   .   .   .
    """)


def test_host_network_source_on_another_node_is_matched_by_its_flannel_address(engine):
    docs = small_world() + [host_pod("x/h", "node-1", "172.18.0.2"),
                            policy("x/db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                                            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/32"}}]}]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b x/h
    x/a  .   X   .   .   .
    x/b  .   .   .   .   .
    y/a  .   X   .   .   .
    y/b  .   X   .   .   .
    x/h  .   .   .   .   .
    """)


def test_host_network_destination_is_not_matched_by_egress_selectors(engine):
    docs = small_world() + [host_pod("x/h", "node-2", "172.18.0.3"),
                            policy("x/web-out", {"podSelector": {"matchLabels": {"app": "web"}},
                                                 "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {}}]}]})]
    # x/h also has app=web but is not policed; x/a (node-1) may only reach pods of x, and x/h is not one
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b x/h
    x/a  .   .   X   X   X
    x/b  .   .   .   .   .
    y/a  .   .   .   .   .
    y/b  .   .   .   .   .
    x/h  .   .   .   .   .
    """)


def test_host_network_destination_is_matched_by_egress_ip_block(engine):
    docs = small_world() + [host_pod("x/h", "node-2", "172.18.0.3"),
                            policy("x/web-out", {"podSelector": {"matchLabels": {"app": "web"}},
                                                 "policyTypes": ["Egress"],
                                                 "egress": [{"to": [{"ipBlock": {"cidr": "172.18.0.0/16"}}]}]})]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b y/a y/b x/h
    x/a  .   X   X   X   .
    x/b  .   .   .   .   .
    y/a  .   .   .   .   .
    y/b  .   .   .   .   .
    x/h  .   .   .   .   .
    """)


# ---------------------------------------------------------------- address families
def _dual_stack_world() -> list[dict]:
    return [
        node("node-1", "10.244.1.0/24", "172.18.0.2"),
        node("node-2", "10.244.2.0/24", "172.18.0.3"),
        namespace("x"),
        pod("x/a", ["10.244.1.10", "fd00:10:244:1::a"], labels={"app": "a"}),
        pod("x/b", ["10.244.2.11", "fd00:10:244:2::b"], labels={"app": "b"}, node_name="node-2"),
        pod("x/c", ["10.244.1.12", "fd00:10:244:1::c"], labels={"app": "c"}),
    ]


def test_dual_stack_pods_are_matched_on_their_ipv4_address(engine):
    docs = _dual_stack_world() + [policy("x/b", {
        "podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244:1::a/128"}},
                              {"ipBlock": {"cidr": "10.244.1.12/32"}}]}],
    })]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b x/c
    x/a  .   X   .
    x/b  .   .   .
    x/c  .   .   .
    """)


def test_ipv6_only_pods_are_matched_by_ipv6_blocks_only(engine):
    docs = [
        node("node-1", "fd00:10:244:1::/64", "fc00::2"),
        namespace("x"),
        pod("x/a", "fd00:10:244:1::a", labels={"app": "a"}),
        pod("x/b", "fd00:10:244:1::b", labels={"app": "b"}),
        pod("x/c", "fd00:10:244:1::c", labels={"app": "c"}),
        policy("x/b", {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244:1::/64",
                                                          "except": ["fd00:10:244:1::c/128"]}},
                                             {"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}),
    ]
    assert_reachability(engine, docs, "80/TCP", """
    -    x/a x/b x/c
    x/a  .   .   .
    x/b  .   .   .
    x/c  .   X   .
    """)


# ---------------------------------------------------------------- input handling
def test_other_kinds_are_ignored(engine):
    docs = small_world() + [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "x"},
         "spec": {"selector": {"app": "db"}, "ports": [{"port": 80}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "x"},
         "spec": {"selector": {"matchLabels": {"app": "web"}}}},
        policy("x/deny-db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}),
    ]
    assert_reachability(engine, docs, "80/TCP", DB_CLOSED)
