"""Reference evaluator: which pod may open a connection to which pod, per NetworkPolicy v1.

A deliberately naive second opinion over raw manifest dicts (as loaded from YAML): no
compilation, no sets, one question answered at a time straight from the API reference
(see DESIGN.md §3). Slow and obvious on purpose; tests compare netfence against it.

Decisions beyond the API text (kept in one place so they are easy to argue with):
- A namespace's labels are those of its Namespace object, and kubernetes.io/metadata.name
  is always its name (the apiserver sets that label on every namespace). A namespace that
  has pods but no Namespace object has only that label.
- A pod with hostNetwork is never isolated and is never matched as a peer by pod or
  namespace selectors (its address is the node's); only ipBlocks can match it.
- Traffic between a pod and its own node is always allowed: a hostNetwork pod talking to
  a pod on the same node, in either direction.
- A hostNetwork pod reaching a pod on another node sends from its node's flannel.1 address
  (the network address of the node's podCIDR of that family: flannel's vxlan layout routes
  other nodes' pod ranges via flannel.1, so the kernel picks that address), not from its
  InternalIP. Without a known podCIDR the pod's own address is used.
- The address family of a connection is IPv4 when both ends have an IPv4 address, else
  IPv6 when both have one; with no common family there is no connection.
- A named port matches iff the destination pod (the policed pod for ingress, the peer for
  egress) has a container port of that name and protocol whose number is the probed port.

ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2), from the API's type comments:
- Each direction on its own: the Admin tier (policies by ascending priority; equal
  priorities by name - upstream leaves that order open, this is netfence's choice; rules in
  written order), first matching rule decides: Accept allows the direction, Deny denies it,
  Pass ends the Admin tier. Then NetworkPolicy as above if one isolates the pod in that
  direction. Else the Baseline tier the same way (Pass there ends the tier), then allow.
- Subjects and `namespaces`/`pods` peers never match host-network pods. `networks` match
  addresses (pod addresses too); `nodes` match the IP addresses in the selected Nodes'
  status.addresses. A rule without `protocols` matches every port; `destinationNamedPort`
  matches a container port of that name (in its own protocol) on the destination pod.
- A pod's traffic to its own node (a host-network pod there) is egress like any other for
  ClusterNetworkPolicy; NetworkPolicy, where it isolates the pod, allows it. Traffic from a
  node to its pods matches no ClusterNetworkPolicy peer and stays allowed.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

METADATA_NAME_LABEL = "kubernetes.io/metadata.name"
PROTOCOLS = ("TCP", "UDP", "SCTP")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ContainerPort:
    name: str | None
    number: int
    protocol: str


@dataclass
class Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    node: str | None
    host_network: bool
    addresses: dict[int, IPAddress]  # IP version -> first address of that family
    ports: list[ContainerPort] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Cluster:
    pods: list[Pod]
    namespace_labels: dict[str, dict[str, str]]
    policies: list[dict[str, Any]]
    node_pod_cidrs: dict[str, list[str]] = field(default_factory=dict)
    cluster_policies: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)

    def pod(self, key: str) -> Pod:
        for pod in self.pods:
            if pod.key == key:
                return pod
        raise KeyError(f"no pod {key!r} in the input")


# ------------------------------------------------------------------ reading manifests
def _flatten(docs: Iterable[dict]) -> list[dict]:
    out: list[dict] = []
    for doc in docs:
        if not doc:
            continue
        if doc.get("kind") == "List" or (doc.get("kind") or "").endswith("List"):
            out.extend(_flatten(doc.get("items") or []))
        else:
            out.append(doc)
    return out


def _meta(doc: dict) -> dict:
    return doc.get("metadata") or {}


def _node_addresses(node: dict) -> list[str]:
    addresses = (node.get("status") or {}).get("addresses") or []
    return [a["address"] for a in addresses if a.get("type") == "InternalIP"]


def _first_per_family(raw: list[str]) -> dict[int, IPAddress]:
    found: dict[int, IPAddress] = {}
    for text in raw:
        address = ipaddress.ip_address(text)
        found.setdefault(address.version, address)
    return found


def _read_pod(doc: dict, node_addresses: dict[str, list[str]]) -> Pod:
    meta, spec, status = _meta(doc), doc.get("spec") or {}, doc.get("status") or {}
    namespace, name = meta.get("namespace") or "default", meta["name"]
    host_network = bool(spec.get("hostNetwork"))
    raw = [entry["ip"] for entry in status.get("podIPs") or [] if entry.get("ip")]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    if not raw and host_network:
        raw = node_addresses.get(spec.get("nodeName") or "", [])
    if not raw:
        raise ValueError(f"pod {namespace}/{name}: no status.podIP(s), cannot place it")
    ports = [
        ContainerPort(p.get("name"), int(p["containerPort"]), p.get("protocol") or "TCP")
        for container in spec.get("containers") or []
        for p in container.get("ports") or []
    ]
    return Pod(namespace, name, dict(meta.get("labels") or {}), spec.get("nodeName"),
               host_network, _first_per_family(raw), ports)


def load_cluster(docs: Iterable[dict]) -> Cluster:
    objects = _flatten(docs)
    node_addresses = {_meta(d)["name"]: _node_addresses(d) for d in objects if d.get("kind") == "Node"}
    pods = [_read_pod(d, node_addresses) for d in objects if d.get("kind") == "Pod"]
    if len({p.key for p in pods}) != len(pods):
        raise ValueError("the same pod appears twice in the input")
    namespace_labels: dict[str, dict[str, str]] = {}
    for doc in objects:
        if doc.get("kind") == "Namespace":
            namespace_labels[_meta(doc)["name"]] = dict(_meta(doc).get("labels") or {})
    for pod in pods:
        namespace_labels.setdefault(pod.namespace, {})
    for name, labels in namespace_labels.items():
        labels[METADATA_NAME_LABEL] = name
    policies = [d for d in objects if d.get("kind") == "NetworkPolicy"]
    pod_cidrs = {
        _meta(d)["name"]: list((d.get("spec") or {}).get("podCIDRs") or [])
        + [c for c in [(d.get("spec") or {}).get("podCIDR")] if c]
        for d in objects if d.get("kind") == "Node"
    }
    cluster_policies = [d for d in objects if d.get("kind") == "ClusterNetworkPolicy"]
    nodes = [d for d in objects if d.get("kind") == "Node"]
    return Cluster(pods, namespace_labels, policies, pod_cidrs, cluster_policies, nodes)


# ------------------------------------------------------------------ matching pieces
def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """LabelSelector semantics: matchLabels AND every matchExpression; {} selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In":
            ok = key in labels and labels[key] in values
        elif operator == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            raise ValueError(f"unknown label selector operator {operator!r}")
        if not ok:
            return False
    return True


def policy_types(policy: dict) -> set[str]:
    """Explicit policyTypes, else the apiserver default: Ingress, plus Egress iff egress rules exist."""
    spec = policy.get("spec") or {}
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


def _policy_namespace(policy: dict) -> str:
    return _meta(policy).get("namespace") or "default"


def _selects(policy: dict, pod: Pod) -> bool:
    return (_policy_namespace(policy) == pod.namespace
            and selector_matches((policy.get("spec") or {}).get("podSelector"), pod.labels))


def _ip_block_matches(block: dict, address: IPAddress) -> bool:
    cidr = ipaddress.ip_network(block["cidr"], strict=False)
    if cidr.version != address.version or address not in cidr:
        return False
    excepted = (ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])
    return not any(e.version == address.version and address in e for e in excepted)


def _peer_matches(peer: dict, policy: dict, cluster: Cluster, other: Pod, address: IPAddress) -> bool:
    if peer.get("ipBlock") is not None:
        return _ip_block_matches(peer["ipBlock"], address)
    pod_selector, namespace_selector = peer.get("podSelector"), peer.get("namespaceSelector")
    if pod_selector is None and namespace_selector is None:
        raise ValueError(f"policy {_meta(policy).get('name')}: a peer needs a selector or an ipBlock")
    if other.host_network:
        return False  # the node's address: selectors never match it
    if namespace_selector is None:
        namespace_ok = other.namespace == _policy_namespace(policy)
    else:
        namespace_ok = selector_matches(namespace_selector, cluster.namespace_labels[other.namespace])
    return namespace_ok and selector_matches(pod_selector, other.labels)


def _port_matches(entry: dict, port: int, protocol: str, destination: Pod) -> bool:
    if (entry.get("protocol") or "TCP") != protocol:
        return False
    wanted = entry.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, int):
        end = entry.get("endPort")
        return wanted <= port <= end if end is not None else port == wanted
    return any(p.name == wanted and p.protocol == protocol and p.number == port for p in destination.ports)


def _rule_matches(rule: dict, peers_key: str, policy: dict, cluster: Cluster,
                  other: Pod, address: IPAddress, port: int, protocol: str, destination: Pod) -> bool:
    ports = rule.get("ports") or []
    if ports and not any(_port_matches(e, port, protocol, destination) for e in ports):
        return False
    peers = rule.get(peers_key) or []
    return not peers or any(_peer_matches(p, policy, cluster, other, address) for p in peers)


# ------------------------------------------------------------------ ClusterNetworkPolicy
def _cnp_selects_pod(cluster: Cluster, namespaces_selector: dict | None, pods: dict | None, pod: Pod) -> bool:
    """A `namespaces` selector or a `pods` {namespaceSelector, podSelector}; never a host-network pod."""
    if pod.host_network:
        return False
    namespace_labels = cluster.namespace_labels[pod.namespace]
    if namespaces_selector is not None:
        return selector_matches(namespaces_selector, namespace_labels)
    return (selector_matches(pods.get("namespaceSelector"), namespace_labels)
            and selector_matches(pods.get("podSelector"), pod.labels))


def _node_ip_addresses(node: dict) -> set[IPAddress]:
    out = set()
    for entry in (node.get("status") or {}).get("addresses") or []:
        try:
            out.add(ipaddress.ip_address(entry.get("address")))
        except ValueError:
            pass  # a Hostname
    return out


def _cnp_peer_matches(cluster: Cluster, peer: dict, other: Pod, address: IPAddress) -> bool:
    if "namespaces" in peer or "pods" in peer:
        return _cnp_selects_pod(cluster, peer.get("namespaces"), peer.get("pods"), other)
    if "networks" in peer:
        return any(address in ipaddress.ip_network(cidr, strict=False) for cidr in peer["networks"]
                   if ipaddress.ip_network(cidr, strict=False).version == address.version)
    if "nodes" in peer:
        return any(address in _node_ip_addresses(n) for n in cluster.nodes
                   if selector_matches(peer["nodes"], dict(_meta(n).get("labels") or {})))
    raise ValueError(f"unknown ClusterNetworkPolicy peer {peer!r}")


def _cnp_protocol_matches(entry: dict, port: int, protocol: str, destination: Pod) -> bool:
    if "destinationNamedPort" in entry:
        return any(p.name == entry["destinationNamedPort"] and p.protocol == protocol and p.number == port
                   for p in destination.ports)
    for key in ("tcp", "udp", "sctp"):
        if key in entry:
            if key.upper() != protocol:
                return False
            wanted = entry[key]["destinationPort"]
            if "range" in wanted:
                return wanted["range"]["start"] <= port <= wanted["range"]["end"]
            return wanted["number"] == port
    raise ValueError(f"unknown ClusterNetworkPolicy protocol {entry!r}")


def _tier_decision(cluster: Cluster, tier: str, policed: Pod, other: Pod, address: IPAddress,
                   direction: str, port: int, protocol: str, destination: Pod) -> str | None:
    """"Accept", "Deny", "Pass" or None (no rule of the tier matched)."""
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    policies = [p for p in cluster.cluster_policies
                if p["spec"]["tier"] == tier
                and _cnp_selects_pod(cluster, p["spec"]["subject"].get("namespaces"),
                                     p["spec"]["subject"].get("pods"), policed)]
    policies.sort(key=lambda p: (p["spec"]["priority"], _meta(p)["name"]))
    for policy in policies:
        for rule in policy["spec"].get(rules_key) or []:
            protocols = rule.get("protocols")
            if protocols and not any(_cnp_protocol_matches(e, port, protocol, destination) for e in protocols):
                continue
            if any(_cnp_peer_matches(cluster, peer, other, address) for peer in rule[peers_key]):
                return rule["action"]
    return None


def _direction_allows(cluster: Cluster, policed: Pod, other: Pod, address: IPAddress,
                      direction: str, port: int, protocol: str, own_node: bool = False) -> bool:
    """Does `policed` accept this connection in `direction` ("Ingress" or "Egress")?

    `own_node`: the other end is the policed pod's own node (NetworkPolicy allows that)."""
    if policed.host_network:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    destination = policed if direction == "Ingress" else other
    admin = _tier_decision(cluster, "Admin", policed, other, address, direction, port, protocol, destination)
    if admin in ("Accept", "Deny"):
        return admin == "Accept"
    isolating = [p for p in cluster.policies if _selects(p, policed) and direction in policy_types(p)]
    if not isolating:
        baseline = _tier_decision(cluster, "Baseline", policed, other, address, direction, port, protocol, destination)
        return baseline != "Deny"
    if own_node:
        return True
    return any(
        _rule_matches(rule or {}, peers_key, policy, cluster, other, address, port, protocol, destination)
        for policy in isolating
        for rule in (policy.get("spec") or {}).get(rules_key) or []
    )


def _common_family(a: Pod, b: Pod) -> int | None:
    for version in (4, 6):
        if version in a.addresses and version in b.addresses:
            return version
    return None


def connection_allowed(cluster: Cluster, source: Pod, destination: Pod, port: int, protocol: str) -> bool:
    protocol = protocol.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    if source.key == destination.key:
        return True  # never leaves the pod's network namespace
    family = _common_family(source, destination)
    if family is None:
        return False
    same_node = source.node is not None and source.node == destination.node
    if same_node and source.host_network:
        return True  # a node to its own pod: no ClusterNetworkPolicy peer is a node, NetworkPolicy allows it
    if same_node and destination.host_network:
        return _direction_allows(cluster, source, destination, destination.addresses[family], "Egress",
                                 port, protocol, own_node=True)
    source_address = source.addresses[family]
    if source.host_network and not same_node:
        for cidr in cluster.node_pod_cidrs.get(source.node or "", []):
            network = ipaddress.ip_network(cidr, strict=False)
            if network.version == family:
                source_address = network.network_address  # the node's flannel.1 address
                break
    return (_direction_allows(cluster, source, destination, destination.addresses[family], "Egress", port, protocol)
            and _direction_allows(cluster, destination, source, source_address, "Ingress", port, protocol))


# ------------------------------------------------------------------ public API
def allowed(docs: list[dict], src_key: str, dst_key: str, port: int, protocol: str) -> bool:
    cluster = load_cluster(docs)
    return connection_allowed(cluster, cluster.pod(src_key), cluster.pod(dst_key), port, protocol)


def reference_matrix(docs: list[dict], port: int, protocol: str) -> dict:
    """Same JSON shape as `netfence matrix -o json`: rows are sources, columns destinations."""
    cluster = load_cluster(docs)
    protocol = protocol.upper()
    return {
        "port": f"{port}/{protocol}",
        "matrix": {
            src.key: {dst.key: connection_allowed(cluster, src, dst, port, protocol) for dst in cluster.pods}
            for src in cluster.pods
        },
    }
