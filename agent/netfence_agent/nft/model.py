"""Typed nftables objects: what render produces, what apply loads and what trace walks.

The model is plain data. `netfence_agent.nft.serialize` turns it into `nft -f` text and into
libnftables JSON commands; `netfence_agent.trace` runs packets through it. Keeping one model
for all three is what makes `netfence matrix` report on exactly the rules an agent loads.

Set and map elements are Python values:
  - an address: `ipaddress.IPv4Address`/`IPv6Address`; a prefix: `IPv4Network`/`IPv6Network`
  - a port or protocol number: `int`; an interface name, protocol name or MAC: `str`
  - a range: `Range(lo, hi)`; a concatenation: `tuple` of the above
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, Union

Family = Literal["inet", "bridge", "ip", "ip6", "netdev"]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class Range:
    lo: object
    hi: object


Element = Union[Address, Network, int, str, Range, tuple]


# --------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Payload:
    """A header field: ("ip", "saddr"), ("ip6", "daddr"), ("th", "dport"), ("ether", "saddr")."""

    protocol: str
    field: str


@dataclass(frozen=True)
class Meta:
    """Packet metadata: "l4proto", "nfproto", "iifname", "oifname", "iif" (ifindex), "mark"."""

    key: str


@dataclass(frozen=True)
class Ct:
    """Connection tracking: "state"."""

    key: str


@dataclass(frozen=True)
class Fib:
    """A FIB lookup, e.g. Fib(("saddr",), "type") for `fib saddr type`."""

    flags: tuple[str, ...]
    result: str


@dataclass(frozen=True)
class Concat:
    parts: tuple["Expr", ...]


Expr = Union[Payload, Meta, Ct, Fib, Concat]


@dataclass(frozen=True)
class SetRef:
    """A named set or map of the same table: `@name`."""

    name: str


@dataclass(frozen=True)
class AnonSet:
    """An inline set `{ a, b }`."""

    elements: tuple[Element, ...]


Value = Union[SetRef, AnonSet, Element, frozenset]  # frozenset: flag values, e.g. ct state {established, related}


# --------------------------------------------------------------------------- statements
@dataclass(frozen=True)
class Match:
    left: Expr
    right: Value
    op: Literal["==", "!="] = "=="


@dataclass(frozen=True)
class Verdict:
    kind: Literal["accept", "drop", "return", "jump", "goto", "continue"]
    target: str | None = None


@dataclass(frozen=True)
class VMap:
    """`<key> vmap @map`: dispatch on a verdict map."""

    key: Expr
    map: str


@dataclass(frozen=True)
class CounterRef:
    """Count into a named counter object: `counter name "x"`."""

    name: str


@dataclass(frozen=True)
class Limit:
    rate: int
    per: Literal["second", "minute"] = "second"
    burst: int | None = None


@dataclass(frozen=True)
class Log:
    """NFLOG to a netlink group (`log prefix "..." group N`)."""

    group: int
    prefix: str = ""


Statement = Union[Match, Verdict, VMap, CounterRef, Limit, Log]


@dataclass(frozen=True)
class Rule:
    statements: tuple[Statement, ...]
    comment: str = ""


# --------------------------------------------------------------------------- objects
@dataclass
class Chain:
    name: str
    rules: list[Rule] = field(default_factory=list)
    comment: str = ""
    hook: str | None = None  # base chain when set
    type: str = "filter"
    priority: int = 0
    policy: Literal["accept", "drop"] | None = None

    @property
    def is_base(self) -> bool:
        return self.hook is not None


@dataclass
class Set:
    name: str
    type: tuple[str, ...]  # e.g. ("ipv4_addr",) or ("ipv4_addr", "inet_proto", "inet_service")
    elements: list[Element] = field(default_factory=list)
    flags: tuple[str, ...] = ()  # "interval"
    comment: str = ""


@dataclass
class Map:
    """A verdict map: key -> Verdict."""

    name: str
    type: tuple[str, ...]
    elements: list[tuple[Element, Verdict]] = field(default_factory=list)
    flags: tuple[str, ...] = ()
    comment: str = ""


@dataclass
class Counter:
    name: str
    comment: str = ""


@dataclass
class Table:
    family: Family
    name: str
    comment: str = ""
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, Set] = field(default_factory=dict)
    maps: dict[str, Map] = field(default_factory=dict)
    counters: dict[str, Counter] = field(default_factory=dict)

    def add(self, obj: Chain | Set | Map | Counter) -> Chain | Set | Map | Counter:
        registry = getattr(self, _REGISTRY[type(obj)])
        if obj.name in registry:
            raise ValueError(f"table {self.family} {self.name}: duplicate {type(obj).__name__.lower()} {obj.name}")
        registry[obj.name] = obj
        return obj

    def base_chains(self) -> list[Chain]:
        return [c for c in self.chains.values() if c.is_base]


_REGISTRY = {Chain: "chains", Set: "sets", Map: "maps", Counter: "counters"}


@dataclass
class Ruleset:
    """Every table netfence owns on one node."""

    tables: list[Table] = field(default_factory=list)

    def table(self, family: str, name: str) -> Table:
        for t in self.tables:
            if t.family == family and t.name == name:
                return t
        raise KeyError(f"{family} {name}")
