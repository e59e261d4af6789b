"""NetworkPolicy scenarios in the lab, one rule of DESIGN §3 each, with real packets.

Every scenario asserts that three things are the same matrix:
  1. the lab probe (real TCP/UDP packets through the real agents' nftables rules),
  2. netfence's offline matrix of the same objects (the lab's cluster.yaml after the apply),
  3. a table written by hand from the spec (rows = from, columns = to, `.` allowed, `X` blocked).

One lab for the whole module (tests/lab/scenarios/cluster.yaml), scenario after scenario; each
scenario applies its complete world (policies, and the labels of every namespace and pod), so
the scenarios do not depend on each other's order.

    node sc-1 (10.244.1.0/24):  x/a 10.244.1.10   x/c 10.244.1.11   y/a 10.244.1.12
    node sc-2 (10.244.2.0/24):  x/b 10.244.2.10   y/b 10.244.2.11   y/h hostNetwork, 172.18.0.3
    namespace x {ns: x, team: blue}, y {ns: y, team: red}; pod labels {pod: a|b|c|h}
    named ports: web = 80/TCP on x/a and 81/TCP on y/b; dns = 81/UDP on x/a and y/a

Facts the tables rely on (DESIGN §3): a pod reaches itself; a node reaches its own pods and its
pods reach it, so y/h (on sc-2) <-> x/b, y/b is always open; y/h is never policed and, as
most implementations do, not matched by pod/namespace selectors. Traffic from node sc-2 (so from
y/h) to a pod on sc-1 leaves through flannel.1 and carries its address 10.244.2.0, not 172.18.0.3.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from lab.scenarios.kit import SCENARIO_CLUSTER, cell_differences, format_matrix, module_lab, parse_table
from netfence_cli.offline import matrix as offline_matrix
from netfence_lab.cli import parse_port
from netfence_lab.lab import Lab, load_manifests
from netfence_lab.model import ManifestError

pytestmark = pytest.mark.lab

# A dropped SYN is tried twice by the prober; 0.5 s each keeps a blocked probe near 1 s.
PROBE_TIMEOUT = 0.5

NAMESPACE_LABELS = {"x": {"ns": "x", "team": "blue"}, "y": {"ns": "y", "team": "red"}}
POD_LABELS = {"x/a": {"pod": "a"}, "x/b": {"pod": "b"}, "x/c": {"pod": "c"},
              "y/a": {"pod": "a"}, "y/b": {"pod": "b"}, "y/h": {"pod": "h"}}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory, load_manifests([str(SCENARIO_CLUSTER)]), "scenario-lab") as lab:
        yield lab


# --------------------------------------------------------------------------- building blocks
def netpol(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pods(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


def world(*policies: dict[str, Any], namespaces: dict[str, dict[str, str]] | None = None,
          pod_labels: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """Everything `lab apply` gets: the policies and the labels of every namespace and pod."""
    ns_labels = {**NAMESPACE_LABELS, **(namespaces or {})}
    labels = {**POD_LABELS, **(pod_labels or {})}
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": dict(l)}} for ns, l in ns_labels.items()
    ]
    for key, l in labels.items():
        ns, name = key.split("/")
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": dict(l)}})
    return docs + list(policies)


def assert_tables(lab: Lab, tables: dict[str, str], step: str = "") -> None:
    """Probe each PORT/PROTO; the lab's matrix and the offline matrix must both equal the table."""
    objects = load_manifests([str(lab.cluster_file())])
    problems: list[str] = []
    for port_proto, table in tables.items():
        port, proto = parse_port(port_proto)
        expected = parse_table(table)
        seen = lab.probe(port, proto, connect_timeout=PROBE_TIMEOUT)
        offline = offline_matrix(objects, port, proto)["matrix"]
        found = cell_differences(expected, seen, f"{port_proto} lab probe") + \
            cell_differences(expected, offline, f"{port_proto} offline matrix")
        if found:
            problems += found + [f"{port_proto} lab probe:\n{format_matrix(seen)}",
                                 f"{port_proto} offline matrix:\n{format_matrix(offline)}"]
    assert not problems, (f"[{step}]\n" if step else "") + "\n".join(problems)


def scenario(lab: Lab, *policies: dict[str, Any], tables: dict[str, str], step: str = "",
             namespaces: dict[str, dict[str, str]] | None = None,
             pod_labels: dict[str, dict[str, str]] | None = None) -> None:
    lab.apply(world(*policies, namespaces=namespaces, pod_labels=pod_labels))
    assert_tables(lab, tables, step)


# --------------------------------------------------------------------------- tables used more than once
ALL_OPEN = """
-    x/a x/b x/c y/a y/b y/h
x/a  .   .   .   .   .   .
x/b  .   .   .   .   .   .
x/c  .   .   .   .   .   .
y/a  .   .   .   .   .   .
y/b  .   .   .   .   .   .
y/h  .   .   .   .   .   .
"""

# Namespace x isolated for ingress with nothing allowed: only a pod to itself and y/h (node sc-2) to x/b.
X_INGRESS_CLOSED = """
-    x/a x/b x/c y/a y/b y/h
x/a  .   X   X   .   .   .
x/b  X   .   X   .   .   .
x/c  X   X   .   .   .   .
y/a  X   X   X   .   .   .
y/b  X   X   X   .   .   .
y/h  X   .   X   .   .   .
"""

# Namespace x open to namespace y's pods only (y/h: hostNetwork, not matched by selectors).
X_OPEN_TO_Y_PODS = """
-    x/a x/b x/c y/a y/b y/h
x/a  .   X   X   .   .   .
x/b  X   .   X   .   .   .
x/c  X   X   .   .   .   .
y/a  .   .   .   .   .   .
y/b  .   .   .   .   .   .
y/h  X   .   X   .   .   .
"""

# x/a isolated for ingress, nothing allowed.
XA_INGRESS_CLOSED = """
-    x/a x/b x/c y/a y/b y/h
x/a  .   .   .   .   .   .
x/b  X   .   .   .   .   .
x/c  X   .   .   .   .   .
y/a  X   .   .   .   .   .
y/b  X   .   .   .   .   .
y/h  X   .   .   .   .   .
"""

DENY_INGRESS = {"podSelector": {}, "policyTypes": ["Ingress"]}


# --------------------------------------------------------------------------- scenarios
def test_no_policy_leaves_every_pod_reachable(lab):
    scenario(lab, tables={"80/TCP": ALL_OPEN, "81/UDP": ALL_OPEN})


def test_default_deny_ingress_isolates_only_its_namespace_tcp_and_udp(lab):
    scenario(lab, netpol("x", "deny-ingress", **DENY_INGRESS),
             tables={"80/TCP": X_INGRESS_CLOSED, "80/UDP": X_INGRESS_CLOSED})


def test_default_deny_egress_blocks_new_connections_out_but_not_to_the_own_node(lab):
    # x/b -> y/h stays open: y/h has the address of x/b's own node sc-2.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   X   X   X
    x/b  X   .   X   X   X   .
    x/c  X   X   .   X   X   X
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab, netpol("x", "deny-egress", podSelector={}, policyTypes=["Egress"]),
             tables={"80/TCP": table, "80/UDP": table})


def test_default_deny_all_plus_allow_dns_like_port_to_one_server(lab):
    # y/a plays the DNS server on 81 (TCP and UDP); x may reach it there and nothing else.
    deny_all = netpol("x", "deny-all", podSelector={}, policyTypes=["Ingress", "Egress"])
    allow_dns = netpol("x", "allow-dns", podSelector={}, policyTypes=["Egress"], egress=[{
        "to": [{"namespaceSelector": pods(ns="y"), "podSelector": pods(pod="a")}],
        "ports": [{"protocol": "UDP", "port": 81}, {"protocol": "TCP", "port": 81}],
    }])
    dns_open = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   .   X   X
    x/b  X   .   X   .   X   .
    x/c  X   X   .   .   X   X
    y/a  X   X   X   .   .   .
    y/b  X   X   X   .   .   .
    y/h  X   .   X   .   .   .
    """
    other_port = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   X   X   X
    x/b  X   .   X   X   X   .
    x/c  X   X   .   X   X   X
    y/a  X   X   X   .   .   .
    y/b  X   X   X   .   .   .
    y/h  X   .   X   .   .   .
    """
    scenario(lab, deny_all, allow_dns, tables={"81/UDP": dns_open, "81/TCP": dns_open, "80/UDP": other_port})


def test_ingress_pod_selector_matches_pods_of_the_policy_namespace_only(lab):
    # from x/a (pod=a in x) to x/b, cross-node; y/a also has pod=a but lives in y.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  .   .   .   .   .   .
    x/c  .   X   .   .   .   .
    y/a  .   X   .   .   .   .
    y/b  .   X   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab, netpol("x", "b-from-a", podSelector=pods(pod="b"), ingress=[{"from": [{"podSelector": pods(pod="a")}]}]),
             tables={"80/TCP": table, "81/UDP": table})


def test_ingress_namespace_selector_matches_every_pod_of_those_namespaces(lab):
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  X   .   .   .   .   .
    x/c  X   .   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  X   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-from-red", podSelector=pods(pod="a"),
                         ingress=[{"from": [{"namespaceSelector": {"matchExpressions": [
                             {"key": "team", "operator": "In", "values": ["red", "green"]}]}}]}]),
             tables={"80/TCP": table})


def test_pod_and_namespace_selector_in_one_peer_is_an_AND(lab):
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   .   .   .
    x/b  X   .   X   .   .   .
    x/c  X   X   .   .   .   .
    y/a  X   X   X   .   .   .
    y/b  .   .   .   .   .   .
    y/h  X   .   X   .   .   .
    """
    scenario(lab, netpol("x", "from-y-b", podSelector={},
                         ingress=[{"from": [{"namespaceSelector": pods(ns="y"), "podSelector": pods(pod="b")}]}]),
             tables={"80/TCP": table})


def test_pod_selector_and_namespace_selector_as_two_peers_is_an_OR(lab):
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   .   .   .
    x/b  .   .   .   .   .   .
    x/c  X   X   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  X   .   X   .   .   .
    """
    scenario(lab, netpol("x", "from-y-or-b", podSelector={},
                         ingress=[{"from": [{"namespaceSelector": pods(ns="y")}, {"podSelector": pods(pod="b")}]}]),
             tables={"80/TCP": table})


def test_policies_selecting_one_pod_allow_the_union_of_their_rules(lab):
    from_c = netpol("x", "a-from-c", podSelector=pods(pod="a"), ingress=[{"from": [
        {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["c"]}]}}]}])
    from_y_b_tcp80 = netpol("x", "a-from-y-b-tcp80", podSelector=pods(pod="a"), ingress=[{
        "from": [{"namespaceSelector": pods(ns="y"), "podSelector": pods(pod="b")}], "ports": [{"port": 80}]}])
    tcp80 = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  X   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  X   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  X   .   .   .   .   .
    """
    udp80 = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  X   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  X   .   .   .   .   .
    y/b  X   .   .   .   .   .
    y/h  X   .   .   .   .   .
    """
    scenario(lab, from_c, from_y_b_tcp80, tables={"80/TCP": tcp80, "80/UDP": udp80})


def test_a_deny_all_policy_and_an_allow_all_rule_union_to_open(lab):
    scenario(lab, netpol("x", "deny-all", podSelector={}, policyTypes=["Ingress", "Egress"]),
             netpol("x", "allow-all", podSelector={}, policyTypes=["Ingress", "Egress"], ingress=[{}], egress=[{}]),
             tables={"80/TCP": ALL_OPEN})


def test_port_number_without_protocol_means_tcp_and_opens_only_that_port(lab):
    scenario(lab, netpol("x", "tcp81-only", podSelector={}, ingress=[{"ports": [{"port": 81}]}]),
             tables={"81/TCP": ALL_OPEN, "80/TCP": X_INGRESS_CLOSED, "81/UDP": X_INGRESS_CLOSED})


def test_end_port_ranges_tcp_and_udp(lab):
    # x/a: TCP 81-90 and UDP 70-80 open to everyone, nothing else.
    scenario(lab, netpol("x", "a-ranges", podSelector=pods(pod="a"), ingress=[{"ports": [
        {"protocol": "TCP", "port": 81, "endPort": 90}, {"protocol": "UDP", "port": 70, "endPort": 80}]}]),
             tables={"81/TCP": ALL_OPEN, "80/TCP": XA_INGRESS_CLOSED, "80/UDP": ALL_OPEN, "81/UDP": XA_INGRESS_CLOSED})


def test_named_ingress_port_resolves_on_each_selected_pod(lab):
    # web = 80/TCP on x/a only; dns = 81/UDP on x/a only (in x): x/b and x/c open nothing.
    only_x_a_open = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   .   .   .
    x/b  .   .   X   .   .   .
    x/c  .   X   .   .   .   .
    y/a  .   X   X   .   .   .
    y/b  .   X   X   .   .   .
    y/h  .   .   X   .   .   .
    """
    scenario(lab, netpol("x", "named", podSelector={}, ingress=[{"ports": [{"port": "web"}, {"port": "dns", "protocol": "UDP"}]}]),
             tables={"80/TCP": only_x_a_open, "81/UDP": only_x_a_open, "81/TCP": X_INGRESS_CLOSED})


def test_named_egress_port_resolves_per_destination_pod(lab):
    # x/c may reach "web" wherever a destination names it: x/a on 80 (same node), y/b on 81 (cross-node).
    tcp80 = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  .   .   .   .   .   .
    x/c  .   X   .   X   X   X
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    tcp81 = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  .   .   .   .   .   .
    x/c  X   X   .   X   .   X
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab, netpol("x", "c-to-web", podSelector=pods(pod="c"), policyTypes=["Egress"],
                         egress=[{"ports": [{"port": "web", "protocol": "TCP"}]}]),
             tables={"80/TCP": tcp80, "81/TCP": tcp81})


def test_named_port_that_resolves_on_no_pod_opens_nothing(lab):
    # "nope" is nobody's port; "dns" exists, but as UDP, so dns/TCP resolves nowhere either.
    scenario(lab, netpol("x", "unresolvable", podSelector={}, ingress=[{"ports": [
        {"port": "nope"}, {"port": "dns", "protocol": "TCP"}]}]),
             tables={"81/TCP": X_INGRESS_CLOSED, "80/TCP": X_INGRESS_CLOSED})


def test_ingress_ip_block_with_except_on_pod_ips(lab):
    # 10.244.0.0/16 minus node sc-2's pods and minus y/a (10.244.1.12): x/a and x/c get in.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  X   .   X   .   .   .
    x/c  .   .   .   .   .   .
    y/a  X   X   X   .   .   .
    y/b  X   X   X   .   .   .
    y/h  X   .   X   .   .   .
    """
    scenario(lab, netpol("x", "from-block", podSelector={}, ingress=[{"from": [
        {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24", "10.244.1.12/32"]}}]}]),
             tables={"80/TCP": table, "80/UDP": table})


def test_egress_ip_block_with_except_on_pod_ips(lab):
    # x/a may go to the pod network except y/b; y/h (172.18.0.3, another node) is outside the block.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   X   X
    x/b  .   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-to-block", podSelector=pods(pod="a"), policyTypes=["Egress"], egress=[{"to": [
        {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.11/32"]}}]}]),
             tables={"80/TCP": table, "81/UDP": table})


def test_egress_rules_without_policy_types_isolate_ingress_and_egress(lab):
    # policyTypes unset + a non-empty egress list = [Ingress, Egress]; no ingress rules = no ingress.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   X   X   X
    x/b  X   .   .   .   .   .
    x/c  X   .   .   .   .   .
    y/a  X   .   .   .   .   .
    y/b  X   .   .   .   .   .
    y/h  X   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-egress-in-x", podSelector=pods(pod="a"), egress=[{"to": [{"podSelector": {}}]}]),
             tables={"80/TCP": table})


def test_empty_egress_list_without_policy_types_isolates_ingress_only(lab):
    # `egress: []` does not count for the defaulting: policyTypes = [Ingress], egress stays open.
    scenario(lab, netpol("x", "a-empty-egress", podSelector=pods(pod="a"), egress=[]),
             tables={"80/TCP": XA_INGRESS_CLOSED})


def test_explicit_egress_type_with_empty_egress_denies_egress_and_ignores_ingress_rules(lab):
    # policyTypes [Egress]: the ingress rules are not used and x/a is not isolated for ingress.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   X   X   X
    x/b  .   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-no-egress", podSelector=pods(pod="a"), policyTypes=["Egress"], egress=[],
                         ingress=[{"from": [{"podSelector": pods(pod="nobody")}]}]),
             tables={"80/TCP": table, "80/UDP": table})


def test_ingress_only_policy_does_not_restrict_egress(lab):
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  X   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  X   .   .   .   .   .
    y/b  X   .   .   .   .   .
    y/h  X   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-from-c", podSelector=pods(pod="a"), ingress=[{"from": [{"podSelector": pods(pod="c")}]}]),
             tables={"80/TCP": table})


def test_connection_needs_egress_at_the_source_and_ingress_at_the_destination(lab):
    # x/a may send only to x/b; x/b accepts only x/c: x/a -> x/b is still blocked.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   X   X   X
    x/b  .   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  .   X   .   .   .   .
    y/b  .   X   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab,
             netpol("x", "a-egress-to-b", podSelector=pods(pod="a"), policyTypes=["Egress"],
                    egress=[{"to": [{"podSelector": pods(pod="b")}]}]),
             netpol("x", "b-from-c", podSelector=pods(pod="b"), ingress=[{"from": [{"podSelector": pods(pod="c")}]}]),
             tables={"80/TCP": table})


def test_egress_to_namespace_selector_on_udp_port(lab):
    udp80 = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   .   .   X
    x/b  .   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    tcp80 = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   X   X   X
    x/b  .   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-to-red-udp80", podSelector=pods(pod="a"), policyTypes=["Egress"], egress=[{
        "to": [{"namespaceSelector": pods(team="red")}], "ports": [{"protocol": "UDP", "port": 80}]}]),
             tables={"80/UDP": udp80, "80/TCP": tcp80})


def test_policy_update_replaces_its_rules(lab):
    from_b = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  .   .   .   .   .   .
    x/c  X   .   .   .   .   .
    y/a  X   .   .   .   .   .
    y/b  X   .   .   .   .   .
    y/h  X   .   .   .   .   .
    """
    from_c = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  X   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  X   .   .   .   .   .
    y/b  X   .   .   .   .   .
    y/h  X   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-from", podSelector=pods(pod="a"), ingress=[{"from": [{"podSelector": pods(pod="b")}]}]),
             tables={"80/TCP": from_b}, step="from b")
    scenario(lab, netpol("x", "a-from", podSelector=pods(pod="a"), ingress=[{"from": [{"podSelector": pods(pod="c")}]}]),
             tables={"80/TCP": from_c}, step="same policy, now from c")


def test_policy_delete_by_leaving_it_out_of_the_apply(lab):
    both = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   X   X   .
    x/b  X   .   X   X   X   .
    x/c  X   X   .   X   X   .
    y/a  X   X   X   .   X   .
    y/b  X   X   X   X   .   .
    y/h  X   .   X   X   .   .
    """
    only_y = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   X   X   .
    x/b  .   .   .   X   X   .
    x/c  .   .   .   X   X   .
    y/a  .   .   .   .   X   .
    y/b  .   .   .   X   .   .
    y/h  .   .   .   X   .   .
    """
    deny_x, deny_y = netpol("x", "deny", **DENY_INGRESS), netpol("y", "deny", **DENY_INGRESS)
    scenario(lab, deny_x, deny_y, tables={"80/TCP": both}, step="x and y closed")
    scenario(lab, deny_y, tables={"80/TCP": only_y}, step="x's policy left out")
    scenario(lab, tables={"80/TCP": ALL_OPEN}, step="no policies")


def test_pod_relabel_changes_which_pods_a_policy_selects_and_admits(lab):
    policy = netpol("x", "a-from-access", podSelector=pods(pod="a"), ingress=[{"from": [{"podSelector": pods(access="yes")}]}])
    relabelled = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   X   .   .   .
    x/b  .   .   .   .   .   .
    x/c  X   .   .   .   .   .
    y/a  X   .   X   .   .   .
    y/b  X   .   X   .   .   .
    y/h  X   .   X   .   .   .
    """
    scenario(lab, policy, tables={"80/TCP": XA_INGRESS_CLOSED}, step="nobody has access")
    # x/b gains access=yes (admitted), x/c becomes pod=a (now selected by the policy too)
    scenario(lab, policy, pod_labels={"x/b": {"pod": "b", "access": "yes"}, "x/c": {"pod": "a"}},
             tables={"80/TCP": relabelled}, step="x/b and x/c relabelled")


def test_namespace_relabel_changes_namespace_selection(lab):
    policy = netpol("x", "from-granted", podSelector={}, ingress=[{"from": [{"namespaceSelector": pods(access="granted")}]}])
    scenario(lab, policy, tables={"80/TCP": X_INGRESS_CLOSED}, step="no namespace granted")
    scenario(lab, policy, namespaces={"y": {"ns": "y", "team": "red", "access": "granted"}},
             tables={"80/TCP": X_OPEN_TO_Y_PODS}, step="namespace y relabelled")


def test_hostnetwork_pod_is_not_policed_even_when_selected(lab):
    # y's deny-all selects y/h too; y/h keeps being reachable and reaching (it is its node).
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   X   X   .
    x/b  .   .   .   X   X   .
    x/c  .   .   .   X   X   .
    y/a  X   X   X   .   X   X
    y/b  X   X   X   X   .   .
    y/h  .   .   .   X   .   .
    """
    scenario(lab, netpol("y", "deny-all", podSelector={}, policyTypes=["Ingress", "Egress"]),
             tables={"80/TCP": table, "80/UDP": table})


def test_hostnetwork_pod_is_not_matched_by_namespace_selector(lab):
    scenario(lab, netpol("x", "from-y", podSelector={}, ingress=[{"from": [{"namespaceSelector": pods(ns="y")}]}]),
             tables={"80/TCP": X_OPEN_TO_Y_PODS, "81/UDP": X_OPEN_TO_Y_PODS})


def test_empty_namespace_selector_admits_every_pod_of_every_namespace(lab):
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   .   .   .   .
    x/b  .   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   X   .   .
    """
    scenario(lab, netpol("y", "from-all-pods", podSelector={}, ingress=[{"from": [{"namespaceSelector": {}}]}]),
             tables={"80/TCP": table})


def test_namespace_selector_on_the_automatic_name_label(lab):
    # the apiserver labels every namespace with kubernetes.io/metadata.name
    scenario(lab, netpol("x", "from-y-by-name", podSelector={}, ingress=[{"from": [
        {"namespaceSelector": pods(**{"kubernetes.io/metadata.name": "y"})}]}]),
             tables={"80/TCP": X_OPEN_TO_Y_PODS})


def test_egress_ip_block_to_a_node_address_reaches_the_hostnetwork_pod(lab):
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   X   X   X   X   .
    x/b  .   .   .   .   .   .
    x/c  .   .   .   .   .   .
    y/a  .   .   .   .   .   .
    y/b  .   .   .   .   .   .
    y/h  .   .   .   .   .   .
    """
    scenario(lab, netpol("x", "a-to-node-2", podSelector=pods(pod="a"), policyTypes=["Egress"],
                         egress=[{"to": [{"ipBlock": {"cidr": "172.18.0.3/32"}}]}]),
             tables={"80/TCP": table})


def test_sctp_rule_opens_neither_tcp_nor_udp(lab):
    # SCTP rules load (no SCTP traffic here): x is isolated and its SCTP rule does not open 80/TCP or 80/UDP.
    scenario(lab, netpol("x", "sctp-80", podSelector={}, ingress=[{"ports": [{"protocol": "SCTP", "port": 80}]}]),
             tables={"80/TCP": X_INGRESS_CLOSED, "80/UDP": X_INGRESS_CLOSED})


def test_hostnetwork_source_on_another_node_carries_its_flannel_address(lab):
    # x/a admits 10.244.2.0/24 (sc-2's pod range, which holds sc-2's flannel.1 address 10.244.2.0);
    # x/c admits only sc-2's InternalIP 172.18.0.3/32, which never reaches another node's pods.
    table = """
    -    x/a x/b x/c y/a y/b y/h
    x/a  .   .   X   .   .   .
    x/b  .   .   X   .   .   .
    x/c  X   .   .   .   .   .
    y/a  X   .   X   .   .   .
    y/b  .   .   X   .   .   .
    y/h  .   .   X   .   .   .
    """
    scenario(lab,
             netpol("x", "a-from-sc-2-range", podSelector=pods(pod="a"), ingress=[{"from": [{"ipBlock": {"cidr": "10.244.2.0/24"}}]}]),
             netpol("x", "c-from-sc-2-address", podSelector=pods(pod="c"), ingress=[{"from": [{"ipBlock": {"cidr": "172.18.0.3/32"}}]}]),
             tables={"80/TCP": table})


def test_invalid_policy_is_rejected_and_the_enforced_set_stays(lab):
    # endPort below port: the whole apply is refused, naming the object and field; the policy
    # already enforced stays enforced (nothing widened, nothing dropped).
    deny = netpol("x", "deny-ingress", **DENY_INGRESS)
    scenario(lab, deny, tables={"80/TCP": X_INGRESS_CLOSED}, step="before")
    bad = netpol("y", "bad-range", podSelector={}, ingress=[{"ports": [{"port": 90, "endPort": 80}]}])
    with pytest.raises(ManifestError, match=r"y/bad-range") as refused:
        lab.apply(world(bad))
    assert "endPort" in str(refused.value)
    assert_tables(lab, {"80/TCP": X_INGRESS_CLOSED}, step="after the refused apply")
