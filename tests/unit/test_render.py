"""Render: the incremental path equals a full render."""

from __future__ import annotations

import copy
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from netfence_agent.nft.serialize import ruleset_text
from netfence_agent.render import PodPort, only_group_members_changed, render, render_group_members
from netfence_api import PeerGroup, PeerPort, PeerPortGroup

from kernel.synthetic import synthetic_spec


def ports_for(spec):
    return {ip: PodPort(f"veth{i:08x}", "02:00:00:00:00:01", 10 + i) for i, p in enumerate(spec.pods) for ip in p.ips}


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 5))
def test_rendering_only_changed_groups_equals_a_full_render(seed, changes):
    rnd = random.Random(seed)
    old = synthetic_spec(pods=30, policies=12)
    groups = list(old.peerGroups)
    for _ in range(changes):
        i = rnd.randrange(len(groups))
        extra = rnd.choice([f"10.250.{rnd.randrange(250)}.{rnd.randrange(1, 250)}/32", "192.168.0.0/16"])
        cidrs = groups[i].cidrs[1:] if groups[i].cidrs and rnd.random() < 0.5 else groups[i].cidrs + [extra]
        groups[i] = PeerGroup(name=groups[i].name, selector=groups[i].selector, cidrs=sorted(set(cidrs)))
    new = old.model_copy(update={"peerGroups": groups})
    assert only_group_members_changed(old, new)
    ports = ports_for(old)
    previous = render(old, ports)
    before = ruleset_text(previous.ruleset)
    incremental = render_group_members(previous, old, new)
    assert ruleset_text(incremental.ruleset) == ruleset_text(render(new, ports).ruleset)
    assert ruleset_text(previous.ruleset) == before  # the previous render is left as it was


def test_a_change_beyond_group_members_takes_the_full_path():
    old = synthetic_spec(pods=10, policies=4)
    moved = old.model_copy(update={"pods": [old.pods[0].model_copy(update={"ips": ["10.99.0.1"]})] + old.pods[1:]})
    assert not only_group_members_changed(old, moved)
    renamed = old.model_copy(update={"peerGroups": [old.peerGroups[0].model_copy(update={"name": "pg-other"})]
                                     + old.peerGroups[1:]})
    assert not only_group_members_changed(old, renamed)
    v6 = old.model_copy(update={"peerGroups": [old.peerGroups[0].model_copy(update={"cidrs": ["fd00::1/128"]})]
                                + old.peerGroups[1:]})
    assert not only_group_members_changed(old, v6)  # a new address family adds maps and rules
