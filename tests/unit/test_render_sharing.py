"""Render shares what pods and nodes have in common without changing what it renders.

The compiler gives pods selected alike the very same AllowRule objects, on every node, and one
PeerGroup object to every node naming it. Render derives nft rules and set contents from each
such object once per call, or once per RenderMemo shared by many calls, and hands the same
immutable Rules to every chain holding it. A spec parsed from JSON shares no objects and must
render the same text.
"""

from __future__ import annotations

import gc
import ipaddress
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netfence_agent.nft.model import Match, SetRef
from netfence_agent.nft.serialize import ruleset_text
from netfence_agent.render import PodPort, RenderMemo, RenderOptions, _address, render
from netfence_api import AllowRule, Isolation, NodeRuleSetSpec, PeerGroup, PolicedPod, PortRange
from netfence_operator.compile import ClusterObjects, Compiler, parse_object

APPS = ["web", "api", "db"]


def small_cluster() -> dict[str, NodeRuleSetSpec]:
    """Two nodes, dual-stack pods on one; policies with numeric and named ports, port ranges,
    ipBlocks and named egress ports (peer port groups)."""
    objects = ClusterObjects()
    for n in range(2):
        objects.add(parse_object({"kind": "Node", "metadata": {"name": f"node-{n}"},
                                  "spec": {"podCIDR": f"10.{100 + n}.0.0/16"}}))
    for ns in ("a", "b"):
        objects.add(parse_object({"kind": "Namespace", "metadata": {"name": ns, "labels": {"team": ns}}}))
    for p in range(24):
        node = p % 2
        ips = [{"ip": f"10.{100 + node}.0.{p + 2}"}] + ([{"ip": f"fd00:{node}::{p + 2:x}"}] if node == 1 else [])
        objects.add(parse_object({
            "kind": "Pod",
            "metadata": {"name": f"pod-{p}", "namespace": "ab"[p % 4 // 2], "uid": f"uid-{p}",
                         "labels": {"app": APPS[p % 3]}},
            "spec": {"nodeName": f"node-{node}", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080 + p % 2}, {"name": "dns", "containerPort": 53,
                                                                 "protocol": "UDP"}]}]},
            "status": {"podIP": ips[0]["ip"], "podIPs": ips},
        }))
    policies = [
        {"podSelector": {}, "policyTypes": ["Ingress"]},
        {"podSelector": {"matchLabels": {"app": "api"}},
         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                      "ports": [{"port": 9000}, {"port": "http"}]}]},
        {"podSelector": {"matchLabels": {"app": "db"}},
         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}],
                      "ports": [{"port": 9000}, {"port": 8080}]},  # pol-1's ports where http is 8080
                     {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                      "ports": [{"port": 30000, "endPort": 32767}, {"port": 443, "endPort": 443}]}]},
        {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
         "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": "http"}]},
                    {"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}],
                     "ports": [{"port": 53, "protocol": "UDP"}]},
                    {"ports": [{"port": 123, "protocol": "UDP"}]}]},
    ]
    for ns in ("a", "b"):
        for i, spec in enumerate(policies):
            objects.add(parse_object({"kind": "NetworkPolicy", "metadata": {"name": f"pol-{i}", "namespace": ns},
                                      "spec": spec}))
    return Compiler(objects).all_specs()


def veths(spec: NodeRuleSetSpec, with_mac: bool) -> dict[str, PodPort]:
    return {ip: PodPort(f"veth{i:08x}", f"02:00:00:00:00:{i:02x}" if with_mac and i % 3 else None, 10 + i)
            for i, pod in enumerate(spec.pods) for ip in pod.ips}


@pytest.mark.parametrize("options", [RenderOptions(), RenderOptions(log_drops=True)], ids=["plain", "log"])
@pytest.mark.parametrize("with_mac", [False, True], ids=["no-mac", "mac"])
def test_a_spec_parsed_from_json_renders_the_same_text(options, with_mac):
    specs = small_cluster()
    assert any(":" in ip for spec in specs.values() for pod in spec.pods for ip in pod.ips)
    assert any(spec.peerPortGroups for spec in specs.values())
    for spec in specs.values():
        parsed = NodeRuleSetSpec.model_validate_json(spec.model_dump_json())
        ports = veths(spec, with_mac)
        compiled, from_json = render(spec, ports, options), render(parsed, ports, options)
        assert ruleset_text(from_json.ruleset) == ruleset_text(compiled.ruleset)
        assert list(from_json.counters.items()) == list(compiled.counters.items())


def test_one_memo_for_every_node_renders_each_node_as_without_it():
    specs = small_cluster()
    memo = RenderMemo()
    for _ in range(2):
        for spec in specs.values():
            ports = veths(spec, True)
            assert ruleset_text(render(spec, ports, memo=memo).ruleset) == ruleset_text(render(spec, ports).ruleset)


def test_pods_holding_the_same_allow_rules_share_their_nft_rules():
    spec = small_cluster()["node-0"]
    inet = render(spec, veths(spec, True)).ruleset.table("inet", "netfence")
    by_rules: dict[tuple[int, ...], list] = {}
    for pod in spec.pods:
        if pod.isolation.ingress and pod.ingress:
            by_rules.setdefault(tuple(map(id, pod.ingress)), []).append(pod)
    alike = next(pods for pods in by_rules.values() if len(pods) > 1)
    chains = [next(c for c in inet.chains.values() if c.comment.startswith(f"{p.key} ingress")) for p in alike]
    allow = [c.rules[:-1] for c in chains]  # the last rule counts this pod's drops
    assert allow[0] and all(rules == allow[0] for rules in allow)
    assert all(a is b for rules in allow[1:] for a, b in zip(rules, allow[0]))
    assert chains[0].rules[-1] != chains[1].rules[-1]


def test_nodes_rendered_with_one_memo_share_the_nft_rules_of_their_common_allow_rules():
    shared = AllowRule(origin=["a/p ingress[0]"], peers="pg-a", ports=[PortRange(port=80), PortRange(port=443)])
    own = AllowRule(origin=["a/p ingress[1]"], ports=[PortRange(port=22)])
    specs = [one_pod_spec(shared, node=f"node-{n}", pod=f"p{n}", extra=[own] if n else []) for n in range(2)]
    memo = RenderMemo()
    with_memo = [ingress_chain(render(spec, {}, memo=memo)) for spec in specs]
    alone = [ingress_chain(render(spec, {})) for spec in specs]
    assert with_memo[0].rules[0] is with_memo[1].rules[0]
    assert alone[0].rules[0] is not alone[1].rules[0]
    assert [c.rules for c in with_memo] == [c.rules for c in alone]
    # A dual-stack node renders the rule for both families: its own rules, not the IPv4-only ones.
    dual = ingress_chain(render(one_pod_spec(shared, node="node-2", pod="p2", ips=("10.1.0.9", "fd00::9")), {},
                                memo=memo))
    assert [r.comment for r in dual.rules[:2]] == ["a/p ingress[0]"] * 2
    assert dual.rules[0] == with_memo[0].rules[0] and dual.rules[0] is not with_memo[0].rules[0]


def ingress_chain(result):
    return next(c for c in result.ruleset.table("inet", "netfence").chains.values() if c.name.endswith("_ingress"))


def one_pod_spec(rule: AllowRule, node: str = "n", pod: str = "p", ips: tuple[str, ...] = ("10.1.0.2",),
                 extra: list[AllowRule] = ()) -> NodeRuleSetSpec:
    policed = PolicedPod(namespace="a", name=pod, ips=list(ips), isolation=Isolation(ingress=True),
                         ingressPolicies=["a/p"], ingress=[rule, *extra])
    group = PeerGroup(name="pg-a", selector="app=a", cidrs=["10.1.0.0/16", "fd00::/64"][:len(ips)])
    return NodeRuleSetSpec(nodeName=node, pods=[policed], peerGroups=[group])


def test_a_memo_kept_across_renders_of_new_objects_renders_each_as_its_own():
    memo = RenderMemo()
    for port in range(1000, 1050):
        rule = AllowRule(origin=[f"a/p ingress[{port}]"], peers="pg-a",
                         ports=[PortRange(port=port), PortRange(port=port + 1)])
        spec = one_pod_spec(rule)
        text = ruleset_text(render(spec, {}, memo=memo).ruleset)
        assert f"a/p ingress[{port}]" in text and f"{port}/TCP, {port + 1}/TCP" in text
        assert text == ruleset_text(render(NodeRuleSetSpec.model_validate_json(spec.model_dump_json()), {}).ruleset)


def test_render_without_a_memo_keeps_no_spec_object_alive():
    rule = AllowRule(origin=["a/p ingress[0]"], peers="pg-a", ports=[PortRange(port=80), PortRange(port=81)])
    spec = one_pod_spec(rule)
    alive = [weakref.ref(rule), weakref.ref(spec.peerGroups[0])]
    render(spec, {})
    del rule, spec
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


def test_equal_port_lists_of_different_rules_share_one_port_set():
    spec = small_cluster()["node-0"]
    inet = render(spec, veths(spec, False)).ruleset.table("inet", "netfence")
    port_sets = [s for name, s in inet.sets.items() if name.startswith("ports_")]
    assert len({tuple(map(str, s.elements)) for s in port_sets}) == len(port_sets)
    origins_by_set: dict[str, set[str]] = {}
    for chain in inet.chains.values():
        for rule in chain.rules:
            for st_ in rule.statements:
                if isinstance(st_, Match) and isinstance(st_.right, SetRef) and st_.right.name.startswith("ports_"):
                    origins_by_set.setdefault(st_.right.name, set()).add(rule.comment)
    assert set(origins_by_set) == {s.name for s in port_sets}
    shared = inet.sets[next(name for name, origins in origins_by_set.items() if len(origins) > 1)]
    assert shared.comment == "ports 9000/TCP, 8080/TCP"


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(alphabet="0123456789.", max_size=16),
    st.tuples(*[st.integers(0, 300)] * 4).map(lambda t: ".".join(map(str, t))),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.text(max_size=12),
))
def test_address_parsing_agrees_with_ipaddress(text):
    try:
        expected = ipaddress.ip_address(text)
    except ValueError:
        with pytest.raises(ValueError):
            _address(text)
        return
    assert _address(text) == expected and type(_address(text)) is type(expected)


@pytest.mark.parametrize("text", ["010.1.1.1", "1.2.3.04", "1.2.3", "1.2.3.4.5", " 1.2.3.4", "1.2.3.4\n",
                                  "256.0.0.1", "1.2.3.4\x00", "0x1.2.3.4", "1.2.3.4/32", "१.2.3.4"])
def test_address_parsing_refuses_what_ipaddress_refuses(text):
    with pytest.raises(ValueError):
        ipaddress.ip_address(text)
    with pytest.raises(ValueError):
        _address(text)
