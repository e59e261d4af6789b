"""Which transaction the agent picks (elements / partial / full) and the order of its commands.

Pure: models in, JSON commands out. The same plans run against the kernel in
tests/kernel/test_transactions_kernel.py.
"""

from __future__ import annotations

import copy
import ipaddress

from netfence_agent.nft.model import Chain, Counter, CounterRef, Map, Match, Payload, Rule, Ruleset, Set, SetRef, Table, Verdict, VMap
from netfence_agent.nft.transaction import REFILL_MAX, ChainDecl, SetDecl, TableInventory, plan

IP = ipaddress.ip_address
NET = ipaddress.ip_network


def base_ruleset() -> Ruleset:
    t = Table("inet", "nftest", comment="test table")
    t.add(Set("peers_v4", ("ipv4_addr",), elements=[NET("10.0.0.1/32"), NET("10.1.0.0/16")], flags=("interval",)))
    t.add(Counter("pod_a_ingress", comment="x/a ingress drops"))
    t.add(Chain("pod_a_ingress", comment="x/a ingress", rules=[
        Rule((Match(Payload("ip", "saddr"), SetRef("peers_v4")), Verdict("accept")), "allow peers"),
        Rule((CounterRef("pod_a_ingress"), Verdict("drop")), "x/a: drop"),
    ]))
    t.add(Chain("forward_hook", hook="forward", priority=0, policy="accept", rules=[
        Rule((VMap(Payload("ip", "daddr"), "ingress_v4"),)),
    ]))
    t.add(Map("ingress_v4", ("ipv4_addr",), elements=[(IP("10.244.0.2"), Verdict("jump", "pod_a_ingress"))]))
    return Ruleset([t])


def with_pod_b(rs: Ruleset) -> Ruleset:
    rs = copy.deepcopy(rs)
    t = rs.tables[0]
    t.add(Counter("pod_b_ingress"))
    t.add(Chain("pod_b_ingress", comment="x/b ingress", rules=[Rule((CounterRef("pod_b_ingress"), Verdict("drop")))]))
    t.maps["ingress_v4"].elements.append((IP("10.244.0.3"), Verdict("jump", "pod_b_ingress")))
    return rs


def verbs(tx) -> list[tuple[str, str, str]]:
    """(verb, object kind, name) of each command, for order assertions."""
    out = []
    for cmd in tx.commands:
        verb, body = next(iter(cmd.items()))
        kind, obj = next(iter(body.items()))
        out.append((verb, kind, obj.get("name") or obj.get("chain")))
    return out


def no_inventory():
    raise AssertionError("a partial or element plan must not read the kernel inventory")


# --------------------------------------------------------------------------- choosing the kind
def test_nothing_loaded_yet_means_full_sync():
    tx = plan(base_ruleset(), None, lambda: {})
    assert tx.kind == "full"
    assert verbs(tx)[0] == ("add", "table", "nftest")
    assert not any(v == "delete" and k == "table" for v, k, _ in verbs(tx))


def test_identical_rule_set_is_a_noop():
    assert plan(base_ruleset(), base_ruleset(), no_inventory).kind == "noop"


def test_peer_group_member_change_refills_a_small_set_in_place():
    desired = base_ruleset()
    desired.tables[0].sets["peers_v4"].elements = [NET("10.0.0.1/32"), NET("10.2.0.0/16"), NET("10.0.0.9/32")]
    tx = plan(desired, base_ruleset(), no_inventory)
    assert tx.kind == "elements"
    # flush + re-declare with every element: commands libnftables evaluates without reading the
    # whole rule set back, in one transaction, so the set is never seen empty.
    assert tx.commands == [
        {"flush": {"set": {"family": "inet", "table": "nftest", "name": "peers_v4"}}},
        {"add": {"set": {"family": "inet", "table": "nftest", "name": "peers_v4", "type": "ipv4_addr",
                         "flags": ["interval"],
                         "elem": ["10.0.0.1", {"prefix": {"addr": "10.2.0.0", "len": 16}}, "10.0.0.9"]}}},
    ]


def test_a_member_joining_adds_only_that_element():
    desired = base_ruleset()
    desired.tables[0].sets["peers_v4"].elements.append(NET("10.0.0.9/32"))
    tx = plan(desired, base_ruleset(), no_inventory)
    assert tx.kind == "elements"
    assert tx.commands == [
        {"add": {"set": {"family": "inet", "table": "nftest", "name": "peers_v4", "type": "ipv4_addr",
                         "flags": ["interval"], "elem": ["10.0.0.9"]}}},
    ]


def test_a_member_leaving_a_large_set_deletes_only_that_element():
    big = [NET(f"10.{i // 250}.{i % 250}.1/32") for i in range(REFILL_MAX + 10)]
    applied = base_ruleset()
    applied.tables[0].sets["peers_v4"].elements = big
    desired = copy.deepcopy(applied)
    desired.tables[0].sets["peers_v4"].elements = big[1:] + [NET("10.200.0.1/32")]
    tx = plan(desired, applied, no_inventory)
    assert tx.kind == "elements"
    assert tx.commands == [
        # A single address as a full-length prefix: what deleting from an interval set needs.
        {"delete": {"element": {"family": "inet", "table": "nftest", "name": "peers_v4",
                                "elem": [{"prefix": {"addr": "10.0.0.1", "len": 32}}]}}},
        {"add": {"set": {"family": "inet", "table": "nftest", "name": "peers_v4", "type": "ipv4_addr",
                         "flags": ["interval"], "elem": ["10.200.0.1"]}}},
    ]


def test_an_element_leaving_a_set_of_concatenated_intervals_is_deleted_not_refilled():
    """The kernel takes a pipapo set's elements out one at a time (~0.2 ms each): a refill of
    the bridge table's pod_addresses_v6 cost 40 ms at 110 pods, deleting the two that go 1.7 ms."""
    key = ("iface_index", "ether_addr", "ipv6_addr")
    applied = base_ruleset()
    elements = [(10 + i, "02:00:00:00:00:01", NET(f"fd00::{i}/128")) for i in range(4)]
    applied.tables[0].add(Set("own_v6", key, elements=elements, flags=("interval",)))
    desired = copy.deepcopy(applied)
    desired.tables[0].sets["own_v6"].elements = elements[1:]
    tx = plan(desired, applied, no_inventory)
    assert tx.kind == "elements"
    assert verbs(tx) == [("delete", "element", "own_v6")]
    assert len(tx.commands[0]["delete"]["element"]["elem"]) == 1


def test_map_verdict_change_refills_the_map():
    applied = with_pod_b(base_ruleset())
    desired = copy.deepcopy(applied)
    desired.tables[0].maps["ingress_v4"].elements = [
        (IP("10.244.0.2"), Verdict("jump", "pod_b_ingress")),
        (IP("10.244.0.3"), Verdict("jump", "pod_b_ingress")),
    ]
    tx = plan(desired, applied, no_inventory)
    assert tx.kind == "elements"
    assert verbs(tx) == [("flush", "map", "ingress_v4"), ("add", "map", "ingress_v4")]
    assert tx.commands[1]["add"]["map"]["elem"] == [
        ["10.244.0.2", {"jump": {"target": "pod_b_ingress"}}],
        ["10.244.0.3", {"jump": {"target": "pod_b_ingress"}}],
    ]


# --------------------------------------------------------------------------- partial syncs
def test_new_pod_is_a_partial_sync_touching_only_its_objects():
    tx = plan(with_pod_b(base_ruleset()), base_ruleset(), no_inventory)
    assert tx.kind == "partial"
    assert verbs(tx) == [
        ("add", "counter", "pod_b_ingress"),
        ("add", "chain", "pod_b_ingress"),
        ("add", "map", "ingress_v4"),                  # its new element, once the chain exists
        ("add", "rule", "pod_b_ingress"),
    ]


def test_pod_removal_unhooks_before_deleting():
    tx = plan(base_ruleset(), with_pod_b(base_ruleset()), no_inventory)
    assert tx.kind == "partial"
    assert verbs(tx) == [
        ("flush", "chain", "pod_b_ingress"),           # its rule referred to the counter
        ("delete", "counter", "pod_b_ingress"),
        ("delete", "element", "ingress_v4"),           # the map's entry jumped to the chain
        ("delete", "chain", "pod_b_ingress"),
    ]
    # A partial sync has libnftables read every declaration anyway: only what goes is written.
    assert tx.commands[2]["delete"]["element"]["elem"] == [["10.244.0.3", {"jump": {"target": "pod_b_ingress"}}]]


def test_changed_rules_flush_and_refill_that_chain_only():
    desired = with_pod_b(base_ruleset())
    desired.tables[0].chains["pod_b_ingress"].rules.insert(0, Rule((Match(Payload("ip", "saddr"), SetRef("peers_v4")), Verdict("accept"))))
    tx = plan(desired, with_pod_b(base_ruleset()), no_inventory)
    assert tx.kind == "partial"
    assert verbs(tx) == [("flush", "chain", "pod_b_ingress"), ("add", "rule", "pod_b_ingress"), ("add", "rule", "pod_b_ingress")]


def test_changed_chain_comment_recreates_the_chain_and_its_map_entry():
    applied = with_pod_b(base_ruleset())
    desired = copy.deepcopy(applied)
    desired.tables[0].chains["pod_b_ingress"].comment = "x/b ingress, isolated by x/p2"
    tx = plan(desired, applied, no_inventory)
    assert tx.kind == "partial"
    assert verbs(tx) == [
        ("flush", "chain", "pod_b_ingress"),
        ("delete", "element", "ingress_v4"),
        ("delete", "chain", "pod_b_ingress"),
        ("add", "chain", "pod_b_ingress"),
        ("add", "map", "ingress_v4"),
        ("add", "rule", "pod_b_ingress"),
    ]


def test_base_chain_declaration_change_needs_a_full_sync():
    desired = base_ruleset()
    desired.tables[0].chains["forward_hook"].priority = 10
    tx = plan(desired, base_ruleset(), lambda: {})
    assert tx.kind == "full" and "forward_hook" in tx.why


def test_set_type_change_needs_a_full_sync():
    desired = base_ruleset()
    desired.tables[0].sets["peers_v4"].flags = ()
    assert plan(desired, base_ruleset(), lambda: {}).kind == "full"


def test_deleting_a_set_an_unchanged_chain_still_uses_needs_a_full_sync():
    applied = base_ruleset()
    applied.tables[0].add(Chain("other", rules=[Rule((Match(Payload("ip", "saddr"), SetRef("peers_v4")), Verdict("accept")))]))
    desired = copy.deepcopy(applied)
    del desired.tables[0].sets["peers_v4"]
    tx = plan(desired, applied, lambda: {})
    assert tx.kind == "full" and "peers_v4" in tx.why


# --------------------------------------------------------------------------- full sync
def kernel_holding(rs: Ruleset) -> dict:
    t = rs.tables[0]
    return {(t.family, t.name): TableInventory(
        chains={n: ChainDecl(c.hook, c.type if c.hook else None, c.priority if c.hook else None,
                             (c.policy or "accept") if c.hook else None, c.comment) for n, c in t.chains.items()},
        sets={n: SetDecl(s.type, frozenset(s.flags), s.comment) for n, s in t.sets.items()},
        maps={n: SetDecl(m.type, frozenset(m.flags), m.comment) for n, m in t.maps.items()},
        counters=set(t.counters),
    )}


def test_full_sync_replaces_in_place_flushing_before_deleting():
    previous_run = with_pod_b(base_ruleset())
    tx = plan(base_ruleset(), None, lambda: kernel_holding(previous_run))
    steps = verbs(tx)
    assert tx.kind == "full"
    assert steps[0] == ("add", "table", "nftest")
    first_delete = min(i for i, s in enumerate(steps) if s[0] == "delete")
    flushes = [i for i, s in enumerate(steps) if s[0] == "flush" and s[1] in ("chain", "map")]
    assert flushes and max(flushes) < first_delete, "every reference is dropped before anything is deleted"
    deleted = {(k, n) for v, k, n in steps if v == "delete"}
    assert deleted == {("counter", "pod_b_ingress"), ("chain", "pod_b_ingress")}
    # Kept objects are re-declared with `add`, which keeps a counter's counts; never deleted.
    assert ("add", "counter", "pod_a_ingress") in steps
    assert ("flush", "set", "peers_v4") in steps
    assert not any(v == "delete" and k == "table" for v, k, _ in steps)


def test_full_sync_recreates_what_add_cannot_change():
    have = kernel_holding(base_ruleset())
    have[("inet", "nftest")].sets["peers_v4"] = SetDecl(("ipv4_addr",), frozenset())  # was no interval set
    have[("inet", "nftest")].chains["forward_hook"] = ChainDecl("forward", "filter", 10, "accept", "")
    steps = verbs(plan(base_ruleset(), None, lambda: have))
    assert ("delete", "set", "peers_v4") in steps and ("delete", "chain", "forward_hook") in steps
    assert steps.index(("delete", "set", "peers_v4")) < steps.index(("add", "set", "peers_v4"))
    assert ("flush", "set", "peers_v4") not in steps  # re-created empty, not flushed
    assert ("delete", "counter", "pod_a_ingress") not in steps


def test_full_sync_fills_maps_after_the_chains_they_jump_to():
    steps = verbs(plan(base_ruleset(), None, lambda: {}))
    assert steps.index(("add", "chain", "pod_a_ingress")) < steps.index(("add", "map", "ingress_v4"))
    assert steps.index(("add", "map", "ingress_v4")) < steps.index(("add", "rule", "forward_hook"))
    # Elements inline: a separate `add element` would make libnftables read the rule set back.
    assert not any(v == "add" and k == "element" for v, k, _ in steps)
