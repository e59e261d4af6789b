"""Invalid input is rejected by netfence with an InputError naming the object and the field.

DESIGN.md §3: bad input never widens or silently drops other policies; it is refused with a
message naming the object and field. The cases follow the apiserver's NetworkPolicy and Pod
validation (e.g. `except` must be a strict subset of `cidr`).
"""
from __future__ import annotations

import pytest

from reference.builders import pod, policy, small_world


def _netfence_matrix(docs, port, protocol):
    from netfence_cli.offline import matrix

    return matrix(docs, port, protocol)


def _input_error():
    from netfence_operator.compile.objects import InputError

    return InputError


def assert_rejected(docs: list[dict], object_name: str, *field_hints: str) -> None:
    """netfence refuses `docs`; the message names `object_name` and one of `field_hints`."""
    with pytest.raises(_input_error()) as caught:
        _netfence_matrix(docs, 80, "TCP")
    message = str(caught.value)
    assert object_name in message, f"message does not name {object_name!r}: {message}"
    assert any(h in message for h in field_hints), f"message names none of {field_hints}: {message}"


def _with_policy(name: str, spec: dict) -> list[dict]:
    return small_world() + [policy(f"x/{name}", spec)]


def _from_ip_block(block: dict) -> dict:
    return {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"ipBlock": block}]}]}


def _ports(*entries: dict) -> dict:
    return {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": list(entries)}]}


@pytest.mark.parametrize("cidr", ["10.244.1.0/33", "10.244.1.300/24", "not-a-cidr", ""])
def test_bad_cidr_is_rejected(cidr):
    assert_rejected(_with_policy("bad-cidr", _from_ip_block({"cidr": cidr})), "bad-cidr", "cidr")


@pytest.mark.parametrize("excepted", ["10.245.0.0/24", "10.244.0.0/16", "10.244.1.0/24", "fd00::/64", "bogus"],
                         ids=["outside", "wider", "equal", "other-family", "not-a-cidr"])
def test_except_outside_its_cidr_is_rejected(excepted):
    docs = _with_policy("bad-except", _from_ip_block({"cidr": "10.244.1.0/24", "except": [excepted]}))
    assert_rejected(docs, "bad-except", "except")


def test_end_port_below_port_is_rejected():
    assert_rejected(_with_policy("bad-range", _ports({"port": 90, "endPort": 80})), "bad-range", "endPort")


def test_end_port_without_port_is_rejected():
    assert_rejected(_with_policy("bad-range", _ports({"endPort": 90})), "bad-range", "endPort")


def test_end_port_with_named_port_is_rejected():
    assert_rejected(_with_policy("bad-range", _ports({"port": "http", "endPort": 90})), "bad-range", "endPort")


@pytest.mark.parametrize("protocol", ["ICMP", "tcp", "HTTP"])
def test_unknown_protocol_is_rejected(protocol):
    assert_rejected(_with_policy("bad-proto", _ports({"port": 80, "protocol": protocol})), "bad-proto", "protocol")


@pytest.mark.parametrize("where", ["podSelector", "peer"])
def test_bad_selector_operator_is_rejected(where):
    selector = {"matchExpressions": [{"key": "app", "operator": "Like", "values": ["web"]}]}
    if where == "podSelector":
        spec = {"podSelector": selector, "policyTypes": ["Ingress"]}
    else:
        spec = {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": selector}]}]}
    assert_rejected(_with_policy("bad-operator", spec), "bad-operator", "operator", "matchExpressions")


def test_pod_without_ip_is_rejected():
    lost = pod("x/no-ip", [], labels={"app": "web"})
    assert "podIP" not in lost["status"]
    assert_rejected(small_world() + [lost], "no-ip", "podIP")


# ---------------------------------------------------------------- ClusterNetworkPolicy
def _cnp(spec_changes: dict) -> list[dict]:
    from reference.builders_cnp import cnp, namespaces, rule

    doc = cnp("bad-cnp", "Admin", 10, namespaces(), ingress=[rule("Deny", [namespaces()])])
    doc["spec"].update(spec_changes)
    return small_world() + [doc]


@pytest.mark.parametrize("changes, hints", [
    ({"tier": "Developer"}, ("spec.tier",)),
    ({"priority": 1001}, ("spec.priority",)),
    ({"priority": -1}, ("spec.priority",)),
    ({"subject": {}}, ("spec.subject",)),
    ({"subject": {"namespaces": {}, "pods": {"podSelector": {}}}}, ("spec.subject",)),
    ({"ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}]}, ("spec.ingress[0].action",)),
    ({"ingress": [{"action": "Deny", "from": []}]}, ("spec.ingress[0].from",)),
    ({"ingress": [{"action": "Deny", "from": [{}]}]}, ("spec.ingress[0].from[0]",)),
    ({"ingress": [{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}]}, ("spec.ingress[0].from[0].networks",)),
    ({"egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/33"]}]}]}, ("spec.egress[0].to[0].networks",)),
    ({"egress": [{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}]}, ("spec.egress[0].to[0]",)),
    ({"egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}],
                  "protocols": [{"destinationNamedPort": "http"}]}]}, ("spec.egress[0]",)),
    ({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                   "protocols": [{"tcp": {"destinationPort": {"range": {"start": 90, "end": 80}}}}]}]},
     ("spec.ingress[0].protocols[0].tcp.destinationPort.range",)),
    ({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                   "protocols": [{"tcp": {"destinationPort": {"number": 80}}, "udp": {"destinationPort": {"number": 80}}}]}]},
     ("spec.ingress[0].protocols[0]",)),
    ({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"icmp": {}}]}]},
     ("spec.ingress[0].protocols[0].icmp",)),
], ids=["tier", "priority-high", "priority-negative", "subject-empty", "subject-both", "action", "no-peers",
        "empty-peer", "ingress-networks", "bad-network", "domain-names", "named-port-to-networks", "range-reversed",
        "two-protocols", "unknown-protocol"])
def test_invalid_cluster_network_policy_is_rejected(changes, hints):
    assert_rejected(_cnp(changes), "ClusterNetworkPolicy bad-cnp", *hints)


def test_cluster_network_policy_of_another_api_group_is_ignored():
    """Antrea and Calico have their own ClusterNetworkPolicy kinds: not ours to read."""
    other = {"apiVersion": "crd.antrea.io/v1beta1", "kind": "ClusterNetworkPolicy",
             "metadata": {"name": "antrea"}, "spec": {"priority": 5, "ingress": [{"action": "Drop"}]}}
    got = _netfence_matrix(small_world() + [other], 80, "TCP")
    assert all(all(row.values()) for row in got["matrix"].values())
