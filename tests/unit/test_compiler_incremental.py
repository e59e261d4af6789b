"""The incremental Compiler must always equal a compile from scratch of the same objects."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfence_operator.compile import ClusterObjects, Compiler, parse_object

NAMESPACES = ["a", "b", "c"]
LABEL_VALUES = ["x", "y"]
NODES = ["n1", "n2"]


def dump(specs):
    return {node: spec.model_dump(mode="json") for node, spec in specs.items()}


labels = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(LABEL_VALUES), max_size=2)
selector = st.one_of(
    st.just({}),
    labels.map(lambda l: {"matchLabels": l}),
    st.tuples(st.sampled_from(["app", "tier"]), st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"])).map(
        lambda t: {"matchExpressions": [{"key": t[0], "operator": t[1],
                                         **({"values": ["x"]} if t[1] in ("In", "NotIn") else {})}]}
    ),
)
peer = st.one_of(
    selector.map(lambda s: {"podSelector": s}),
    selector.map(lambda s: {"namespaceSelector": s}),
    st.tuples(selector, selector).map(lambda t: {"podSelector": t[0], "namespaceSelector": t[1]}),
    st.sampled_from([{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.1.0/24"]}}, {"ipBlock": {"cidr": "10.0.2.5/32"}}]),
)
port = st.one_of(st.just({"port": 80}), st.just({"port": "web"}), st.just({"port": "dns", "protocol": "UDP"}),
                 st.just({"port": 1000, "endPort": 2000}), st.just({"protocol": "SCTP"}))
rule = st.fixed_dictionaries({}, optional={"peers": st.lists(peer, max_size=2), "ports": st.lists(port, max_size=2)})


def as_rule(r, direction):
    out = {}
    if "peers" in r:
        out["from" if direction == "ingress" else "to"] = r["peers"]
    if "ports" in r:
        out["ports"] = r["ports"]
    return out


policy = st.builds(
    lambda ns, name, sel, types, ing, eg: {
        "kind": "NetworkPolicy", "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": sel, **({"policyTypes": types} if types else {}),
                 **({"ingress": [as_rule(r, "ingress") for r in ing]} if ing is not None else {}),
                 **({"egress": [as_rule(r, "egress") for r in eg]} if eg is not None else {})},
    },
    st.sampled_from(NAMESPACES), st.sampled_from(["p1", "p2", "p3"]), selector,
    st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
    st.none() | st.lists(rule, max_size=2), st.none() | st.lists(rule, max_size=2),
)
pod = st.builds(
    lambda ns, name, node, l, ip, web, host: {
        "kind": "Pod", "metadata": {"namespace": ns, "name": name, "labels": l},
        "spec": {"nodeName": node, "hostNetwork": host, "containers": [{"name": "c", "ports": [
            {"name": "web", "containerPort": web}, {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        "status": {"podIP": f"10.0.{ip // 250}.{ip % 250 + 1}"},
    },
    st.sampled_from(NAMESPACES), st.sampled_from(["p", "q", "r"]), st.sampled_from(NODES), labels,
    st.integers(0, 600), st.sampled_from([8080, 9090]), st.booleans(),
)
node = st.builds(lambda name, cidr, l, ip: {"kind": "Node", "metadata": {"name": name, "labels": l},
                                            "spec": {"podCIDR": cidr},
                                            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}},
                 st.sampled_from(NODES), st.sampled_from(["10.0.0.0/16", "10.9.0.0/16"]), labels,
                 st.sampled_from(["172.18.0.2", "172.18.0.3"]))
cnp_peer = st.one_of(
    selector.map(lambda s: {"namespaces": s}),
    st.tuples(selector, selector).map(lambda t: {"pods": {"namespaceSelector": t[0], "podSelector": t[1]}}),
    st.just({"networks": ["10.0.0.0/8", "172.18.0.0/16"]}),
    selector.map(lambda s: {"nodes": s}),
)
cnp_protocols = st.lists(st.one_of(st.just({"tcp": {"destinationPort": {"number": 80}}}),
                                   st.just({"udp": {"destinationPort": {"range": {"start": 50, "end": 60}}}}),
                                   st.just({"destinationNamedPort": "web"})), min_size=1, max_size=2)


def cnp_rule(direction):
    def build(action, peers, protocols):
        if direction == "ingress":
            peers = [p for p in peers if "namespaces" in p or "pods" in p] or [{"namespaces": {}}]
        elif protocols and any("destinationNamedPort" in p for p in protocols):
            peers = [p for p in peers if "namespaces" in p or "pods" in p] or [{"namespaces": {}}]
        rule = {"action": action, "from" if direction == "ingress" else "to": peers}
        if protocols:
            rule["protocols"] = protocols
        return rule
    return st.builds(build, st.sampled_from(["Accept", "Deny", "Pass"]), st.lists(cnp_peer, min_size=1, max_size=2),
                     st.none() | cnp_protocols)


cluster_policy = st.builds(
    lambda name, tier, priority, subject, ing, eg: {
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
        "spec": {"tier": tier, "priority": priority, "subject": subject,
                 **({"ingress": ing} if ing else {}), **({"egress": eg} if eg else {})}},
    st.sampled_from(["c1", "c2"]), st.sampled_from(["Admin", "Baseline"]), st.sampled_from([1, 5]),
    st.one_of(selector.map(lambda s: {"namespaces": s}),
              st.tuples(selector, selector).map(lambda t: {"pods": {"namespaceSelector": t[0], "podSelector": t[1]}})),
    st.lists(cnp_rule("ingress"), max_size=2), st.lists(cnp_rule("egress"), max_size=2),
)
namespace = st.builds(lambda name, l: {"kind": "Namespace", "metadata": {"name": name, "labels": l}},
                      st.sampled_from(NAMESPACES), labels)
operation = st.one_of(
    pod.map(lambda d: ("upsert", d)), policy.map(lambda d: ("upsert", d)), namespace.map(lambda d: ("upsert", d)),
    node.map(lambda d: ("upsert", d)), cluster_policy.map(lambda d: ("upsert", d)),
    st.sampled_from(["c1", "c2"]).map(lambda n: ("delete", ("ClusterNetworkPolicy", None, n))),
    st.tuples(st.sampled_from(["Pod", "NetworkPolicy"]), st.sampled_from(NAMESPACES),
              st.sampled_from(["p", "q", "r", "p1", "p2", "p3"])).map(lambda t: ("delete", t)),
    st.sampled_from(NAMESPACES).map(lambda n: ("delete", ("Namespace", None, n))),
    st.sampled_from(NODES).map(lambda n: ("delete", ("Node", None, n))),
)


def apply(compiler: Compiler, objects: ClusterObjects, op: str, arg) -> set[str]:
    """One operation on the incremental compiler and on the objects a fresh compile reads."""
    if op == "upsert":
        obj = parse_object(arg)
        objects.add(obj)
        return compiler.upsert(obj)
    kind, ns, name = arg
    key = name if kind in ("Namespace", "Node", "ClusterNetworkPolicy") else f"{ns}/{name}"
    store = {"Pod": objects.pods, "NetworkPolicy": objects.policies, "Namespace": objects.namespaces,
             "Node": objects.nodes, "ClusterNetworkPolicy": objects.cluster_policies}[kind]
    store.pop(key, None)
    return compiler.delete(kind, key)


@settings(max_examples=int(os.environ.get("NETFENCE_HYPOTHESIS_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=25))
def test_incremental_equals_fresh_compile(operations):
    compiler = Compiler()
    objects = ClusterObjects()
    for op, arg in operations:
        before = dump(compiler.all_specs())
        affected = apply(compiler, objects, op, arg)
        after = dump(compiler.all_specs())
        fresh = Compiler(objects)
        assert after == dump(fresh.all_specs())
        assert compiler.problems() == fresh.problems()
        # Every node whose spec changed was reported, so the publisher patches it.
        assert {n for n in after if after[n] != before.get(n)} <= affected


# web on n1, db on n2, and a policy letting web reach db: n2's rules name web's group.
WEB_DB = [
    {"kind": "Pod", "metadata": {"namespace": "a", "name": "web", "labels": {"app": "web"}},
     "spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.0.1"}},
    {"kind": "Pod", "metadata": {"namespace": "a", "name": "db", "labels": {"app": "db"}},
     "spec": {"nodeName": "n2"}, "status": {"podIP": "10.0.0.2"}},
    {"kind": "NetworkPolicy", "metadata": {"namespace": "a", "name": "db"},
     "spec": {"podSelector": {"matchLabels": {"app": "db"}},
              "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}},
]


def test_upsert_reports_exactly_the_nodes_whose_spec_changed():
    base = ClusterObjects()
    for d in WEB_DB + [{"kind": "Pod", "metadata": {"namespace": "a", "name": "other", "labels": {"app": "other"}},
                        "spec": {"nodeName": "n3"}, "status": {"podIP": "10.0.0.3"}}]:
        base.add(parse_object(d))
    compiler = Compiler(base)
    before = compiler.all_specs()
    # web moves to a new IP: only n1 (its own node) and n2 (whose rules name web's group) change.
    moved = parse_object({"kind": "Pod", "metadata": {"namespace": "a", "name": "web", "labels": {"app": "web"}},
                          "spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.0.9"}})
    affected = compiler.upsert(moved)
    after = compiler.all_specs()
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"n1", "n2"}
    assert affected >= changed and "n3" not in affected
    assert after["n2"].peerGroups[0].cidrs == ["10.0.0.9/32"]


def _cnp(subject: dict, egress_to: dict | None = None) -> dict:
    spec = {"tier": "Admin", "priority": 1, "subject": subject,
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}
    if egress_to is not None:
        spec["egress"] = [{"action": "Deny", "to": [egress_to]}]
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "c1"}, "spec": spec}


def _step(compiler: Compiler, objects: ClusterObjects, doc: dict) -> set[str]:
    obj = parse_object(doc)
    objects.add(obj)
    affected = compiler.upsert(obj)
    assert dump(compiler.all_specs()) == dump(Compiler(objects).all_specs())
    return affected


def test_cluster_network_policy_subjects_follow_namespace_pod_and_node_labels():
    """Each relabel changes what a ClusterNetworkPolicy selects: the incremental compiler must
    notice (a subject by namespace labels, by pod labels; a `nodes` peer by node labels)."""
    compiler, objects = Compiler(), ClusterObjects()
    pod_doc = {"kind": "Pod", "metadata": {"namespace": "a", "name": "p", "labels": {"app": "x"}},
               "spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.0.1"}}
    node_doc = {"kind": "Node", "metadata": {"name": "n1", "labels": {"zone": "x"}},
                "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}
    for doc in ({"kind": "Namespace", "metadata": {"name": "a", "labels": {"team": "x"}}}, pod_doc, node_doc,
                _cnp({"namespaces": {"matchLabels": {"team": "x"}}}, {"nodes": {"matchLabels": {"zone": "x"}}})):
        _step(compiler, objects, doc)
    pod_spec = compiler.all_specs()["n1"].pods[0]
    assert pod_spec.adminIngress and pod_spec.adminEgress
    assert "n1" in _step(compiler, objects, {"kind": "Namespace", "metadata": {"name": "a", "labels": {"team": "y"}}})
    assert not compiler.all_specs()["n1"].pods[0].adminIngress
    _step(compiler, objects, {"kind": "Namespace", "metadata": {"name": "a", "labels": {"team": "x"}}})
    _step(compiler, objects, _cnp({"pods": {"podSelector": {"matchLabels": {"app": "x"}}}},
                                  {"nodes": {"matchLabels": {"zone": "x"}}}))
    assert compiler.all_specs()["n1"].pods[0].adminIngress
    assert "n1" in _step(compiler, objects, {**pod_doc, "metadata": {**pod_doc["metadata"], "labels": {"app": "y"}}})
    assert not compiler.all_specs()["n1"].pods[0].adminIngress
    _step(compiler, objects, pod_doc)
    (group,) = [g for g in compiler.all_specs()["n1"].peerGroups if "nodes" in g.selector]
    assert group.cidrs == ["172.18.0.2/32"]
    assert "n1" in _step(compiler, objects, {**node_doc, "metadata": {"name": "n1", "labels": {"zone": "y"}}})
    (group,) = [g for g in compiler.all_specs()["n1"].peerGroups if "nodes" in g.selector]
    assert group.cidrs == []


def _groups(compiler: Compiler) -> dict[str, dict]:
    return {name: compiler.group(name).model_dump(mode="json") for name in compiler.group_names()}


@settings(max_examples=int(os.environ.get("NETFENCE_HYPOTHESIS_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=25))
def test_changed_groups_name_every_group_whose_content_changed(operations):
    """take_changed_groups() names every group whose content differs from the last time it was
    taken (created and removed ones too); group() equals a compile from scratch and is the very
    object the node specs hold."""
    compiler = Compiler()
    objects = ClusterObjects()
    known: dict[str, dict] = {}
    for i, (op, arg) in enumerate(operations):
        apply(compiler, objects, op, arg)
        if i % 2:  # node specs built in between, or not
            compiler.all_specs()
        changed = compiler.take_changed_groups()
        now = _groups(compiler)
        assert {n for n in known.keys() | now.keys() if known.get(n) != now.get(n)} <= changed
        fresh = Compiler(objects)
        assert now == _groups(fresh)
        for spec in compiler.all_specs().values():
            for group in spec.peerGroups + spec.peerPortGroups:
                assert compiler.group(group.name) is group
        assert compiler.take_changed_groups() == set()  # building specs changes no group
        known = now


def test_group_member_change_keeps_the_pods_list_of_nodes_that_only_name_the_group():
    docs = WEB_DB
    compiler = Compiler()
    for d in docs:
        compiler.upsert(parse_object(d))
    n2 = compiler.node_spec("n2")
    (group,) = n2.peerGroups
    compiler.take_changed_groups()
    # A second web pod, on n1: the group of n2's rule gains a member; n2's own pods do not change.
    affected = compiler.upsert(parse_object({**docs[0], "metadata": {**docs[0]["metadata"], "name": "web2"},
                                             "status": {"podIP": "10.0.0.3"}}))
    assert affected == {"n1", "n2"}  # as before: the nodes whose specs changed
    assert compiler.take_changed_groups() == {group.name}
    after = compiler.node_spec("n2")
    assert after.pods is n2.pods  # the same list object: the publisher's and agent's fast path
    assert after.peerGroups[0].cidrs == ["10.0.0.1/32", "10.0.0.3/32"] and group.cidrs == ["10.0.0.1/32"]
    assert compiler.group(group.name) is after.peerGroups[0]
    # The pod on n2 itself changes: a new pods list, the old one untouched.
    compiler.upsert(parse_object({**docs[1], "status": {"podIP": "10.0.0.9"}}))
    again = compiler.node_spec("n2")
    assert again.pods is not n2.pods and again.pods[0].ips == ["10.0.0.9"] and n2.pods[0].ips == ["10.0.0.2"]
    assert compiler.take_changed_groups() == set()  # db is in no group
