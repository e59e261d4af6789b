"""The NodeRuleSet on the wire at scale: split into bounded objects, assembled back on the agent.

The compiler produces one complete `NodeRuleSetSpec` per node and render takes one; this module
is the layer between them and the API (docs/design-scale.md explains the choices):

* **PeerGroupSlice** (cluster-scoped, shared by every node): part of one content-addressed peer
  group (or peer-port group), named `<group>.s<bits>`, labelled `netfence.io/peer-group=<group>`.
* **PodRuleSlice** (one node's): part of the node's policed pods with their allow rules, named
  `<node>.p<bits>`, labelled `netfence.io/node=<node>`.
* **NodeRuleSet** (one per node, name = node): `nodeName` and the node's pod slices by name and
  content hash. The groups it uses are the ones its pods' rules name.

Members are placed by a hash trie: a slice holds the members whose hash starts with its `<bits>`,
and it is split in two by the next bit while its members' JSON exceeds the bound. The layout is
therefore a pure function of the content (`netfence compile` prints what the controller
publishes), every object stays near the bound whatever the cluster's size, and one member
changes exactly one slice (or splits/merges one). A set of slices is complete when their
prefixes form an exact partition of the hash space (no prefix of another, sizes summing to 1):
that is how the agent knows it holds a whole group without a list of its slices anywhere.

`assemble` gives back the compiler's spec exactly (lists in the compiler's canonical order), so
`content_hash()` of the assembled spec is the agent's `appliedHash`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from pydantic import Field, model_validator

from netfence_api.models import (
    API_GROUP,
    API_VERSION,
    KIND,
    NodeRuleSetSpec,
    PeerGroup,
    PeerPortGroup,
    PolicedPod,
    _Model,
    canonical_json,
    short_hash,
)

POD_SLICE_KIND, POD_SLICE_PLURAL = "PodRuleSlice", "podruleslices"
GROUP_SLICE_KIND, GROUP_SLICE_PLURAL = "PeerGroupSlice", "peergroupslices"
API = f"{API_GROUP}/{API_VERSION}"
NODE_LABEL = f"{API_GROUP}/node"
GROUP_LABEL = f"{API_GROUP}/peer-group"
MANAGED_BY = {"app.kubernetes.io/managed-by": "netfence-controller"}
PODS_ANNOTATION = f"{API_GROUP}/pods"
RULES_ANNOTATION = f"{API_GROUP}/rules"
HASH_ANNOTATION = f"{API_GROUP}/spec-hash"
_HASH_BITS = 64
_KEPT_BODIES = 4  # per node and call: see Splitter.node_objects
_NAME_MAX = 253


# --------------------------------------------------------------------------- wire models
class PodSliceRef(_Model):
    name: str
    hash: str = Field(description="Content hash of the slice's spec (slice_hash): the agent uses "
                                  "the slice only when it holds exactly this content.")


class SplitRuleSetSpec(_Model):
    """A NodeRuleSet's spec on the API: the node's pod slices. Peer groups are found through
    the rules of the pods (PeerGroupSlices labelled with the group's name)."""

    nodeName: str
    podSlices: list[PodSliceRef] = Field(default_factory=list)


class PodRuleSliceSpec(_Model):
    """Part of one node's policed pods: those whose name hashes to `prefix`."""

    nodeName: str
    prefix: str = Field(default="", pattern=r"^[01]{0,64}$")
    pods: list[PolicedPod] = Field(default_factory=list)


class PeerGroupSliceSpec(_Model):
    """Part of one peer group (or peer-port group): the members whose hash starts with `prefix`."""

    prefix: str = Field(default="", pattern=r"^[01]{0,64}$")
    peerGroup: PeerGroup | None = None
    peerPortGroup: PeerPortGroup | None = None

    @model_validator(mode="after")
    def _one_group(self) -> "PeerGroupSliceSpec":
        if (self.peerGroup is None) == (self.peerPortGroup is None):
            raise ValueError("exactly one of peerGroup and peerPortGroup")
        return self

    @property
    def group(self) -> PeerGroup | PeerPortGroup:
        return self.peerGroup if self.peerGroup is not None else self.peerPortGroup  # type: ignore[return-value]


@dataclass(frozen=True)
class Bounds:
    """Most bytes of members (their compact JSON) one slice holds before it is split.

    A slice is sent whole to every watcher when one member changes, so the bound is what a
    pod event costs per slice it touches (docs/design-scale.md has the sizes behind them)."""

    pod_slice_bytes: int = 16 * 1024
    group_slice_bytes: int = 8 * 1024


DEFAULT_BOUNDS = Bounds()


class Incomplete(ValueError):
    """The objects held do not yet make a consistent rule set (named in the message)."""


# --------------------------------------------------------------------------- small pure pieces
def slice_hash(spec: Mapping[str, Any]) -> str:
    """Content hash of a slice's spec as JSON data (what PodSliceRef.hash holds)."""
    return short_hash(spec, 16)


def member_hash(key: str) -> int:
    """Where a member lives in the hash trie: 64 stable bits of its key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def node_label_value(node: str) -> str:
    """A node name as a label value (at most 63 characters; longer names by their hash)."""
    return node if len(node) <= 63 else "h" + short_hash(node, 32)


def _bounded(base: str, suffix: str) -> str:
    if len(base) + len(suffix) <= _NAME_MAX:
        return base + suffix
    return f"{base[:_NAME_MAX - len(suffix) - 17].rstrip('.-')}-{short_hash(base, 16)}{suffix}"


def pod_slice_name(node: str, prefix: str) -> str:
    return _bounded(node, f".p{prefix}")


def group_slice_name(group: str, prefix: str) -> str:
    return _bounded(group, f".s{prefix}")


def partition(keys: Sequence[int], sizes: Sequence[int], bound: int) -> list[tuple[str, list[int]]]:
    """Leaves of the hash trie over items (by index, input order kept in each leaf): a leaf is
    split by the next bit while its items' sizes sum past `bound` and it has more than one."""
    out: list[tuple[str, list[int]]] = []
    stack = [("", list(range(len(keys))), sum(sizes))]
    while stack:
        prefix, indexes, total = stack.pop()
        depth = len(prefix)
        if total <= bound or len(indexes) <= 1 or depth >= _HASH_BITS:
            out.append((prefix, indexes))
            continue
        shift = _HASH_BITS - 1 - depth
        zero = [i for i in indexes if not (keys[i] >> shift) & 1]
        one = [i for i in indexes if (keys[i] >> shift) & 1]
        stack.append((prefix + "1", one, sum(sizes[i] for i in one)))
        stack.append((prefix + "0", zero, sum(sizes[i] for i in zero)))
    return sorted(out)


def exact_partition(prefixes: Iterable[str]) -> bool:
    """True when the prefixes cover the hash space exactly once (a complete set of slices)."""
    ordered = sorted(prefixes)
    if not ordered:
        return False
    for a, b in zip(ordered, ordered[1:]):
        if b.startswith(a):
            return False  # overlap: a split or merge is half way through
    return sum(1 << (_HASH_BITS - len(p)) for p in ordered) == 1 << _HASH_BITS


def cidr_key(text: str) -> tuple[int, int]:
    """The compiler's order of group members (merge_addresses): IPv4 first, then by address."""
    address = text.split("/", 1)[0]
    if ":" in address:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
    return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")


def _entry_key(entry: Mapping[str, Any]) -> tuple:
    return cidr_key(entry["address"]), entry["protocol"], entry["port"]


def _pod_key(pod: PolicedPod) -> str:
    return f"{pod.namespace}/{pod.name}"


def _compact_size(data: Any) -> int:
    return len(json.dumps(data, separators=(",", ":")))


def _envelope(kind: str, name: str, labels: dict[str, str], annotations: dict[str, str], spec: dict) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind,
            "metadata": {"name": name, "labels": {**MANAGED_BY, **labels}, "annotations": annotations},
            "spec": spec}


# --------------------------------------------------------------------------- split
@dataclass
class PodSlice:
    """One PodRuleSlice of a node, its object built when it is needed (to be written): the
    Splitter keeps only the pods and the content hash of each slice, not their JSON."""

    node: str
    prefix: str
    digest: str
    pods: tuple[PolicedPod, ...]
    _body: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return pod_slice_name(self.node, self.prefix)

    def object(self) -> dict[str, Any]:
        body = self._body if self._body is not None else _pod_slice_body(self.node, self.prefix, self.pods)
        rules = sum(len(p.all_rules()) for p in self.pods)
        return _envelope(POD_SLICE_KIND, self.name, {NODE_LABEL: node_label_value(self.node)},
                         {HASH_ANNOTATION: self.digest, PODS_ANNOTATION: str(len(self.pods)),
                          RULES_ANNOTATION: str(rules)}, body)


def _pod_slice_body(node: str, prefix: str, pods: Iterable[PolicedPod]) -> dict[str, Any]:
    return {"nodeName": node, "prefix": prefix, "pods": [p.model_dump(mode="json", exclude_none=True) for p in pods]}


@dataclass
class NodeObjects:
    """What one node's spec publishes besides its groups."""

    ruleset: dict[str, Any]
    pod_slices: list[PodSlice]
    groups: list[PeerGroup | PeerPortGroup]  # the groups its rules name (published as their slices)
    group_names: frozenset[str] = frozenset()  # their names (the same object while the pods are)


@dataclass
class Splitter:
    """split() with memory: a group or pod the compiler hands over again (the same object) is not
    serialised or hashed again, so a pod event costs the slices it touches, not the node."""

    bounds: Bounds = DEFAULT_BOUNDS
    # group name -> (the group model split last, its slice objects)
    _groups: dict[str, tuple[Any, list[dict[str, Any]]]] = field(default_factory=dict)
    # node -> {pod key: (PolicedPod, JSON size, trie key)}
    _pods: dict[str, dict[str, tuple[PolicedPod, int, int]]] = field(default_factory=dict)
    # node -> {prefix: (pods of the slice, content hash)}
    _slices: dict[str, dict[str, tuple[tuple[PolicedPod, ...], str]]] = field(default_factory=dict)
    # node -> (the pods list split last, what it gave)
    _last: dict[str, tuple[list, NodeObjects]] = field(default_factory=dict)
    _member_keys: dict[str, int] = field(default_factory=dict)

    def _key(self, text: str) -> int:
        found = self._member_keys.get(text)
        if found is None:
            if len(self._member_keys) > 1_000_000:
                self._member_keys.clear()
            found = self._member_keys[text] = member_hash(text)
        return found

    # ------------------------------------------------------------------ groups
    def group_objects(self, group: PeerGroup | PeerPortGroup) -> list[dict[str, Any]]:
        cached = self._groups.get(group.name)
        if cached is not None and (cached[0] is group or cached[0] == group):
            return cached[1]
        objects = self._split_group(group)
        self._groups[group.name] = (group, objects)
        return objects

    def forget_group(self, name: str) -> None:
        self._groups.pop(name, None)

    def _split_group(self, group: PeerGroup | PeerPortGroup) -> list[dict[str, Any]]:
        if isinstance(group, PeerGroup):
            members: list = list(group.cidrs)
            keys = [self._key(c) for c in members]
            sizes = [len(c) + 3 for c in members]  # quotes and comma
            field_name = "peerGroup"
        else:
            members = [e.model_dump(mode="json") for e in group.entries]
            keys = [self._key(f"{e['address']} {e['protocol']} {e['port']}") for e in members]
            sizes = [_compact_size(e) + 1 for e in members]
            field_name = "peerPortGroup"
        out = []
        for prefix, indexes in partition(keys, sizes, self.bounds.group_slice_bytes):
            part = [members[i] for i in indexes]
            body = {"name": group.name, "selector": group.selector,
                    ("cidrs" if field_name == "peerGroup" else "entries"): part}
            spec = {"prefix": prefix, field_name: body}
            out.append(_envelope(GROUP_SLICE_KIND, group_slice_name(group.name, prefix), {GROUP_LABEL: group.name},
                                 {HASH_ANNOTATION: slice_hash(spec)}, spec))
        return out

    # ------------------------------------------------------------------ nodes
    def node_objects(self, spec: NodeRuleSetSpec) -> NodeObjects:
        node = spec.nodeName
        last = self._last.get(node)
        if last is not None and last[0] is spec.pods:
            # The very same pods (the compiler hands over its list again when only group
            # members moved, which is most events for most nodes): nothing of the node's own.
            return NodeObjects(last[1].ruleset, last[1].pod_slices, [*spec.peerGroups, *spec.peerPortGroups],
                               last[1].group_names)
        before = self._pods.get(node, {})
        entries: dict[str, tuple[PolicedPod, int, int]] = {}
        for pod in spec.pods:
            key = _pod_key(pod)
            old = before.get(key)
            if old is not None and old[0] is pod:
                entries[key] = old
            else:
                entries[key] = (pod, _compact_size(pod.model_dump(mode="json", exclude_none=True)) + 1, self._key(key))
        self._pods[node] = entries
        ordered = list(entries.values())
        known = self._slices.get(node, {})
        slices: list[PodSlice] = []
        kept = 0
        for prefix, indexes in partition([e[2] for e in ordered], [e[1] for e in ordered], self.bounds.pod_slice_bytes):
            pods = tuple(ordered[i][0] for i in indexes)
            old_slice = known.get(prefix)
            if old_slice is not None and len(old_slice[0]) == len(pods) and all(a is b for a, b in zip(old_slice[0], pods)):
                slices.append(PodSlice(node, prefix, old_slice[1], pods))
            else:
                body = _pod_slice_body(node, prefix, pods)
                # A pod event changes a slice or two: their JSON is kept for the write. A whole
                # node (a first publish) would hold all of it at once: built again when written.
                kept += 1
                slices.append(PodSlice(node, prefix, slice_hash(body), pods, body if kept <= _KEPT_BODIES else None))
        self._slices[node] = {s.prefix: (s.pods, s.digest) for s in slices}
        groups = [*spec.peerGroups, *spec.peerPortGroups]
        ruleset_spec = {"nodeName": node, "podSlices": [{"name": s.name, "hash": s.digest} for s in slices]}
        rules = sum(len(p.all_rules()) for p in spec.pods)
        ruleset = {"apiVersion": API, "kind": KIND,
                   "metadata": {"name": node, "labels": dict(MANAGED_BY),
                                "annotations": {PODS_ANNOTATION: str(len(spec.pods)), RULES_ANNOTATION: str(rules),
                                                HASH_ANNOTATION: slice_hash(ruleset_spec)}},
                   "spec": ruleset_spec}
        names = frozenset(g.name for g in groups)
        objects = NodeObjects(ruleset, [PodSlice(s.node, s.prefix, s.digest, s.pods) for s in slices], groups, names)
        self._last[node] = (spec.pods, objects)  # (the slices without their JSON: built again when written)
        return NodeObjects(ruleset, slices, groups, names)

    def forget_node(self, node: str) -> None:
        self._pods.pop(node, None)
        self._slices.pop(node, None)
        self._last.pop(node, None)


def _referenced_groups(spec: NodeRuleSetSpec) -> list[PeerGroup | PeerPortGroup]:
    """The spec's groups, checked to be exactly those its rules name (what assemble derives)."""
    rules = [r for p in spec.pods for r in p.all_rules()]
    named = sorted({r.peers for r in rules if r.peers is not None})
    named_ports = sorted({r.peerPorts for r in rules if r.peerPorts is not None})
    if [g.name for g in spec.peerGroups] != named or [g.name for g in spec.peerPortGroups] != named_ports:
        raise ValueError(f"node {spec.nodeName}: peer groups are not exactly those its rules name, in name order")
    return [*spec.peerGroups, *spec.peerPortGroups]


def split(specs: Iterable[NodeRuleSetSpec], bounds: Bounds = DEFAULT_BOUNDS) -> list[dict[str, Any]]:
    """The API objects that carry these complete specs, referenced before referencing (the
    order the controller writes them): every group's slices once, then per node its pod slices
    and its NodeRuleSet. Raises ValueError for a spec whose groups are not exactly those its
    rules name, or a group that differs between nodes."""
    splitter = Splitter(bounds)
    nodes, groups = [], {}
    for spec in specs:
        _referenced_groups(spec)
        objects = splitter.node_objects(spec)
        nodes.append(objects)
        for group in objects.groups:
            other = groups.setdefault(group.name, group)
            if other != group:
                raise ValueError(f"peer group {group.name} differs between nodes")
    out: list[dict[str, Any]] = []
    for name in sorted(groups):
        out += splitter.group_objects(groups[name])
    for objects in nodes:
        out += [s.object() for s in objects.pod_slices]
        out.append(objects.ruleset)
    return out


# --------------------------------------------------------------------------- assemble
def _merged(lists: list[list], key) -> list:
    if len(lists) == 1:
        return list(lists[0])
    return list(heapq.merge(*lists, key=key))


def assemble_group(name: str, slices: Iterable[PeerGroupSliceSpec]) -> PeerGroup | PeerPortGroup:
    """One group from its slices; Incomplete unless they are exactly one whole group."""
    held = list(slices)
    if not held:
        raise Incomplete(f"no PeerGroupSlice of peer group {name}")
    if not exact_partition(s.prefix for s in held):
        raise Incomplete(f"the PeerGroupSlices of peer group {name} do not cover it exactly once "
                         f"(prefixes {sorted(s.prefix for s in held)})")
    held.sort(key=lambda s: s.prefix)
    first = held[0].group
    if any(s.group.name != name for s in held) or len({type(s.group) for s in held}) != 1:
        raise Incomplete(f"the PeerGroupSlices labelled {name} hold other groups")
    if isinstance(first, PeerGroup):
        cidrs = _merged([s.peerGroup.cidrs for s in held], cidr_key)  # type: ignore[union-attr]
        return PeerGroup.model_construct(name=name, selector=first.selector, cidrs=cidrs)
    entries = _merged([s.peerPortGroup.entries for s in held],  # type: ignore[union-attr]
                      lambda e: (cidr_key(e.address), e.protocol, e.port))
    return PeerPortGroup.model_construct(name=name, selector=first.selector, entries=entries)


def assemble(ruleset: SplitRuleSetSpec, pod_slices: Mapping[str, tuple[str, PodRuleSliceSpec]],
             groups: Mapping[str, PeerGroup | PeerPortGroup]) -> NodeRuleSetSpec:
    """The complete spec of a node from its NodeRuleSet, its pod slices (name -> (content hash,
    spec)) and assembled groups (name -> group). Incomplete names what is missing or stale."""
    parts = []
    for ref in ruleset.podSlices:
        found = pod_slices.get(ref.name)
        if found is None:
            raise Incomplete(f"PodRuleSlice {ref.name} is missing")
        if found[0] != ref.hash:
            raise Incomplete(f"PodRuleSlice {ref.name} holds content {found[0]}, NodeRuleSet {ruleset.nodeName} "
                             f"names {ref.hash}")
        if found[1].nodeName != ruleset.nodeName:
            raise Incomplete(f"PodRuleSlice {ref.name} is for node {found[1].nodeName}")
        parts.append(found[1].pods)
    pods = _merged(parts, _pod_key) if parts else []
    rules = [r for p in pods for r in p.all_rules()]
    picked = []
    for names in (sorted({r.peers for r in rules if r.peers is not None}),
                  sorted({r.peerPorts for r in rules if r.peerPorts is not None})):
        out = []
        for name in names:
            group = groups.get(name)
            if group is None:
                raise Incomplete(f"peer group {name} is missing (no complete set of its PeerGroupSlices)")
            out.append(group)
        picked.append(out)
    for group in picked[0]:
        if not isinstance(group, PeerGroup):
            raise Incomplete(f"{group.name} is a peer-port group where a peer group is named")
    for group in picked[1]:
        if not isinstance(group, PeerPortGroup):
            raise Incomplete(f"{group.name} is a peer group where a peer-port group is named")
    return NodeRuleSetSpec.model_construct(nodeName=ruleset.nodeName, pods=pods, peerGroups=picked[0],
                                           peerPortGroups=picked[1])


def is_split(ruleset_spec: Mapping[str, Any]) -> bool:
    """A NodeRuleSet spec that references slices (else it is complete on its own: file mode)."""
    return "podSlices" in ruleset_spec


def _items(objects: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for obj in objects:
        if obj.get("kind") == "List":
            yield from _items(obj.get("items") or [])
        else:
            yield obj


def assemble_from_objects(objects: Iterable[Mapping[str, Any]]) -> dict[str, NodeRuleSetSpec]:
    """Every node's complete spec from API objects (NodeRuleSets, PodRuleSlices, PeerGroupSlices,
    e.g. `netfence compile -o json` or a listing of the API). Raises Incomplete (a ValueError)
    for a node whose referenced objects are missing, or pydantic's ValidationError."""
    rulesets, pod_slices, group_slices = {}, {}, {}
    for obj in _items(objects):
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind == KIND:
            rulesets[obj["metadata"]["name"]] = spec
        elif kind == POD_SLICE_KIND:
            pod_slices[obj["metadata"]["name"]] = (slice_hash(spec), PodRuleSliceSpec.model_validate(spec))
        elif kind == GROUP_SLICE_KIND:
            parsed = PeerGroupSliceSpec.model_validate(spec)
            group_slices.setdefault(parsed.group.name, []).append(parsed)
    groups = {}
    for name, held in group_slices.items():
        try:
            groups[name] = assemble_group(name, held)
        except Incomplete:
            pass  # reported below if a node needs it
    out = {}
    for node, spec in sorted(rulesets.items()):
        if is_split(spec):
            out[node] = assemble(SplitRuleSetSpec.model_validate(spec), pod_slices, groups)
        else:
            out[node] = NodeRuleSetSpec.model_validate(spec)
    return out


def publish_order(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Referenced objects before those that reference them: group slices, pod slices, rule sets."""
    rank = {GROUP_SLICE_KIND: 0, POD_SLICE_KIND: 1, KIND: 2}
    return sorted(objects, key=lambda o: rank.get(o.get("kind"), 3))


def canonical_size(obj: Mapping[str, Any]) -> int:
    """Bytes of an object as compact JSON (what the API stores, give or take its metadata)."""
    return len(canonical_json(obj))
