"""Transactions against the real kernel, in network namespaces the tests create.

The oracle of the property test: whatever sequence of rule sets one agent applies (full first,
then element-level and partial syncs), its kernel must hold exactly what a fresh full load of the
last rule set gives in a second, empty namespace - every chain, rule, set element, map entry,
counter and comment.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.conftest import normalized
from netfence_api import AllowRule, Isolation, NodeRuleSetSpec, PeerGroup, PeerPort, PeerPortGroup, PolicedPod, PortRange
from netfence_agent.nft.kernel import OWNED_TABLES, CounterValue, NftError
from netfence_agent.nft.model import Counter, Ruleset, Set, Table
from netfence_agent.nft.transaction import REFILL_MAX, plan
from netfence_agent.render import PodPort, RenderOptions, render

pytestmark = pytest.mark.kernel

PODS = [("x", "a", ("10.244.0.2",)), ("x", "b", ("10.244.0.3",)), ("y", "c", ("10.244.0.4",)),
        ("y", "d", ("10.244.0.5", "fd00::5"))]
CIDRS = ["10.244.0.2/32", "10.244.0.3/32", "10.244.0.4/32", "10.244.1.0/24", "10.1.0.0/16", "192.168.0.0/24", "fd00::5/128"]
PORTS = [PortRange(protocol="TCP", port=80), PortRange(protocol="TCP", port=8000, endPort=8080),
         PortRange(protocol="UDP", port=53)]
HOSTS = ["10.244.0.2/32", "10.244.0.3/32", "10.244.0.4/32"]
# Render makes a group's set a hash set when it holds single addresses only and an interval set
# when it holds ranges; a change of set type is structural. The first three groups keep their
# kind across member changes (so those stay element-level); g-four is drawn freely per rule set.
GROUP_MEMBERS = {"g-one": ([], HOSTS), "g-two": (["10.244.1.0/24"], HOSTS + ["192.168.0.0/24"]),
                 "g-three": (["10.1.0.0/16", "fd00::5/128"], HOSTS)}
GROUPS = [*GROUP_MEMBERS, "g-four"]


def members_of_stable_groups():
    return st.tuples(*[st.lists(st.sampled_from(optional), unique=True, max_size=3).map(lambda m, f=fixed: f + m)
                       for fixed, optional in GROUP_MEMBERS.values()])


@st.composite
def rule_sets(draw):
    groups = [PeerGroup(name=g, selector=f"sel {g}", cidrs=m)
              for g, m in zip(GROUP_MEMBERS, draw(members_of_stable_groups()))]
    groups.append(PeerGroup(name="g-four", selector="sel g-four",
                            cidrs=draw(st.lists(st.sampled_from(CIDRS), unique=True, max_size=4))))
    port_group = PeerPortGroup(name="pp-http", selector="named port http", entries=[
        PeerPort(address=ip, protocol="TCP", port=8080)
        for ip in draw(st.lists(st.sampled_from(["10.244.0.3", "10.244.0.4"]), unique=True))])
    rule = st.builds(lambda peers, ports, origin: AllowRule(origin=[origin], peers=peers, ports=ports),
                     st.sampled_from([None, *GROUPS]),
                     st.one_of(st.none(), st.lists(st.sampled_from(PORTS), min_size=1, max_size=2, unique=True)),
                     st.sampled_from(["x/p ingress[0]", "x/q egress[0]", "y/r ingress[1]"]))
    pods = []
    for ns, name, ips in draw(st.lists(st.sampled_from(PODS), unique=True, min_size=1)):
        ingress, egress = draw(st.booleans()), draw(st.booleans())
        egress_rules = draw(st.lists(rule, max_size=2)) if egress else []
        if egress and draw(st.booleans()):
            egress_rules.append(AllowRule(origin=[f"{ns}/named egress[0]"], peerPorts="pp-http"))
        pods.append(PolicedPod(
            namespace=ns, name=name, uid=f"uid-{name}", ips=list(ips), isolation=Isolation(ingress=ingress, egress=egress),
            ingressPolicies=[f"{ns}/p{draw(st.integers(0, 1))}"] if ingress else [],
            egressPolicies=[f"{ns}/q"] if egress else [],
            ingress=draw(st.lists(rule, max_size=2)) if ingress else [],
            egress=egress_rules,
        ))
    spec = NodeRuleSetSpec(nodeName="n1", pods=pods, peerGroups=groups, peerPortGroups=[port_group])
    veths = {ips[0]: PodPort(f"veth{name}", draw(st.sampled_from([None, f"02:00:00:00:00:0{i}"])), 100 + i)
             for i, (_ns, name, ips) in enumerate(PODS) if draw(st.booleans())}
    return spec, veths, RenderOptions(log_drops=draw(st.booleans()))


def group_members():
    return members_of_stable_groups().map(
        lambda members: [PeerGroup(name=g, selector=f"sel {g}", cidrs=m) for g, m in zip(GROUP_MEMBERS, members)])


def test_any_sequence_of_syncs_leaves_what_a_fresh_full_load_gives(kernel_in):
    agent_ns, fresh_ns = kernel_in("txa"), kernel_in("txb")
    kinds: set[str] = set()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rule_sets(), st.lists(st.one_of(rule_sets(), group_members()), max_size=5))
    def check(first, changes):
        applied = None  # a new agent process: what the kernel holds is left from the example before
        sequence = [first]
        for change in changes:
            # A new rule set, or the one before with other peer group members (element-level).
            previous = sequence[-1][0]
            sequence.append(change if isinstance(change, tuple) else
                            (previous.model_copy(update={"peerGroups": change + previous.peerGroups[-1:]}),
                             *sequence[-1][1:]))
        for spec, veths, options in sequence:
            desired = render(spec, veths, options).ruleset
            tx = plan(desired, applied, agent_ns.inventory)
            kinds.add(tx.kind)
            agent_ns.apply(tx)
            applied = desired
            fresh_ns.delete_tables()
            fresh_ns.apply(plan(desired, None, fresh_ns.inventory))
            assert normalized(agent_ns.ruleset_json()) == normalized(fresh_ns.ruleset_json()), tx.kind
            assert sorted(agent_ns.tables()) == sorted(fresh_ns.tables())

    check()
    assert {"full", "partial", "elements"} <= kinds, kinds


def tiny(count: int, group: list[str]) -> Ruleset:
    t = Table("inet", "netfence")
    t.add(Set("peers", ("ipv4_addr",), elements=[ipaddress.ip_network(c) for c in group], flags=("interval",)))
    for i in range(count):
        t.add(Counter(f"c{i}", comment=f"counter {i}"))
    return Ruleset([t])


def test_counters_keep_their_counts_through_full_and_partial_syncs(kernel_in):
    k = kernel_in()
    # What a previous agent run left: a counter that has counted.
    k.nft("add table inet netfence; add counter inet netfence c0 { packets 5 bytes 300 }")
    k.apply(plan(tiny(1, ["10.0.0.1/32"]), None, k.inventory))
    assert k.counters()[("inet", "netfence", "c0")] == CounterValue(5, 300)
    k.apply(plan(tiny(2, ["10.0.0.2/32"]), tiny(1, ["10.0.0.1/32"]), k.inventory))  # partial: adds c1
    k.apply(plan(tiny(2, ["10.0.0.2/32"]), None, k.inventory))  # full again, as after a restart
    assert k.counters()[("inet", "netfence", "c0")] == CounterValue(5, 300)


def test_restart_full_sync_replaces_in_place_without_duplicates(kernel_in):
    k = kernel_in()
    spec = NodeRuleSetSpec(nodeName="n1", pods=[PolicedPod(namespace="x", name="a", ips=["10.244.0.2"],
                                                           isolation=Isolation(ingress=True))])
    first = render(spec, {"10.244.0.2": PodPort("vetha", "02:00:00:00:00:01", 100)}).ruleset
    k.apply(plan(first, None, k.inventory))
    before = normalized(k.ruleset_json())
    # A new process: applied unknown; the same rules again, then different ones.
    k.apply(plan(first, None, k.inventory))
    assert normalized(k.ruleset_json()) == before
    assert sorted(k.tables()) == sorted(OWNED_TABLES)
    second = render(spec.model_copy(update={"pods": []}), {}).ruleset
    k.apply(plan(second, None, k.inventory))
    listing = normalized(k.ruleset_json())
    assert not [key for key in listing if key[0] == "chain" and key[3].startswith("pod_")]
    assert sorted(k.tables()) == sorted(OWNED_TABLES)


@pytest.mark.parametrize("size", [3, REFILL_MAX + 3], ids=["refilled", "element-deleted"])
def test_element_syncs_of_small_and_large_sets_match_a_fresh_load(kernel_in, size):
    agent_ns, fresh_ns = kernel_in("ela"), kernel_in("elb")
    hosts = [f"10.{i // 250}.{i % 250}.1/32" for i in range(size)]
    sequence = [hosts, hosts[1:], hosts[1:] + ["10.250.0.0/24"], hosts[2:] + ["10.250.0.0/24", "10.251.0.7/32"]]
    applied = None
    for members in sequence:
        desired = tiny(1, members)
        tx = plan(desired, applied, agent_ns.inventory)
        assert tx.kind == ("full" if applied is None else "elements")
        agent_ns.apply(tx)
        applied = desired
        fresh_ns.delete_tables()
        fresh_ns.apply(plan(desired, None, fresh_ns.inventory))
        assert normalized(agent_ns.ruleset_json()) == normalized(fresh_ns.ruleset_json())


def test_a_rejected_transaction_changes_nothing(kernel_in):
    k = kernel_in()
    good = tiny(1, ["10.0.0.0/24"])
    k.apply(plan(good, None, k.inventory))
    before = normalized(k.ruleset_json())
    bad = tiny(3, ["10.0.0.0/8", "10.1.0.0/16"])  # overlapping intervals: refused
    with pytest.raises(NftError, match="interval"):
        k.apply(plan(bad, good, k.inventory))
    with pytest.raises(NftError):
        k.apply(plan(bad, None, k.inventory))
    assert normalized(k.ruleset_json()) == before


def test_cleanup_deletes_only_netfence_tables(kernel_in):
    k = kernel_in()
    k.apply(plan(tiny(1, []), None, k.inventory))
    k.nft("add table bridge netfence; add table inet someone_else; add table ip netfence")
    assert sorted(k.delete_tables()) == sorted(OWNED_TABLES)
    assert k.tables() == {("inet", "someone_else"), ("ip", "netfence")}
    assert k.delete_tables() == []


def test_set_elements_read_back_what_render_loaded(kernel_in):
    """The anti-spoofing check reads the bridge table's elements straight from the kernel
    (nft/dump.py): keys of concatenations, host-order ifindexes (network order in the interval
    set), MACs, addresses, map verdicts must all come back as render wrote them."""
    pods = [PolicedPod(namespace=ns, name=name, uid=name, ips=list(ips), isolation=Isolation()) for ns, name, ips in PODS]
    ports = {ip: PodPort(f"veth{i:08x}", f"02:42:0A:F4:00:{i:02X}", 300 + i)
             for i, (_ns, _name, ips) in enumerate(PODS) for ip in ips}
    result = render(NodeRuleSetSpec(nodeName="n", pods=pods), ports)
    k = kernel_in()
    k.apply(plan(result.ruleset, None, k.inventory))
    names = ["pod_ports", "pod_addresses_v4", "pod_addresses_v6", "pod_arp_senders", "not_there"]
    read = k.set_elements("bridge", "netfence", names)
    assert set(read) == set(names) - {"not_there"}
    bridge = result.ruleset.table("bridge", "netfence")
    assert sorted((e.key[0], e.verdict) for e in read["pod_ports"]) == sorted(
        (name, ("jump", verdict.target)) for name, verdict in bridge.maps["pod_ports"].elements)
    for name in ("pod_addresses_v4", "pod_arp_senders"):
        assert sorted(e.key for e in read[name]) == sorted(
            (ifindex, mac, str(address)) for ifindex, mac, address in bridge.sets[name].elements)
    v6 = {(e.key, e.key_end) for e in read["pod_addresses_v6"]}
    expected = {((ifindex, mac, str(net.network_address)), (ifindex, mac, str(net.broadcast_address)))
                for ifindex, mac, net in bridge.sets["pod_addresses_v6"].elements}
    assert v6 == expected
    assert k.set_elements("bridge", "no_such_table", names) == {}
