"""NodeRuleSet + local veth map -> typed nftables model. Pure: data in, data out.

Per-packet cost stays flat in the number of pods and policies: the forward hook dispatches on
the packet's source and destination address through verdict maps (one hash lookup each) to the
chain of the one pod concerned; that chain holds only the rules of the policies selecting that
pod, each one set lookup against a content-addressed peer set.

    forward_hook (inet, hook forward)
      ct state established,related accept; ct state invalid drop; own-node sources accept
      ip saddr vmap @egress_v4 ──jump──> pod_<id>_egress:  allow... goto ingress_dispatch
      goto ingress_dispatch                                 counter + drop
    ingress_dispatch
      ip daddr vmap @ingress_v4 ──jump──> pod_<id>_ingress: allow... accept
      accept                                                counter + drop

Same-node pod traffic crosses the forward hook once (cni0 -> cni0, br_netfilter), so one
traversal checks the source's egress and then the destination's ingress. Anti-spoofing lives
in the bridge family, keyed on the veth the frame came in on (DESIGN.md §4):

    prerouting_hook (bridge, hook prerouting)
      iif . ether saddr . ip saddr @pod_addresses_v4 accept      (the common frame: one lookup)
      iifname vmap @pod_ports ──jump──> pod_<id>_spoof: own ARP, own IPv6 link-local: accept
                                                        counter + drop

An established packet thus costs one rule in each of the two hooks, whatever the number of
pods and policies.

New pods are held closed until the rule set covers them (DESIGN.md §3: a pod whose rules are
not yet in the kernel is held, not left open). The agent sees a pod's veth and IP long before
the controller's rule set names the pod; what it sees but the rule set does not cover comes in
as `holds`, and rides the dispatch that is there anyway:

    forward_hook:      ip saddr vmap @egress_v4  ──jump──> held_egress:  counter + drop
    ingress_dispatch:  ip daddr vmap @ingress_v4 ──jump──> held_ingress: counter + drop
    prerouting_hook:   its own MAC and IP on its veth accept (to and from the node, as for
                       every pod; other pods and the world are refused in the forward hook)
                       iifname vmap @pod_ports ──jump──> held_veth: own ARP, link-local: accept
                                                                    counter + drop
                       meta iifkind "veth" counter + drop      (a veth not known at all yet)

The last rule holds a pod before the agent has even seen it: from its veth's first frame, not
from when discovery and a sync get there (measured: the real CNI plugin sets a pod's IP and
answers connections tens of milliseconds before that). Known veths never reach it (their own
addresses are accepted first, and every known veth is in @pod_ports, pods' or let through).
A veth whose pod has no IP yet has no own addresses, so every frame from it is dropped.

Partial renders (render_update, the agent's render after its first): a node's model is built
from one share per pod (its chains, counters, port sets and verdict-map elements; its veth's
chain and address elements) and one per peer group (its sets), each derived from that pod or
group alone, and then assembled in spec order. render_update keeps the shares of what did not
change - the very objects, which the plan skips by identity - so a pod born, deleted,
relabelled or given a new IP costs that pod, as kube-proxy's nftables proxier syncs only the
services that changed. Assembly is the same code for both, so a partial render is the full
render of the same inputs (tests/unit/test_render_update.py; on the kernel,
tests/kernel/test_render_update_kernel.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Literal, NamedTuple, TypeVar

from netfence_api import AllowRule, NodeRuleSetSpec, PeerGroup, PeerPortGroup, PolicedPod, TierRule
from netfence_agent.nft.model import (
    AnonSet,
    Chain,
    Concat,
    Counter,
    CounterRef,
    Ct,
    Fib,
    Limit,
    Log,
    Map,
    Match,
    Meta,
    Payload,
    Range,
    Rule,
    Ruleset,
    Set,
    SetRef,
    Table,
    Verdict,
    VMap,
)

TABLE_NAME = "netfence"
INET_TABLE = ("inet", TABLE_NAME)
BRIDGE_TABLE = ("bridge", TABLE_NAME)
FORWARD_CHAIN = "forward_hook"
INPUT_CHAIN = "input_hook"
INGRESS_DISPATCH = "ingress_dispatch"
SPOOF_CHAIN = "prerouting_hook"
_PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_FAMILY = {4: ("ip", "ipv4_addr", "v4"), 6: ("ip6", "ipv6_addr", "v6")}
# Expressions and verdicts are immutable; sharing them saves most of render's allocations.
_ACCEPT, _DROP = Verdict("accept"), Verdict("drop")
_GOTO_INGRESS = Verdict("goto", INGRESS_DISPATCH)
_ETHER_SADDR = Payload("ether", "saddr")
_IIF = Meta("iif")
_ARP_SADDR_IP = Payload("arp", "saddr ip")
_ADDR = {(proto, f): Payload(proto, f) for proto in ("ip", "ip6") for f in ("saddr", "daddr")}
_DPORT = {proto: Payload(proto, "dport") for proto in ("tcp", "udp", "sctp")}
_PROTO_PORT = Concat((Meta("l4proto"), Payload("th", "dport")))
_ADDR_PROTO_PORT = {proto: Concat((_ADDR[(proto, "daddr")], Meta("l4proto"), Payload("th", "dport")))
                    for proto in ("ip", "ip6")}
_LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")
_UNSPECIFIED6_NET = ipaddress.ip_network("::/128")
_UNSPECIFIED4 = ipaddress.IPv4Address("0.0.0.0")
_ND_TYPES = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")


@dataclass(frozen=True)
class PodPort:
    """The host side of a local pod's veth."""

    ifname: str
    mac: str | None = None
    ifindex: int | None = None


@dataclass(frozen=True)
class HeldPort:
    """A local pod's veth, or IPs on it, that the rule set does not cover (yet): held closed.

    `ips` are the pod's IPs the rule set does not list (empty while the pod has none). The veth
    itself is held unless a pod of the rule set has it (then only those IPs are).
    """

    port: PodPort
    ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Holds:
    """New pods held closed (the agent's --new-pods=hold). The default holds nothing: the
    offline views, and --new-pods=open."""

    enabled: bool = False  # drop frames from veths nothing is known about (a pod being born)
    held: tuple[HeldPort, ...] = ()
    # Veths let through unchecked: a pod released when its hold timed out, and bridge ports
    # that are no pod's (veths on a bridge without pods, e.g. docker0 next to cni0).
    passed: tuple[PodPort, ...] = ()


NO_HOLDS = Holds()


@dataclass(frozen=True)
class RenderOptions:
    log_drops: bool = False
    nflog_group: int = 100
    log_rate_per_second: int = 10


@dataclass(frozen=True)
class CounterLabels:
    namespace: str
    pod: str
    kind: Literal["ingress", "egress", "spoof", "held_ingress", "held_egress"]


HELD_INGRESS, HELD_EGRESS, HELD_VETH = "held_ingress", "held_egress", "held_veth"
# The node-wide counters of held traffic: no pod name to give (the rule set does not know it).
HELD_LABELS = {direction: CounterLabels("", "", f"held_{direction}") for direction in ("ingress", "egress")}


@dataclass(frozen=True)
class RuleCounterLabels:
    """A ClusterNetworkPolicy Deny rule's drop counter (one per rule and node)."""

    policy: str
    tier: str
    rule: str
    direction: Literal["ingress", "egress"]


@dataclass
class RenderResult:
    ruleset: Ruleset
    counters: dict[str, CounterLabels] = field(default_factory=dict)
    rule_counters: dict[str, RuleCounterLabels] = field(default_factory=dict)
    families: tuple[int, ...] = (4,)  # IP versions rendered (the spec's, and held IPs')
    # What render_update reuses: the inputs and each pod's and group's share of the model.
    parts: "_RenderParts | None" = field(default=None, repr=False, compare=False)


# Parsing addresses dominates render time; the same pod IPs recur in every group and sync.
@lru_cache(maxsize=1 << 17)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """ipaddress.ip_address(text). The C library parses an IPv4 address in a quarter of the time
    and accepts exactly the dotted quads ipaddress does (four decimal octets, no leading zeros);
    anything else, IPv6 and errors included, goes to ipaddress."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        return ipaddress.ip_address(text)


_network = lru_cache(maxsize=1 << 17)(ipaddress.ip_network)

_Derived = TypeVar("_Derived")


class RenderMemo:
    """What render derives from spec objects (AllowRules, peer groups), by object, for the
    renders that share it.

    The compiler gives pods selected alike the very same AllowRule objects, on every node, and
    one PeerGroup object to every node naming the group. Each render call derives what it needs
    from each object once; a caller rendering many nodes from one compiler (the offline views,
    the compile benchmark) can pass one memo to all those calls, and then a rule met on many
    nodes is read and rendered once. Entries hold their object, so its id stays its own for as
    long as the memo lives: keep a memo for one batch of renders, not for good. An agent
    rendering specs parsed from JSON, which share no objects across renders, passes none.
    """

    def __init__(self) -> None:
        self._derived: dict[tuple, dict[int, tuple[Any, Any]]] = {}

    def derived(self, derive: Callable[..., _Derived], *variant: Any) -> Callable[[Any], _Derived]:
        """derive(obj, *variant), remembered per object."""
        entries = self._derived.setdefault((derive, *variant), {})

        def of(obj: Any) -> _Derived:
            entry = entries.get(id(obj))
            if entry is None:
                entry = entries[id(obj)] = (obj, derive(obj, *variant))
            return entry[1]
        return of


class _SetContent(NamedTuple):
    """A named set as derived from the spec. Immutable, so shared across renders; each table
    gets its own (mutable) Set."""

    name: str
    type: tuple[str, ...]
    elements: tuple
    flags: tuple[str, ...] = ()
    comment: str = ""

    def new_set(self) -> Set:
        return Set(self.name, self.type, list(self.elements), self.flags, self.comment)


@lru_cache(maxsize=1 << 16)
def pod_id(namespace: str, name: str) -> str:
    """Short stable id for a pod's nft objects (names are capped; comments carry the real name)."""
    return hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:10]


def counter_name(namespace: str, name: str, kind: str) -> str:
    return f"pod_{pod_id(namespace, name)}_{kind}"


@lru_cache(maxsize=1 << 14)
def rule_counter_name(policy: str, rule: str) -> str:
    """Named counter of a ClusterNetworkPolicy rule ("ingress[2]"); its comment has the names."""
    return "cnp_" + hashlib.sha256(f"{policy} {rule}".encode()).hexdigest()[:12]


def set_name(group: str, family: int) -> str:
    return f"{group.replace('-', '_')}_{_FAMILY[family][2]}"


def log_prefix(counter: str) -> str:
    """NFLOG prefix of a drop: the agent maps it back to namespace, pod and direction."""
    return f"netfence:{counter}"


def render(spec: NodeRuleSetSpec, ports: Mapping[str, PodPort], options: RenderOptions = RenderOptions(),
           memo: RenderMemo | None = None, holds: Holds = NO_HOLDS) -> RenderResult:
    """The node's nftables model. Pass one `memo` to the renders of many nodes of one compile.
    `holds`: local veths and IPs the spec does not cover, to be held closed."""
    memo = RenderMemo() if memo is None else memo
    return _render(spec, ports, options, holds, _families(spec, holds.held), memo, None)


def render_update(previous: RenderResult, spec: NodeRuleSetSpec, ports: Mapping[str, PodPort],
                  options: RenderOptions = RenderOptions(), holds: Holds = NO_HOLDS) -> RenderResult:
    """render(spec, ports, options, holds=holds), rebuilding only what changed since `previous`.

    The agent's render after the first: a pod of the node born, deleted, relabelled or given a
    new IP rebuilds that pod's chains, counters and elements only; a peer group whose members
    changed, its sets only. Everything else is `previous`'s very objects, which the plan then
    skips by identity (nft/transaction.py), so the transaction touches what changed, as
    kube-proxy's partial syncs do. The result equals a full render of the same inputs (property
    and kernel tested); a change of the node's name, address families or options renders all.
    """
    before = previous.parts
    families = _families(spec, holds.held)
    if before is None or (before.node, before.families, before.options) != (spec.nodeName, families, options):
        return render(spec, ports, options, holds=holds)
    if ((before.pods is spec.pods or before.pods == spec.pods) and before.holds == holds and before.ports == ports
            and [g.name for g in (*spec.peerGroups, *spec.peerPortGroups)] == list(before.groups)):
        return _with_group_members(previous, spec)
    return _render(spec, ports, options, holds, families, RenderMemo(), before)


class _PodPolicy(NamedTuple):
    """What one local pod brings to the inet table, derived from the pod, the address families
    and the options alone: render_update keeps it for as long as the pod does not change."""

    pod: PolicedPod
    chains: tuple[Chain, ...]
    # Its drop counters and its Deny rules' counters (CounterLabels / RuleCounterLabels), in the
    # order render meets them; a Deny rule's counter is shared by every pod the rule applies to.
    counters: tuple[tuple[Counter, CounterLabels | RuleCounterLabels], ...]
    port_sets: tuple[_SetContent, ...]  # in the order its rules use them; shared as well
    dispatch: tuple[tuple[str, Any, Verdict], ...]  # (direction, address, jump to its chain)
    own_node: Verdict | None  # its egress chain, for its traffic to this node (the input hook)


class _PodSpoof(NamedTuple):
    """What one local pod's veth brings to the bridge table (from its IPs and veth alone)."""

    ips: tuple[str, ...]
    port: PodPort
    counter: Counter
    labels: CounterLabels
    chain: Chain
    v4: tuple  # its elements of pod_addresses_v4, pod_addresses_v6, pod_arp_senders
    v6: tuple
    arp: tuple


@dataclass(frozen=True)
class _RenderParts:
    """A render's inputs and each pod's and group's share of its model, for render_update."""

    node: str
    families: tuple[int, ...]
    options: RenderOptions
    pods: list[PolicedPod]  # the spec's very list
    ports: Mapping[str, PodPort]
    holds: Holds
    groups: dict[str, tuple[PeerGroup | PeerPortGroup, tuple[Set, ...]]]  # by name, in spec order
    policies: dict[str, _PodPolicy]  # by pod key
    spoofs: dict[str, _PodSpoof]
    port_sets: dict[str, Set]


def _render(spec: NodeRuleSetSpec, ports: Mapping[str, PodPort], options: RenderOptions, holds: Holds,
            families: tuple[int, ...], memo: RenderMemo, before: _RenderParts | None) -> RenderResult:
    """The node's model, from the parts of `before` that did not change and new ones for the rest."""
    groups: dict[str, tuple[PeerGroup | PeerPortGroup, tuple[Set, ...]]] = {}
    group_sets: list[Set] = []
    for group, sets_of in _groups_with_derivers(spec, memo, families):
        groups[group.name] = _group_share(group, before.groups.get(group.name) if before is not None else None, sets_of)
        group_sets += groups[group.name][1]

    allow_rules = {direction: memo.derived(_derive_allow_rules, direction, families) for direction in ("egress", "ingress")}
    tier_matches = {direction: memo.derived(_derive_tier_matches, direction, families)
                    for direction in ("egress", "ingress")}
    policies: dict[str, _PodPolicy] = {}
    spoofs: dict[str, _PodSpoof] = {}
    for pod in spec.pods:
        key = pod.key
        if key in policies:
            raise ValueError(f"pod {key} is listed twice")
        old_policy = before.policies.get(key) if before is not None else None
        policies[key] = old_policy if old_policy is not None and (old_policy.pod is pod or old_policy.pod == pod) \
            else _pod_policy(pod, options, allow_rules, tier_matches)
        port = _veth_of(pod, ports)
        if port is None:
            continue  # veth not found yet: IP-keyed policy still applies
        old_spoof = before.spoofs.get(key) if before is not None else None
        ips = tuple(pod.ips)
        spoofs[key] = old_spoof if old_spoof is not None and old_spoof.ips == ips and old_spoof.port == port \
            else _pod_anti_spoofing(pod, ips, port, options)

    result = RenderResult(Ruleset(), families=families)
    inet = Table("inet", TABLE_NAME, comment=f"netfence: NetworkPolicy of node {spec.nodeName}")
    bridge = Table("bridge", TABLE_NAME, comment=f"netfence: anti-spoofing on pod veths of node {spec.nodeName}")
    result.ruleset.tables += [inet, bridge]
    for s in group_sets:
        inet.add(s)
    dispatch = {
        (direction, fam): inet.add(
            Map(f"{direction}_{_FAMILY[fam][2]}", (_FAMILY[fam][1],),
                comment=f"local pods isolated for {direction}, and held ones")
        )
        for direction in ("egress", "ingress")
        for fam in families
    }
    inet.add(_forward_chain(families))
    inet.add(_ingress_dispatch_chain(families))
    known_port_sets = before.port_sets if before is not None else {}
    port_sets: dict[str, Set] = {}
    own_node_egress = []  # pods whose traffic to this node ClusterNetworkPolicy egress rules police
    for part in policies.values():
        for counter, labels in part.counters:
            if isinstance(labels, CounterLabels):
                result.counters[counter.name] = labels
                inet.add(counter)
            elif counter.name not in inet.counters:  # a Deny rule's counter, met first with this pod
                inet.add(counter)
                result.rule_counters[counter.name] = labels
        for chain in part.chains:
            inet.add(chain)
        for content in part.port_sets:
            # A port set joins the table with the first rule that matches against it.
            if content.name not in inet.sets:
                port_sets[content.name] = inet.add(known_port_sets.get(content.name) or content.new_set())
        for direction, address, jump in part.dispatch:
            dispatch[(direction, address.version)].elements.append((address, jump))
        if part.own_node is not None:
            own_node_egress.append((part.pod, part.own_node))
    if own_node_egress:
        _render_input_hook(inet, families, own_node_egress)

    _render_held_policy(inet, holds.held, dispatch, result, options)
    _render_anti_spoofing(bridge, spoofs.values(), result, options, families, holds)
    result.parts = _RenderParts(spec.nodeName, families, options, spec.pods, dict(ports), holds, groups, policies,
                                spoofs, port_sets)
    return result


def _groups_with_derivers(spec: NodeRuleSetSpec, memo: RenderMemo, families: tuple[int, ...]) -> Iterator[tuple[Any, Callable]]:
    """Each group of the spec, peer groups then peer-port groups, with what derives its sets."""
    peer_sets, peer_port_sets = memo.derived(_derive_peer_sets, families), memo.derived(_derive_peer_port_sets, families)
    yield from ((group, peer_sets) for group in spec.peerGroups)
    yield from ((group, peer_port_sets) for group in spec.peerPortGroups)


def _group_share(group: PeerGroup | PeerPortGroup, old: tuple | None, sets_of: Callable) -> tuple:
    """A group's share of the model: `old` (the group and its sets) while the group is equal,
    else its sets derived anew."""
    if old is not None and (old[0] is group or old[0] == group):
        return old
    return group, tuple([content.new_set() for content in sets_of(group)])


def _pod_policy(pod: PolicedPod, options: RenderOptions, allow_rules: dict, tier_matches: dict) -> _PodPolicy:
    """One local pod's chains (per direction it is isolated in, or has ClusterNetworkPolicy
    rules for), their counters and the verdict-map elements that lead its traffic there."""
    chains: list[Chain] = []
    counters: dict[str, tuple[Counter, CounterLabels | RuleCounterLabels]] = {}
    port_sets: dict[str, _SetContent] = {}
    dispatch: list[tuple[str, Any, Verdict]] = []
    own_node = None
    isolation = pod.isolation
    key = pod.key
    for direction, isolated, rules, policies in (
        ("egress", isolation.egress, pod.egress, pod.egressPolicies),
        ("ingress", isolation.ingress, pod.ingress, pod.ingressPolicies),
    ):
        admin = pod.tier_rules("Admin", direction)
        # Baseline rules apply only where no NetworkPolicy isolates the pod.
        baseline = [] if isolated else pod.tier_rules("Baseline", direction)
        if not (isolated or admin or baseline):
            continue
        # The counter and the chain share a name, in separate namespaces of the table.
        name = counter_name(pod.namespace, pod.name, direction)
        counters[name] = (Counter(name, comment=f"{key} {direction} drops"), CounterLabels(pod.namespace, pod.name, direction))
        chain = Chain(name, comment=_chain_comment(key, direction, isolated, policies, admin, baseline))
        chains.append(chain)
        allow = _ACCEPT if direction == "ingress" else _GOTO_INGRESS
        tail = chain
        if any(r.action == "Pass" for r in admin):
            # Pass skips the rest of the Admin tier: those rules and the tiers after them
            # get a chain of their own to go to.
            tail = Chain(f"{name}_np", comment=f"{key} {direction} after the Admin tier")
            chains.append(tail)
        tier_context = (port_sets, counters, options, tier_matches[direction], name, direction, allow)
        for rule in admin:
            _add_tier_rule(chain, rule, Verdict("goto", tail.name) if rule.action == "Pass" else None, *tier_context)
        if tail is not chain:
            chain.rules.append(Rule((Verdict("goto", tail.name),), f"{key} {direction}: the Admin tier did not decide"))
        if isolated:
            if admin and direction == "egress":
                tail.rules.append(Rule((Match(Fib(("daddr",), "type"), _NODE_ADDRESS_TYPES), _ACCEPT),
                                       "NetworkPolicy: a pod's traffic to its own node is always allowed"))
            nft_of = allow_rules[direction]
            for rule in rules:
                nft_rules, port_set = nft_of(rule)
                if port_set is not None:
                    port_sets.setdefault(port_set.name, port_set)
                tail.rules += nft_rules
            if options.log_drops:
                tail.rules.append(_log_sample(options, name, f"{key} {direction}: log a sample of drops"))
            tail.rules.append(Rule((CounterRef(name), _DROP), f"{key} {direction}: no policy rule allows this"))
        else:
            for rule in baseline:
                # Pass in the Baseline tier goes on to the default: allowed.
                _add_tier_rule(tail, rule, allow if rule.action == "Pass" else None, *tier_context)
            tail.rules.append(Rule((allow,), f"{key} {direction}: no NetworkPolicy isolates it, "
                                             "no ClusterNetworkPolicy rule decided: allowed"))
        jump = Verdict("jump", name)
        dispatch += [(direction, _address(ip), jump) for ip in pod.ips]
        if direction == "egress" and (admin or baseline):
            own_node = jump
    return _PodPolicy(pod, tuple(chains), tuple(counters.values()), tuple(port_sets.values()), tuple(dispatch), own_node)


def only_group_members_changed(old: NodeRuleSetSpec, new: NodeRuleSetSpec) -> bool:
    """True when `new` differs from `old` at most in the members of its peer groups.

    That is the common change (a pod joins or leaves a group somewhere in the cluster), and
    then only set elements change in the rendered rules.
    """
    return (
        old.nodeName == new.nodeName
        and [g.name for g in old.peerGroups] == [g.name for g in new.peerGroups]
        and [g.name for g in old.peerPortGroups] == [g.name for g in new.peerPortGroups]
        and _families(old) == _families(new)
        and old.pods == new.pods
    )


def render_group_members(previous: RenderResult, old: NodeRuleSetSpec, new: NodeRuleSetSpec) -> RenderResult:
    """render(new, ...) when only_group_members_changed(old, new), reusing `previous`.

    Chains, maps and counters are shared with `previous` (the models are not mutated after
    render); only the sets of groups whose members changed are built again. Equal to a full
    render of `new` with the same ports and options (tested), at the cost of the groups that
    changed instead of the whole node.
    """
    changed = {g.name for g, before in zip(new.peerGroups, old.peerGroups) if g.cidrs != before.cidrs}
    changed |= {g.name for g, before in zip(new.peerPortGroups, old.peerPortGroups) if g.entries != before.entries}
    return _with_group_members(previous, new, changed)


def _with_group_members(previous: RenderResult, new: NodeRuleSetSpec, changed: set[str] | None = None) -> RenderResult:
    """`previous` with the sets of the groups of `new` that `changed` built again (None: those
    that differ from the groups `previous` rendered); every other object is shared."""
    families = previous.families  # the spec's families are unchanged; held IPs may add IPv6
    old_inet = previous.ruleset.table(*INET_TABLE)
    inet = Table(old_inet.family, old_inet.name, comment=old_inet.comment, chains=old_inet.chains,
                 sets=dict(old_inet.sets), maps=old_inet.maps, counters=old_inet.counters)
    before = previous.parts
    groups = dict(before.groups) if before is not None else {}
    for group, sets_of in _groups_with_derivers(new, RenderMemo(), families):
        if changed is not None and group.name not in changed:
            continue
        old = groups.get(group.name) if changed is None else None
        share = _group_share(group, old, sets_of)
        if share is not old:
            groups[group.name] = share
            inet.sets.update((s.name, s) for s in share[1])
    tables = [inet if t is old_inet else t for t in previous.ruleset.tables]
    result = RenderResult(Ruleset(tables), previous.counters, previous.rule_counters, families)
    if before is not None:
        result.parts = replace(before, pods=new.pods, groups=groups)
    return result


# --------------------------------------------------------------------------- ClusterNetworkPolicy tiers
# What counts as "the node itself" for a pod's traffic to its node (the input hook).
_NODE_ADDRESS_TYPES = AnonSet(("local", "broadcast", "multicast"))


def _chain_comment(key: str, direction: str, isolated: bool, policies: list[str],
                   admin: list[TierRule], baseline: list[TierRule]) -> str:
    parts = [f"isolated by {', '.join(policies)}"] if isolated else []
    for tier, rules in (("Admin", admin), ("Baseline", baseline)):
        names = list(dict.fromkeys(r.policy for r in rules))
        if names:
            parts.append(f"{tier} tier {', '.join(names)}")
    return f"{key} {direction}, " + "; ".join(parts)


def _derive_tier_matches(rule: TierRule, direction: str,
                         families: tuple[int, ...]) -> tuple[tuple[tuple[Match, ...], ...], _SetContent | None]:
    """The matches of one TierRule (one tuple per address family) and the port set they use.

    The verdict is added per pod: a Deny counts into the pod's counter too."""
    if rule.peerPorts is not None:
        return tuple((_group_match(rule.peerPorts, f, "peer_ports"),) for f in families), None
    ports, port_set = ((), None) if rule.ports is None else _port_match(
        tuple([(p.protocol, p.port, p.endPort) for p in rule.ports]))
    if rule.peers is None:
        return (tuple(ports),), port_set
    peer_field = "saddr" if direction == "ingress" else "daddr"
    return tuple((_group_match(rule.peers, f, peer_field), *ports) for f in families), port_set


def _add_tier_rule(chain: Chain, rule: TierRule, verdict: Verdict | None, port_sets: dict[str, _SetContent],
                   counters: dict[str, tuple[Counter, CounterLabels | RuleCounterLabels]], options: RenderOptions,
                   matches_of, pod_counter: str, direction: str, allow: Verdict) -> None:
    """One ClusterNetworkPolicy rule in a pod's chain: Accept allows this direction, Deny drops
    (counted for the pod and for the rule), Pass goes where `verdict` says."""
    matches, port_set = matches_of(rule)
    if port_set is not None:
        port_sets.setdefault(port_set.name, port_set)
    comment = f"{rule.action}: {rule.origin}"
    if rule.action == "Deny":
        counter = rule_counter_name(rule.policy, rule.rule)
        if counter not in counters:
            counters[counter] = (Counter(counter, comment=rule.origin),
                                 RuleCounterLabels(rule.policy, rule.tier, rule.label, direction))
        if options.log_drops:
            limit = Limit(options.log_rate_per_second, "second", burst=options.log_rate_per_second)
            chain.rules += [Rule((*m, limit, Log(options.nflog_group, log_prefix(pod_counter))),
                                 f"log a sample: {comment}") for m in matches]
        tail: tuple = (CounterRef(pod_counter), CounterRef(counter), _DROP)
    elif rule.action == "Accept":
        tail = (allow,)
    else:
        tail = (verdict,)
    chain.rules += [Rule((*m, *tail), comment) for m in matches]


def _render_input_hook(inet: Table, families: tuple[int, ...], pods: list[tuple[PolicedPod, Verdict]]) -> None:
    """A pod's traffic to its own node (the node's addresses, host-network pods) is delivered
    locally, never forwarded: ClusterNetworkPolicy egress rules (e.g. `nodes` peers) see it
    here. NetworkPolicy always allows it (the pod chains say so before their own rules)."""
    maps = {fam: inet.add(Map(f"local_egress_{_FAMILY[fam][2]}", (_FAMILY[fam][1],),
                              comment="local pods with ClusterNetworkPolicy egress rules"))
            for fam in families}
    for pod, jump in pods:
        for ip in pod.ips:
            address = _address(ip)
            maps[address.version].elements.append((address, jump))
    chain = inet.add(Chain(INPUT_CHAIN, hook="input", priority=0, policy="accept",
                           comment="ClusterNetworkPolicy egress of local pods to this node"))
    chain.rules.append(Rule((Match(Ct("state"), frozenset({"established", "related"})), _ACCEPT),
                            "replies and related flows of allowed connections"))
    for fam in families:
        proto, _, suffix = _FAMILY[fam]
        chain.rules.append(Rule((VMap(Payload(proto, "saddr"), f"local_egress_{suffix}"),),
                                "egress policy of the source pod, if it is local"))


# --------------------------------------------------------------------------- inet
def _families(spec: NodeRuleSetSpec, held: Sequence[HeldPort] = ()) -> tuple[int, ...]:
    # An IPv6 address or CIDR is the only kind of text here holding a colon.
    # Joined per list, the search runs in C: this runs on every sync, over every group member.
    has_v6 = (
        any(":" in "".join(p.ips) for p in spec.pods)
        or any(":" in "".join(h.ips) for h in held)
        or any(":" in "".join(g.cidrs) for g in spec.peerGroups)
        or any(":" in e.address for g in spec.peerPortGroups for e in g.entries)
    )
    return (4, 6) if has_v6 else (4,)


def _derive_peer_sets(group: PeerGroup, families: tuple[int, ...]) -> tuple[_SetContent, ...]:
    members = tuple(map(_network, group.cidrs))
    sets = []
    for fam in families:
        # Without IPv6 in the spec every member is IPv4 (_families).
        nets = members if len(families) == 1 else tuple(n for n in members if n.version == fam)
        # Pod IPs alone make a plain hash set: libnftables 1.0.6 reads back every interval
        # set's elements to add one element to any of them. Which kind a group needs changes
        # only with its policy (an ipBlock), never with pod churn.
        ranges = any(n.prefixlen != n.max_prefixlen for n in nets)
        sets.append(_SetContent(set_name(group.name, fam), (_FAMILY[fam][1],), nets,
                                flags=("interval",) if ranges else (), comment=f"peers: {group.selector}"))
    return tuple(sets)


def _derive_peer_port_sets(group: PeerPortGroup, families: tuple[int, ...]) -> tuple[_SetContent, ...]:
    entries = tuple((_address(e.address), _PROTO[e.protocol], e.port) for e in group.entries)
    return tuple(
        _SetContent(set_name(group.name, fam), (_FAMILY[fam][1], "inet_proto", "inet_service"),
                    entries if len(families) == 1 else tuple(t for t in entries if t[0].version == fam),
                    comment=f"named ports on peers: {group.selector}")
        for fam in families
    )


def _forward_chain(families: tuple[int, ...]) -> Chain:
    chain = Chain(FORWARD_CHAIN, hook="forward", priority=0, policy="accept",
                  comment="NetworkPolicy for pod traffic forwarded by this node")
    chain.rules += [
        Rule((Match(Ct("state"), frozenset({"established", "related"})), Verdict("accept")),
             "replies and related flows of allowed connections"),
        Rule((Match(Ct("state"), frozenset({"invalid"})), Verdict("drop")), "not part of any valid connection"),
        Rule((Match(Fib(("saddr",), "type"), "local"), Verdict("accept")),
             "traffic from this node itself is always allowed"),
    ]
    if 6 in families:
        chain.rules.append(Rule(
            (Match(Payload("icmpv6", "type"), AnonSet(_ND_TYPES)), Verdict("accept")),
            "IPv6 neighbour discovery keeps allowed flows reachable",
        ))
    for fam in families:
        proto, _, suffix = _FAMILY[fam]
        chain.rules.append(Rule((VMap(Payload(proto, "saddr"), f"egress_{suffix}"),),
                                "egress policy of the source pod, if it is local and isolated (or held)"))
    chain.rules.append(Rule((Verdict("goto", INGRESS_DISPATCH),), "then ingress policy of the destination"))
    return chain


def _ingress_dispatch_chain(families: tuple[int, ...]) -> Chain:
    chain = Chain(INGRESS_DISPATCH, comment="ingress policy of the destination pod, if it is local and isolated")
    for fam in families:
        proto, _, suffix = _FAMILY[fam]
        chain.rules.append(Rule((VMap(Payload(proto, "daddr"), f"ingress_{suffix}"),),
                                "destination is a local pod isolated for ingress (or held)"))
    chain.rules.append(Rule((Verdict("accept"),), "destination not isolated for ingress"))
    return chain


def _render_held_policy(inet: Table, held: Sequence[HeldPort], dispatch: dict[tuple[str, int], Map],
                        result: RenderResult, options: RenderOptions) -> None:
    """Held pod IPs dispatch to a drop, both ways. The chains and counters are there even when
    nothing is held, so holding and releasing a pod change map elements only (milliseconds)."""
    for direction, name in (("egress", HELD_EGRESS), ("ingress", HELD_INGRESS)):
        result.counters[name] = HELD_LABELS[direction]
        inet.add(Counter(name, comment=f"{direction} of held pods: new pods the rule set does not cover yet"))
        chain = inet.add(Chain(name, comment=f"{direction} of a local pod held closed until the rule set covers it"))
        if options.log_drops:
            chain.rules.append(_log_sample(options, name, f"held pods {direction}: log a sample of drops"))
        chain.rules.append(Rule((CounterRef(name), _DROP),
                                f"held: a local pod the rule set does not cover yet, {direction} refused"))
        jump = Verdict("jump", name)
        for entry in held:
            for ip in entry.ips:
                address = _address(ip)
                dispatch[(direction, address.version)].elements.append((address, jump))


def _derive_allow_rules(rule: AllowRule, direction: str,
                        families: tuple[int, ...]) -> tuple[tuple[Rule, ...], _SetContent | None]:
    """The nft rules of one AllowRule in one direction, and the port set they match against."""
    allow = _ACCEPT if direction == "ingress" else _GOTO_INGRESS
    comment = "; ".join(rule.origin)
    if rule.peerPorts is not None:
        return tuple([Rule((_group_match(rule.peerPorts, f, "peer_ports"), allow), comment) for f in families]), None
    ports, port_set = ((), None) if rule.ports is None else _port_match(
        tuple([(p.protocol, p.port, p.endPort) for p in rule.ports]))
    if rule.peers is None:
        return (Rule((*ports, allow), comment),), port_set
    peer_field = "saddr" if direction == "ingress" else "daddr"
    return tuple([Rule((_group_match(rule.peers, f, peer_field), *ports, allow), comment) for f in families]), port_set


@lru_cache(maxsize=1 << 12)
def _port_match(ports: tuple[tuple[str, int, int | None], ...]) -> tuple[tuple[Match], _SetContent | None]:
    """`tcp dport 80` for one port (range); else a named port set shared by equal port lists.

    Not an anonymous set: libnftables 1.0.6 takes quadratic time over a batch of rules with
    anonymous sets (measured: 20,000 rules load in minutes, with named sets in 2 s).
    """
    elements = tuple(
        (_PROTO[protocol], lo if hi == lo else Range(lo, hi)) for protocol, lo, hi in _disjoint_port_ranges(ports)
    )
    if len(elements) == 1:
        protocol, port = elements[0]
        return (Match(_DPORT[protocol], port),), None
    name = "ports_" + hashlib.sha256(repr(elements).encode()).hexdigest()[:12]
    comment = "ports " + ", ".join(f"{port}{'-' + str(end) if end else ''}/{protocol}" for protocol, port, end in ports)
    return (Match(_PROTO_PORT, SetRef(name)),), _SetContent(name, ("inet_proto", "inet_service"), elements,
                                                            flags=("interval",), comment=comment)


def _disjoint_port_ranges(ports: tuple[tuple[str, int, int | None], ...]) -> list[tuple[str, int, int]]:
    """(protocol, first, last) of the ports, in their order; ranges that overlap (80 and 80-81,
    or a port twice) merged, in the order of the protocol's ranges: the kernel refuses
    overlapping elements in a set of concatenated intervals ("File exists")."""
    ranges = [(protocol, port, port if end is None else end) for protocol, port, end in ports]
    ordered = sorted(ranges)
    if all(a[0] != b[0] or a[2] < b[1] for a, b in zip(ordered, ordered[1:])):
        return ranges  # the common case, as written
    merged: list[tuple[str, int, int]] = []
    for protocol, lo, hi in ordered:
        if merged and merged[-1][0] == protocol and lo <= merged[-1][2]:
            merged[-1] = (protocol, merged[-1][1], max(hi, merged[-1][2]))
        else:
            merged.append((protocol, lo, hi))
    return merged


@lru_cache(maxsize=1 << 14)
def _group_match(group: str, family: int, field: Literal["saddr", "daddr", "peer_ports"]) -> Match:
    """An allow rule's peer test: `ip saddr @<group>_v4`, or `ip daddr . meta l4proto . th dport @<group>_v4`
    for a group of named ports resolved on the peers. Immutable and the same in many rules: built once."""
    proto = _FAMILY[family][0]
    left = _ADDR_PROTO_PORT[proto] if field == "peer_ports" else _ADDR[(proto, field)]
    return Match(left, SetRef(set_name(group, family)))


def _log_sample(options: RenderOptions, counter: str, comment: str) -> Rule:
    """NFLOG a rate-limited sample of what the next rule drops, tagged with its counter."""
    limit = Limit(options.log_rate_per_second, "second", burst=options.log_rate_per_second)
    return Rule((limit, Log(options.nflog_group, log_prefix(counter))), comment)


# --------------------------------------------------------------------------- bridge
# Every pod chain holds the same rules, looking up the frame's (port, MAC, source) in node-wide
# sets; only the counter differs per pod. A veth's addresses are set elements, and the rules are
# shared objects, so render and the kernel carry little per pod. They accept rather than return:
# with new pods held, the hook's last rule would drop a return.
_SPOOF_SHARED = (
    # Link-local IPv6 (router solicitation, MLD, DAD) leaves every pod with IPv6 up, even an
    # IPv4-only one; it is never routed, so allowing it from the pod's MAC opens nothing and
    # keeps the spoofing counter for real spoofing.
    Rule((Match(Concat((_IIF, _ETHER_SADDR, _ADDR[("ip6", "saddr")])), SetRef("pod_addresses_v6")), _ACCEPT),
         "its own MAC and IPv6 address, link-local or unspecified"),
    Rule((Match(Concat((_IIF, _ETHER_SADDR, _ARP_SADDR_IP)), SetRef("pod_arp_senders")), _ACCEPT),
         "ARP from its own MAC and address, or 0.0.0.0 for duplicate address detection"),
)


def _render_anti_spoofing(bridge: Table, spoofs: Iterable[_PodSpoof], result: RenderResult, options: RenderOptions,
                          families: tuple[int, ...], holds: Holds) -> None:
    dispatch = bridge.add(Map("pod_ports", ("ifname",),
                              comment="host-side veths of local pods, and bridge ports let through"))
    hook = bridge.add(Chain(SPOOF_CHAIN, hook="prerouting", priority=-200, policy="accept",
                            comment="frames leaving a pod must carry its own addresses"))
    # Keyed on the veth's ifindex, not its name: a shorter key is measurably cheaper on this
    # path, and an ifindex is never reused while the kernel runs (names are: a veth made for a
    # new pod can take a deleted one's name before the next sync).
    own = {
        "v4": bridge.add(Set("pod_addresses_v4", ("iface_index", "ether_addr", "ipv4_addr"),
                             comment="each local pod's veth, MAC and IPv4 addresses")),
        "v6": bridge.add(Set("pod_addresses_v6", ("iface_index", "ether_addr", "ipv6_addr"), flags=("interval",),
                             comment="each local pod's veth, MAC, IPv6 addresses, link-local and ::")),
        "arp": bridge.add(Set("pod_arp_senders", ("iface_index", "ether_addr", "ipv4_addr"),
                              comment="each local pod's veth, MAC and ARP sender addresses (its own, 0.0.0.0)")),
    }
    # Every frame a pod sends passes this chain, so the common case costs one rule and one
    # lookup: the frame's (veth, MAC, source) found among the pods' own. Only what that misses
    # (ARP, link-local IPv6, a pod whose MAC is unknown, spoofing) goes on to the pod's own chain,
    # which holds its drop counter. Measured with perf on bench/datapath.py's stream: a dispatch
    # to the pod chain and the lookup there cost twice the CPU of this (docs/benchmarks.md).
    hook.rules += [
        Rule((Match(Concat((_IIF, _ETHER_SADDR, _ADDR[(_FAMILY[fam][0], "saddr")])),
                    SetRef(own[_FAMILY[fam][2]].name)), _ACCEPT),
             f"a local pod's own MAC and IP{_FAMILY[fam][2]} address on its own veth")
        for fam in families
    ]
    hook.rules.append(Rule((VMap(Meta("iifname"), dispatch.name),), "other frames entering the bridge from a pod veth"))
    for part in spoofs:
        result.counters[part.counter.name] = part.labels
        bridge.add(part.counter)
        bridge.add(part.chain)
        own["v4"].elements += part.v4
        own["v6"].elements += part.v6
        own["arp"].elements += part.arp
        dispatch.elements.append((part.port.ifname, Verdict("jump", part.chain.name)))
    _render_held_veths(bridge, holds, hook, own, dispatch, result, options)


def _pod_anti_spoofing(pod: PolicedPod, ips: tuple[str, ...], port: PodPort, options: RenderOptions) -> _PodSpoof:
    """A local pod's veth: its chain (what its own addresses do not cover: ARP, link-local IPv6,
    spoofing counted and dropped) and its own addresses as elements of the node-wide sets."""
    key = pod.key
    # The counter and the chain share a name, in separate namespaces of the table.
    name = counter_name(pod.namespace, pod.name, "spoof")
    chain = Chain(name, comment=f"{key} on {port.ifname}")
    addresses = [_address(ip) for ip in ips]
    if port.mac and port.ifindex is not None:
        v4, v6, arp = _own_addresses(port, addresses)
        chain.rules += _SPOOF_SHARED
    else:
        # MAC or ifindex unknown (a port given without them): check the source address alone.
        v4 = v6 = arp = ()
        comment = f"{key}: its own address (MAC unknown)"
        chain.rules += [Rule((Match(_ADDR[(_FAMILY[a.version][0], "saddr")], a), _ACCEPT), comment)
                        for a in addresses]
    if options.log_drops:
        chain.rules.append(_log_sample(options, name, f"{key}: log a sample of spoofed frames"))
    chain.rules.append(Rule((CounterRef(name), _DROP), f"{key}: source address or MAC is not the pod's"))
    return _PodSpoof(ips, port, Counter(name, comment=f"{key} spoofed frames"),
                     CounterLabels(pod.namespace, pod.name, "spoof"), chain, v4, v6, arp)


def _own_addresses(port: PodPort, addresses: list) -> tuple[tuple, tuple, tuple]:
    """A veth's own (ifindex, MAC, address) elements of pod_addresses_v4, pod_addresses_v6 and
    pod_arp_senders: its IPs, link-local IPv6 and ARP."""
    mac, veth = port.mac.lower(), port.ifindex
    v4 = tuple([(veth, mac, a) for a in addresses if a.version == 4])
    v6 = tuple([(veth, mac, _network(f"{a}/128")) for a in addresses if a.version == 6]) \
        + ((veth, mac, _LINK_LOCAL6), (veth, mac, _UNSPECIFIED6_NET))
    arp = (*v4, (veth, mac, _UNSPECIFIED4)) if v4 else ()
    return v4, v6, arp


def _render_held_veths(bridge: Table, holds: Holds, hook: Chain, own: dict[str, Set], dispatch: Map,
                       result: RenderResult, options: RenderOptions) -> None:
    """Held veths are anti-spoofed like any pod's, into one node-wide chain and counter.

    Their own MAC and IPs pass the bridge (the forward hook refuses them towards other pods and
    the world), so the node still reaches a held pod (kubelet's probes: DESIGN.md §3, a pod and
    its node always talk) and a deleted pod's open connections drain while its veth lingers. A
    veth whose pod has no IP yet has no own addresses: everything it sends is dropped here, as
    everything from a veth not known at all (the hook's last rule).
    """
    result.counters[HELD_VETH] = HELD_LABELS["egress"]
    bridge.add(Counter(HELD_VETH, comment="frames from held or unknown veths, other than their own addresses"))
    chain = bridge.add(Chain(HELD_VETH, comment="veths of local pods held closed until the rule set covers them"))
    chain.rules += _SPOOF_SHARED
    if options.log_drops:
        chain.rules.append(_log_sample(options, HELD_VETH, "held veths: log a sample of drops"))
    chain.rules.append(Rule((CounterRef(HELD_VETH), _DROP),
                            "held: no IP of this pod known yet, or not its own address or MAC"))
    taken = {ifname for ifname, _ in dispatch.elements}
    jump = Verdict("jump", HELD_VETH)
    for entry in holds.held:
        port = entry.port
        if port.ifname in taken:
            continue  # a pod of the rule set has this veth: only the uncovered IPs are held
        taken.add(port.ifname)
        if port.mac and port.ifindex is not None and entry.ips:
            for name, elements in zip(("v4", "v6", "arp"), _own_addresses(port, [_address(ip) for ip in entry.ips])):
                own[name].elements += elements
        dispatch.elements.append((port.ifname, jump))
    for port in holds.passed:
        if port.ifname not in taken:
            taken.add(port.ifname)
            dispatch.elements.append((port.ifname, _ACCEPT))
    if holds.enabled:
        hook.rules.append(Rule((Match(Meta("iifkind"), "veth"), CounterRef(HELD_VETH), _DROP),
                               "held: a veth no local pod is known on yet, a pod being born"))


def _veth_of(pod: PolicedPod, ports: Mapping[str, PodPort]) -> PodPort | None:
    for ip in pod.ips:
        port = ports.get(ip)
        if port is not None:
            return port
    return None
