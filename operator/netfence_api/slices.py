"""The NodeRuleSet on the wire at scale: peer groups in bounded objects of their own.

The compiler produces one complete `NodeRuleSetSpec` per node and render takes one; this module
is the layer between them and the API (docs/design-scale.md explains the choices):

* **NodeRuleSet** (one per node, name = node): the node's policed pods with their rules, inline
  as DESIGN §5 fixes it. Its rules name content-addressed peer groups; a group the spec does not
  carry inline lives in PeerGroupSlices.
* **PeerGroupSlice** (cluster-scoped, shared by every node): part of one peer group (or
  peer-port group), named `<group>.s<bits>`, labelled `netfence.io/peer-group=<group>`.

Where groups live is one decision for the whole cluster, made from the content alone: inline in
every NodeRuleSet while all of the nodes' rule data (pods, rules and the groups each names) is
at most `Bounds.inline_groups_bytes` (64 KiB: a change rewriting every NodeRuleSet then costs
what one object costs), in PeerGroupSlices otherwise. A small cluster reads as one object per
node; a large one writes a member change into one slice of at most 4 KiB instead of into every
NodeRuleSet that names the group.

Members are placed by a hash trie: a slice holds the members whose hash starts with its `<bits>`,
and it is split in two by the next bit while its members' JSON exceeds the bound. The layout is
therefore a pure function of the content (`netfence compile` prints what the controller
publishes), every slice stays near the bound whatever the cluster's size, and one member
changes exactly one slice (or splits/merges one). A set of slices is complete when their
prefixes form an exact partition of the hash space (no prefix of another, sizes summing to 1):
that is how the agent knows it holds a whole group without a list of its slices anywhere.

`assemble` gives back the compiler's spec exactly (groups in name order, members in the
compiler's order), so `content_hash()` of the assembled spec is the agent's `appliedHash`.
"""

from __future__ import annotations

import difflib
import hashlib
import heapq
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from pydantic import Field, model_validator

from netfence_api.models import (
    API_GROUP,
    API_VERSION,
    KIND,
    NodeRuleSetSpec,
    PeerGroup,
    PeerPortGroup,
    _Model,
    canonical_json,
    short_hash,
)

GROUP_SLICE_KIND, GROUP_SLICE_PLURAL = "PeerGroupSlice", "peergroupslices"
API = f"{API_GROUP}/{API_VERSION}"
GROUP_LABEL = f"{API_GROUP}/peer-group"
MANAGED_BY = {"app.kubernetes.io/managed-by": "netfence-controller"}
# Printer columns can't count list items, so the objects carry the counts in annotations.
PODS_ANNOTATION = f"{API_GROUP}/pods"
RULES_ANNOTATION = f"{API_GROUP}/rules"
HASH_ANNOTATION = f"{API_GROUP}/spec-hash"
_HASH_BITS = 64
_NAME_MAX = 253

Group = PeerGroup | PeerPortGroup


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
    def group(self) -> Group:
        return self.peerGroup if self.peerGroup is not None else self.peerPortGroup  # type: ignore[return-value]


@dataclass(frozen=True)
class Bounds:
    """Sizes (bytes of compact JSON) that decide the layout.

    `group_slice_bytes`: most bytes of members one PeerGroupSlice holds before it is split (a
    watcher receives the whole slice when one member changes). `inline_groups_bytes`: groups
    stay inline in the NodeRuleSets while the nodes' rule data, each node with the groups it
    names, adds up to at most this (0: always in PeerGroupSlices)."""

    group_slice_bytes: int = 4 * 1024
    inline_groups_bytes: int = 64 * 1024


DEFAULT_BOUNDS = Bounds()


class Incomplete(ValueError):
    """The objects held do not yet make a consistent rule set (named in the message)."""


# --------------------------------------------------------------------------- small pure pieces
def slice_hash(spec: Mapping[str, Any]) -> str:
    """Content hash of a PeerGroupSlice's spec as JSON data (its spec-hash annotation)."""
    return short_hash(spec, 16)


def ruleset_hash(spec: Mapping[str, Any]) -> str:
    """Content hash of a NodeRuleSet's spec as JSON data (its spec-hash annotation): with the
    groups inline, what `NodeRuleSetSpec.content_hash()` gives, so the agent's appliedHash
    equals it once the agent has applied it."""
    return "sha256:" + hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def member_hash(key: str) -> int:
    """Where a member lives in the hash trie: 64 stable bits of its key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def group_slice_name(group: str, prefix: str) -> str:
    base, suffix = group, f".s{prefix}"
    if len(base) + len(suffix) <= _NAME_MAX:
        return base + suffix
    return f"{base[:_NAME_MAX - len(suffix) - 17].rstrip('.-')}-{short_hash(base, 16)}{suffix}"


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


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def named_groups(spec: NodeRuleSetSpec) -> tuple[list[str], list[str]]:
    """Names of the peer groups and peer-port groups the spec's rules name, in name order."""
    rules = [r for p in spec.pods for r in p.all_rules()]
    return (sorted({r.peers for r in rules if r.peers is not None}),
            sorted({r.peerPorts for r in rules if r.peerPorts is not None}))


def referenced_groups(spec: NodeRuleSetSpec) -> list[Group]:
    """The spec's groups, checked to be exactly those its rules name (what assemble derives)."""
    named, named_ports = named_groups(spec)
    if [g.name for g in spec.peerGroups] != named or [g.name for g in spec.peerPortGroups] != named_ports:
        raise ValueError(f"node {spec.nodeName}: peer groups are not exactly those its rules name, in name order")
    return [*spec.peerGroups, *spec.peerPortGroups]


def _envelope(kind: str, name: str, labels: dict[str, str], annotations: dict[str, str], spec: dict) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind,
            "metadata": {"name": name, "labels": {**MANAGED_BY, **labels}, "annotations": annotations},
            "spec": spec}


# --------------------------------------------------------------------------- split
@dataclass
class NodeObjects:
    """What one node's spec publishes: its NodeRuleSet in both layouts, and the groups it names."""

    node: str
    pods_json: list[dict[str, Any]]  # the pods as the NodeRuleSet carries them
    groups: list[Group]  # the groups its rules name, in name order (peer groups, then peer-port groups)
    group_names: frozenset[str]
    own_size: int  # bytes of the node's rule data without groups
    group_sizes: list[int]  # bytes of each of its groups
    rules: int
    _ruleset: dict[bool, dict[str, Any]] = field(default_factory=dict)

    @property
    def inline_size(self) -> int:
        """Bytes of the node's rule data with its groups inline (the layout decision)."""
        return self.own_size + sum(self.group_sizes)

    def ruleset(self, inline: bool) -> dict[str, Any]:
        """The NodeRuleSet object, with its groups inline or only named by its rules."""
        built = self._ruleset.get(inline)
        if built is None:
            spec = {"nodeName": self.node, "pods": self.pods_json,
                    "peerGroups": [g.model_dump(mode="json") for g in self.groups if isinstance(g, PeerGroup)]
                    if inline else [],
                    "peerPortGroups": [g.model_dump(mode="json") for g in self.groups if isinstance(g, PeerPortGroup)]
                    if inline else []}
            built = self._ruleset[inline] = _envelope(
                KIND, self.node, {}, {PODS_ANNOTATION: str(len(self.pods_json)), RULES_ANNOTATION: str(self.rules),
                                      HASH_ANNOTATION: ruleset_hash(spec)}, spec)
        return built


@dataclass
class Splitter:
    """The layout with memory: a group or pod the compiler hands over again (the same object) is
    not serialised or hashed again, so a pod event costs what it touches, not the cluster."""

    bounds: Bounds = DEFAULT_BOUNDS
    # group name -> (the group model seen last, its JSON size, its slice objects once built)
    _groups: dict[str, list[Any]] = field(default_factory=dict)
    # node -> {pod key: (PolicedPod, its JSON, its compact size with a comma)}
    _pods: dict[str, dict[str, tuple[Any, dict[str, Any], int]]] = field(default_factory=dict)
    # node -> (the pods list and groups lists split last, what they gave)
    _last: dict[str, tuple[list, list, list, NodeObjects]] = field(default_factory=dict)
    _member_keys: dict[str, int] = field(default_factory=dict)

    def _key(self, text: str) -> int:
        found = self._member_keys.get(text)
        if found is None:
            if len(self._member_keys) > 1_000_000:
                self._member_keys.clear()
            found = self._member_keys[text] = member_hash(text)
        return found

    # ------------------------------------------------------------------ groups
    def _group_entry(self, group: Group) -> list[Any]:
        entry = self._groups.get(group.name)
        if entry is None or not (entry[0] is group or entry[0] == group):
            entry = self._groups[group.name] = [group, len(_compact(group.model_dump(mode="json"))), None]
        entry[0] = group  # the newest equal object: identity checks hit next time
        return entry

    def group_size(self, group: Group) -> int:
        return self._group_entry(group)[1]

    def group_objects(self, group: Group) -> list[dict[str, Any]]:
        """The PeerGroupSlices holding the group."""
        entry = self._group_entry(group)
        if entry[2] is None:
            entry[2] = self._split_group(group)
        return entry[2]

    def forget_group(self, name: str) -> None:
        self._groups.pop(name, None)

    def _split_group(self, group: Group) -> list[dict[str, Any]]:
        if isinstance(group, PeerGroup):
            members: list = list(group.cidrs)
            keys = [self._key(c) for c in members]
            sizes = [len(c) + 3 for c in members]  # quotes and comma
            field_name, list_name = "peerGroup", "cidrs"
        else:
            members = [e.model_dump(mode="json") for e in group.entries]
            keys = [self._key(f"{e['address']} {e['protocol']} {e['port']}") for e in members]
            sizes = [len(_compact(e)) + 1 for e in members]
            field_name, list_name = "peerPortGroup", "entries"
        out = []
        for prefix, indexes in partition(keys, sizes, self.bounds.group_slice_bytes):
            spec = {"prefix": prefix, field_name: {"name": group.name, "selector": group.selector,
                                                   list_name: [members[i] for i in indexes]}}
            out.append(_envelope(GROUP_SLICE_KIND, group_slice_name(group.name, prefix), {GROUP_LABEL: group.name},
                                 {HASH_ANNOTATION: slice_hash(spec)}, spec))
        return out

    # ------------------------------------------------------------------ nodes
    def node_objects(self, spec: NodeRuleSetSpec) -> NodeObjects:
        node = spec.nodeName
        last = self._last.get(node)
        if last is not None and last[0] is spec.pods and last[1] is spec.peerGroups and last[2] is spec.peerPortGroups:
            return last[3]
        groups = [*spec.peerGroups, *spec.peerPortGroups]
        if last is not None and last[0] is spec.pods:
            # The very same pods (the compiler hands its list over again when only group members
            # moved, which is most events for most nodes): only the groups are new.
            before = last[3]
            sizes = [size if old is group else self.group_size(group)
                     for old, group, size in zip(before.groups, groups, before.group_sizes)]
            objects = NodeObjects(node, before.pods_json, groups, before.group_names, before.own_size, sizes, before.rules)
            if False in before._ruleset:  # without its groups the NodeRuleSet did not change
                objects._ruleset[False] = before._ruleset[False]
        else:
            known = self._pods.get(node, {})
            entries: dict[str, tuple[Any, dict[str, Any], int]] = {}
            for pod in spec.pods:
                old = known.get(pod.key)
                if old is None or old[0] is not pod:
                    dumped = pod.model_dump(mode="json", exclude_none=True)
                    old = (pod, dumped, len(_compact(dumped)) + 1)
                entries[pod.key] = old
            self._pods[node] = entries
            # The size of the node's own part as compact JSON, from its pods' (measured once each).
            own = len(_compact({"nodeName": node, "pods": [], "peerGroups": [], "peerPortGroups": []})) \
                + sum(e[2] for e in entries.values()) - (1 if entries else 0)
            objects = NodeObjects(node, [e[1] for e in entries.values()], groups, frozenset(g.name for g in groups), own,
                                  [self.group_size(g) for g in groups], sum(len(p.all_rules()) for p in spec.pods))
        self._last[node] = (spec.pods, spec.peerGroups, spec.peerPortGroups, objects)
        return objects

    def inline_size(self, node: str) -> int:
        """The node's inline size as last laid out (0 for a node not laid out)."""
        last = self._last.get(node)
        return last[3].inline_size if last is not None else 0

    def forget_node(self, node: str) -> None:
        self._pods.pop(node, None)
        self._last.pop(node, None)


def groups_inline(total: int, bounds: Bounds = DEFAULT_BOUNDS) -> bool:
    """The layout of the whole cluster from the sum of its nodes' inline sizes."""
    return total <= bounds.inline_groups_bytes


def split(specs: Iterable[NodeRuleSetSpec], bounds: Bounds = DEFAULT_BOUNDS,
          nodes: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The API objects that carry these complete specs (every node of the cluster: the layout is
    decided over all of them), in the order the controller writes them: the slices of every
    group that lives in slices, then the NodeRuleSets. `nodes` keeps only those nodes' objects
    (and the slices of the groups they name). Raises ValueError for a spec whose groups are not
    exactly those its rules name, or a group that differs between nodes."""
    splitter = Splitter(bounds)
    all_objects, groups = [], {}
    for spec in specs:
        referenced_groups(spec)
        objects = splitter.node_objects(spec)
        all_objects.append(objects)
        for group in objects.groups:
            other = groups.setdefault(group.name, group)
            if other != group:
                raise ValueError(f"peer group {group.name} differs between nodes")
    inline = groups_inline(sum(o.inline_size for o in all_objects), bounds)
    wanted = set(nodes) if nodes is not None else None
    shown = [o for o in all_objects if wanted is None or o.node in wanted]
    out: list[dict[str, Any]] = []
    if not inline:
        for name in sorted(set().union(*(o.group_names for o in shown)) if shown else ()):
            out += splitter.group_objects(groups[name])
    out += [o.ruleset(inline) for o in shown]
    return out


def _pod_identity(pod: Mapping[str, Any]) -> tuple:
    return pod.get("namespace"), pod.get("name")


def ruleset_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSON Patch (RFC 6902) operations turning NodeRuleSet spec `old` into `new`: pods added,
    removed or replaced one by one, other fields replaced whole. A pod event on a node of 110
    pods then writes one pod (~0.5 KiB), not the node's whole rule set (~50 KiB)."""
    ops: list[dict[str, Any]] = []
    for name in sorted(set(old) | set(new)):
        if name == "pods" or old.get(name) == new.get(name):
            continue
        ops.append({"op": "replace" if name in old else "add", "path": f"/spec/{name}", "value": new[name]}
                   if name in new else {"op": "remove", "path": f"/spec/{name}"})
    before, after = list(old.get("pods") or []), list(new.get("pods") or [])
    if "pods" not in old or "pods" not in new:
        if before != after or ("pods" in old) != ("pods" in new):
            ops.append({"op": "add", "path": "/spec/pods", "value": after})
        return ops
    matcher = difflib.SequenceMatcher(a=[_pod_identity(p) for p in before], b=[_pod_identity(p) for p in after],
                                      autojunk=False)
    def touching(i: int, op: dict[str, Any]) -> list[dict[str, Any]]:
        # The pod at i must be the one meant: an object edited behind the writer's back fails
        # the patch instead of taking a change meant for another pod.
        return [{"op": "test", "path": f"/spec/pods/{i}/namespace", "value": before[i].get("namespace")},
                {"op": "test", "path": f"/spec/pods/{i}/name", "value": before[i].get("name")}, op]

    # From the end backwards: an operation never moves what the ones before it address.
    for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
        if tag == "equal":
            for k in range(i2 - i1):
                if before[i1 + k] != after[j1 + k]:
                    ops += touching(i1 + k, {"op": "replace", "path": f"/spec/pods/{i1 + k}", "value": after[j1 + k]})
            continue
        for i in range(i2 - 1, i1 - 1, -1):
            ops += touching(i, {"op": "remove", "path": f"/spec/pods/{i}"})
        ops += [{"op": "add", "path": f"/spec/pods/{i1 + k}", "value": after[j1 + k]} for k in range(j2 - j1)]
    return ops


# --------------------------------------------------------------------------- assemble
def _merged(lists: list[list], key) -> list:
    if len(lists) == 1:
        return list(lists[0])
    return list(heapq.merge(*lists, key=key))


def assemble_group(name: str, slices: Iterable[PeerGroupSliceSpec]) -> Group:
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


def assemble(ruleset: NodeRuleSetSpec, group_of: Callable[[str], Group | None]) -> NodeRuleSetSpec:
    """The complete spec of a node from its NodeRuleSet's spec and the groups held in slices
    (`group_of(name)`: the group, None if no slice holds it, or Incomplete if they are not one
    whole): every group its rules name, inline in the spec or else from `group_of`. Incomplete
    names what is missing."""
    inline: dict[str, Group] = {g.name: g for g in (*ruleset.peerGroups, *ruleset.peerPortGroups)}
    named, named_ports = named_groups(ruleset)
    picked: list[list] = []
    for names, kind in ((named, PeerGroup), (named_ports, PeerPortGroup)):
        out = []
        for name in names:
            group = inline.get(name)
            if group is None:
                group = group_of(name)
            if group is None:
                raise Incomplete(f"peer group {name} is missing (neither inline in NodeRuleSet "
                                 f"{ruleset.nodeName} nor a complete set of PeerGroupSlices)")
            if not isinstance(group, kind):
                raise Incomplete(f"{name} is a {'peer-port group' if kind is PeerGroup else 'peer group'} "
                                 f"where a {'peer group' if kind is PeerGroup else 'peer-port group'} is named")
            out.append(group)
        picked.append(out)
    if [g.name for g in ruleset.peerGroups] == named and [g.name for g in ruleset.peerPortGroups] == named_ports:
        return ruleset  # complete as it is
    return NodeRuleSetSpec.model_construct(nodeName=ruleset.nodeName, pods=ruleset.pods, peerGroups=picked[0],
                                           peerPortGroups=picked[1])


def _items(objects: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for obj in objects:
        if obj.get("kind") == "List":
            yield from _items(obj.get("items") or [])
        else:
            yield obj


def assemble_from_objects(objects: Iterable[Mapping[str, Any]]) -> dict[str, NodeRuleSetSpec]:
    """Every node's complete spec from API objects (NodeRuleSets and PeerGroupSlices, e.g.
    `netfence compile -o json` or a listing of the API). Raises Incomplete (a ValueError) for a
    node whose groups are missing, or pydantic's ValidationError."""
    rulesets, group_slices = {}, {}
    for obj in _items(objects):
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind == KIND:
            rulesets[obj["metadata"]["name"]] = spec
        elif kind == GROUP_SLICE_KIND:
            parsed = PeerGroupSliceSpec.model_validate(spec)
            group_slices.setdefault(parsed.group.name, []).append(parsed)

    def group_of(name: str) -> Group | None:
        return assemble_group(name, group_slices[name]) if name in group_slices else None

    return {node: assemble(NodeRuleSetSpec.model_validate(spec), group_of) for node, spec in sorted(rulesets.items())}


def canonical_size(obj: Mapping[str, Any]) -> int:
    """Bytes of an object as compact JSON (what the API stores, give or take its metadata)."""
    return len(canonical_json(obj))
