"""Render: held pods (new pods the rule set does not cover yet) are held closed, at no rule's cost.

The golden file held-new-pods.nft is the rendered text of one node with a covered pod, a held
pod with an IP and a held veth without one. Regenerate it after an intended change with
NETFENCE_UPDATE_GOLDEN=1 and review the diff (as tests/golden/test_golden.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from netfence_agent.nft.serialize import rule_text, ruleset_text
from netfence_agent.render import (
    HELD_EGRESS,
    HELD_INGRESS,
    HELD_VETH,
    HeldPort,
    Holds,
    PodPort,
    render,
    render_group_members,
)
from netfence_api import Isolation, NodeRuleSetSpec, PeerGroup, PolicedPod

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "held-new-pods.nft"
UPDATE = os.environ.get("NETFENCE_UPDATE_GOLDEN") == "1"

A = PolicedPod(namespace="x", name="a", uid="ua", ips=["10.244.0.2"], isolation=Isolation(ingress=True),
               ingressPolicies=["x/deny"])
SPEC = NodeRuleSetSpec(nodeName="n1", pods=[A], peerGroups=[PeerGroup(name="pg-1", selector="app=a", cidrs=["10.244.0.2/32"])])
PORTS = {
    "10.244.0.2": PodPort("veth0000000a", "02:00:00:00:00:0a", 10),
    "10.244.0.3": PodPort("veth0000000b", "02:00:00:00:00:0b", 11),
}
NEW = HeldPort(PORTS["10.244.0.3"], ("10.244.0.3",))
NO_IP_YET = HeldPort(PodPort("veth0000000c", "02:00:00:00:00:0c", 12))
RELEASED = PodPort("veth0000000e", None, 14)  # held past the timeout, or a port of a bridge without pods
HOLDS = Holds(True, (NEW, NO_IP_YET), (RELEASED,))


def inet_map(result, name):
    return dict(result.ruleset.table("inet", "netfence").maps[name].elements)


def bridge(result):
    return result.ruleset.table("bridge", "netfence")


def test_held_ips_dispatch_to_the_held_drops_both_ways():
    result = render(SPEC, PORTS, holds=HOLDS)
    egress, ingress = inet_map(result, "egress_v4"), inet_map(result, "ingress_v4")
    assert {str(k): v.target for k, v in egress.items()} == {"10.244.0.3": HELD_EGRESS}
    assert {str(k): v.target for k, v in ingress.items()} == {"10.244.0.2": "pod_5356176b92_ingress",
                                                              "10.244.0.3": HELD_INGRESS}
    inet = result.ruleset.table("inet", "netfence")
    for name in (HELD_EGRESS, HELD_INGRESS):
        assert [type(s).__name__ for s in inet.chains[name].rules[-1].statements] == ["CounterRef", "Verdict"]
        assert inet.chains[name].rules[-1].statements[-1].kind == "drop"
    assert result.counters[HELD_EGRESS].kind == "held_egress" and result.counters[HELD_VETH].kind == "held_egress"
    assert result.counters[HELD_INGRESS].kind == "held_ingress"


def test_held_veths_jump_to_the_held_chain_and_only_known_ips_are_their_own():
    table = bridge(render(SPEC, PORTS, holds=HOLDS))
    ports = {k: v.target or v.kind for k, v in table.maps["pod_ports"].elements}
    assert ports == {"veth0000000a": "pod_5356176b92_spoof", "veth0000000b": HELD_VETH, "veth0000000c": HELD_VETH,
                     "veth0000000e": "accept"}
    own = {(veth, str(ip)) for veth, _mac, ip in table.sets["pod_addresses_v4"].elements}
    assert own == {(10, "10.244.0.2"), (11, "10.244.0.3")}, "a veth without an IP has no own address: all dropped"
    assert not any(veth == 12 for veth, *_ in table.sets["pod_addresses_v6"].elements)


def test_unknown_veths_are_dropped_after_every_known_one_is_dispatched():
    hook = bridge(render(SPEC, PORTS, holds=HOLDS)).chains["prerouting_hook"]
    assert ruleset_text_of(hook.rules[-1]) == 'meta iifkind veth counter name "held_veth" drop'
    assert hook.rules[-2].statements[0].map == "pod_ports", "after the dispatch of every known veth"
    assert len(bridge(render(SPEC, PORTS)).chains["prerouting_hook"].rules) == len(hook.rules) - 1
    assert len(bridge(render(SPEC, PORTS, holds=Holds(False, HOLDS.held))).chains["prerouting_hook"].rules) \
        == len(hook.rules) - 1, "--new-pods=open"


def ruleset_text_of(rule) -> str:
    return rule_text(rule).split(" comment ")[0]


def test_holding_and_releasing_change_elements_only():
    plain, holding = render(SPEC, PORTS, holds=Holds(True)), render(SPEC, PORTS, holds=HOLDS)
    for family in ("inet", "bridge"):
        before, after = plain.ruleset.table(family, "netfence"), holding.ruleset.table(family, "netfence")
        assert before.chains.keys() == after.chains.keys(), "holding and releasing change elements only"
        assert before.counters.keys() == after.counters.keys()
        assert [c.rules for c in before.chains.values()] == [c.rules for c in after.chains.values()]


def test_a_veth_of_a_covered_pod_holds_only_its_uncovered_ips():
    extra = HeldPort(PORTS["10.244.0.2"], ("10.244.0.9",))  # a second IP the rule set does not list
    result = render(SPEC, {**PORTS, "10.244.0.9": PORTS["10.244.0.2"]}, holds=Holds(True, (extra,)))
    assert {str(k) for k in inet_map(result, "ingress_v4")} == {"10.244.0.2", "10.244.0.9"}
    assert {k: v.target for k, v in bridge(result).maps["pod_ports"].elements} == {"veth0000000a": "pod_5356176b92_spoof"}


def test_a_held_ipv6_address_brings_the_ipv6_dispatch():
    v6 = HeldPort(PodPort("veth0000000d", "02:00:00:00:00:0d", 13), ("fd00::3",))
    result = render(SPEC, PORTS, holds=Holds(True, (v6,)))
    assert result.families == (4, 6)
    assert {str(k): v.target for k, v in inet_map(result, "ingress_v6").items()} == {"fd00::3": HELD_INGRESS}


def test_a_group_member_change_keeps_the_holds_and_equals_a_full_render():
    v6 = HeldPort(PodPort("veth0000000d", "02:00:00:00:00:0d", 13), ("fd00::3",))
    holds = Holds(True, (NEW, v6))
    previous = render(SPEC, PORTS, holds=holds)
    new = SPEC.model_copy(update={"peerGroups": [PeerGroup(name="pg-1", selector="app=a",
                                                           cidrs=["10.244.0.2/32", "fd00::7/128"])]})
    assert ruleset_text(render_group_members(previous, SPEC, new).ruleset) == ruleset_text(render(new, PORTS, holds=holds).ruleset)


def test_rendered_held_pods_match_golden():
    text = ruleset_text(render(SPEC, PORTS, holds=HOLDS).ruleset)
    if UPDATE:
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"no golden file {GOLDEN.name}; run with NETFENCE_UPDATE_GOLDEN=1"
    assert text == GOLDEN.read_text()


@pytest.mark.kernel
def test_kernel_accepts_the_held_golden(netns):
    r = subprocess.run(["ip", "netns", "exec", netns, "nft", "-c", "-f", str(GOLDEN)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
