"""Offline answers from manifests: compile, explain, matrix.

They run the same pure pieces an agent runs - compile, then render each node's rules - and
trace packets through those rendered rules. There is no second policy evaluator here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from netfence_api import NodeRuleSetSpec
from netfence_api.manifests import ManifestSyntaxError, load_documents
from netfence_agent.render import (
    BRIDGE_TABLE,
    INET_TABLE,
    PodPort,
    RenderMemo,
    RenderOptions,
    RenderResult,
    counter_name,
    render,
)
from netfence_agent.trace import Packet, TraceResult, trace
from netfence_operator.compile import ClusterObjects, Compiler, InputError, Pod, parse_documents

DEFAULT_NODE = "default"
BRIDGE = "cni0"
OVERLAY = "flannel.1"
UPLINK = "eth0"


# --------------------------------------------------------------------------- input
def read_manifests(paths: list[str], stdin: TextIO | None = None) -> list[tuple[str, Any]]:
    """(source, document) for every YAML or JSON document in the files; "-" reads standard input."""
    out = []
    for path in paths:
        try:
            if path == "-":
                text, source = (stdin or sys.stdin).read(), "<stdin>"
            else:
                with open(path) as f:
                    text, source = f.read(), path
        except OSError as e:
            raise InputError([f"{path}: cannot read: {e.strerror}"]) from None
        try:
            docs = load_documents(text)
        except ManifestSyntaxError as e:
            raise InputError([f"{source}: {e}"]) from None
        out += [(source, d) for d in docs if d is not None]
    return out


def load_cluster(sourced_docs: list[tuple[str, Any]], notes: list[str] | None = None) -> ClusterObjects:
    objects = parse_documents(sourced_docs, require_pod_ips=True, notes=notes)
    for key, pod in list(objects.pods.items()):
        if not pod.spec.nodeName:
            objects.pods[key] = pod.model_copy(update={"spec": pod.spec.model_copy(update={"nodeName": DEFAULT_NODE})})
            if notes is not None:
                notes.append(f"note: Pod {key} has no spec.nodeName; it is placed on node {DEFAULT_NODE!r}")
    return objects


# --------------------------------------------------------------------------- the cluster as the agents see it
def synthetic_port(namespace: str, name: str) -> PodPort:
    """A veth name, MAC and ifindex of the shape CNI and the kernel give them, stable per pod."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()
    mac = "02:" + ":".join(digest[8 + 2 * i: 10 + 2 * i] for i in range(5))
    return PodPort(ifname=f"veth{digest[:8]}", mac=mac, ifindex=1000 + int(digest[18:24], 16))


@dataclass
class OfflineCluster:
    """Every node's rendered rules, and where each pod lives."""

    objects: ClusterObjects
    specs: dict[str, NodeRuleSetSpec]
    rendered: dict[str, RenderResult] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    _node_addresses: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, objects: ClusterObjects, options: RenderOptions = RenderOptions(),
              rendered: bool = True) -> "OfflineCluster":
        """Compile every node; render them too unless `rendered` is False (the rule-set objects
        alone are what `netfence compile -o json|yaml` prints)."""
        compiler = Compiler(objects)
        specs = compiler.all_specs()
        cluster = cls(objects, specs, problems=compiler.problems())
        if not rendered:
            return cluster
        memo = RenderMemo()  # nodes share the compiler's rule and group objects: render each once
        for node, spec in specs.items():
            ports = {}
            for pod in spec.pods:
                port = synthetic_port(pod.namespace, pod.name)
                ports.update({ip: port for ip in pod.ips})
            cluster.rendered[node] = render(spec, ports, options, memo)
        return cluster

    def node_addresses(self, node: str) -> frozenset[str]:
        """The node's own addresses (computed once: every traced leg asks)."""
        cached = self._node_addresses.get(node)
        if cached is None:
            cached = self._node_addresses[node] = self._addresses_of(node)
        return cached

    def _addresses_of(self, node: str) -> frozenset[str]:
        addresses = set()
        n = self.objects.nodes.get(node)
        if n is not None:
            addresses |= set(n.internal_ips)
            for cidr in n.pod_cidrs:
                net = ipaddress.ip_network(cidr, strict=False)
                addresses.add(str(net.network_address + 1))  # cni0's address
        addresses |= {ip for p in self.objects.pods.values() if p.spec.hostNetwork and p.spec.nodeName == node for ip in p.ips}
        return frozenset(addresses)

    def overlay_address(self, node: str, version: int) -> str | None:
        """The node's flannel.1 address: the network address of its podCIDR of that family."""
        n = self.objects.nodes.get(node)
        for cidr in n.pod_cidrs if n is not None else ():
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version == version:
                return str(net.network_address)
        return None

    def node_of_address(self, address: str) -> str | None:
        for name in self.rendered:
            if address in self.node_addresses(name):
                return name
        return None


@dataclass
class Endpoint:
    label: str
    ip: str
    node: str | None  # node whose pod network holds it; None when outside the pod network
    pod: Pod | None = None
    host_network: bool = False
    veth: PodPort | None = None  # a pod's host-side veth


@dataclass
class Leg:
    node: str
    hook: str
    family: str
    packet: Packet
    result: TraceResult


@dataclass
class Verdict:
    allowed: bool
    legs: list[Leg]
    reason: str = ""


def resolve_endpoint(cluster: OfflineCluster, text: str, family: int | None = None) -> Endpoint:
    if "/" in text and not _is_ip(text):
        pod = cluster.objects.pods.get(text)
        if pod is None:
            raise InputError([f"no Pod {text} in the input"])
        ips = pod.ips
        if family is not None:
            ips = [ip for ip in ips if ipaddress.ip_address(ip).version == family] or ips
        veth = synthetic_port(pod.metadata.namespace, pod.metadata.name)
        return Endpoint(text, ips[0], pod.spec.nodeName, pod, pod.spec.hostNetwork, veth)
    if not _is_ip(text):
        raise InputError([f"{text!r} is neither NAMESPACE/POD nor an IP address"])
    ip = str(ipaddress.ip_address(text))
    for pod in cluster.objects.pods.values():
        if ip in pod.ips:
            return resolve_endpoint(cluster, pod.key, ipaddress.ip_address(ip).version)
    return Endpoint(text, ip, cluster.node_of_address(ip), host_network=cluster.node_of_address(ip) is not None)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _pick_addresses(src: Endpoint, dst: Endpoint) -> tuple[str, str] | None:
    """A source and destination address of one family, IPv4 first."""
    src_ips = src.pod.ips if src.pod else [src.ip]
    dst_ips = dst.pod.ips if dst.pod else [dst.ip]
    for version in (4, 6):
        s = [ip for ip in src_ips if ipaddress.ip_address(ip).version == version]
        d = [ip for ip in dst_ips if ipaddress.ip_address(ip).version == version]
        if s and d:
            return s[0], d[0]
    return None


def connection(cluster: OfflineCluster, src: Endpoint, dst: Endpoint, port: int, protocol: str) -> Verdict:
    """Would a new connection from src to dst on port/protocol be let through, and by which rules."""
    if src.pod is not None and dst.pod is not None and src.pod.key == dst.pod.key:
        return Verdict(True, [], "a pod's traffic to itself stays in its network namespace")
    pair = _pick_addresses(src, dst)
    if pair is None:
        return Verdict(False, [], "no common IP family")
    saddr, daddr = pair
    src_policed = src.pod is not None and not src.host_network and src.node is not None
    dst_policed = dst.pod is not None and not dst.host_network and dst.node is not None
    if src.host_network and src.node is not None and dst_policed and dst.node == src.node:
        return Verdict(True, [], f"traffic from node {src.node} to its own pods is always allowed")
    if dst.host_network and dst.node is not None and src_policed and src.node == dst.node:
        # Addressed to the node itself: the input hook takes it, not forward. NetworkPolicy
        # always allows it; ClusterNetworkPolicy egress rules (e.g. `nodes` peers) apply.
        return _verdict(_node_legs(cluster, src.node, saddr, daddr, port, protocol, BRIDGE, "", src, hook="input"))
    if src.host_network and src.node is not None and dst_policed and dst.node != src.node:
        # Another node's pod range is routed via flannel.1: the kernel sources from its address.
        saddr = cluster.overlay_address(src.node, ipaddress.ip_address(saddr).version) or saddr
    legs: list[Leg] = []
    if src_policed:
        oif = BRIDGE if dst_policed and dst.node == src.node else (OVERLAY if dst.node else UPLINK)
        legs += _node_legs(cluster, src.node, saddr, daddr, port, protocol, BRIDGE, oif, src)
        if oif == BRIDGE:
            return _verdict(legs)
    if dst_policed:
        iif = OVERLAY if src.node or src_policed else UPLINK
        legs += _node_legs(cluster, dst.node, saddr, daddr, port, protocol, iif, BRIDGE, None)
    return _verdict(legs)


def _node_legs(cluster, node, saddr, daddr, port, protocol, iif, oif, from_pod: Endpoint | None,
               hook: str = "forward") -> list[Leg]:
    rendered = cluster.rendered.get(node)
    if rendered is None:
        return []
    legs = []
    local = cluster.node_addresses(node)
    if from_pod is not None:
        # The frame enters the bridge from the pod's veth: anti-spoofing sees it first.
        veth = from_pod.veth or PodPort("")
        bridge_pkt = Packet(saddr, daddr, protocol, port, iifname=veth.ifname, iif=veth.ifindex, src_mac=veth.mac,
                            local_addresses=local)
        table = rendered.ruleset.table(*BRIDGE_TABLE)
        legs.append(Leg(node, "prerouting", "bridge", bridge_pkt, trace(table, "prerouting", bridge_pkt)))
        if not legs[-1].result.accepted:
            return legs
    pkt = Packet(saddr, daddr, protocol, port, iifname=iif, oifname=oif, local_addresses=local)
    table = rendered.ruleset.table(*INET_TABLE)
    legs.append(Leg(node, hook, "inet", pkt, trace(table, hook, pkt)))
    return legs


def _verdict(legs: list[Leg]) -> Verdict:
    return Verdict(all(leg.result.accepted for leg in legs), legs)


# --------------------------------------------------------------------------- commands
def parse_port(text: str) -> tuple[int, str]:
    number, _, protocol = text.partition("/")
    protocol = (protocol or "TCP").upper()
    if protocol not in ("TCP", "UDP", "SCTP"):
        raise InputError([f"--port {text}: protocol must be TCP, UDP or SCTP"])
    try:
        port = int(number)
    except ValueError:
        raise InputError([f"--port {text}: port must be a number"]) from None
    if not 1 <= port <= 65535:
        raise InputError([f"--port {text}: port must be within 1-65535"])
    return port, protocol


def matrix_for(cluster: OfflineCluster, port: int, protocol: str) -> dict:
    pods = sorted(cluster.objects.pods)
    endpoints = {key: resolve_endpoint(cluster, key) for key in pods}
    table = {
        src: {dst: connection(cluster, endpoints[src], endpoints[dst], port, protocol).allowed for dst in pods}
        for src in pods
    }
    return {"port": f"{port}/{protocol}", "matrix": table}


def matrix(docs: list[dict], port: int, protocol: str) -> dict:
    """The reachability matrix of manifests (dicts), as `netfence matrix -o json` prints it."""
    cluster = OfflineCluster.build(load_cluster([("<input>", d) for d in docs]))
    return matrix_for(cluster, port, protocol)


def matrix_table(result: dict) -> str:
    pods = list(result["matrix"])
    width = max([len(p) for p in pods] + [4])
    lines = [f"{result['port']}: rows = from, columns = to, '.' allowed, 'X' blocked"]
    lines.append(" " * width + "  " + " ".join(p.rjust(max(len(p), 1)) for p in pods))
    for src in pods:
        cells = " ".join(("." if result["matrix"][src][dst] else "X").rjust(len(dst)) for dst in pods)
        lines.append(src.ljust(width) + "  " + cells)
    return "\n".join(lines)


def explain_text(cluster: OfflineCluster, src_text: str, dst_text: str, port: int, protocol: str) -> str:
    src = resolve_endpoint(cluster, src_text)
    dst = resolve_endpoint(cluster, dst_text)
    verdict = connection(cluster, src, dst, port, protocol)
    lines = [f"{src.label} ({src.ip}) -> {dst.label} ({dst.ip}) {port}/{protocol}: "
             f"{'ALLOWED' if verdict.allowed else 'DENIED'}"]
    if verdict.reason:
        lines.append(f"  {verdict.reason}")
    for end, direction in ((src, "egress"), (dst, "ingress")):
        policed = _policed_pod(cluster, end)
        if policed is None:
            continue
        isolated = getattr(policed.isolation, direction)
        names = policed.egressPolicies if direction == "egress" else policed.ingressPolicies
        parts = [f"isolated by {', '.join(names)}" if isolated
                 else "not isolated (no NetworkPolicy selects it for " + direction + ")"]
        for tier in ("Admin", "Baseline"):
            tier_policies = list(dict.fromkeys(r.policy for r in policed.tier_rules(tier, direction)))
            if tier_policies:
                unused = " (not consulted: a NetworkPolicy isolates it)" if tier == "Baseline" and isolated else ""
                parts.append(f"{tier} tier {', '.join(tier_policies)}{unused}")
        lines.append(f"  {end.label} {direction}: " + "; ".join(parts))
        decider = _deciding_rule(verdict.legs, policed, direction)
        if decider is not None:
            lines.append(f"    decided by: {decider}")
    for leg in verdict.legs:
        p = leg.packet
        lines.append(f"  node {leg.node}, {leg.family} {leg.hook} (iif {p.iifname or '-'}, oif {p.oifname or '-'}): "
                     f"{leg.result.verdict}")
        for step in leg.result.steps:
            lines.append(f"    {step.chain}[{step.index}]: {step.text}")
        if leg.result.policy:
            lines.append(f"    end of chain: policy {leg.result.policy}")
        for counter in leg.result.counters:
            lines.append(f"    counted in {counter}")
    return "\n".join(lines)


def _deciding_rule(legs: list[Leg], pod, direction: str) -> str | None:
    """The comment of the rule that decided `direction` for `pod`: the last rule its own
    chains ran (tier, policy and rule for a ClusterNetworkPolicy rule)."""
    chain_prefix = counter_name(pod.namespace, pod.name, direction)
    decider = None
    for leg in legs:
        for step in leg.result.steps:
            if step.chain == chain_prefix or step.chain.startswith(chain_prefix + "_"):
                decider = step.rule.comment
    if decider and not decider.startswith(("Accept:", "Deny:", "Pass:")) and ": " not in decider:
        decider = f"NetworkPolicy tier: {decider}"  # origins of NetworkPolicy allow rules
    return decider


def _policed_pod(cluster: OfflineCluster, end: Endpoint):
    if end.pod is None or end.node not in cluster.specs:
        return None
    return next((p for p in cluster.specs[end.node].pods if p.key == end.pod.key), None)
