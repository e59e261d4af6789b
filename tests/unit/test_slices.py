"""The wire layer between compiler and render: peer groups inline or in bounded slices, assembled back exactly."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfence_api import AllowRule, Isolation, NodeRuleSetSpec, PeerGroup, PeerPort, PeerPortGroup, PolicedPod, PortRange
from netfence_api.slices import (
    GROUP_SLICE_KIND,
    KIND,
    Bounds,
    Incomplete,
    Splitter,
    groups_inline,
    assemble_from_objects,
    cidr_key,
    exact_partition,
    member_hash,
    split,
)

SMALL = Bounds(group_slice_bytes=120, inline_groups_bytes=0)  # groups always in slices, split a lot
INLINE = Bounds(inline_groups_bytes=1 << 30)  # groups always inline

# --------------------------------------------------------------------------- specs in the compiler's canonical order
v4 = st.tuples(st.integers(0, 3), st.integers(0, 255)).map(lambda t: f"10.{t[0]}.0.{t[1]}/32")
v6 = st.integers(0, 300).map(lambda i: f"fd00::{i:x}/128")
cidr_lists = st.sets(v4 | v6, max_size=40).map(lambda s: sorted(s, key=cidr_key))
entry = st.builds(lambda a, proto, port: PeerPort(address=a.split("/")[0], protocol=proto, port=port),
                  v4 | v6, st.sampled_from(["TCP", "UDP"]), st.integers(1, 3))


def peer_groups(count: int):
    return st.lists(cidr_lists, min_size=count, max_size=count).map(
        lambda lists: [PeerGroup(name=f"pg-{i:012x}", selector=f"sel {i}", cidrs=c) for i, c in enumerate(lists)])


def peer_port_groups(count: int):
    return st.lists(st.sets(entry, max_size=20), min_size=count, max_size=count).map(
        lambda sets: [PeerPortGroup(name=f"pp-{i:012x}", selector=f"named {i}",
                                    entries=sorted(s, key=lambda e: (cidr_key(e.address), e.protocol, e.port)))
                      for i, s in enumerate(sets)])


def rules(groups: int, port_groups: int):
    plain = st.builds(lambda g, ports: AllowRule(origin=["ns/p ingress[0]"], peers=g, ports=ports),
                      st.none() | st.sampled_from([f"pg-{i:012x}" for i in range(groups)]) if groups else st.none(),
                      st.none() | st.just([PortRange(port=80)]))
    options = [plain]
    if port_groups:
        options.append(st.sampled_from([f"pp-{i:012x}" for i in range(port_groups)]).map(
            lambda g: AllowRule(origin=["ns/p egress[0]"], peerPorts=g)))
    return st.lists(st.one_of(*options), max_size=3)


@st.composite
def node_specs(draw, node: str = "n1", groups: list | None = None, port_groups: list | None = None):
    groups = draw(peer_groups(3)) if groups is None else groups
    port_groups = draw(peer_port_groups(2)) if port_groups is None else port_groups
    names = draw(st.sets(st.tuples(st.sampled_from(["a", "b", "a-b"]), st.integers(0, 30)), max_size=25))
    pods = []
    for i, (ns, n) in enumerate(sorted(names, key=lambda t: f"{t[0]}/pod-{t[1]}")):
        pods.append(PolicedPod(namespace=ns, name=f"pod-{n}", uid=f"u{n}", ips=[f"10.9.{i}.1"],
                               isolation=Isolation(ingress=True), ingressPolicies=[f"{ns}/p"],
                               ingress=draw(rules(len(groups), len(port_groups))),
                               egress=draw(rules(len(groups), len(port_groups)))))
    used = {r.peers for p in pods for r in p.ingress + p.egress}
    used_ports = {r.peerPorts for p in pods for r in p.ingress + p.egress}
    return NodeRuleSetSpec(nodeName=node, pods=pods, peerGroups=[g for g in groups if g.name in used],
                           peerPortGroups=[g for g in port_groups if g.name in used_ports])


@st.composite
def clusters(draw):
    groups, port_groups = draw(peer_groups(3)), draw(peer_port_groups(2))
    return [draw(node_specs(f"n{i}", groups, port_groups)) for i in range(draw(st.integers(1, 3)))]


def wire(objects: list[dict]) -> list[dict]:
    return json.loads(json.dumps(objects))  # as the API would hand them out


def by_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def on_path(objects: dict, keys: set, member: str) -> bool:
    """Every slice in `keys` lies on the trie path of `member` or hangs right off it: a change
    rewrites the member's slice, or splits (merges) it, and nothing else."""
    bits = format(member_hash(member), "064b")
    return all(bits.startswith(objects[k]["spec"]["prefix"][:-1]) for k in keys)


def member_bytes(obj: dict) -> tuple[int, int]:
    """(members, bytes of their JSON) of a group slice."""
    group = obj["spec"].get("peerGroup") or obj["spec"].get("peerPortGroup")
    items = group.get("cidrs", group.get("entries"))
    return len(items), sum(len(json.dumps(i, separators=(",", ":"))) + (1 if isinstance(i, str) else 1) for i in items)


def pods_of(objects: list[dict]) -> dict[str, list]:
    return {o["metadata"]["name"]: o["spec"]["pods"] for o in objects if o["kind"] == KIND}


# --------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.sampled_from([SMALL, INLINE, Bounds()]))
def test_assemble_of_split_is_the_compiled_spec(specs, bounds):
    objects = wire(split(specs, bounds))
    back = assemble_from_objects(objects)
    assert back == {s.nodeName: s for s in specs}
    assert {n: s.content_hash() for n, s in back.items()} == {s.nodeName: s.content_hash() for s in specs}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.sampled_from([SMALL, INLINE, Bounds()]))
def test_every_rule_set_holds_its_nodes_pods_and_rules_inline(specs, bounds):
    """DESIGN §5: the NodeRuleSet spec is the node's pods and their allow rules, whatever the layout."""
    objects = wire(split(specs, bounds))
    assert pods_of(objects) == {s.nodeName: [p.model_dump(mode="json", exclude_none=True) for p in s.pods]
                                for s in specs}
    assert {o["metadata"]["name"] for o in objects if o["kind"] == KIND} == {s.nodeName for s in specs}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_the_layout_is_one_decision_for_the_cluster_from_its_size(specs):
    default = Bounds()
    total = sum(Splitter(default).node_objects(s).inline_size for s in specs)
    inline = groups_inline(total, default)
    objects = split(specs, default)
    assert inline == (not any(o["kind"] == GROUP_SLICE_KIND for o in objects)) or not any(s.peerGroups or s.peerPortGroups for s in specs)
    for obj in objects:
        if obj["kind"] == KIND:
            spec = next(s for s in specs if s.nodeName == obj["metadata"]["name"])
            carried = [g["name"] for g in obj["spec"]["peerGroups"] + obj["spec"]["peerPortGroups"]]
            assert carried == ([g.name for g in (*spec.peerGroups, *spec.peerPortGroups)] if inline else [])


def test_a_small_cluster_has_its_groups_inline_and_a_large_one_in_slices():
    (small,) = sample()
    objects = split([small])
    assert [o["kind"] for o in objects] == [KIND]
    assert [g["name"] for g in objects[0]["spec"]["peerGroups"]] == ["pg-000000000001"]
    # The same rules on many nodes: past 64 KiB of rule data the groups move out, once for all.
    many = [small.model_copy(update={"nodeName": f"n{i}"}) for i in range(40)]
    objects = split(many)
    assert {o["kind"] for o in objects} == {KIND, GROUP_SLICE_KIND}
    assert sum(o["kind"] == GROUP_SLICE_KIND for o in objects) == 1  # shared by the 40 nodes
    assert all(o["spec"]["peerGroups"] == [] for o in objects if o["kind"] == KIND)
    assert assemble_from_objects(wire(objects)) == {s.nodeName: s for s in many}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_every_slice_is_within_its_bound_unless_it_holds_one_member(specs):
    for obj in split(specs, SMALL):
        if obj["kind"] == KIND:
            continue
        count, size = member_bytes(obj)
        assert size <= SMALL.group_slice_bytes or count == 1, (obj["metadata"]["name"], count, size)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.data())
def test_one_member_more_changes_few_slices_and_no_rule_set(specs, data):
    """A pod joining a group rewrites one slice of it (or splits one into two), nothing else."""
    before = by_name(split(specs, SMALL))
    groups = {g.name: g for s in specs for g in s.peerGroups}
    if not groups:
        return
    name = data.draw(st.sampled_from(sorted(groups)))
    extra = data.draw(st.integers(0, 255).map(lambda i: f"10.77.0.{i}/32"))
    group = groups[name]
    if extra in group.cidrs:
        return
    grown = group.model_copy(update={"cidrs": sorted([*group.cidrs, extra], key=cidr_key)})
    changed_specs = [s.model_copy(update={"peerGroups": [grown if g.name == name else g for g in s.peerGroups]})
                     for s in specs]
    after = by_name(split(changed_specs, SMALL))
    written = {k for k, o in after.items() if before.get(k) != o}
    deleted = set(before) - set(after)
    assert all(k[0] == GROUP_SLICE_KIND and k[1].startswith(name) for k in written | deleted)
    assert on_path(after, written, extra) and on_path(before, deleted, extra)
    assert len(deleted) <= 1, deleted


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_one_pod_more_changes_only_its_nodes_rule_set(specs):
    before = by_name(split(specs, SMALL))
    new = PolicedPod(namespace="zz", name="newcomer", ips=["10.66.0.1"])
    grown = [specs[0].model_copy(update={"pods": [*specs[0].pods, new]}), *specs[1:]]
    after = by_name(split(grown, SMALL))
    assert {k for k, o in after.items() if before.get(k) != o} == {(KIND, specs[0].nodeName)}
    assert set(before) == set(after)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(clusters(), min_size=2, max_size=4), st.sampled_from([SMALL, INLINE, Bounds()]))
def test_a_splitter_with_memory_gives_what_a_fresh_split_gives(rounds, bounds):
    splitter = Splitter(bounds)
    for specs in rounds:
        planned = [splitter.node_objects(spec) for spec in specs]
        inline = groups_inline(sum(o.inline_size for o in planned), bounds)
        remembered = [o.ruleset(inline) for o in planned]
        if not inline:
            remembered += [s for o in planned for g in o.groups for s in splitter.group_objects(g)]
        assert by_name(remembered) == by_name(split(specs, bounds))


def test_split_of_some_nodes_keeps_the_clusters_layout_and_their_groups_only():
    (one,) = sample()
    other_group = PeerGroup(name="pg-000000000002", selector="elsewhere", cidrs=["10.3.0.1/32"])
    other_pod = PolicedPod(namespace="b", name="x", ips=["10.4.0.1"], isolation=Isolation(ingress=True),
                           ingress=[AllowRule(origin=["b/x ingress[0]"], peers=other_group.name)])
    two = NodeRuleSetSpec(nodeName="n2", pods=[other_pod], peerGroups=[other_group])
    objects = split([one, two], SMALL, nodes=["n2"])
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        (GROUP_SLICE_KIND, "pg-000000000002.s"), (KIND, "n2")]


def test_exact_partition():
    assert exact_partition([""])
    assert exact_partition(["0", "10", "11"])
    assert not exact_partition(["0", "10"])  # 11 missing
    assert not exact_partition(["", "0", "1"])  # a split half way: parent and children
    assert not exact_partition([])


# --------------------------------------------------------------------------- incompleteness is named
def sample() -> list[NodeRuleSetSpec]:
    group = PeerGroup(name="pg-000000000001", selector="ns a pods{app=web}",
                      cidrs=sorted({f"10.1.{i // 250}.{i % 250}/32" for i in range(60)}, key=cidr_key))
    pods = [PolicedPod(namespace="a", name=f"db-{i:02d}", ips=[f"10.2.0.{i}"], isolation=Isolation(ingress=True),
                       ingress=[AllowRule(origin=["a/db ingress[0]"], peers=group.name, ports=[PortRange(port=5432)])])
            for i in range(20)]
    return [NodeRuleSetSpec(nodeName="n1", pods=pods, peerGroups=[group])]


def test_a_missing_group_slice_is_named():
    objects = wire(split(sample(), SMALL))
    victim = next(o for o in objects if o["kind"] == GROUP_SLICE_KIND)
    with pytest.raises(Incomplete, match="PeerGroupSlices of peer group pg-000000000001 do not cover it"):
        assemble_from_objects([o for o in objects if o is not victim])
    with pytest.raises(Incomplete, match="peer group pg-000000000001 is missing"):
        assemble_from_objects([o for o in objects if o["kind"] != GROUP_SLICE_KIND])


def test_an_overlapping_set_of_group_slices_is_not_a_group():
    """Half way through a split the parent slice and its children are both there."""
    objects = wire(split(sample(), SMALL))
    whole = wire(split(sample(), Bounds(inline_groups_bytes=0)))
    parent = next(o for o in whole if o["kind"] == GROUP_SLICE_KIND)
    assert parent["spec"]["prefix"] == ""
    with pytest.raises(Incomplete, match="do not cover it exactly once"):
        assemble_from_objects([*objects, parent])


def test_split_puts_referenced_objects_first():
    kinds = [o["kind"] for o in split(sample(), SMALL)]
    assert kinds == sorted(kinds, key=[GROUP_SLICE_KIND, KIND].index)


def test_split_refuses_a_spec_whose_groups_are_not_its_rules():
    (spec,) = sample()
    with pytest.raises(ValueError, match="not exactly those its rules name"):
        split([spec.model_copy(update={"peerGroups": []})])


@pytest.mark.parametrize("bounds", [SMALL, INLINE], ids=["slices", "inline"])
def test_cluster_network_policy_tier_rules_and_their_groups_travel(bounds):
    """Tier rules (Admin/Baseline) name peer groups NetworkPolicy rules may not: both layouts
    must carry those groups, and assemble give back the compiled spec exactly."""
    from pathlib import Path

    from netfence_cli import offline

    golden = Path(__file__).resolve().parent.parent / "golden"
    docs = offline.read_manifests([str(golden / "cluster.yaml"), str(golden / "cluster-network-policies.yaml")])
    specs = offline.OfflineCluster.build(offline.load_cluster(docs), rendered=False).specs
    tier_groups = {r.peers for s in specs.values() for p in s.pods
                   for r in (*(p.adminIngress or ()), *(p.adminEgress or ()), *(p.baselineIngress or ()),
                             *(p.baselineEgress or ())) if r.peers}
    np_groups = {r.peers for s in specs.values() for p in s.pods for r in (*p.ingress, *p.egress) if r.peers}
    assert tier_groups - np_groups, "the case must have groups only tier rules name"
    assert assemble_from_objects(wire(split(specs.values(), bounds))) == specs


# --------------------------------------------------------------------------- NodeRuleSet updates as JSON Patch
pod_dicts = st.lists(st.builds(
    lambda ns, n, ip, rules: {"namespace": ns, "name": f"pod-{n}", "ips": [f"10.0.0.{ip}"], "ingress": rules},
    st.sampled_from(["a", "b"]), st.integers(0, 12), st.integers(1, 4), st.lists(st.just({"origin": ["x"]}), max_size=2)),
    max_size=14).map(lambda pods: sorted({(p["namespace"], p["name"]): p for p in pods}.values(),
                                         key=lambda p: (p["namespace"], p["name"])))
spec_dicts = st.builds(lambda pods, groups: {"nodeName": "n1", "pods": pods, "peerGroups": groups, "peerPortGroups": []},
                       pod_dicts, st.lists(st.builds(dict, name=st.sampled_from(["pg-1", "pg-2"])), max_size=2))


@settings(max_examples=300, deadline=None)
@given(spec_dicts, spec_dicts)
def test_a_rule_set_patch_turns_the_old_spec_into_the_new(old, new):
    import jsonpatch

    from netfence_api.slices import ruleset_patch

    ops = ruleset_patch(old, new)
    assert jsonpatch.apply_patch({"spec": copy.deepcopy(old)}, ops)["spec"] == new
    if old == new:
        assert ops == []


def test_one_pod_changed_is_one_small_operation():
    from netfence_api.slices import ruleset_patch

    pods = [{"namespace": "a", "name": f"pod-{i:03d}", "ips": [f"10.0.{i // 250}.{i % 250}"]} for i in range(110)]
    born = [*pods[:50], {"namespace": "a", "name": "pod-050b", "ips": ["10.9.9.9"]}, *pods[50:]]
    assert ruleset_patch({"pods": pods}, {"pods": born}) == [{"op": "add", "path": "/spec/pods/50", "value": born[50]}]
    moved = [*pods[:7], {**pods[7], "ips": ["10.9.9.9"]}, *pods[8:]]
    guard = [{"op": "test", "path": "/spec/pods/7/namespace", "value": "a"},
             {"op": "test", "path": "/spec/pods/7/name", "value": "pod-007"}]
    assert ruleset_patch({"pods": pods}, {"pods": moved}) == [*guard, {"op": "replace", "path": "/spec/pods/7", "value": moved[7]}]
    assert ruleset_patch({"pods": pods}, {"pods": pods[:7] + pods[8:]}) == [*guard, {"op": "remove", "path": "/spec/pods/7"}]


def test_companions_name_each_node_with_its_hash_start_and_only_a_few():
    from netfence_api.crd import (COMPANIONS_ANNOTATION, COMPANIONS_MAX, companion_of, companions_of, companions_value,
                                  is_companion)

    h1, h2 = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    value = companions_value({"n2": h2, "n1": h1})
    assert value == f"n1={'ab' * 8} n2={'cd' * 8}"
    annotations = {COMPANIONS_ANNOTATION: value}
    assert is_companion(h1, companion_of(annotations, "n1")) and not is_companion(h2, companion_of(annotations, "n1"))
    assert companion_of(annotations, "n3") is None and companion_of({}, "n1") is None and companion_of(None, "n1") is None
    assert companions_of(annotations) == {"n1": "ab" * 8, "n2": "cd" * 8}
    assert companions_of({COMPANIONS_ANNOTATION: "a= =b c=1"}) == {"c": "1"}  # malformed pairs are no one
    assert companions_value({}) is None
    assert companions_value({f"n{i}": h1 for i in range(COMPANIONS_MAX + 1)}) is None  # a policy change: no one waits
