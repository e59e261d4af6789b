"""Small builders for hand-written test clusters: plain manifest dicts, as kubectl would read them."""
from __future__ import annotations

from typing import Any, Iterable

# (number, protocol, name or None) of one container port
PortSpec = tuple[int, str, str | None]
DEFAULT_PORTS: tuple[PortSpec, ...] = ((80, "TCP", "http"), (81, "TCP", "alt"), (80, "UDP", "http-udp"))


def node(name: str, pod_cidr: str, internal_ip: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip},
                                 {"type": "Hostname", "address": name}]},
    }


def namespace(name: str, labels: dict[str, str] | None = None, *, with_name_label: bool = True) -> dict:
    all_labels = dict(labels or {})
    if with_name_label:
        all_labels.setdefault("kubernetes.io/metadata.name", name)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": all_labels}}


def pod(key: str, ips: str | Iterable[str], *, labels: dict[str, str] | None = None, node_name: str = "node-1",
        ports: Iterable[PortSpec] = DEFAULT_PORTS, host_network: bool = False) -> dict:
    """A running pod `namespace/name`; `ips` is one address or a list (dual-stack, primary first)."""
    ns, name = key.split("/")
    addresses = [ips] if isinstance(ips, str) else list(ips)
    container: dict[str, Any] = {"name": "main", "image": "registry.k8s.io/e2e-test-images/agnhost:2.53"}
    port_list = []
    for number, protocol, port_name in ports:
        entry: dict[str, Any] = {"containerPort": number, "protocol": protocol}
        if port_name:
            entry["name"] = port_name
        port_list.append(entry)
    if port_list:
        container["ports"] = port_list
    spec: dict[str, Any] = {"nodeName": node_name, "containers": [container]}
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": "Running"}
    if addresses:
        status["podIP"] = addresses[0]
        status["podIPs"] = [{"ip": a} for a in addresses]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {})},
            "spec": spec, "status": status}


def policy(key: str, spec: dict) -> dict:
    ns, name = key.split("/")
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def small_world() -> list[dict]:
    """Two nodes, namespaces x (team=blue) and y (team=red), two pods in each.

        x/a app=web     10.244.1.10 node-1      y/a app=web     10.244.1.20 node-1
        x/b app=db      10.244.2.11 node-2      y/b app=client  10.244.2.21 node-2
    Every pod has container ports http=80/TCP, alt=81/TCP, http-udp=80/UDP.
    """
    return [
        node("node-1", "10.244.1.0/24", "172.18.0.2"),
        node("node-2", "10.244.2.0/24", "172.18.0.3"),
        namespace("x", {"team": "blue"}),
        namespace("y", {"team": "red"}),
        pod("x/a", "10.244.1.10", labels={"app": "web"}, node_name="node-1"),
        pod("x/b", "10.244.2.11", labels={"app": "db"}, node_name="node-2"),
        pod("y/a", "10.244.1.20", labels={"app": "web"}, node_name="node-1"),
        pod("y/b", "10.244.2.21", labels={"app": "client"}, node_name="node-2"),
    ]
