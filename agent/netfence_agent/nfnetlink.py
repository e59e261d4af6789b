"""The nfnetlink basics the NFLOG reader and the nftables dumps share: headers and attributes."""

from __future__ import annotations

import struct
from typing import Iterator

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

NLMSG = struct.Struct("=IHHII")  # length, type, flags, seq, pid
NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian)
NLA = struct.Struct("=HH")  # length, type


def attributes(data: bytes, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The netlink attributes in data[offset:end], by type (the last one of a type wins)."""
    return dict(each_attribute(data, offset, end))


def each_attribute(data: bytes, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(type, value) of every attribute in data[offset:end], in order (for lists of one type)."""
    end = len(data) if end is None else end
    while offset + NLA.size <= end:
        length, kind = NLA.unpack_from(data, offset)
        if length < NLA.size:
            break
        yield kind & NLA_TYPE_MASK, data[offset + NLA.size: offset + length]
        offset += (length + 3) & ~3


def attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    body = NLA.pack(NLA.size + len(value), kind) + value
    return body + b"\0" * (-len(body) % 4)
