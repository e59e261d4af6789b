"""Pure planning of a lab: manifests in, a complete layout out (no I/O, no randomness inside).

The plan fixes every name and address before anything is created, so the build is a plain walk
over it and `lab down` can remove exactly what the plan named. Where the manifest says where a
pod lives, what its IP is, or which CIDR a node owns, the plan follows it; only what is missing
is assigned, from the cluster's own ranges (never a hard-coded 10.244 when the manifest says
otherwise).
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

NETNS_PREFIX = "nflab-"
UNDERLAY_NETNS = "nflab-underlay"
POD_NETNS_PREFIX = "nflab-pod-"
UNDERLAY_BRIDGE = "br0"
DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
DEFAULT_UNDERLAY_CIDR = "172.18.0.0/16"
DEFAULT_PORTS = (80, 81)
VXLAN_VNI = 1
VXLAN_PORT = 8472
VXLAN_OVERHEAD = 50
UNDERLAY_MTU = 1500
POD_MTU = UNDERLAY_MTU - VXLAN_OVERHEAD  # flannel gives pods the VXLAN MTU

_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class ManifestError(ValueError):
    """Bad input: names the object and the field (exit code 2)."""


@dataclass(frozen=True)
class PortSpec:
    port: int
    protocol: str
    name: str | None = None


@dataclass
class NodePlan:
    name: str
    index: int
    netns: str
    underlay_ip: str
    underlay_prefix: int
    underlay_if: str  # its port on the underlay bridge, inside the underlay netns
    pod_cidr: str
    cni0_ip: str  # first host address of pod_cidr, the pods' gateway
    vtep_ip: str  # network address of pod_cidr, on flannel.1 as /32
    vtep_mac: str


@dataclass
class PodPlan:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    host_network: bool
    sandbox_id: str  # 64 hex, like a containerd sandbox ID
    netns: str  # pod netns, or the node's netns for hostNetwork pods
    # What the CNI bridge plugin chose when it wired the pod ("" until then, and for hostNetwork pods)
    veth: str = ""  # host side in the node netns
    mac: str = ""  # eth0 MAC
    veth_mac: str = ""
    ports: list[PortSpec] = field(default_factory=list)  # what the pod's server listens on
    skipped: list[PortSpec] = field(default_factory=list)  # SCTP: no sockets on this kernel

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def ports_of(self, protocol: str) -> list[int]:
        return sorted({p.port for p in self.ports if p.protocol == protocol})


@dataclass
class LabPlan:
    nodes: list[NodePlan]
    pods: list[PodPlan]
    namespaces: list[dict[str, Any]]  # Namespace manifests, with the apiserver's name label
    node_objects: list[dict[str, Any]]  # Node manifests with podCIDR and InternalIP filled in
    pod_objects: list[dict[str, Any]]  # Pod manifests with nodeName, uid and podIP filled in
    policies: list[dict[str, Any]]  # NetworkPolicies found in the cluster file
    ignored_kinds: list[str] = field(default_factory=list)
    cluster_cidr: str = DEFAULT_CLUSTER_CIDR  # flannel's network: the pods' route via cni0

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pod(self, key: str) -> PodPlan:
        for p in self.pods:
            if p.key == key:
                return p
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabPlan":
        def pod(d: dict[str, Any]) -> PodPlan:
            d = dict(d)
            d["ports"] = [PortSpec(**p) for p in d.get("ports", [])]
            d["skipped"] = [PortSpec(**p) for p in d.get("skipped", [])]
            return PodPlan(**d)

        return cls(
            nodes=[NodePlan(**n) for n in data["nodes"]],
            pods=[pod(p) for p in data["pods"]],
            namespaces=data["namespaces"],
            node_objects=data["node_objects"],
            pod_objects=data["pod_objects"],
            policies=data.get("policies", []),
            ignored_kinds=data.get("ignored_kinds", []),
            cluster_cidr=data.get("cluster_cidr", DEFAULT_CLUSTER_CIDR),
        )


# ------------------------------------------------------------------------------ manifests
def flatten_documents(docs: Iterable[Any]) -> list[dict[str, Any]]:
    """Drop empty documents and unpack `kind: List`."""
    out: list[dict[str, Any]] = []
    for d in docs:
        if d is None:
            continue
        if not isinstance(d, dict):
            raise ManifestError(f"document is not a mapping: {str(d)[:60]!r}")
        if d.get("kind") == "List" or (d.get("kind", "").endswith("List") and "items" in d):
            out.extend(flatten_documents(d.get("items") or []))
        else:
            out.append(d)
    return out


def object_name(obj: dict[str, Any]) -> str:
    md = obj.get("metadata") or {}
    name = md.get("name")
    if not name or not isinstance(name, str):
        raise ManifestError(f"{obj.get('kind', 'object')} without metadata.name")
    return name


def pod_namespace(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("namespace") or "default"


# The kinds `lab apply` takes as the complete desired policy set.
POLICY_KINDS = frozenset({"NetworkPolicy", "ClusterNetworkPolicy"})


def policy_label(obj: dict[str, Any]) -> str:
    """"ns/name" of a NetworkPolicy; "ClusterNetworkPolicy name" of a cluster-scoped one."""
    if obj.get("kind") == "ClusterNetworkPolicy":
        return f"ClusterNetworkPolicy {object_name(obj)}"
    return f"{pod_namespace(obj)}/{object_name(obj)}"


def with_name_label(ns_obj: dict[str, Any]) -> dict[str, Any]:
    """The apiserver always sets kubernetes.io/metadata.name; policies select on it."""
    ns_obj = copy.deepcopy(ns_obj)
    md = ns_obj.setdefault("metadata", {})
    labels = md.get("labels") or {}
    labels["kubernetes.io/metadata.name"] = md["name"]
    md["labels"] = labels
    ns_obj.setdefault("apiVersion", "v1")
    return ns_obj


def namespace_object(name: str) -> dict[str, Any]:
    return with_name_label({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def container_ports(pod: dict[str, Any]) -> list[PortSpec]:
    where = f"Pod {pod_namespace(pod)}/{object_name(pod)}"
    ports: list[PortSpec] = []
    spec = pod.get("spec") or {}
    for ci, c in enumerate(spec.get("containers") or []):
        for pi, p in enumerate((c or {}).get("ports") or []):
            num = p.get("containerPort")
            if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= 65535:
                raise ManifestError(f"{where}: spec.containers[{ci}].ports[{pi}].containerPort is {num!r}")
            proto = str(p.get("protocol") or "TCP").upper()
            if proto not in ("TCP", "UDP", "SCTP"):
                raise ManifestError(f"{where}: spec.containers[{ci}].ports[{pi}].protocol is {proto!r}")
            ports.append(PortSpec(num, proto, p.get("name")))
    return ports


def served_ports(pod: dict[str, Any]) -> tuple[list[PortSpec], list[PortSpec]]:
    """(ports the lab server answers on, ports it cannot serve: SCTP)."""
    declared = container_ports(pod)
    if not declared:
        declared = [PortSpec(p, proto) for p in DEFAULT_PORTS for proto in ("TCP", "UDP")]
    serve, skipped = [], []
    seen: set[tuple[int, str]] = set()
    for p in declared:
        if (p.port, p.protocol) in seen:
            continue
        seen.add((p.port, p.protocol))
        (skipped if p.protocol == "SCTP" else serve).append(p)
    return serve, skipped


def _ipv4(value: Any) -> ipaddress.IPv4Address | None:
    try:
        addr = ipaddress.ip_address(str(value))
    except ValueError:
        return None
    return addr if isinstance(addr, ipaddress.IPv4Address) else None


def _node_pod_cidr(node: dict[str, Any]) -> ipaddress.IPv4Network | None:
    spec = node.get("spec") or {}
    for c in [spec.get("podCIDR")] + list(spec.get("podCIDRs") or []):
        if not c:
            continue
        try:
            net = ipaddress.ip_network(str(c), strict=True)
        except ValueError as e:
            raise ManifestError(f"Node {object_name(node)}: spec.podCIDR {c!r}: {e}") from None
        if isinstance(net, ipaddress.IPv4Network):
            if net.num_addresses < 4:
                raise ManifestError(f"Node {object_name(node)}: spec.podCIDR {c} is too small for pods")
            return net
    return None


def _node_internal_ip(node: dict[str, Any]) -> ipaddress.IPv4Address | None:
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") == "InternalIP":
            ip = _ipv4(a.get("address"))
            if ip is not None:
                return ip
    return None


def _pod_ip(pod: dict[str, Any]) -> ipaddress.IPv4Address | None:
    status = pod.get("status") or {}
    candidates = [status.get("podIP")] + [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)]
    for c in candidates:
        if c:
            ip = _ipv4(c)
            if ip is None and ":" not in str(c):
                raise ManifestError(f"Pod {pod_namespace(pod)}/{object_name(pod)}: status.podIP {c!r} is not an IP")
            if ip is not None:
                return ip
    return None


def _mac(prefix: int, payload: bytes) -> str:
    return ":".join(f"{b:02x}" for b in bytes([prefix]) + payload[:5].rjust(5, b"\0"))


def _common_prefix(ips: list[ipaddress.IPv4Address]) -> int:
    if len(ips) < 2:
        return 32
    first = int(ips[0])
    prefix = 32
    for ip in ips[1:]:
        diff = first ^ int(ip)
        prefix = min(prefix, 32 - diff.bit_length())
    return prefix


# ------------------------------------------------------------------------------ plan
def plan_lab(
    docs: Iterable[Any],
    node_count: int | None = None,
    new_hex: Callable[[int], str] | None = None,
    new_uid: Callable[[], str] | None = None,
) -> LabPlan:
    """Lay out a lab for these manifests.

    node_count: the wanted number of nodes; nodes named by the manifest always exist, and when
    it names none the lab has `node_count` (default 2) nodes called node-1, node-2, ...
    new_hex(n) gives n random hex digits (sandbox IDs), new_uid() a pod UID; injected so that
    planning stays deterministic under test.
    """
    import secrets
    import uuid

    new_hex = new_hex or (lambda n: secrets.token_hex((n + 1) // 2)[:n])
    new_uid = new_uid or (lambda: str(uuid.uuid4()))
    objs = flatten_documents(docs)

    node_docs: dict[str, dict[str, Any]] = {}
    ns_docs: dict[str, dict[str, Any]] = {}
    pod_docs: dict[str, dict[str, Any]] = {}
    policies: list[dict[str, Any]] = []
    ignored: list[str] = []
    for o in objs:
        kind = o.get("kind")
        if kind == "Node":
            name = object_name(o)
            if not _NODE_NAME.match(name):
                raise ManifestError(f"Node {name!r}: metadata.name must be a lower-case DNS label for a netns name")
            node_docs[name] = copy.deepcopy(o)
        elif kind == "Namespace":
            ns_docs[object_name(o)] = with_name_label(o)
        elif kind == "Pod":
            pod_docs[f"{pod_namespace(o)}/{object_name(o)}"] = copy.deepcopy(o)
        elif kind in POLICY_KINDS:
            policies.append(copy.deepcopy(o))
        else:
            ignored.append(str(kind))

    # Nodes: the manifest's, those the pods name, then numbered ones up to node_count.
    names = list(node_docs)
    for p in pod_docs.values():
        n = (p.get("spec") or {}).get("nodeName")
        if n and n not in names:
            if not _NODE_NAME.match(str(n)):
                raise ManifestError(f"Pod {pod_namespace(p)}/{object_name(p)}: spec.nodeName {n!r} is not a DNS label")
            names.append(str(n))
    want = node_count if node_count is not None else (0 if names else 2)
    i = 1
    while len(names) < want:
        if f"node-{i}" not in names:
            names.append(f"node-{i}")
        i += 1
    if not names:
        raise ManifestError("the lab needs at least one node (--nodes)")

    # Pod CIDRs: given ones first; missing ones are /24s of the cluster's own /16.
    cidrs: dict[str, ipaddress.IPv4Network] = {}
    for n in names:
        c = _node_pod_cidr(node_docs[n]) if n in node_docs else None
        if c is not None:
            for other, oc in cidrs.items():
                if c.overlaps(oc):
                    raise ManifestError(f"Node {n}: spec.podCIDR {c} overlaps node {other}'s {oc}")
            cidrs[n] = c
    cluster = _cluster_cidr(list(cidrs.values()), [ip for p in pod_docs.values() if (ip := _pod_ip(p))])
    subnets = (s for s in cluster.subnets(new_prefix=max(24, cluster.prefixlen)) if int(s.network_address) != int(cluster.network_address))
    for n in names:
        if n in cidrs:
            continue
        for s in subnets:
            if not any(s.overlaps(c) for c in cidrs.values()):
                cidrs[n] = s
                break
        else:
            raise ManifestError(f"no free pod CIDR left in {cluster} for node {n}")

    # Underlay addresses: InternalIP where given, else the next free 172.18.0.N.
    underlay: dict[str, ipaddress.IPv4Address] = {}
    for n in names:
        ip = _node_internal_ip(node_docs[n]) if n in node_docs else None
        if ip is not None:
            if ip in underlay.values():
                raise ManifestError(f"Node {n}: InternalIP {ip} is used by another node")
            underlay[n] = ip
    free = (ip for ip in ipaddress.ip_network(DEFAULT_UNDERLAY_CIDR).hosts() if int(ip) & 0xFF >= 2)
    for n in names:
        if n not in underlay:
            underlay[n] = next(ip for ip in free if ip not in underlay.values())
    common = _common_prefix(list(underlay.values()))
    # Same /16 as docker's kind network where they share one; otherwise /32 plus peer routes.
    prefix = min(16, common) if common >= 8 else 32

    nodes: list[NodePlan] = []
    for idx, n in enumerate(names, start=1):
        c = cidrs[n]
        nodes.append(
            NodePlan(
                name=n,
                index=idx,
                netns=NETNS_PREFIX + n,
                underlay_ip=str(underlay[n]),
                underlay_prefix=prefix,
                underlay_if=f"u{idx}",
                pod_cidr=str(c),
                cni0_ip=str(c.network_address + 1),
                vtep_ip=str(c.network_address),
                vtep_mac=_mac(0x0E, b"\x6e\x66" + idx.to_bytes(3, "big")),
            )
        )

    pods, pod_objects = _plan_pods(pod_docs, nodes, cidrs, underlay, new_hex, new_uid)

    # Namespaces of pods that the manifest does not define exist anyway, as in a cluster.
    for p in pods:
        if p.namespace not in ns_docs:
            ns_docs[p.namespace] = namespace_object(p.namespace)

    node_objects = [_node_object(node_docs.get(n.name), n) for n in nodes]
    return LabPlan(
        nodes=nodes,
        pods=pods,
        namespaces=list(ns_docs.values()),
        node_objects=node_objects,
        pod_objects=pod_objects,
        policies=policies,
        ignored_kinds=sorted(set(ignored)),
        cluster_cidr=str(cluster),
    )


def _cluster_cidr(cidrs: list[ipaddress.IPv4Network], pod_ips: list[ipaddress.IPv4Address]) -> ipaddress.IPv4Network:
    if cidrs:
        return cidrs[0].supernet(new_prefix=min(16, cidrs[0].prefixlen))
    if pod_ips:
        return ipaddress.ip_network(f"{pod_ips[0]}/16", strict=False)
    return ipaddress.ip_network(DEFAULT_CLUSTER_CIDR)


def _plan_pods(
    pod_docs: dict[str, dict[str, Any]],
    nodes: list[NodePlan],
    cidrs: dict[str, ipaddress.IPv4Network],
    underlay: dict[str, ipaddress.IPv4Address],
    new_hex: Callable[[int], str],
    new_uid: Callable[[], str],
) -> tuple[list[PodPlan], list[dict[str, Any]]]:
    used: dict[str, set[ipaddress.IPv4Address]] = {n.name: set() for n in nodes}
    placed: list[tuple[str, dict[str, Any], str, ipaddress.IPv4Address | None]] = []
    rr = 0
    for key, doc in pod_docs.items():
        spec = doc.get("spec") or {}
        ip = _pod_ip(doc)
        host_network = bool(spec.get("hostNetwork"))
        node = spec.get("nodeName")
        if not node and ip is not None:
            node = next((n for n, c in cidrs.items() if ip in c), None)
            if node is None and host_network:
                node = next((n for n, u in underlay.items() if u == ip), None)
        if not node:
            node = nodes[rr % len(nodes)].name
            rr += 1
        if host_network:
            ip = underlay[node]  # a hostNetwork pod has its node's address
        elif ip is not None:
            if ip not in cidrs[node] or ip in (cidrs[node].network_address, cidrs[node].network_address + 1, cidrs[node].broadcast_address):
                raise ManifestError(f"Pod {key}: status.podIP {ip} is not a pod address of node {node}'s podCIDR {cidrs[node]}")
            if ip in used[node]:
                raise ManifestError(f"Pod {key}: status.podIP {ip} is used by another pod")
            used[node].add(ip)
        placed.append((key, doc, node, ip))

    pods: list[PodPlan] = []
    objects: list[dict[str, Any]] = []
    taken_hex: set[str] = set()
    for key, doc, node, ip in placed:
        spec = doc.get("spec") or {}
        host_network = bool(spec.get("hostNetwork"))
        if ip is None:
            ip = next((h for h in cidrs[node].hosts() if h != cidrs[node].network_address + 1 and h not in used[node]), None)
            if ip is None:
                raise ManifestError(f"Pod {key}: node {node}'s podCIDR {cidrs[node]} is full")
            used[node].add(ip)
        for _ in range(100):
            sandbox = new_hex(64)
            if sandbox[:8] not in taken_hex and sandbox[8:16] not in taken_hex:
                break
        else:
            raise RuntimeError("no unique sandbox ID from 100 tries: the hex source is not random")
        taken_hex.update((sandbox[:8], sandbox[8:16]))
        md = doc.setdefault("metadata", {})
        md.setdefault("namespace", pod_namespace(doc))
        uid = md.get("uid") or new_uid()
        md["uid"] = uid
        doc.setdefault("apiVersion", "v1")
        doc.setdefault("spec", {})["nodeName"] = node
        status = doc.setdefault("status", {})
        status["podIP"] = str(ip)
        status["podIPs"] = [{"ip": str(ip)}]
        status.setdefault("phase", "Running")
        node_plan = next(n for n in nodes if n.name == node)
        status["hostIP"] = node_plan.underlay_ip
        serve, skipped = served_ports(doc)
        netns = node_plan.netns if host_network else POD_NETNS_PREFIX + sandbox[:8]
        pods.append(
            PodPlan(
                namespace=md["namespace"],
                name=md["name"],
                uid=uid,
                node=node,
                ip=str(ip),
                host_network=host_network,
                sandbox_id=sandbox,
                netns=netns,
                ports=serve,
                skipped=skipped,
            )
        )
        objects.append(doc)
    return pods, objects


def _node_object(doc: dict[str, Any] | None, node: NodePlan) -> dict[str, Any]:
    doc = copy.deepcopy(doc) if doc else {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}
    doc.setdefault("apiVersion", "v1")
    spec = doc.setdefault("spec", {})
    spec["podCIDR"] = node.pod_cidr
    spec["podCIDRs"] = [node.pod_cidr]
    status = doc.setdefault("status", {})
    addrs = [a for a in status.get("addresses") or [] if a.get("type") != "InternalIP"]
    status["addresses"] = [{"type": "InternalIP", "address": node.underlay_ip}] + addrs
    return doc


@dataclass
class ApplyRequest:
    """What `lab apply` was given, sorted by what each document changes (the same reading for a
    lab of files and a lab on an API server)."""

    # The complete desired policy set, deep copies in the order given; a NetworkPolicy without
    # a namespace is in "default", as kubectl would put it.
    policies: list[dict[str, Any]] = field(default_factory=list)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    pod_labels: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    ignored_kinds: set[str] = field(default_factory=set)


def read_apply_documents(docs: Iterable[dict[str, Any]], node_names: Iterable[str]) -> ApplyRequest:
    nodes = set(node_names)
    request = ApplyRequest()
    seen: set[str] = set()
    for doc in docs:
        kind = doc.get("kind")
        labels = dict((doc.get("metadata") or {}).get("labels") or {})
        if kind in POLICY_KINDS:
            label = policy_label(doc)
            if label in seen:
                raise ManifestError(f"{'' if kind == 'ClusterNetworkPolicy' else kind + ' '}{label} is given twice")
            seen.add(label)
            doc = copy.deepcopy(doc)
            if kind == "NetworkPolicy":
                doc.setdefault("metadata", {})["namespace"] = pod_namespace(doc)
            request.policies.append(doc)
        elif kind == "Namespace":
            request.namespace_labels[object_name(doc)] = labels
        elif kind == "Pod":
            request.pod_labels[(pod_namespace(doc), object_name(doc))] = labels
        elif kind == "Node":
            if object_name(doc) not in nodes:
                raise ManifestError(f"Node {object_name(doc)}: the lab cannot add nodes; bring it up with them")
        else:
            request.ignored_kinds.add(str(kind))
    return request
