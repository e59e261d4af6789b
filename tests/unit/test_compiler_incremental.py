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
node = st.builds(lambda name, cidr: {"kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": cidr}},
                 st.sampled_from(NODES), st.sampled_from(["10.0.0.0/16", "10.9.0.0/16"]))
namespace = st.builds(lambda name, l: {"kind": "Namespace", "metadata": {"name": name, "labels": l}},
                      st.sampled_from(NAMESPACES), labels)
operation = st.one_of(
    pod.map(lambda d: ("upsert", d)), policy.map(lambda d: ("upsert", d)), namespace.map(lambda d: ("upsert", d)),
    node.map(lambda d: ("upsert", d)),
    st.tuples(st.sampled_from(["Pod", "NetworkPolicy"]), st.sampled_from(NAMESPACES),
              st.sampled_from(["p", "q", "r", "p1", "p2", "p3"])).map(lambda t: ("delete", t)),
    st.sampled_from(NAMESPACES).map(lambda n: ("delete", ("Namespace", None, n))),
    st.sampled_from(NODES).map(lambda n: ("delete", ("Node", None, n))),
)


@settings(max_examples=int(os.environ.get("NETFENCE_HYPOTHESIS_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=25))
def test_incremental_equals_fresh_compile(operations):
    compiler = Compiler()
    objects = ClusterObjects()
    for op, arg in operations:
        before = dump(compiler.all_specs())
        if op == "upsert":
            obj = parse_object(arg)
            affected = compiler.upsert(obj)
            objects.add(obj)
        else:
            kind, ns, name = arg
            key = name if kind in ("Namespace", "Node") else f"{ns}/{name}"
            affected = compiler.delete(kind, key)
            store = {"Pod": objects.pods, "NetworkPolicy": objects.policies, "Namespace": objects.namespaces,
                     "Node": objects.nodes}[kind]
            store.pop(key, None)
        after = dump(compiler.all_specs())
        fresh = Compiler(objects)
        assert after == dump(fresh.all_specs())
        assert compiler.problems() == fresh.problems()
        # Every node whose spec changed was reported, so the publisher patches it.
        assert {n for n in after if after[n] != before.get(n)} <= affected


def test_upsert_reports_exactly_the_nodes_whose_spec_changed():
    base = ClusterObjects()
    for d in [
        {"kind": "Pod", "metadata": {"namespace": "a", "name": "web", "labels": {"app": "web"}},
         "spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.0.1"}},
        {"kind": "Pod", "metadata": {"namespace": "a", "name": "db", "labels": {"app": "db"}},
         "spec": {"nodeName": "n2"}, "status": {"podIP": "10.0.0.2"}},
        {"kind": "Pod", "metadata": {"namespace": "a", "name": "other", "labels": {"app": "other"}},
         "spec": {"nodeName": "n3"}, "status": {"podIP": "10.0.0.3"}},
        {"kind": "NetworkPolicy", "metadata": {"namespace": "a", "name": "db"},
         "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}},
    ]:
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
