"""Drop logging: read the NFLOG group the drop rules log to, one JSON line per dropped packet.

Stdlib only (DESIGN.md §4: pyroute2 has no NFLOG client): an AF_NETLINK / NETLINK_NETFILTER
socket bound to the group with NFULNL_MSG_CONFIG, then NFULNL_MSG_PACKET messages whose
attributes carry the log prefix and the first bytes of the packet. The prefix names the nft
counter of the drop rule (render.log_prefix), which names namespace, pod and direction; the
5-tuple comes from the packet's IP and TCP/UDP headers. The rules log at a limited rate
(RenderOptions.log_rate_per_second), so this is a sample when a pod is flooded.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Mapping, TextIO

from netfence_agent.nfnetlink import NETLINK_NETFILTER, NFGEN, NLM_F_REQUEST, NLMSG, NLMSG_ERROR, attribute, attributes
from netfence_agent.render import CounterLabels, log_prefix

log = logging.getLogger("netfence.nflog")

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLM_F_ACK = 0x4

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2

NFULA_PACKET_HDR = 1
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
COPY_BYTES = 128  # IP + TCP/UDP headers, with IPv6 extension headers to spare


@dataclass(frozen=True)
class LoggedPacket:
    prefix: str
    hw_protocol: int | None
    payload: bytes
    indev: int | None = None
    outdev: int | None = None


@dataclass(frozen=True)
class FiveTuple:
    protocol: str | None
    src: str | None
    dst: str | None
    sport: int | None = None
    dport: int | None = None


def parse_packet_message(message: bytes) -> LoggedPacket | None:
    """One netlink message (header included) of type NFULNL_MSG_PACKET, or None."""
    _length, msg_type, _flags, _seq, _pid = NLMSG.unpack_from(message, 0)
    if msg_type != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
        return None
    attrs = attributes(message, NLMSG.size + NFGEN.size)
    hdr = attrs.get(NFULA_PACKET_HDR)
    indev = attrs.get(NFULA_IFINDEX_INDEV)
    outdev = attrs.get(NFULA_IFINDEX_OUTDEV)
    return LoggedPacket(
        prefix=attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace"),
        hw_protocol=struct.unpack_from("!H", hdr)[0] if hdr and len(hdr) >= 2 else None,
        payload=attrs.get(NFULA_PAYLOAD, b""),
        indev=struct.unpack("!I", indev)[0] if indev and len(indev) == 4 else None,
        outdev=struct.unpack("!I", outdev)[0] if outdev and len(outdev) == 4 else None,
    )


def five_tuple(payload: bytes, hw_protocol: int | None = None) -> FiveTuple:
    """Protocol, addresses and ports from a packet starting at its network header."""
    if not payload:
        return FiveTuple(None, None, None)
    if hw_protocol == ETH_P_ARP:
        if len(payload) >= 28:
            return FiveTuple("arp", str(ipaddress.IPv4Address(payload[14:18])), str(ipaddress.IPv4Address(payload[24:28])))
        return FiveTuple("arp", None, None)
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src, dst = ipaddress.IPv4Address(payload[12:16]), ipaddress.IPv4Address(payload[16:20])
        fragment_offset = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        transport = payload[header:] if fragment_offset == 0 else b""
    elif version == 6 and len(payload) >= 40:
        proto, offset = payload[6], 40
        src, dst = ipaddress.IPv6Address(payload[8:24]), ipaddress.IPv6Address(payload[24:40])
        while proto in (0, 43, 60) and offset + 8 <= len(payload):  # hop-by-hop, routing, dest opts
            proto, offset = payload[offset], offset + (payload[offset + 1] + 1) * 8
        transport = payload[offset:]
    else:
        return FiveTuple(None, None, None)
    sport = dport = None
    if proto in (6, 17, 132) and len(transport) >= 4:
        sport, dport = struct.unpack_from("!HH", transport, 0)
    return FiveTuple(_PROTO_NAMES.get(proto, str(proto)), str(src), str(dst), sport, dport)


PREFIX_TAG = log_prefix("")  # what render puts before the counter name


def drop_record(packet: LoggedPacket, labels: Mapping[str, CounterLabels]) -> dict:
    """The JSON log line of one logged drop."""
    counter = packet.prefix[len(PREFIX_TAG):] if packet.prefix.startswith(PREFIX_TAG) else None
    owner = labels.get(counter) if counter else None
    kind = owner.kind if owner else None
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "msg": "packet dropped",
        "namespace": owner.namespace if owner else None,
        "pod": owner.pod if owner else None,
        # A spoofed frame is one the pod sent: it is the pod's egress, dropped for its source.
        "direction": "egress" if kind == "spoof" else kind.removeprefix("held_") if kind else None,
        "reason": ("spoofed-source" if kind == "spoof" else "held-new-pod" if kind and kind.startswith("held_")
                   else "policy" if kind else None),
    }
    record.update(asdict(five_tuple(packet.payload, packet.hw_protocol)))
    if owner is None:
        record["prefix"] = packet.prefix
    return record


class NflogReader:
    """Binds an NFLOG group in this network namespace and writes a JSON line per packet."""

    def __init__(self, group: int, labels: Callable[[], Mapping[str, CounterLabels]], out: TextIO = sys.stdout):
        self.group = group
        self.labels = labels
        self.out = out
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        self._seq = 0
        self._configure(attribute(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND)))
        self._configure(attribute(NFULA_CFG_MODE, struct.pack("!IBB", COPY_BYTES, NFULNL_COPY_PACKET, 0)))
        # Deliver every packet at once instead of batching up to a second's worth.
        self._configure(attribute(NFULA_CFG_QTHRESH, struct.pack("!I", 1)) + attribute(NFULA_CFG_TIMEOUT, struct.pack("!I", 0)))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _configure(self, attrs: bytes) -> None:
        self._seq += 1
        body = NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(self.group)) + attrs
        msg_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        self.sock.send(NLMSG.pack(NLMSG.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0) + body)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # logged packets may queue ahead of the answer
            readable, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + NLMSG.size <= len(data):
                length, reply_type, _flags, seq, _pid = NLMSG.unpack_from(data, offset)
                if reply_type == NLMSG_ERROR and seq == self._seq:
                    code = struct.unpack_from("=i", data, offset + NLMSG.size)[0]
                    if code:
                        raise OSError(-code, f"NFLOG group {self.group}: {os.strerror(-code)}")
                    return
                offset += max((length + 3) & ~3, NLMSG.size)
        raise OSError(f"NFLOG group {self.group}: no answer to a configuration request")

    def handle(self, data: bytes) -> None:
        offset = 0
        while offset + NLMSG.size <= len(data):
            length = NLMSG.unpack_from(data, offset)[0]
            if length < NLMSG.size:
                return
            packet = parse_packet_message(data[offset: offset + length])
            if packet is not None:
                self.out.write(json.dumps(drop_record(packet, self.labels())) + "\n")
            offset += (length + 3) & ~3
        self.out.flush()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nflog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.sock, self._wake_r], [], [])
            if self.sock not in readable:
                continue
            try:
                self.handle(self.sock.recv(1 << 20))
            except OSError as exc:  # ENOBUFS: the kernel dropped log messages; logs are a sample anyway
                log.warning("NFLOG receive: %s", exc)
            except Exception:
                log.exception("NFLOG message could not be handled")

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._configure(attribute(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_UNBIND)))
        except OSError:
            pass
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
