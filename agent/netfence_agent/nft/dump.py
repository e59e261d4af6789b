"""Reading nf_tables objects straight from the kernel over nfnetlink (read-only, stdlib).

Why not `list ...` through libnftables: version 1.0.6 fills its whole cache - every rule and
every set element of every table - before answering any `list` command. At 1,000 pods and
500 policies (8,000 rules, 20,000 set elements) that is 1-2 s for one `list counters`, and a
/metrics scrape or the inventory before a full sync would pay it each time. A filtered kernel
dump of just the objects asked for (chains, sets, counter objects of one table) takes
milliseconds. Everything that changes the kernel still goes through libnftables (kernel.py).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from netfence_agent.nfnetlink import (
    NETLINK_NETFILTER,
    NFGEN,
    NLA,
    NLA_TYPE_MASK,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_ERROR,
    attribute,
    attributes,
    each_attribute,
)

NFNL_SUBSYS_NFTABLES = 10
NLM_F_DUMP = 0x300
NLMSG_DONE = 3

NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_GETOBJ = 1, 4, 10, 13, 19
NFTA_TABLE_NAME, NFTA_TABLE_USERDATA = 1, 6
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE, NFTA_CHAIN_USERDATA = 1, 3, 4, 5, 7, 12
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE, NFTA_SET_USERDATA = 1, 2, 3, 4, 13
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_LIST_ELEM = 1, 2, 3, 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY_END = 1, 2, 3, 10
NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2, 1, 2
NFT_SET_ELEM_INTERVAL_END = 0x1
VERDICT_NAMES = {0: "drop", 1: "accept", -1: "continue", -2: "break", -3: "jump", -4: "goto", -5: "return"}
NFT_OBJECT_COUNTER = 1

NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_INTERVAL, NFT_SET_MAP = 0x1, 0x2, 0x4, 0x8
NFT_SET_TIMEOUT, NFT_SET_EVAL = 0x10, 0x20
SET_FLAG_NAMES = {"constant": NFT_SET_CONSTANT, "interval": NFT_SET_INTERVAL,
                  "timeout": NFT_SET_TIMEOUT, "dynamic": NFT_SET_EVAL}

# Comments live in the objects' userdata TLVs (libnftnl's NFTNL_UDATA_*_COMMENT).
UDATA_TABLE_COMMENT, UDATA_CHAIN_COMMENT, UDATA_SET_COMMENT = 0, 0, 7

NFPROTO = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
FAMILY_NAMES = {v: k for k, v in NFPROTO.items()}
HOOK_NAMES = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting", 5: "ingress"}
NETDEV_HOOK_NAMES = {0: "ingress", 1: "egress"}

# nft's datatype ids (include/datatype.h); a concatenation folds them 6 bits at a time.
DATATYPE_IDS = {
    "ipv4_addr": 7, "ipv6_addr": 8, "ether_addr": 9, "ether_type": 10, "inet_proto": 12,
    "inet_service": 13, "mark": 19, "iface_index": 20, "ifname": 41,
}
# How a value of each type sits in a set element's key: its width in bytes and how to read it.
# In a concatenation every part starts on a 4-byte boundary (nft registers are 32 bits).
_VALUE_WIDTH = {"ipv4_addr": 4, "ipv6_addr": 16, "ether_addr": 6, "ether_type": 2, "inet_proto": 1,
                "inet_service": 2, "mark": 4, "iface_index": 4, "ifname": 16}
_HOST_ORDER = frozenset({"iface_index", "mark"})
DATATYPE_NAMES = {v: k for k, v in DATATYPE_IDS.items()}
TYPE_BITS = 6



def concat_type_id(types: tuple[str, ...]) -> int | None:
    """The key type id nft gives a set of these types (None: a type this module does not know)."""
    value = 0
    for name in types:
        if name not in DATATYPE_IDS:
            return None
        value = value << TYPE_BITS | DATATYPE_IDS[name]
    return value


def type_names(type_id: int) -> tuple[str, ...]:
    parts = []
    while type_id:
        parts.append(DATATYPE_NAMES.get(type_id & ((1 << TYPE_BITS) - 1), f"type{type_id & 63}"))
        type_id >>= TYPE_BITS
    return tuple(reversed(parts))


@dataclass(frozen=True)
class ChainInfo:
    name: str
    hook: str | None
    type: str | None
    priority: int | None
    policy: str | None
    comment: str


@dataclass(frozen=True)
class SetInfo:
    name: str
    type: tuple[str, ...]
    flags: frozenset[str]
    is_map: bool
    comment: str


@dataclass(frozen=True)
class CounterInfo:
    name: str
    packets: int
    bytes: int


@dataclass(frozen=True)
class ElementInfo:
    """One element of a named set or map, its key read by the set's types."""

    key: tuple
    key_end: tuple | None = None  # interval sets of concatenations: the range's last key
    interval_end: bool = False  # plain interval sets: this element closes a range
    verdict: tuple[str, str | None] | None = None  # verdict maps: (verdict, chain)


# The same elements come back on every read: decoded once, a read costs a lookup per element.
@lru_cache(maxsize=1 << 15)
def _element(raw: bytes, types: tuple[str, ...], interval: bool) -> ElementInfo:
    e = attributes(raw)
    end = _data_value(e[NFTA_SET_ELEM_KEY_END]) if NFTA_SET_ELEM_KEY_END in e else None
    verdict = None
    if NFTA_SET_ELEM_DATA in e:
        v = attributes(attributes(e[NFTA_SET_ELEM_DATA]).get(NFTA_DATA_VERDICT, b""))
        if NFTA_VERDICT_CODE in v:
            code = struct.unpack("!i", v[NFTA_VERDICT_CODE][:4])[0]
            verdict = (VERDICT_NAMES.get(code, str(code)), _string(v[NFTA_VERDICT_CHAIN]) if NFTA_VERDICT_CHAIN in v else None)
    return ElementInfo(decode_key(_data_value(e.get(NFTA_SET_ELEM_KEY)), types, interval),
                       decode_key(end, types, interval) if end is not None else None,
                       bool((_be32(e.get(NFTA_SET_ELEM_FLAGS)) or 0) & NFT_SET_ELEM_INTERVAL_END), verdict)


def decode_key(raw: bytes, types: tuple[str, ...], interval: bool = False) -> tuple:
    """A set element's key as values: addresses as inet_ntop spells them, MACs as lower-case
    text, names as str, numbers as int. Host-order types (iface_index, mark) are stored in host
    order, except in interval sets, where nft turns them to network order for range lookups."""
    values, offset = [], 0
    for name in types:
        width = _VALUE_WIDTH.get(name)
        if width is None:  # a type this module does not know: the rest as bytes
            values.append(raw[offset:])
            break
        part = raw[offset: offset + width]
        if name == "ipv4_addr":
            values.append(socket.inet_ntop(socket.AF_INET, part))
        elif name == "ipv6_addr":
            values.append(socket.inet_ntop(socket.AF_INET6, part))
        elif name == "ether_addr":
            values.append(part.hex(":"))
        elif name == "ifname":
            values.append(_string(part))
        elif name in _HOST_ORDER and not interval:
            values.append(int.from_bytes(part, sys.byteorder))
        else:
            values.append(int.from_bytes(part, "big"))
        offset += (width + 3) & ~3 if len(types) > 1 else width
    return tuple(values)


def _data_value(nested: bytes | None) -> bytes:
    """The NFTA_DATA_VALUE a key attribute holds (its only attribute)."""
    if not nested or len(nested) < NLA.size:
        return b""
    length, kind = NLA.unpack_from(nested, 0)
    return nested[NLA.size: length] if kind & NLA_TYPE_MASK == NFTA_DATA_VALUE else b""


def _string(value: bytes | None) -> str:
    return (value or b"").split(b"\0", 1)[0].decode(errors="replace")


def _be32(value: bytes | None) -> int | None:
    return struct.unpack("!I", value[:4])[0] if value and len(value) >= 4 else None


def udata_comment(udata: bytes | None, comment_type: int) -> str:
    """libnftnl userdata: a run of (u8 type, u8 length, value) records."""
    offset, data = 0, udata or b""
    while offset + 2 <= len(data):
        kind, length = data[offset], data[offset + 1]
        if kind == comment_type:
            return _string(data[offset + 2: offset + 2 + length])
        offset += 2 + length
    return ""


class NftDumper:
    """A NETLINK_NETFILTER socket in the namespace of the thread that created it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _dump(self, msg: int, family: str | int, attrs: bytes = b"") -> Iterator[tuple[int, dict[int, bytes]]]:
        """(nfproto family, attributes) of each object in the dump."""
        self._seq += 1
        proto = NFPROTO[family] if isinstance(family, str) else family
        body = NFGEN.pack(proto, 0, 0) + attrs
        header = NLMSG.pack(NLMSG.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg,
                             NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0)
        self.sock.send(header + body)
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + NLMSG.size <= len(data):
                length, msg_type, _flags, seq, _pid = NLMSG.unpack_from(data, offset)
                if length < NLMSG.size:
                    break
                if seq == self._seq:
                    if msg_type == NLMSG_DONE:
                        return
                    if msg_type == NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, offset + NLMSG.size)[0]
                        if code:
                            raise OSError(-code, f"nfnetlink dump: {os.strerror(-code)}")
                        return
                    nf_family = data[offset + NLMSG.size]
                    yield nf_family, attributes(data, offset + NLMSG.size + NFGEN.size, offset + length)
                offset += (length + 3) & ~3

    def tables(self) -> set[tuple[str, str]]:
        return {(FAMILY_NAMES.get(f, str(f)), _string(a.get(NFTA_TABLE_NAME))) for f, a in self._dump(NFT_MSG_GETTABLE, 0)}

    def chains(self, family: str, table: str) -> list[ChainInfo]:
        out = []
        for _f, a in self._dump(NFT_MSG_GETCHAIN, family, attribute(NFTA_CHAIN_TABLE, table.encode() + b"\0")):
            if _string(a.get(NFTA_CHAIN_TABLE)) != table:
                continue
            hook = type_ = priority = policy = None
            if NFTA_CHAIN_HOOK in a:
                h = attributes(a[NFTA_CHAIN_HOOK])
                number = _be32(h.get(NFTA_HOOK_HOOKNUM))
                hook = (NETDEV_HOOK_NAMES if family == "netdev" else HOOK_NAMES).get(number, str(number))
                raw = h.get(NFTA_HOOK_PRIORITY)
                priority = struct.unpack("!i", raw[:4])[0] if raw else None
                type_ = _string(a.get(NFTA_CHAIN_TYPE)) or None
                policy = {0: "drop", 1: "accept"}.get(_be32(a.get(NFTA_CHAIN_POLICY)), "accept")
            out.append(ChainInfo(_string(a.get(NFTA_CHAIN_NAME)), hook, type_, priority, policy,
                                 udata_comment(a.get(NFTA_CHAIN_USERDATA), UDATA_CHAIN_COMMENT)))
        return out

    def sets(self, family: str, table: str) -> list[SetInfo]:
        """Named sets and maps (the anonymous sets of rules such as `{ tcp . 80 }` left out)."""
        out = []
        for _f, a in self._dump(NFT_MSG_GETSET, family, attribute(NFTA_SET_TABLE, table.encode() + b"\0")):
            flags = _be32(a.get(NFTA_SET_FLAGS)) or 0
            if _string(a.get(NFTA_SET_TABLE)) != table or flags & NFT_SET_ANONYMOUS:
                continue
            out.append(SetInfo(
                name=_string(a.get(NFTA_SET_NAME)),
                type=type_names(_be32(a.get(NFTA_SET_KEY_TYPE)) or 0),
                flags=frozenset(n for n, bit in SET_FLAG_NAMES.items() if flags & bit),
                is_map=bool(flags & NFT_SET_MAP),
                comment=udata_comment(a.get(NFTA_SET_USERDATA), UDATA_SET_COMMENT),
            ))
        return out

    def elements(self, family: str, table: str, set_name: str, types: tuple[str, ...],
                 interval: bool = False) -> list[ElementInfo]:
        """The elements of one named set or map (types and interval: as its SetInfo says)."""
        request = (attribute(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                   + attribute(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        return [_element(element, types, interval)
                for _f, a in self._dump(NFT_MSG_GETSETELEM, family, request)
                for kind, element in each_attribute(a.get(NFTA_SET_ELEM_LIST_ELEMENTS, b""))
                if kind == NFTA_LIST_ELEM]

    def counters(self, family: str, table: str) -> list[CounterInfo]:
        request = attribute(NFTA_OBJ_TABLE, table.encode() + b"\0") + attribute(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
        out = []
        for _f, a in self._dump(NFT_MSG_GETOBJ, family, request):
            if _string(a.get(NFTA_OBJ_TABLE)) != table or _be32(a.get(NFTA_OBJ_TYPE)) != NFT_OBJECT_COUNTER:
                continue
            data = attributes(a.get(NFTA_OBJ_DATA, b""))
            packets = data.get(NFTA_COUNTER_PACKETS)
            count = data.get(NFTA_COUNTER_BYTES)
            out.append(CounterInfo(_string(a.get(NFTA_OBJ_NAME)),
                                   struct.unpack("!Q", packets)[0] if packets else 0,
                                   struct.unpack("!Q", count)[0] if count else 0))
        return out
