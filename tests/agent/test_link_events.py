"""Discovery's link table kept by RTMGRP_LINK events, replayed from what the kernel really sent.

tests/agent/data/bridge_link_messages.json is recorded from this machine's kernel by
tests/kernel/bridge_events.py (a pod wired by the CNI bridge plugin, then forward_delay, carrier,
MTU, cost, hairpin and master changes, CNI DEL), with a fresh RTM_GETLINK dump after every step.
A table kept by events must say what the dump says. Issue 12: the AF_BRIDGE message at the end of
forward_delay replaced the veth's entry with one of no kind and no peer namespace, and the pod's
anti-spoofing went with it.
"""

from __future__ import annotations

import json
import socket
from functools import lru_cache
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from netfence_agent.discovery import HostLink, apply_link_message, link_table

RECORDING = json.loads((Path(__file__).parent / "data" / "bridge_link_messages.json").read_text())
STEPS = RECORDING["steps"]


@lru_cache(maxsize=None)
def decoded(hex_chunk: str) -> tuple[int, ifinfmsg]:
    """(message type, message); cached: decoding dominates the property test otherwise."""
    data = bytes.fromhex(hex_chunk)
    msg = ifinfmsg(data)
    msg.decode()
    return msg["header"]["type"], msg


def dumped(step: dict) -> dict[int, HostLink]:
    return link_table(msg for _type, msg in map(decoded, step["dump"]))


def veth_index() -> int:
    (index,) = [i for i, link in dumped(STEPS[0]).items() if link.ifname == RECORDING["veth"]]
    return index


def built(family: int, index: int, *attrs: tuple, msg_type: int = RTM_NEWLINK) -> tuple[int, ifinfmsg]:
    """A link message as the kernel would encode it, decoded back."""
    msg = ifinfmsg()
    msg["family"], msg["index"], msg["attrs"] = family, index, list(attrs)
    msg["header"]["type"] = msg_type
    msg.encode()
    back = ifinfmsg(msg.data)
    back.decode()
    return msg_type, back


# --------------------------------------------------------------------------- the recording
def test_the_recording_shows_the_bridge_messages_of_issue_12():
    veth = veth_index()

    def bridge_messages(name: str, msg_type: int) -> list[ifinfmsg]:
        step = next(s for s in STEPS if s["name"] == name)
        return [m for t, m in map(decoded, step["messages"])
                if t == msg_type and m["family"] == socket.AF_BRIDGE and m["index"] == veth]

    at_forwarding = bridge_messages("forwarding state reached", RTM_NEWLINK)
    assert at_forwarding, "the end of forward_delay announces the port"
    assert all(m.get_attr("IFLA_LINKINFO") is None and m.get_attr("IFLA_LINK_NETNSID") is None for m in at_forwarding)
    assert bridge_messages("another bridge", RTM_DELLINK), "leaving a bridge: an AF_BRIDGE DELLINK, the link lives on"
    # Through every step but the last, the kernel itself says the veth is a pod's veth.
    for step in STEPS[:-1]:
        link = dumped(step)[veth]
        assert link.kind == "veth" and link.peer_nsid is not None and link.peer_index, (step["name"], link)
    assert veth not in dumped(STEPS[-1])


def test_replaying_the_kernels_messages_keeps_the_table_equal_to_its_dump():
    links = link_table(msg for _t, msg in map(decoded, RECORDING["initial_dump"]))
    for step in STEPS:
        for msg_type, msg in map(decoded, step["messages"]):
            apply_link_message(links, msg_type, msg)
        assert links == dumped(step), step["name"]


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_bridge_port_messages_anywhere_change_nothing(data):
    """Wherever AF_BRIDGE messages arrive (a port's state changes on its own timers), the
    table after each step is still the kernel's."""
    port_messages = [m for s in STEPS for m in s["messages"] if decoded(m)[1]["family"] == socket.AF_BRIDGE]
    links = link_table(msg for _t, msg in map(decoded, RECORDING["initial_dump"]))
    for step in STEPS:
        sequence = [m for m in step["messages"] if decoded(m)[1]["family"] == socket.AF_UNSPEC]
        extra = data.draw(st.lists(st.tuples(st.integers(0, len(sequence)), st.sampled_from(port_messages)),
                                   max_size=6))
        for position, message in sorted(extra, key=lambda e: -e[0]):
            sequence.insert(position, message)
        for msg_type, msg in map(decoded, sequence):
            apply_link_message(links, msg_type, msg)
        assert links == dumped(step), step["name"]


# --------------------------------------------------------------------------- partial messages
VETH = HostLink(7, "veth0a1b2c3d", "veth", 2, 0)


def test_a_bridge_port_message_neither_replaces_nor_deletes_the_link():
    links = {VETH.index: VETH}
    port = (("IFLA_IFNAME", VETH.ifname), ("IFLA_MASTER", 3), ("IFLA_LINK", 2))
    assert not apply_link_message(links, *built(socket.AF_BRIDGE, 7, *port))
    assert not apply_link_message(links, *built(socket.AF_BRIDGE, 7, *port, msg_type=RTM_DELLINK))
    assert links == {VETH.index: VETH}
    assert apply_link_message(links, *built(socket.AF_UNSPEC, 7, ("IFLA_IFNAME", VETH.ifname), msg_type=RTM_DELLINK))
    assert links == {}


def test_a_message_without_linkinfo_updates_only_what_it_carries():
    links = {VETH.index: VETH}
    assert apply_link_message(links, *built(socket.AF_UNSPEC, 7, ("IFLA_IFNAME", "renamed")))
    assert links[7] == HostLink(7, "renamed", "veth", 2, 0)
    assert not apply_link_message(links, *built(socket.AF_UNSPEC, 7, ("IFLA_MTU", 1400)))
    assert links[7] == HostLink(7, "renamed", "veth", 2, 0)


def test_a_whole_description_is_taken_as_it_is():
    """With IFLA_LINKINFO the message is the kernel's full view: no IFLA_LINK_NETNSID then means
    the peer is in our namespace (it was moved here), not 'unchanged'."""
    links = {VETH.index: VETH}
    linkinfo = ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth")]})
    assert apply_link_message(links, *built(socket.AF_UNSPEC, 7, ("IFLA_IFNAME", VETH.ifname), ("IFLA_LINK", 9),
                                            linkinfo))
    assert links[7] == HostLink(7, VETH.ifname, "veth", 9, None)


def test_an_unknown_link_is_taken_from_any_unspec_message():
    links: dict[int, HostLink] = {}
    assert apply_link_message(links, *built(socket.AF_UNSPEC, 4, ("IFLA_IFNAME", "eth1")))
    assert links == {4: HostLink(4, "eth1", None, None, None)}
    assert not apply_link_message(links, *built(socket.AF_BRIDGE, 5, ("IFLA_IFNAME", "veth9")))
    assert 5 not in links
