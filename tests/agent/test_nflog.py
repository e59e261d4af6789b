"""NFLOG parsing: netlink messages and packet headers built byte by byte, as the kernel sends them."""

from __future__ import annotations

import ipaddress
import struct

from netfence_agent.nflog import (
    ETH_P_ARP,
    ETH_P_IP,
    NFULA_PACKET_HDR,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    FiveTuple,
    drop_record,
    five_tuple,
    parse_packet_message,
)
from netfence_agent.render import CounterLabels, counter_name, log_prefix


def ipv4(src: str, dst: str, proto: int, transport: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(transport), 1, 0, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + transport


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 64240, 0, 0)


def attr(kind: int, value: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(value), kind) + value
    return body + b"\0" * (-len(body) % 4)


def nflog_message(prefix: str, hw_protocol: int, payload: bytes) -> bytes:
    attrs = (attr(NFULA_PACKET_HDR, struct.pack("!HBB", hw_protocol, 2, 0)) + attr(NFULA_PREFIX, prefix.encode() + b"\0")
             + attr(NFULA_PAYLOAD, payload))
    body = struct.pack("=BBH", 2, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body


def test_ipv4_tcp_five_tuple():
    assert five_tuple(ipv4("10.244.0.4", "10.244.0.3", 6, tcp(40000, 80))) == FiveTuple("tcp", "10.244.0.4", "10.244.0.3", 40000, 80)


def test_ipv4_udp_with_options():
    packet = ipv4("10.0.0.1", "10.0.0.2", 17, struct.pack("!HHHH", 5353, 53, 8, 0))
    with_options = bytes([0x46]) + packet[1:20] + b"\x01\x01\x01\x00" + packet[20:]  # IHL 6: 4 bytes of options
    assert five_tuple(with_options) == FiveTuple("udp", "10.0.0.1", "10.0.0.2", 5353, 53)


def test_ipv6_skips_extension_headers():
    hop_by_hop = bytes([6, 0]) + b"\0" * 6  # next header TCP, 8 bytes
    fixed = struct.pack("!IHBB16s16s", 6 << 28, len(hop_by_hop) + 20, 0, 64,
                        ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed)
    assert five_tuple(fixed + hop_by_hop + tcp(1234, 443)) == FiveTuple("tcp", "fd00::1", "fd00::2", 1234, 443)


def test_arp_sender_and_target():
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, b"\x02" * 6, ipaddress.IPv4Address("10.244.0.99").packed,
                      b"\0" * 6, ipaddress.IPv4Address("10.244.0.1").packed)
    assert five_tuple(arp, ETH_P_ARP) == FiveTuple("arp", "10.244.0.99", "10.244.0.1")


def test_truncated_packet_gives_what_it_can():
    assert five_tuple(ipv4("10.0.0.1", "10.0.0.2", 6, b"")) == FiveTuple("tcp", "10.0.0.1", "10.0.0.2")
    assert five_tuple(b"") == FiveTuple(None, None, None)


def test_message_to_json_record_names_pod_and_direction():
    counter = counter_name("shop", "db", "ingress")
    labels = {counter: CounterLabels("shop", "db", "ingress")}
    message = nflog_message(log_prefix(counter), ETH_P_IP, ipv4("10.244.0.4", "10.244.0.3", 6, tcp(40000, 5432)))
    packet = parse_packet_message(message)
    assert packet is not None and packet.hw_protocol == ETH_P_IP
    record = drop_record(packet, labels)
    assert {k: record[k] for k in ("namespace", "pod", "direction", "reason", "protocol", "src", "sport", "dst", "dport")} == {
        "namespace": "shop", "pod": "db", "direction": "ingress", "reason": "policy", "protocol": "tcp",
        "src": "10.244.0.4", "sport": 40000, "dst": "10.244.0.3", "dport": 5432}


def test_spoof_drop_is_the_pods_egress_and_unknown_prefixes_are_kept():
    counter = counter_name("x", "a", "spoof")
    message = nflog_message(log_prefix(counter), ETH_P_IP, ipv4("10.9.9.9", "10.244.0.3", 17, struct.pack("!HHHH", 1, 2, 8, 0)))
    record = drop_record(parse_packet_message(message), {counter: CounterLabels("x", "a", "spoof")})
    assert (record["pod"], record["direction"], record["reason"]) == ("a", "egress", "spoofed-source")
    other = drop_record(parse_packet_message(nflog_message("someone:else", ETH_P_IP, b"")), {})
    assert other["pod"] is None and other["prefix"] == "someone:else"


def test_other_message_types_are_not_packets():
    assert parse_packet_message(struct.pack("=IHHII", 16, (4 << 8) | 1, 0, 0, 0)) is None
