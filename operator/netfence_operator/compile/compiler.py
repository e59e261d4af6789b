"""Incremental NetworkPolicy compiler: cluster objects in, one NodeRuleSetSpec per node out.

Pure: no I/O. The Compiler keeps the cluster state and what it derived from it, so that a
change recomputes only what it touches:

* a pod's own rules (PolicedPod) depend on the pod and the policies of its namespace;
* a peer group's members depend on the pods and namespaces its selectors can match;
* a node's spec is its pods' rules plus the groups those rules name.

Peer groups are content-addressed by their definition (the peers of one rule, normalised), so
the same `from:` list in many policies is one group, and a pod joining it changes set
elements only, never the structure of the rules that use it.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from pydantic import BaseModel

from netfence_api import (
    AllowRule,
    Isolation,
    NodeRuleSetSpec,
    PeerGroup,
    PeerPort,
    PeerPortGroup,
    PolicedPod,
    PortRange,
    TierRule,
    short_hash,
)
from netfence_operator.compile.objects import (
    ClusterNetworkPolicy,
    ClusterObjects,
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    NetworkPolicyPeer,
    Node,
    Pod,
)

DIRECTIONS = ("ingress", "egress")
TIER_FIELDS = tuple((tier, direction) for tier in ("Admin", "Baseline") for direction in DIRECTIONS)
_ISOLATION = {(i, e): Isolation(ingress=i, egress=e) for i in (False, True) for e in (False, True)}
_POLICY_TYPE = {"ingress": "Ingress", "egress": "Egress"}
_POLICED_BASE_FIELDS = ("namespace", "name", "uid", "ips", "isolation", "ingressPolicies", "egressPolicies",
                        "ingress", "egress")
_POLICED_FIELDS: dict[tuple[str, ...], set[str]] = {}  # model_fields_set of PolicedPods, by tier fields


# --------------------------------------------------------------------------- group definitions
@dataclass(frozen=True, eq=False)
class SelectorPeer:
    """Pods matched by a podSelector and/or namespaceSelector, seen from `namespace`."""

    namespace: str | None  # the policy's namespace when there is no namespaceSelector
    pod_selector: LabelSelector | None
    namespace_selector: LabelSelector | None

    def matches_namespace(self, ns: Namespace) -> bool:
        if self.namespace_selector is None:
            return ns.name == self.namespace
        return self.namespace_selector.matches(ns.labels)

    def matches_pod_labels(self, labels: dict[str, str]) -> bool:
        return self.pod_selector is None or self.pod_selector.matches(labels)

    def describe(self) -> str:
        ns = f"ns {self.namespace}" if self.namespace_selector is None else f"ns{{{self.namespace_selector.describe()}}}"
        pods = "pods{<all>}" if self.pod_selector is None else f"pods{{{self.pod_selector.describe()}}}"
        return f"{ns} {pods}"

    def as_data(self) -> dict:
        return {
            "namespace": self.namespace,
            "podSelector": None if self.pod_selector is None else self.pod_selector.model_dump(exclude_none=True),
            "namespaceSelector": None
            if self.namespace_selector is None
            else self.namespace_selector.model_dump(exclude_none=True),
        }


@dataclass(frozen=True, eq=True)
class BlockPeer:
    """An ipBlock, as the disjoint CIDRs left after its excepts."""

    cidr: str
    excepts: tuple[str, ...]

    @cached_property
    def _networks(self) -> tuple:
        return tuple(ipblock_networks(IPBlock.model_validate({"cidr": self.cidr, "except": list(self.excepts)})))

    def networks(self) -> list:
        return list(self._networks)

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.networks())

    def describe(self) -> str:
        return self.cidr + (f" except {','.join(self.excepts)}" if self.excepts else "")

    def as_data(self) -> dict:
        return {"cidr": self.cidr, "except": list(self.excepts)}


@dataclass(frozen=True, eq=False)
class GroupDef:
    """The peers of one policy rule. Its hash names the group."""

    selectors: tuple[SelectorPeer, ...]
    blocks: tuple[BlockPeer, ...]
    # For peer-port groups: named ports resolved on each destination pod.
    port_names: tuple[tuple[str, str | None], ...] = ()  # (name, protocol; None: the port's own)
    any_peer: bool = False  # a rule without peers: every pod is a candidate (named ports only)
    # ClusterNetworkPolicy `nodes` peers: the IP addresses of the nodes these select.
    node_selectors: tuple[LabelSelector, ...] = ()

    @cached_property
    def name(self) -> str:
        prefix = "pp-" if self.port_names else "pg-"
        data = {
            "selectors": [s.as_data() for s in self.selectors],
            "blocks": [b.as_data() for b in self.blocks],
            "ports": [list(p) for p in self.port_names],
            "any": self.any_peer,
        }
        if self.node_selectors:  # only then: the names of groups without stay as they were
            data["nodes"] = [n.model_dump(exclude_none=True) for n in self.node_selectors]
        return prefix + short_hash(data)

    def describe(self) -> str:
        parts = ["any peer"] if self.any_peer else []
        parts += [s.describe() for s in self.selectors] + [b.describe() for b in self.blocks]
        parts += [f"nodes{{{n.describe()}}}" for n in self.node_selectors]
        text = " | ".join(parts)
        if self.port_names:
            text += " ports " + ",".join(f"{n}/{p}" if p else n for n, p in self.port_names)
        return text

    def matches_pod(self, pod: Pod, ns: Namespace) -> bool:
        if self.any_peer:
            return True
        if any(s.matches_namespace(ns) and s.matches_pod_labels(pod.metadata.labels) for s in self.selectors):
            return True
        # ipBlock peers match pod IPs as written (only relevant for per-pod named ports).
        return bool(self.port_names) and any(b.contains(ip) for b in self.blocks for ip in pod.ips)


def ipblock_networks(block: IPBlock) -> list:
    """cidr minus every except, as disjoint networks."""
    remaining = [block.network]
    for ex in block.excepts:
        nxt = []
        for net in remaining:
            if ex.subnet_of(net):
                nxt.extend(net.address_exclude(ex))
            elif net.subnet_of(ex):
                continue
            else:
                nxt.append(net)
        remaining = nxt
    return sorted(remaining, key=lambda n: (n.version, n.network_address, n.prefixlen))


def _address_key(text: str) -> tuple[int, int]:
    """(version, value) of an address in canonical spelling (pod IPs are validated so)."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except OSError:
        address = ipaddress.ip_address(text)  # anything else ip_address reads
        return address.version, int(address)


def merge_addresses(pod_ips: list[str], blocks: list) -> list[str]:
    """Pod addresses and ipBlock networks as disjoint CIDR strings, v4 first, sorted.

    Interval sets refuse overlapping elements, so a pod IP inside an ipBlock is left out and
    overlapping blocks are merged. Pod IPs alone never overlap, so they need no collapsing.
    """
    merged_blocks = [ipaddress.ip_network(c) for c in collapse(blocks)] if blocks else []
    singles = []
    for ip in set(pod_ips):
        version, value = _address_key(ip)
        if not any(n.version == version and int(n.network_address) <= value <= int(n.broadcast_address) for n in merged_blocks):
            singles.append((version, value, 0, f"{ip}/{32 if version == 4 else 128}"))
    items = singles + [(n.version, int(n.network_address), 1, str(n)) for n in merged_blocks]
    return [text for _, _, _, text in sorted(items)]


def collapse(addresses: list) -> list[str]:
    """Disjoint CIDR strings (v4 first), so interval sets never hold overlapping elements."""
    v4 = [a for a in addresses if a.version == 4]
    v6 = [a for a in addresses if a.version == 6]
    out = []
    for nets in (v4, v6):
        out += [str(n) for n in ipaddress.collapse_addresses(nets)]
    return out


def _peer_defs(peers: list[NetworkPolicyPeer], namespace: str) -> tuple[tuple[SelectorPeer, ...], tuple[BlockPeer, ...]]:
    selectors, blocks = [], []
    for peer in peers:
        if peer.ipBlock is not None:
            blocks.append(BlockPeer(peer.ipBlock.cidr, tuple(peer.ipBlock.except_ or ())))
            continue
        pod_sel = peer.podSelector
        selectors.append(
            SelectorPeer(
                namespace=namespace if peer.namespaceSelector is None else None,
                # An empty podSelector beside a namespaceSelector means all pods, like no podSelector.
                pod_selector=None if pod_sel is None or pod_sel.is_empty() else pod_sel,
                namespace_selector=peer.namespaceSelector,
            )
        )
    # Order does not change meaning; sorting makes equal peer lists share one group.
    unique_selectors = {short_hash(s.as_data()): s for s in selectors}
    return (
        tuple(unique_selectors[k] for k in sorted(unique_selectors)),
        tuple(sorted(set(blocks), key=lambda b: (b.cidr, b.excepts))),
    )


def _cnp_peer_defs(peers: list) -> tuple[tuple[SelectorPeer, ...], tuple[BlockPeer, ...], tuple[LabelSelector, ...]]:
    """ClusterNetworkPolicy peers as group parts: `namespaces` and `pods` are selector peers
    (never bound to one namespace), `networks` blocks without excepts, `nodes` node selectors."""
    selectors, blocks, nodes = [], [], []
    for peer in peers:
        if peer.namespaces is not None:
            selectors.append(SelectorPeer(None, None, peer.namespaces))
        elif peer.pods is not None:
            pod_sel = peer.pods.podSelector
            selectors.append(SelectorPeer(None, None if pod_sel.is_empty() else pod_sel, peer.pods.namespaceSelector))
        elif getattr(peer, "networks", None) is not None:
            blocks += [BlockPeer(cidr, ()) for cidr in peer.networks]
        elif getattr(peer, "nodes", None) is not None:
            nodes.append(peer.nodes)
    unique_selectors = {short_hash(s.as_data()): s for s in selectors}
    unique_nodes = {short_hash(n.model_dump(exclude_none=True)): n for n in nodes}
    return (
        tuple(unique_selectors[k] for k in sorted(unique_selectors)),
        tuple(sorted(set(blocks), key=lambda b: (b.cidr, b.excepts))),
        tuple(unique_nodes[k] for k in sorted(unique_nodes)),
    )


def cnp_owner(name: str) -> str:
    """How a ClusterNetworkPolicy is keyed among policies (a NetworkPolicy key has no space)."""
    return f"ClusterNetworkPolicy {name}"


# --------------------------------------------------------------------------- compiler
@dataclass
class _GroupState:
    definition: GroupDef
    members: set[str] = field(default_factory=set)  # pod keys matched by the selectors (updated in place)
    # (node name, its addresses) of the nodes the node selectors match
    node_members: frozenset[tuple[str, tuple[str, ...]]] = frozenset()
    nodes: set[str] = field(default_factory=set)  # nodes whose spec names this group
    published: PeerGroup | PeerPortGroup | None = None  # cache, dropped when members change
    owners: set[str] = field(default_factory=set)  # policies whose rules name this group
    # The sorted "ip/len" CIDRs of the members, kept up to date member by member (None: to be
    # built from the members). Only for groups of pods alone (no ipBlock, nodes or ports).
    addresses: "_Addresses | None" = None

    @property
    def pods_only(self) -> bool:
        d = self.definition
        return not (d.blocks or d.node_selectors or d.port_names)


class _Addresses:
    """A group's pod addresses as the sorted, de-duplicated CIDR list merge_addresses gives
    for pod IPs alone, updated per pod instead of rebuilt: (version, value) keys and their
    texts in two parallel sorted lists, and how many members hold each address."""

    __slots__ = ("keys", "texts", "counts")

    def __init__(self, ips) -> None:
        self.counts: dict[str, int] = {}
        for ip in ips:
            self.counts[ip] = self.counts.get(ip, 0) + 1
        items = sorted((_address_key(ip), ip) for ip in self.counts)
        self.keys = [k for k, _ in items]
        self.texts = [_cidr_text(k[0], ip) for k, ip in items]

    def add(self, ip: str) -> None:
        n = self.counts.get(ip, 0)
        self.counts[ip] = n + 1
        if n == 0:
            key = _address_key(ip)
            i = bisect.bisect_left(self.keys, key)
            self.keys.insert(i, key)
            self.texts.insert(i, _cidr_text(key[0], ip))

    def remove(self, ip: str) -> None:
        n = self.counts.pop(ip)
        if n > 1:
            self.counts[ip] = n - 1
            return
        i = bisect.bisect_left(self.keys, _address_key(ip))
        del self.keys[i]
        del self.texts[i]


def _cidr_text(version: int, ip: str) -> str:
    return f"{ip}/{32 if version == 4 else 128}"


@dataclass(eq=False)
class _NodeCache:
    """What a node's spec is made of, kept between builds and updated pod by pod.

    `pods` and the two group lists are handed out in specs and never changed in place: a new
    list replaces one whose content changes, so an unchanged list keeps its identity."""

    keys: list[str] = field(default_factory=list)  # sorted keys of the node's policed pods
    pods: list[PolicedPod] = field(default_factory=list)  # their PolicedPods, same order
    refs: dict[str, int] = field(default_factory=dict)  # group name -> pods whose rules name it
    group_names: list[str] = field(default_factory=list)
    port_group_names: list[str] = field(default_factory=list)
    peer_groups: list | None = None  # None: to be built from the names
    port_groups: list | None = None
    stale: bool = True  # rebuild everything
    pending: set[str] = field(default_factory=set)  # pods whose rules may have changed
    changed_groups: set[str] = field(default_factory=set)  # groups whose content changed


class Compiler:
    """Holds the cluster state and compiles NodeRuleSetSpecs, recomputing only what a change touches.

    upsert/delete return the names of the nodes whose spec may have changed.
    """

    def __init__(self, objects: ClusterObjects | None = None) -> None:
        self.namespaces: dict[str, Namespace] = {}
        self.pods: dict[str, Pod] = {}
        self.policies: dict[str, NetworkPolicy] = {}
        self.nodes: dict[str, Node] = {}
        self._pods_by_ns: dict[str, set[str]] = defaultdict(set)
        self._live_keys: set[str] = set()  # pods for which _live() holds
        self._pods_by_node: dict[str, set[str]] = defaultdict(set)
        self._policies_by_ns: dict[str, set[str]] = defaultdict(set)
        self._label_index: dict[str, dict[tuple[str, str], set[str]]] = defaultdict(lambda: defaultdict(set))
        self._groups: dict[str, _GroupState] = {}
        self._groups_by_namespace: dict[str, set[str]] = defaultdict(set)  # selectors bound to one namespace
        self._groups_open: set[str] = set()  # groups that may match pods of any namespace
        self._rules: dict[str, list] = {}  # policy key -> its compiled rules
        self._static_rules: dict[str, list[AllowRule]] = {}  # "ns/policy direction[i]" -> rules shared by all pods
        self._static_ids: set[int] = set()
        # origin -> {how the pod resolves the rule's named ports -> rules}: ingress rules with
        # named ports differ only between pods that number those ports differently.
        self._resolved_rules: dict[str, dict[tuple, list[AllowRule]]] = {}
        self._selected: dict[str, set[str]] = {}  # policy key -> live pods its podSelector selects
        self._ingress_named: dict[str, bool] = {}  # policy key -> has ingress rules with named ports
        # namespace -> {(policies selecting a pod, its named ports if they matter) -> its rules}:
        # pods selected by the same policies compile alike, as replicas of one workload do.
        self._shapes: dict[str, dict[tuple, tuple]] = {}
        self._merge_cache: dict[tuple[int, ...], tuple[list[AllowRule], list[AllowRule]]] = {}
        self._isolates: dict[str, tuple[str, ...]] = {}  # policy key -> directions it isolates
        self._origins: dict[str, list[str]] = {}  # policy key -> "ns/name direction[i]" of each rule
        self._policies_sorted: dict[str, list[str]] = {}  # namespace -> its policy keys, sorted
        self._selections_by_ns: dict[str, list[tuple[str, set[str]]]] = {}  # see _namespace_selections
        self._group_refs: dict[str, int] = defaultdict(int)
        self._policy_groups: dict[str, list[str]] = {}
        self._policed: dict[str, PolicedPod | None] = {}  # cache of each pod's rules
        self._specs: dict[str, NodeRuleSetSpec] = {}  # cache of node specs
        # each node's pods and the groups they name, updated pod by pod (see _build_spec)
        self._node_pods: dict[str, _NodeCache] = {}
        self._changed_groups: set[str] = set()  # see take_changed_groups
        self._problems: dict[str, list[str]] = {}  # cache of problems() per policy
        # ClusterNetworkPolicies: they select pods of any namespace, so a change to one
        # recompiles every pod; pods selected by the same ones still share their rules.
        self.cluster_policies: dict[str, ClusterNetworkPolicy] = {}
        self._cnp_rules: dict[str, list] = {}  # name -> (direction, index, rule, group definitions)
        self._cnp_ingress_named: dict[str, bool] = {}
        self._cnp_order: list[str] | None = None  # names in evaluation order
        self._cnp_index: dict | None = None  # see _cnp_subject_index
        # namespace -> (name, pod selector or None) of the ones whose subject's namespace part
        # matches it, in evaluation order: a pod then checks only those.
        self._cnps_by_namespace: dict[str, tuple[tuple[str, LabelSelector | None], ...]] = {}
        self._tier_rules: dict[tuple[str, str, int], dict[tuple, list[TierRule]]] = {}
        self._node_groups: set[str] = set()  # groups with `nodes` peers
        if objects is not None:
            for ns in objects.namespaces.values():
                self.namespaces[ns.name] = ns
            for node in objects.nodes.values():
                self.nodes[node.name] = node
            for pod in objects.pods.values():
                self._index_pod(pod)
            for policy in objects.policies.values():
                self._add_policy(policy)
            for cnp in objects.cluster_policies.values():
                self._add_cluster_policy(cnp)

    # ------------------------------------------------------------------ public API
    def upsert(self, obj: BaseModel) -> set[str]:
        if isinstance(obj, Pod):
            return self._upsert_pod(obj)
        if isinstance(obj, NetworkPolicy):
            return self._upsert_policy(obj)
        if isinstance(obj, ClusterNetworkPolicy):
            return self._upsert_cluster_policy(obj)
        if isinstance(obj, Namespace):
            return self._upsert_namespace(obj)
        if isinstance(obj, Node):
            new = obj.name not in self.nodes
            if self.nodes.get(obj.name) is None or self.nodes[obj.name].pod_cidrs != obj.pod_cidrs:
                self._problems.clear()  # ipBlock notes depend on the pod CIDRs
            self.nodes[obj.name] = obj
            return ({obj.name} if new else set()) | self._nodes_changed()
        raise TypeError(f"cannot compile {type(obj).__name__}")

    def delete(self, kind: str, key: str) -> set[str]:
        if kind == "Pod":
            return self._delete_pod(key)
        if kind == "NetworkPolicy":
            return self._delete_policy(key)
        if kind == "ClusterNetworkPolicy":
            return self._delete_cluster_policy(key)
        if kind == "Namespace":
            if key not in self.namespaces:
                return set()
            return self._upsert_namespace(Namespace.implicit(key), drop=True)
        if kind == "Node":
            self._specs.pop(key, None)
            cache = self._node_pods.pop(key, None)
            if cache is not None:
                self._unname_groups(key, cache.refs)
            self._problems.clear()
            if self.nodes.pop(key, None) is None:
                return set()
            return {key} | self._nodes_changed()
        raise TypeError(f"cannot compile {kind}")

    def node_names(self) -> set[str]:
        return set(self.nodes) | {n for n, keys in self._pods_by_node.items() if keys}

    def node_spec(self, node: str) -> NodeRuleSetSpec:
        spec = self._specs.get(node)
        if spec is None:
            spec = self._specs[node] = self._build_spec(node)
        return spec

    def all_specs(self) -> dict[str, NodeRuleSetSpec]:
        return {node: self.node_spec(node) for node in sorted(self.node_names())}

    def problems(self) -> dict[str, list[str]]:
        """Per policy key: what a user should know about it (it compiles either way)."""
        out: dict[str, list[str]] = {}
        for key, policy in sorted(self.policies.items()):
            notes = self._problems.get(key)
            if notes is None:
                notes = self._problems[key] = self._policy_problems(policy)
            if notes:
                out[key] = notes
        return out

    def pods_selected_by(self, policy_key: str) -> list[str]:
        return sorted(self._selected_by(policy_key))

    def take_changed_groups(self) -> set[str]:
        """Names of the peer groups (PeerGroup and PeerPortGroup) whose content may differ from
        what `group(name)` gave when this was last called: their members, the members'
        addresses or named ports changed, or the group was created or removed (then `group`
        returns None). Clears the set. upsert/delete report nodes as before; this is for a
        publisher that keeps groups apart from node specs and need not rebuild those."""
        taken, self._changed_groups = self._changed_groups, set()
        return taken

    def group(self, name: str) -> PeerGroup | PeerPortGroup | None:
        """The current content of a peer group, the same object as the node specs that name
        it hold (and the same object again while it does not change); None if no policy
        names it any longer."""
        state = self._groups.get(name)
        if state is None:
            return None
        d = state.definition
        return self._peer_port_group(d) if d.port_names else self._peer_group(d)

    def group_names(self) -> set[str]:
        """Names of every peer group some policy's rules name."""
        return set(self._groups)

    # ------------------------------------------------------------------ pods
    @staticmethod
    def _live(pod: Pod) -> bool:
        """A pod that holds its IPs on the pod network (terminated pods give them back)."""
        return pod.on_pod_network and bool(pod.ips) and not pod.terminated

    def _index_pod(self, pod: Pod) -> None:
        key = pod.key
        self.pods[key] = pod
        if self._live(pod):
            self._live_keys.add(key)
        self._pods_by_ns[pod.metadata.namespace].add(key)
        if pod.spec.nodeName:
            self._pods_by_node[pod.spec.nodeName].add(key)
        index = self._label_index[pod.metadata.namespace]
        for item in pod.metadata.labels.items():
            index[item].add(key)

    def _unindex_pod(self, pod: Pod) -> None:
        key = pod.key
        self.pods.pop(key, None)
        self._live_keys.discard(key)
        self._pods_by_ns[pod.metadata.namespace].discard(key)
        if pod.spec.nodeName:
            self._pods_by_node[pod.spec.nodeName].discard(key)
        index = self._label_index[pod.metadata.namespace]
        for item in pod.metadata.labels.items():
            index[item].discard(key)

    def _upsert_pod(self, pod: Pod) -> set[str]:
        old = self.pods.get(pod.key)
        if old == pod:
            return set()
        if old is not None:
            self._unindex_pod(old)
        self._index_pod(pod)
        return self._pod_changed(pod.key, old, pod)

    def _delete_pod(self, key: str) -> set[str]:
        old = self.pods.get(key)
        if old is None:
            return set()
        self._unindex_pod(old)
        return self._pod_changed(key, old, None)

    def _pod_changed(self, key: str, old: Pod | None, new: Pod | None) -> set[str]:
        self._policed.pop(key, None)
        affected = {p.spec.nodeName for p in (old, new) if p is not None and p.spec.nodeName}
        for node in affected:
            self._pod_pending(node, key)
        for p in (old, new):
            if p is not None:  # its selection, hence ingress named ports, may have changed
                for policy_key in self._policies_by_ns.get(p.metadata.namespace, ()):
                    self._problems.pop(policy_key, None)
                    selected = self._selected.get(policy_key)
                    if selected is not None:
                        selected.discard(key)
                        if p is new and self._live(new) and self.policies[policy_key].spec.podSelector.matches(
                                new.metadata.labels):
                            selected.add(key)
        for name in self._candidate_groups(old) | self._candidate_groups(new):
            state = self._groups[name]
            matched = new is not None and self._live(new) and state.definition.matches_pod(new, self._ns(new))
            was = key in state.members
            if matched != was:
                if matched:
                    state.members.add(key)
                else:
                    state.members.discard(key)
            elif not (matched and (old is None or old.ips != new.ips or old.spec.containers != new.spec.containers)):
                continue
            addresses = state.addresses
            if addresses is not None:
                if was:
                    for ip in old.ips:
                        addresses.remove(ip)
                if matched:
                    for ip in new.ips:
                        addresses.add(ip)
            affected |= self._group_changed(state)
        for node in affected:
            self._specs.pop(node, None)
        return affected

    def _group_changed(self, state: _GroupState) -> set[str]:
        """Drop what was derived from a group whose members (or their addresses) changed."""
        state.published = None
        for policy_key in state.owners:
            self._problems.pop(policy_key, None)
        name = state.definition.name
        self._changed_groups.add(name)
        for node in state.nodes:
            cache = self._node_pods.get(node)
            if cache is not None:
                cache.changed_groups.add(name)
        return state.nodes

    def _candidate_groups(self, pod: Pod | None) -> set[str]:
        """Groups a pod of this namespace could be a member of (cheap pre-filter)."""
        if pod is None:
            return set()
        ns = self._ns(pod)
        out = set(self._groups_by_namespace.get(ns.name, ()))
        for name in self._groups_open:
            d = self._groups[name].definition
            if d.any_peer or (d.port_names and d.blocks) or any(s.matches_namespace(ns) for s in d.selectors):
                out.add(name)
        return out

    def _register_group(self, d: GroupDef) -> None:
        state = self._groups[d.name] = _GroupState(d, members=set(self._compute_members(d)),
                                                   node_members=self._compute_node_members(d))
        self._changed_groups.add(d.name)
        # Node caches may still count pods (to be refreshed) whose rules name a group of this name.
        state.nodes.update(node for node, cache in self._node_pods.items() if d.name in cache.refs)
        for node in state.nodes:
            self._node_pods[node].changed_groups.add(d.name)
        if d.node_selectors:
            self._node_groups.add(d.name)
        if d.any_peer or d.blocks and d.port_names or any(s.namespace_selector is not None for s in d.selectors):
            self._groups_open.add(d.name)
        for s in d.selectors:
            if s.namespace_selector is None:
                self._groups_by_namespace[s.namespace].add(d.name)

    def _unregister_group(self, name: str) -> None:
        state = self._groups.pop(name)
        self._changed_groups.add(name)
        self._groups_open.discard(name)
        self._node_groups.discard(name)
        for s in state.definition.selectors:
            if s.namespace_selector is None:
                self._groups_by_namespace[s.namespace].discard(name)

    # ------------------------------------------------------------------ namespaces
    def _ns(self, pod: Pod) -> Namespace:
        return self.namespaces.get(pod.metadata.namespace) or Namespace.implicit(pod.metadata.namespace)

    def _upsert_namespace(self, ns: Namespace, drop: bool = False) -> set[str]:
        old = self.namespaces.get(ns.name)
        if old is not None and old.labels == ns.labels and not drop:
            self.namespaces[ns.name] = ns
            return set()
        if drop:
            self.namespaces.pop(ns.name, None)
        else:
            self.namespaces[ns.name] = ns
        affected: set[str] = set()
        self._cnps_by_namespace.pop(ns.name, None)
        if self.cluster_policies:  # their subjects select by namespace labels
            affected |= self._invalidate_namespace_pods(ns.name)
        for state in self._groups.values():
            if not any(s.namespace_selector is not None for s in state.definition.selectors):
                continue
            members = self._compute_members(state.definition)
            if members != state.members:
                state.members = set(members)
                state.addresses = None
                affected |= self._group_changed(state)
        for node in affected:
            self._specs.pop(node, None)
        return affected

    # ------------------------------------------------------------------ policies
    def _upsert_policy(self, policy: NetworkPolicy) -> set[str]:
        old = self.policies.get(policy.key)
        if old == policy:
            return set()
        affected = self._delete_policy(policy.key) if old is not None else set()
        self._add_policy(policy)
        affected |= self._invalidate_namespace_pods(policy.metadata.namespace)
        return affected

    def _delete_policy(self, key: str) -> set[str]:
        policy = self.policies.pop(key, None)
        if policy is None:
            return set()
        self._policies_by_ns[policy.metadata.namespace].discard(key)
        self._problems.pop(key, None)
        self._isolates.pop(key, None)
        self._origins.pop(key, None)
        self._policies_sorted.pop(policy.metadata.namespace, None)
        self._selections_by_ns.pop(policy.metadata.namespace, None)
        self._merge_cache.clear()  # entries may hold this policy's rules
        self._selected.pop(key, None)
        self._ingress_named.pop(key, None)
        self._shapes.pop(policy.metadata.namespace, None)
        for direction, i, _, _ in self._rules.pop(key, ()):
            origin = f"{key} {direction}[{i}]"
            for rules in [self._static_rules.pop(origin, ()), *self._resolved_rules.pop(origin, {}).values()]:
                for rule in rules:
                    self._static_ids.discard(id(rule))
        for name in self._policy_groups.pop(key, []):
            self._groups[name].owners.discard(key)
            self._group_refs[name] -= 1
            if self._group_refs[name] == 0:
                del self._group_refs[name]
                self._unregister_group(name)
        return self._invalidate_namespace_pods(policy.metadata.namespace)

    def _add_policy(self, policy: NetworkPolicy) -> None:
        self.policies[policy.key] = policy
        self._policies_by_ns[policy.metadata.namespace].add(policy.key)
        self._rules[policy.key] = list(self._policy_rules(policy))
        self._ingress_named[policy.key] = any(
            d == "ingress" and any(isinstance(p.port, str) for p in rule.ports or ()) for d, _, rule, _ in self._rules[policy.key])
        self._shapes.pop(policy.metadata.namespace, None)
        self._origins[policy.key] = [f"{policy.key} {d}[{i}]" for d, i, _, _ in self._rules[policy.key]]
        self._policies_sorted.pop(policy.metadata.namespace, None)
        self._selections_by_ns.pop(policy.metadata.namespace, None)
        types = policy.spec.effective_policy_types()
        self._isolates[policy.key] = tuple(d for d in DIRECTIONS if _POLICY_TYPE[d] in types)
        names = []
        for _, _, _, definitions in self._rules[policy.key]:
            for d in definitions:
                if d.name not in self._groups:
                    self._register_group(d)
                names.append(d.name)
        self._problems.pop(policy.key, None)
        for name in names:
            self._groups[name].owners.add(policy.key)
            self._group_refs[name] += 1
        self._policy_groups[policy.key] = names

    # ------------------------------------------------------------------ ClusterNetworkPolicies
    def _upsert_cluster_policy(self, cnp: ClusterNetworkPolicy) -> set[str]:
        old = self.cluster_policies.get(cnp.name)
        if old == cnp:
            return set()
        if old is not None:
            self._forget_cluster_policy(cnp.name)
        self._add_cluster_policy(cnp)
        return self._invalidate_all_pods()

    def _delete_cluster_policy(self, name: str) -> set[str]:
        if name not in self.cluster_policies:
            return set()
        self._forget_cluster_policy(name)
        return self._invalidate_all_pods()

    def _add_cluster_policy(self, cnp: ClusterNetworkPolicy) -> None:
        self.cluster_policies[cnp.name] = cnp
        self._cnp_order = self._cnp_index = None
        self._cnp_rules[cnp.name] = list(self._cnp_rule_defs(cnp))
        self._cnp_ingress_named[cnp.name] = any(
            d == "ingress" and any(p.destinationNamedPort is not None for p in rule.protocols or ())
            for d, _, rule, _ in self._cnp_rules[cnp.name])
        owner = cnp_owner(cnp.name)
        names = []
        for _, _, _, definitions in self._cnp_rules[cnp.name]:
            for d in definitions:
                if d.name not in self._groups:
                    self._register_group(d)
                self._groups[d.name].owners.add(owner)
                self._group_refs[d.name] += 1
                names.append(d.name)
        self._policy_groups[owner] = names

    def _forget_cluster_policy(self, name: str) -> None:
        self.cluster_policies.pop(name)
        self._cnp_order = self._cnp_index = None
        self._cnp_ingress_named.pop(name, None)
        for direction, index, _, _ in self._cnp_rules.pop(name, ()):
            self._tier_rules.pop((name, direction, index), None)
        owner = cnp_owner(name)
        for group in self._policy_groups.pop(owner, []):
            self._groups[group].owners.discard(owner)
            self._group_refs[group] -= 1
            if self._group_refs[group] == 0:
                del self._group_refs[group]
                self._unregister_group(group)

    def _invalidate_all_pods(self) -> set[str]:
        """Every pod may be selected by a ClusterNetworkPolicy: drop every pod's rules."""
        self._cnps_by_namespace.clear()
        self._policed.clear()
        self._shapes.clear()
        for cache in self._node_pods.values():
            cache.stale = True
        self._specs.clear()
        return self.node_names()

    @staticmethod
    def _cnp_rule_defs(cnp: ClusterNetworkPolicy):
        """(direction, index, rule, group definitions the rule needs) for every rule, in order."""
        for direction in DIRECTIONS:
            for index, rule in enumerate(getattr(cnp.spec, direction) or ()):
                selectors, blocks, nodes = _cnp_peer_defs(rule.peers)
                definitions = [GroupDef(selectors, blocks, node_selectors=nodes)]
                names = tuple(sorted({p.destinationNamedPort for p in rule.protocols or ()
                                      if p.destinationNamedPort is not None}))
                if direction == "egress" and names:
                    # Named ports resolve on each peer pod, in whatever protocol it declares.
                    definitions.append(GroupDef(selectors, (), port_names=tuple((n, None) for n in names)))
                yield direction, index, rule, definitions

    def _cluster_policies_selecting(self, pod: Pod) -> tuple[str, ...]:
        """Names of the ClusterNetworkPolicies whose subject is this pod, in evaluation order."""
        if not self.cluster_policies:
            return ()
        ns = self._ns(pod)
        candidates = self._cnps_by_namespace.get(ns.name)
        if candidates is None:
            index = self._cnp_subject_index()
            found = set(index[None])
            for item in ns.labels.items():
                found |= index.get(item, set())
            candidates = []
            for rank in sorted(found):
                name = self._cnp_order[rank]
                subject = self.cluster_policies[name].spec.subject
                if subject.namespaces is not None:
                    if subject.namespaces.matches(ns.labels):
                        candidates.append((name, None))
                elif subject.pods.namespaceSelector.matches(ns.labels):
                    candidates.append((name, subject.pods.podSelector))
            candidates = self._cnps_by_namespace[ns.name] = tuple(candidates)
        labels = pod.metadata.labels
        return tuple(name for name, selector in candidates if selector is None or selector.matches(labels))

    def _cnp_subject_index(self) -> dict:
        """(label key, value) -> ranks (in evaluation order) of the policies whose subject's
        namespace selector requires that label; None -> those that require none (checked for
        every namespace). A namespace then checks only policies that can match it."""
        if self._cnp_order is None or self._cnp_index is None:
            self._cnp_order = sorted(self.cluster_policies, key=lambda n: self.cluster_policies[n].order_key())
            index: dict = {None: set()}
            for rank, name in enumerate(self._cnp_order):
                subject = self.cluster_policies[name].spec.subject
                selector = subject.namespaces if subject.namespaces is not None else subject.pods.namespaceSelector
                first = min((selector.matchLabels or {}).items(), default=None)
                index.setdefault(first, set()).add(rank)
            self._cnp_index = index
        return self._cnp_index

    def _tier_rules_of(self, pod: Pod, cnp: ClusterNetworkPolicy, direction: str, index: int, rule,
                       definitions: list[GroupDef]) -> list[TierRule]:
        # Shared by every pod the rule applies to, except ingress named ports, which resolve
        # on the pod itself: pods that number them alike share.
        resolution: tuple = ()
        if direction == "ingress":
            resolution = tuple(tuple(pod.named_port_numbers(p.destinationNamedPort))
                               for p in rule.protocols or () if p.destinationNamedPort is not None)
        cache = self._tier_rules.setdefault((cnp.name, direction, index), {})
        rules = cache.get(resolution)
        if rules is None:
            rules = cache[resolution] = self._build_tier_rules(pod, cnp, direction, index, rule, definitions)
        return rules

    @staticmethod
    def _build_tier_rules(pod: Pod, cnp: ClusterNetworkPolicy, direction: str, index: int, rule,
                          definitions: list[GroupDef]) -> list[TierRule]:
        fields = dict(action=rule.action, policy=cnp.name, tier=cnp.spec.tier, priority=cnp.spec.priority,
                      rule=f"{direction}[{index}]", name=rule.name)
        peers = next(d.name for d in definitions if not d.port_names)
        if not rule.protocols:
            return [TierRule.model_construct(**fields, peers=peers, ports=None, peerPorts=None)]
        numeric: list[PortRange] = []
        for entry in rule.protocols:
            numbered = entry.port_range()
            if numbered is not None:
                protocol, first, last = numbered
                numeric.append(PortRange.model_construct(protocol=protocol, port=first,
                                                         endPort=None if last == first else last))
            elif direction == "ingress":
                numeric += [PortRange.model_construct(protocol=protocol, port=number, endPort=None)
                            for protocol, number in pod.named_port_numbers(entry.destinationNamedPort)]
        out = []
        if numeric:
            out.append(TierRule.model_construct(**fields, peers=peers, ports=_unique(numeric), peerPorts=None))
        per_peer = next((d.name for d in definitions if d.port_names), None)
        if per_peer is not None:
            out.append(TierRule.model_construct(**fields, peers=None, ports=None, peerPorts=per_peer))
        # Nothing left (a named port no container declares): the rule matches no traffic.
        return out

    def _invalidate_namespace_pods(self, namespace: str) -> set[str]:
        affected = set()
        for key in self._pods_by_ns.get(namespace, ()):
            self._policed.pop(key, None)
            node = self.pods[key].spec.nodeName
            if node:
                affected.add(node)
                self._pod_pending(node, key)
        for node in affected:
            self._specs.pop(node, None)
        return affected

    def _policy_rules(self, policy: NetworkPolicy):
        """(direction, index, rule, group definitions the rule needs) for every rule."""
        ns = policy.metadata.namespace
        types = policy.spec.effective_policy_types()
        for direction in DIRECTIONS:
            if _POLICY_TYPE[direction] not in types:
                continue
            for i, rule in enumerate(getattr(policy.spec, direction) or ()):
                peers = rule.peers
                selectors, blocks = _peer_defs(peers, ns) if peers else ((), ())
                definitions = []
                if peers:
                    definitions.append(GroupDef(selectors, blocks))
                names = tuple(
                    sorted({(p.port, p.protocol) for p in rule.ports or () if isinstance(p.port, str)})
                )
                if direction == "egress" and names:
                    definitions.append(GroupDef(selectors, blocks, port_names=names, any_peer=not peers))
                yield direction, i, rule, definitions

    # ------------------------------------------------------------------ group members
    def _select_in_namespaces(self, namespaces: list[str], selector: LabelSelector | None) -> set[str]:
        out: set[str] = set()
        for ns in namespaces:
            if selector is not None and selector.matchLabels:
                item = next(iter(sorted(selector.matchLabels.items())))
                candidates = self._label_index.get(ns, {}).get(item, set())
            else:
                candidates = self._pods_by_ns.get(ns, set())
            live = candidates & self._live_keys
            if selector is None:
                out |= live
            else:
                out.update(key for key in live if selector.matches(self.pods[key].metadata.labels))
        return out

    def _all_namespace_names(self) -> set[str]:
        return set(self.namespaces) | {ns for ns, keys in self._pods_by_ns.items() if keys}

    def _compute_members(self, d: GroupDef) -> frozenset[str]:
        if d.any_peer:
            return frozenset(self._live_keys)
        members: set[str] = set()
        for s in d.selectors:
            if s.namespace_selector is None:
                namespaces = [s.namespace]
            else:
                namespaces = [
                    n for n in self._all_namespace_names()
                    if s.namespace_selector.matches((self.namespaces.get(n) or Namespace.implicit(n)).labels)
                ]
            members |= self._select_in_namespaces(namespaces, s.pod_selector)
        if d.port_names and d.blocks:
            members |= {k for k in self._live_keys if any(b.contains(ip) for b in d.blocks for ip in self.pods[k].ips)}
        return frozenset(members)

    def _compute_node_members(self, d: GroupDef) -> frozenset[tuple[str, tuple[str, ...]]]:
        if not d.node_selectors:
            return frozenset()
        return frozenset(
            (node.name, tuple(node.ip_addresses))
            for node in self.nodes.values()
            if any(sel.matches(node.metadata.labels) for sel in d.node_selectors)
        )

    def _nodes_changed(self) -> set[str]:
        """Nodes whose specs name a `nodes` peer group whose nodes or their addresses changed."""
        affected: set[str] = set()
        for name in self._node_groups:
            state = self._groups[name]
            members = self._compute_node_members(state.definition)
            if members != state.node_members:
                state.node_members = members
                affected |= self._group_changed(state)
        for node in affected:
            self._specs.pop(node, None)
        return affected

    def _peer_group(self, d: GroupDef) -> PeerGroup:
        state = self._groups[d.name]
        if state.published is None and state.pods_only:
            if state.addresses is None:
                state.addresses = _Addresses(ip for key in state.members for ip in self.pods[key].ips)
            state.published = PeerGroup.model_construct(name=d.name, selector=d.describe(),
                                                        cidrs=list(state.addresses.texts))
        if state.published is None:
            blocks = [net for block in d.blocks for net in block.networks()]
            addresses = [ip for key in state.members for ip in self.pods[key].ips]
            addresses += [ip for _, ips in state.node_members for ip in ips]
            cidrs = merge_addresses(addresses, blocks)
            state.published = PeerGroup.model_construct(name=d.name, selector=d.describe(), cidrs=cidrs)
        return state.published

    def _peer_port_group(self, d: GroupDef) -> PeerPortGroup:
        state = self._groups[d.name]
        if state.published is None:
            state.published = self._build_peer_port_group(d, state)
        return state.published

    def _build_peer_port_group(self, d: GroupDef, state: _GroupState) -> PeerPortGroup:
        entries = set()
        for key in state.members:
            pod = self.pods[key]
            for name, protocol in d.port_names:
                for resolved, number in pod.named_port_numbers(name, protocol):
                    entries |= {(ip, resolved, number) for ip in pod.ips}
        ordered = sorted(entries, key=lambda e: (_address_key(e[0]), e[1], e[2]))
        return PeerPortGroup.model_construct(
            name=d.name,
            selector=d.describe(),
            entries=[PeerPort.model_construct(address=a, protocol=p, port=n) for a, p, n in ordered],
        )

    # ------------------------------------------------------------------ per-pod rules
    def _policed_pod(self, key: str) -> PolicedPod | None:
        if key in self._policed:
            return self._policed[key]
        pod = self.pods[key]
        result = None
        if key in self._live_keys:
            result = self._compile_pod(pod)
        self._policed[key] = result
        return result

    def _compile_pod(self, pod: Pod) -> PolicedPod:
        ns, key = pod.metadata.namespace, pod.key
        selecting = tuple(k for k, selected in self._namespace_selections(ns) if key in selected)
        cnps = self._cluster_policies_selecting(pod)
        named = tuple(pod.port_names()) if (any(self._ingress_named[k] for k in selecting)
                                            or any(self._cnp_ingress_named[c] for c in cnps)) else ()
        shapes = self._shapes.setdefault(ns, {})
        shape = shapes.get((selecting, cnps, named))
        if shape is None:
            shape = shapes[(selecting, cnps, named)] = self._compile_shape(pod, selecting, cnps)
        isolation, ingress_policies, egress_policies, ingress, egress, tiers = shape
        fields_set = _POLICED_FIELDS.get(tuple(tiers))
        if fields_set is None:  # one set per combination of tiers, shared (~700 bytes a pod)
            fields_set = _POLICED_FIELDS[tuple(tiers)] = set(_POLICED_BASE_FIELDS) | set(tiers)
        return PolicedPod.model_construct(
            _fields_set=fields_set,
            namespace=ns,
            name=pod.metadata.name,
            uid=pod.metadata.uid,
            ips=pod.ips,
            isolation=isolation,
            ingressPolicies=ingress_policies,
            egressPolicies=egress_policies,
            ingress=ingress,
            egress=egress,
            **tiers,
        )

    def _compile_shape(self, pod: Pod, selecting: tuple[str, ...], cnps: tuple[str, ...] = ()) -> tuple:
        """Isolation, isolating policies, merged rules and tier rules of a pod that these
        policies and ClusterNetworkPolicies select."""
        isolating: dict[str, list[str]] = {"ingress": [], "egress": []}
        rules: dict[str, list[AllowRule]] = {"ingress": [], "egress": []}
        for key in selecting:
            for direction in self._isolates[key]:
                isolating[direction].append(key)
            for (direction, _, rule, definitions), origin in zip(self._rules[key], self._origins[key]):
                rules[direction] += self._allow_rules(pod, direction, origin, rule, definitions)
        isolation = _ISOLATION[(bool(isolating["ingress"]), bool(isolating["egress"]))]
        tiers: dict[str, list[TierRule]] = {}
        for name in cnps:  # already in evaluation order
            cnp = self.cluster_policies[name]
            for direction, index, rule, definitions in self._cnp_rules[name]:
                field_name = f"{cnp.spec.tier.lower()}{direction.capitalize()}"
                tiers.setdefault(field_name, []).extend(
                    self._tier_rules_of(pod, cnp, direction, index, rule, definitions))
        return (isolation, isolating["ingress"], isolating["egress"],
                self._merged(rules["ingress"]), self._merged(rules["egress"]), tiers)

    def _selected_by(self, policy_key: str) -> set[str]:
        selected = self._selected.get(policy_key)
        if selected is None:
            selected = self._selected[policy_key] = self._select_in_namespaces(
                [self.policies[policy_key].metadata.namespace], self.policies[policy_key].spec.podSelector)
        return selected

    def _namespace_selections(self, namespace: str) -> list[tuple[str, set[str]]]:
        """(policy key, pods it selects) of the namespace's policies, in key order."""
        found = self._selections_by_ns.get(namespace)
        if found is None:
            found = self._selections_by_ns[namespace] = [(k, self._selected_by(k)) for k in self._sorted_policies(namespace)]
        return found

    def _sorted_policies(self, namespace: str) -> list[str]:
        keys = self._policies_sorted.get(namespace)
        if keys is None:
            keys = self._policies_sorted[namespace] = sorted(self._policies_by_ns.get(namespace, ()))
        return keys

    def _merged(self, rules: list[AllowRule]) -> list[AllowRule]:
        """_merge, remembered for lists of shared rules: pods selected alike get one result."""
        if len(rules) <= 1:
            return rules
        key = tuple(map(id, rules))
        hit = self._merge_cache.get(key)
        if hit is not None:
            return hit[1]
        merged = _merge(rules)
        if all(id(r) in self._static_ids for r in rules):
            # Holding `rules` keeps their ids from being reused while the entry lives.
            self._merge_cache[key] = (rules, merged)
        return merged

    def _allow_rules(self, pod: Pod, direction: str, origin: str, rule, definitions: list[GroupDef]) -> list[AllowRule]:
        # Most rules compile the same for every pod they select: share those AllowRules.
        if direction == "ingress" and any(isinstance(p.port, str) for p in rule.ports or ()):
            resolution = tuple(pod.named_port(p.port, p.protocol) for p in rule.ports if isinstance(p.port, str))
            cache = self._resolved_rules.setdefault(origin, {})
            cached = cache.get(resolution)
            if cached is None:
                cached = cache[resolution] = self._build_allow_rules(pod, direction, origin, rule, definitions)
                self._static_ids.update(map(id, cached))
            return cached
        cached = self._static_rules.get(origin)
        if cached is None:
            cached = self._static_rules[origin] = self._build_allow_rules(pod, direction, origin, rule, definitions)
            self._static_ids.update(map(id, cached))
        return cached

    def _build_allow_rules(self, pod: Pod, direction: str, origin: str, rule, definitions: list[GroupDef]) -> list[AllowRule]:
        peers = next((d.name for d in definitions if not d.port_names), None)
        if rule.ports is None or not rule.ports:
            return [AllowRule.model_construct(origin=[origin], peers=peers)]
        numeric: list[PortRange] = []
        for p in rule.ports:
            if p.port is None:
                # A protocol without a port: every port of that protocol.
                numeric.append(PortRange.model_construct(protocol=p.protocol, port=1, endPort=65535))
            elif isinstance(p.port, int):
                numeric.append(PortRange.model_construct(protocol=p.protocol, port=p.port, endPort=p.endPort))
            elif direction == "ingress":
                # Ingress named ports resolve on the pod being protected.
                number = pod.named_port(p.port, p.protocol)
                if number is not None:
                    numeric.append(PortRange.model_construct(protocol=p.protocol, port=number))
        out = []
        if numeric:
            out.append(AllowRule.model_construct(origin=[origin], peers=peers, ports=_unique(numeric)))
        per_peer = next((d.name for d in definitions if d.port_names), None)
        if per_peer is not None:
            out.append(AllowRule.model_construct(origin=[origin], peerPorts=per_peer))
        return out

    # ------------------------------------------------------------------ node specs
    def _pod_pending(self, node: str, key: str) -> None:
        """The pod's rules (or whether it is on this node at all) may have changed."""
        cache = self._node_pods.get(node)
        if cache is not None and not cache.stale:
            cache.pending.add(key)

    def _unname_groups(self, node: str, names) -> None:
        for name in names:
            state = self._groups.get(name)
            if state is not None:
                state.nodes.discard(node)

    @staticmethod
    def _rule_groups(pod: PolicedPod) -> set[str]:
        """Names of the groups (peer and peer-port) a pod's rules name."""
        names = set()
        for rules in (pod.ingress, pod.egress, pod.adminIngress, pod.adminEgress, pod.baselineIngress,
                      pod.baselineEgress):
            for rule in rules or ():
                if rule.peers is not None:
                    names.add(rule.peers)
                if rule.peerPorts is not None:
                    names.add(rule.peerPorts)
        return names

    def _count_groups(self, node: str, cache: _NodeCache, pod: PolicedPod, step: int) -> bool:
        """Add (step 1) or take away (-1) a pod's group references; True if the set of names changed."""
        refs, changed = cache.refs, False
        for name in self._rule_groups(pod):
            n = refs.get(name, 0) + step
            if n > 0:
                refs[name] = n
                if step > 0:
                    self._groups[name].nodes.add(node)
                    changed = changed or n == 1
            else:
                del refs[name]
                self._unname_groups(node, (name,))
                changed = True
        return changed

    def _refresh_node_pods(self, node: str, cache: _NodeCache) -> bool:
        """Bring the node's pods up to date; True if the names of the groups they name changed."""
        if cache.stale or len(cache.pending) > max(8, len(cache.keys) // 4):
            old_refs = cache.refs
            keys, pods = [], []
            for key in sorted(self._pods_by_node.get(node, ())):
                policed = self._policed_pod(key)
                if policed is not None:
                    keys.append(key)
                    pods.append(policed)
            refs: dict[str, int] = {}
            for pod in pods:
                for name in self._rule_groups(pod):
                    refs[name] = refs.get(name, 0) + 1
            self._unname_groups(node, [n for n in old_refs if n not in refs])
            for name in refs:
                self._groups[name].nodes.add(node)
            if len(pods) != len(cache.pods) or any(a is not b for a, b in zip(pods, cache.pods)):
                cache.pods = pods  # else the same list: nothing in it changed
            cache.keys, cache.refs, cache.stale = keys, refs, False
            cache.pending.clear()
            return refs.keys() != old_refs.keys()
        names_changed = False
        keys, pods = cache.keys, cache.pods
        copied = False
        on_node = self._pods_by_node.get(node, ())
        for key in sorted(cache.pending):
            i = bisect.bisect_left(keys, key)
            present = i < len(keys) and keys[i] == key
            policed = self._policed_pod(key) if key in on_node else None
            if present and policed is pods[i]:
                continue
            if not copied:
                keys, pods, copied = list(keys), list(pods), True
            if present:
                names_changed |= self._count_groups(node, cache, pods[i], -1)
                if policed is not None:
                    pods[i] = policed
                else:
                    del keys[i], pods[i]
            elif policed is not None:
                keys.insert(i, key)
                pods.insert(i, policed)
            if policed is not None:
                names_changed |= self._count_groups(node, cache, policed, 1)
        cache.pending.clear()
        if copied:
            cache.keys, cache.pods = keys, pods
        return names_changed

    def _build_spec(self, node: str) -> NodeRuleSetSpec:
        cache = self._node_pods.get(node)
        if cache is None:
            cache = self._node_pods[node] = _NodeCache()
        if self._refresh_node_pods(node, cache) or cache.peer_groups is None:
            # Which groups a node names changes only with its pods.
            cache.group_names = sorted(n for n in cache.refs if not self._groups[n].definition.port_names)
            cache.port_group_names = sorted(n for n in cache.refs if self._groups[n].definition.port_names)
            cache.peer_groups = [self._peer_group(self._groups[n].definition) for n in cache.group_names]
            cache.port_groups = [self._peer_port_group(self._groups[n].definition) for n in cache.port_group_names]
        elif cache.changed_groups:
            peer_groups = port_groups = None
            for name in cache.changed_groups:
                state = self._groups.get(name)
                if state is None or name not in cache.refs:
                    continue
                if state.definition.port_names:
                    port_groups = list(cache.port_groups) if port_groups is None else port_groups
                    port_groups[bisect.bisect_left(cache.port_group_names, name)] = self._peer_port_group(state.definition)
                else:
                    peer_groups = list(cache.peer_groups) if peer_groups is None else peer_groups
                    peer_groups[bisect.bisect_left(cache.group_names, name)] = self._peer_group(state.definition)
            cache.peer_groups = cache.peer_groups if peer_groups is None else peer_groups
            cache.port_groups = cache.port_groups if port_groups is None else port_groups
        cache.changed_groups.clear()
        return NodeRuleSetSpec.model_construct(
            nodeName=node,
            pods=cache.pods,
            peerGroups=cache.peer_groups,
            peerPortGroups=cache.port_groups,
        )

    # ------------------------------------------------------------------ problems
    def _policy_problems(self, policy: NetworkPolicy) -> list[str]:
        notes = []
        selected = [self.pods[k] for k in self.pods_selected_by(policy.key)]
        pod_networks = [
            ipaddress.ip_network(c, strict=False) for n in self.nodes.values() for c in n.pod_cidrs
        ]
        for direction, i, rule, definitions in self._policy_rules(policy):
            where = f"spec.{direction}[{i}]"
            for j, p in enumerate(rule.ports or ()):
                if not isinstance(p.port, str):
                    continue
                if direction == "ingress":
                    resolves = any(pod.named_port(p.port, p.protocol) is not None for pod in selected)
                else:
                    d = next(d for d in definitions if d.port_names)
                    resolves = any(
                        self.pods[k].named_port(p.port, p.protocol) is not None
                        for k in self._compute_members(d)
                    )
                if not resolves:
                    notes.append(
                        f"{where}.ports[{j}].port: named port {p.port!r}/{p.protocol} resolves on no "
                        f"{'selected' if direction == 'ingress' else 'peer'} pod; it opens nothing"
                    )
            for j, peer in enumerate(rule.peers or ()):
                if peer.ipBlock is None:
                    continue
                net = peer.ipBlock.network
                if any(net.version == pn.version and net.overlaps(pn) for pn in pod_networks):
                    notes.append(
                        f"{where}.{'from' if direction == 'ingress' else 'to'}[{j}].ipBlock.cidr: "
                        f"{peer.ipBlock.cidr} covers pod IPs; it matches those pods too"
                    )
        return notes


def _unique(items: list) -> list:
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _merge(rules: list[AllowRule]) -> list[AllowRule]:
    """One rule per distinct (peers, ports, peerPorts), naming every policy rule it stands for."""
    if len(rules) <= 1:
        return rules
    merged: dict[tuple, list[str]] = {}
    for rule in rules:
        ports = None if rule.ports is None else tuple((p.protocol, p.port, p.endPort) for p in rule.ports)
        key = (rule.peers, ports, rule.peerPorts)
        merged.setdefault(key, [])
        merged[key] += [o for o in rule.origin if o not in merged[key]]
    if len(merged) == len(rules):
        return rules
    firsts: dict[tuple, AllowRule] = {}
    for rule in rules:
        ports = None if rule.ports is None else tuple((p.protocol, p.port, p.endPort) for p in rule.ports)
        firsts.setdefault((rule.peers, ports, rule.peerPorts), rule)
    return [rule.model_copy(update={"origin": merged[key]}) for key, rule in firsts.items()]


def compile_cluster(objects: ClusterObjects) -> dict[str, NodeRuleSetSpec]:
    return Compiler(objects).all_specs()
