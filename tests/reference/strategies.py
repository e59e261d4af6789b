"""Hypothesis strategies for small random clusters with NetworkPolicies (and, when asked,
ClusterNetworkPolicies of both tiers), as plain manifests.

Some pods use hostNetwork (address = their node's) and some namespaces have no Namespace
object. Everything generated is valid for the apiserver (kubernetes-validate checks the shapes in
tests/spec/test_property.py): canonical CIDRs, `except` strictly inside its `cidr`, endPort
only with a numeric port and >= it, unique container port names per pod. The vocabularies
are tiny on purpose so that selectors, names and addresses collide often.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import yaml
from hypothesis import strategies as st

from reference.builders import namespace, node, pod, policy

NAMESPACE_NAMES = ("alpha", "beta", "gamma", "delta")
POD_LABEL_KEYS = ("app", "tier", "role")
NAMESPACE_LABEL_KEYS = ("team", "env")
LABEL_VALUES = ("a", "b", "c")
PORT_NUMBERS = (53, 80, 81, 8080)
PORT_NAMES = ("http", "dns", "metrics")
PROTOCOLS = ("TCP", "UDP", "SCTP")
PREFIXES = (0, 8, 16, 20, 24, 26, 28, 30, 32)
METADATA_NAME = "kubernetes.io/metadata.name"
NODE_LABEL_KEYS = ("kubernetes.io/hostname", "zone")
CNP_PRIORITIES = (0, 5, 5, 10, 1000)  # repeats: equal priorities (ordered by name) come up often
CNP_ACTIONS = ("Accept", "Deny", "Pass")


@dataclass
class Scenario:
    """A cluster (Nodes, Namespaces, Pods, NetworkPolicies) and the port/protocol to probe."""

    docs: list[dict]
    port: int
    protocol: str

    def __repr__(self) -> str:
        # Hypothesis prints this for a falsifying example: make it a file one can `netfence matrix -f`
        return (f"# probe {self.port}/{self.protocol}\n"
                + yaml.safe_dump_all(self.docs, sort_keys=False, default_flow_style=None))


def labels(keys: tuple[str, ...]) -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(st.sampled_from(keys), st.sampled_from(LABEL_VALUES), max_size=len(keys))


def match_expression(keys: tuple[str, ...], values: tuple[str, ...]) -> st.SearchStrategy[dict]:
    with_values = st.fixed_dictionaries({
        "key": st.sampled_from(keys), "operator": st.sampled_from(("In", "NotIn")),
        "values": st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True),
    })
    without_values = st.fixed_dictionaries({
        "key": st.sampled_from(keys), "operator": st.sampled_from(("Exists", "DoesNotExist")),
    })
    return st.one_of(with_values, without_values)


@st.composite
def label_selector(draw, keys: tuple[str, ...], values: tuple[str, ...] = LABEL_VALUES) -> dict:
    selector: dict = {}
    if draw(st.booleans()):
        match_labels = draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(values), min_size=1, max_size=2))
        selector["matchLabels"] = match_labels
    if draw(st.booleans()):
        selector["matchExpressions"] = draw(st.lists(match_expression(keys, values), min_size=1, max_size=2))
    return selector


@st.composite
def ip_block(draw, anchors: list[str]) -> dict:
    """A CIDR around one of `anchors` (pod addresses), with `except` entries strictly inside it."""
    anchor = ipaddress.ip_address(draw(st.sampled_from(anchors)))
    prefix = draw(st.sampled_from(PREFIXES))
    cidr = ipaddress.ip_network(f"{anchor}/{prefix}", strict=False)
    block: dict = {"cidr": str(cidr)}
    inside = [a for a in anchors if ipaddress.ip_address(a) in cidr]
    excepts: list[str] = []
    if prefix < 32:
        for _ in range(draw(st.integers(0, 2))):
            around = draw(st.sampled_from(inside))
            longer = draw(st.sampled_from([p for p in PREFIXES if p > prefix]))
            excepted = str(ipaddress.ip_network(f"{around}/{longer}", strict=False))
            if excepted not in excepts:
                excepts.append(excepted)
    if excepts:
        block["except"] = excepts
    return block


@st.composite
def peer(draw, anchors: list[str], namespace_names: list[str]) -> dict:
    namespace_keys = NAMESPACE_LABEL_KEYS + (METADATA_NAME,)
    namespace_values = LABEL_VALUES + tuple(namespace_names)
    kind = draw(st.sampled_from(("pod", "namespace", "both", "ipBlock")))
    if kind == "ipBlock":
        return {"ipBlock": draw(ip_block(anchors))}
    result: dict = {}
    if kind in ("pod", "both"):
        result["podSelector"] = draw(label_selector(POD_LABEL_KEYS))
    if kind in ("namespace", "both"):
        result["namespaceSelector"] = draw(label_selector(namespace_keys, namespace_values))
    return result


@st.composite
def policy_port(draw) -> dict:
    entry: dict = {}
    if draw(st.booleans()):
        entry["protocol"] = draw(st.sampled_from(PROTOCOLS))
    form = draw(st.sampled_from(("none", "number", "name", "range")))
    if form == "number":
        entry["port"] = draw(st.sampled_from(PORT_NUMBERS))
    elif form == "name":
        entry["port"] = draw(st.sampled_from(PORT_NAMES))
    elif form == "range":
        start = draw(st.sampled_from(PORT_NUMBERS))
        entry["port"] = start
        entry["endPort"] = start + draw(st.sampled_from((0, 1, 27, 8000)))
    return entry


@st.composite
def rule(draw, peers_key: str, anchors: list[str], namespace_names: list[str]) -> dict:
    result: dict = {}
    peers = draw(st.sampled_from(("missing", "empty", "some")))
    if peers == "empty":
        result[peers_key] = []
    elif peers == "some":
        result[peers_key] = draw(st.lists(peer(anchors, namespace_names), min_size=1, max_size=2))
    ports = draw(st.sampled_from(("missing", "empty", "some")))
    if ports == "empty":
        result["ports"] = []
    elif ports == "some":
        result["ports"] = draw(st.lists(policy_port(), min_size=1, max_size=2))
    return result


@st.composite
def policy_spec(draw, anchors: list[str], namespace_names: list[str]) -> dict:
    spec: dict = {"podSelector": draw(label_selector(POD_LABEL_KEYS))}
    types = draw(st.sampled_from((None, ["Ingress"], ["Egress"], ["Ingress", "Egress"])))
    if types is not None:
        spec["policyTypes"] = types
    for rules_key, peers_key in (("ingress", "from"), ("egress", "to")):
        form = draw(st.sampled_from(("missing", "empty", "some")))
        if form == "empty":
            spec[rules_key] = []
        elif form == "some":
            spec[rules_key] = draw(st.lists(rule(peers_key, anchors, namespace_names), min_size=1, max_size=2))
    return spec


@st.composite
def container_ports(draw) -> list[tuple[int, str, str | None]]:
    pairs = draw(st.lists(st.tuples(st.sampled_from(PORT_NUMBERS), st.sampled_from(PROTOCOLS)),
                          max_size=3, unique=True))
    names = draw(st.permutations(PORT_NAMES))
    return [(number, protocol, names[i] if draw(st.booleans()) else None)
            for i, (number, protocol) in enumerate(pairs)]


def _probe_candidates(pods: list[dict], policies: list[dict]) -> list[tuple[int, str]]:
    found = {(80, "TCP")}
    for p in pods:
        for container in p["spec"]["containers"]:
            found.update((cp["containerPort"], cp["protocol"]) for cp in container.get("ports", []))
    for pol in policies:
        for rules_key in ("ingress", "egress"):
            for r in pol["spec"].get(rules_key) or []:
                for entry in r.get("ports") or []:
                    protocol = entry.get("protocol", "TCP")
                    if isinstance(entry.get("port"), int):
                        found.add((entry["port"], protocol))
                    if "endPort" in entry:
                        found.update({(entry["endPort"], protocol), (entry["endPort"] + 1, protocol)})
    return sorted(found)


# --------------------------------------------------------------------------- ClusterNetworkPolicy
def _namespace_selector(namespace_names: list[str]) -> st.SearchStrategy[dict]:
    # often empty ("every namespace"), so that cluster-wide rules meet traffic often
    return st.one_of(st.just({}), label_selector(NAMESPACE_LABEL_KEYS + (METADATA_NAME,),
                                                 LABEL_VALUES + tuple(namespace_names)))


@st.composite
def cnp_pods(draw, namespace_names: list[str]) -> dict:
    result = {"podSelector": draw(st.one_of(st.just({}), label_selector(POD_LABEL_KEYS)))}
    if draw(st.booleans()):
        result["namespaceSelector"] = draw(_namespace_selector(namespace_names))
    return result


@st.composite
def cnp_peer(draw, egress: bool, anchors: list[str], namespace_names: list[str], node_names: list[str]) -> dict:
    kind = draw(st.sampled_from(("namespaces", "pods", "networks", "nodes") if egress else ("namespaces", "pods")))
    if kind == "namespaces":
        return {"namespaces": draw(_namespace_selector(namespace_names))}
    if kind == "pods":
        return {"pods": draw(cnp_pods(namespace_names))}
    if kind == "nodes":
        return {"nodes": draw(label_selector(NODE_LABEL_KEYS, LABEL_VALUES + tuple(node_names)))}
    networks = []
    for _ in range(draw(st.integers(1, 2))):
        anchor = draw(st.sampled_from(anchors))
        cidr = str(ipaddress.ip_network(f"{anchor}/{draw(st.sampled_from(PREFIXES))}", strict=False))
        if cidr not in networks:
            networks.append(cidr)
    return {"networks": networks}


@st.composite
def cnp_protocol(draw, named: bool) -> dict:
    form = draw(st.sampled_from(("number", "range", "name") if named else ("number", "range")))
    if form == "name":
        return {"destinationNamedPort": draw(st.sampled_from(PORT_NAMES))}
    key = draw(st.sampled_from(PROTOCOLS)).lower()
    start = draw(st.sampled_from(PORT_NUMBERS))
    if form == "number":
        return {key: {"destinationPort": {"number": start}}}
    return {key: {"destinationPort": {"range": {"start": start, "end": start + draw(st.sampled_from((1, 27, 8000)))}}}}


@st.composite
def cnp_rule(draw, egress: bool, anchors: list[str], namespace_names: list[str], node_names: list[str]) -> dict:
    peers = draw(st.lists(cnp_peer(egress, anchors, namespace_names, node_names), min_size=1, max_size=2))
    rule: dict = {}
    if draw(st.booleans()):
        rule["name"] = draw(st.sampled_from(("r1", "r2", "deny-all", "allow-dns")))
    rule["action"] = draw(st.sampled_from(CNP_ACTIONS))
    rule["to" if egress else "from"] = peers
    if draw(st.booleans()):
        # upstream: named ports only towards pods (networks and nodes have none)
        named = not any("networks" in p or "nodes" in p for p in peers)
        rule["protocols"] = draw(st.lists(cnp_protocol(named), min_size=1, max_size=2))
    return rule


@st.composite
def cluster_network_policy(draw, name: str, anchors: list[str], namespace_names: list[str],
                           node_names: list[str]) -> dict:
    if draw(st.booleans()):
        subject = {"namespaces": draw(_namespace_selector(namespace_names))}
    else:
        subject = {"pods": draw(cnp_pods(namespace_names))}
    spec: dict = {"tier": draw(st.sampled_from(("Admin", "Baseline"))),
                  "priority": draw(st.sampled_from(CNP_PRIORITIES)), "subject": subject}
    for key, egress in (("ingress", False), ("egress", True)):
        rules = draw(st.lists(cnp_rule(egress, anchors, namespace_names, node_names), max_size=3))
        if rules:
            spec[key] = rules
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def _cnp_probe_candidates(cnps: list[dict]) -> set[tuple[int, str]]:
    found = set()
    for cnp in cnps:
        for key in ("ingress", "egress"):
            for rule in cnp["spec"].get(key) or []:
                for entry in rule.get("protocols") or []:
                    for protocol in PROTOCOLS:
                        port = (entry.get(protocol.lower()) or {}).get("destinationPort")
                        if port and "number" in port:
                            found.add((port["number"], protocol))
                        elif port:
                            found.update((p, protocol) for p in (port["range"]["end"], port["range"]["end"] + 1))
    return found


@st.composite
def scenarios(draw, cluster_policies: bool = False) -> Scenario:
    """`cluster_policies`: add 0-3 ClusterNetworkPolicies (both tiers) to the NetworkPolicies."""
    node_count = draw(st.integers(1, 3))
    nodes = [node(f"node-{i}", f"10.244.{i}.0/24", f"172.18.0.{i + 1}") for i in range(1, node_count + 1)]
    if cluster_policies:
        for n in nodes:
            if draw(st.booleans()):
                n["metadata"]["labels"]["zone"] = draw(st.sampled_from(LABEL_VALUES))
    namespace_names = draw(st.lists(st.sampled_from(NAMESPACE_NAMES), min_size=2, max_size=4, unique=True))
    # a namespace may come without its Namespace object (pods only), or without the name label
    namespaces = [namespace(name, draw(labels(NAMESPACE_LABEL_KEYS)), with_name_label=draw(st.booleans()))
                  for name in namespace_names if draw(st.integers(0, 4)) > 0]
    pods = []
    for i in range(draw(st.integers(2, 6))):
        node_index = draw(st.integers(1, node_count))
        # uses the node's address, never policed; more of them with ClusterNetworkPolicies,
        # whose egress rules reach a pod's own node too
        host_network = draw(st.integers(0, 3 if cluster_policies else 7)) == 0
        address = f"172.18.0.{node_index + 1}" if host_network else f"10.244.{node_index}.{10 + i}"
        pods.append(pod(f"{draw(st.sampled_from(namespace_names))}/p{i}", address,
                        labels=draw(labels(POD_LABEL_KEYS)), node_name=f"node-{node_index}",
                        ports=draw(container_ports()), host_network=host_network))
    anchors = sorted({p["status"]["podIP"] for p in pods})
    policies = [policy(f"{draw(st.sampled_from(namespace_names))}/pol{i}",
                       draw(policy_spec(anchors, namespace_names)))
                for i in range(draw(st.integers(0, 4)))]
    cnps = []
    if cluster_policies:
        anchors = sorted(set(anchors) | {f"172.18.0.{i + 1}" for i in range(1, node_count + 1)})
        node_names = [n["metadata"]["name"] for n in nodes]
        cnps = [draw(cluster_network_policy(f"cnp{i}", anchors, namespace_names, node_names))
                for i in range(draw(st.integers(1, 3)))]
    candidates = sorted(set(_probe_candidates(pods, policies)) | _cnp_probe_candidates(cnps))
    port, protocol = draw(st.sampled_from(candidates))
    return Scenario(nodes + namespaces + pods + policies + cnps, port, protocol)
