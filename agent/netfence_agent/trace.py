"""Run one packet through the typed nftables model, chain by chain, as the kernel would.

Used by `netfence explain` and `netfence matrix`: they judge the rules an agent loads, not a
second reading of the policies. Covers what render emits: payload/meta/ct/fib matches, named
and anonymous sets with prefixes, ranges and concatenations, verdict maps, jump/goto/return,
`fib saddr|daddr type` (local = one of the node's own addresses).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from netfence_agent.nft.model import (
    AnonSet,
    Chain,
    Concat,
    CounterRef,
    Ct,
    Fib,
    Limit,
    Log,
    Match,
    Meta,
    Payload,
    Range,
    Rule,
    SetRef,
    Table,
    Verdict,
    VMap,
)
from netfence_agent.nft.serialize import rule_text

_L4 = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection as one hook of one node sees it."""

    src: str
    dst: str
    protocol: str = "TCP"  # TCP, UDP, SCTP
    dport: int = 80
    sport: int = 40000
    iifname: str = ""
    oifname: str = ""
    iif: int | None = None  # ifindex of iifname
    src_mac: str | None = None
    ct_state: str = "new"
    local_addresses: frozenset[str] = frozenset()  # addresses of the node the hook runs on

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version


@dataclass
class Step:
    chain: str
    index: int
    rule: Rule
    text: str


@dataclass
class TraceResult:
    verdict: str  # "accept" or "drop"
    steps: list[Step] = field(default_factory=list)  # rules that matched, in order
    counters: list[str] = field(default_factory=list)
    logged: bool = False
    policy: str | None = None  # set when the base chain's policy decided

    @property
    def accepted(self) -> bool:
        return self.verdict == "accept"


class TraceError(RuntimeError):
    pass


def _field(expr, pkt: Packet):
    """The packet's value for an expression; None when the packet has no such field."""
    if isinstance(expr, Concat):
        parts = tuple(_field(p, pkt) for p in expr.parts)
        return None if any(p is None for p in parts) else parts
    if isinstance(expr, Payload):
        if expr.protocol in ("ip", "ip6"):
            if (expr.protocol == "ip") != (pkt.version == 4):
                return None
            return ipaddress.ip_address(pkt.src if expr.field == "saddr" else pkt.dst)
        if expr.protocol == "th":
            return pkt.dport if expr.field == "dport" else pkt.sport
        if expr.protocol in ("tcp", "udp", "sctp"):  # `tcp dport`: only packets of that protocol
            if _L4[pkt.protocol] != expr.protocol:
                return None
            return pkt.dport if expr.field == "dport" else pkt.sport
        if expr.protocol == "ether" and expr.field == "saddr":
            return pkt.src_mac
        return None  # arp, icmpv6: the traced packet is TCP/UDP/SCTP over IP
    if isinstance(expr, Meta):
        return {
            "l4proto": _L4[pkt.protocol],
            "nfproto": "ipv4" if pkt.version == 4 else "ipv6",
            "iifname": pkt.iifname,
            "oifname": pkt.oifname,
            "iif": pkt.iif,
        }.get(expr.key)
    if isinstance(expr, Ct):
        return pkt.ct_state if expr.key == "state" else None
    if isinstance(expr, Fib):
        if expr.flags in (("saddr",), ("daddr",)) and expr.result == "type":
            address = pkt.src if expr.flags == ("saddr",) else pkt.dst
            return "local" if address in pkt.local_addresses else "unicast"
        return None
    raise TraceError(f"cannot trace expression {expr!r}")


def _element_matches(element, value) -> bool:
    if isinstance(element, tuple):
        return isinstance(value, tuple) and len(element) == len(value) and all(
            _element_matches(e, v) for e, v in zip(element, value)
        )
    if isinstance(element, Range):
        return element.lo <= value <= element.hi
    if isinstance(element, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and value.version == element.version and value in element
    if isinstance(element, str) and isinstance(value, str):
        return element.lower() == value.lower()
    return element == value


def _in_elements(elements, value) -> bool:
    return any(_element_matches(e, value) for e in elements)


def _match(st: Match, table: Table, pkt: Packet) -> bool:
    value = _field(st.left, pkt)
    if value is None:
        return False
    right = st.right
    if isinstance(right, SetRef):
        if right.name not in table.sets:
            raise TraceError(f"rule refers to missing set @{right.name}")
        hit = _in_elements(table.sets[right.name].elements, value)
    elif isinstance(right, AnonSet):
        hit = _in_elements(right.elements, value)
    elif isinstance(right, frozenset):
        hit = value in right
    else:
        hit = _element_matches(right, value)
    return hit if st.op == "==" else not hit


def trace(table: Table, hook: str, pkt: Packet) -> TraceResult:
    """The verdict of every base chain of `table` on `hook`, in priority order.

    A drop in any base chain ends it; an accept only ends that base chain (as in the kernel).
    """
    result = TraceResult("accept")
    for base in sorted((c for c in table.base_chains() if c.hook == hook), key=lambda c: c.priority):
        verdict = _run_base_chain(table, base, pkt, result)
        if verdict == "drop":
            result.verdict = "drop"
            return result
    return result


def _run_base_chain(table: Table, base: Chain, pkt: Packet, result: TraceResult) -> str:
    # Call stack of (chain, next rule index), as nft keeps it for jump/goto/return.
    stack: list[tuple[Chain, int]] = [(base, 0)]
    for _ in range(100_000):  # bounded: a loop in the rules would be a render bug
        if not stack:
            result.policy = base.policy or "accept"
            return base.policy or "accept"
        chain, index = stack.pop()
        if index >= len(chain.rules):
            if not stack:
                result.policy = base.policy or "accept"
                return base.policy or "accept"
            continue  # implicit return to the caller
        stack.append((chain, index + 1))
        rule = chain.rules[index]
        verdict = _run_rule(table, chain, index, rule, pkt, result)
        if verdict is None:
            continue
        kind, target = verdict.kind, verdict.target
        if kind in ("accept", "drop"):
            return kind
        if kind == "continue":
            continue
        if kind == "return":
            stack.pop()
            continue
        if target not in table.chains:
            raise TraceError(f"{kind} to missing chain {target}")
        if kind == "goto":
            stack.pop()
        stack.append((table.chains[target], 0))
    raise TraceError("rule evaluation did not terminate")


def _run_rule(table: Table, chain: Chain, index: int, rule: Rule, pkt: Packet, result: TraceResult) -> Verdict | None:
    counters: list[str] = []
    logged = False
    for st in rule.statements:
        if isinstance(st, Match):
            if not _match(st, table, pkt):
                return None
        elif isinstance(st, CounterRef):
            counters.append(st.name)
        elif isinstance(st, Limit):
            pass  # the first packet is always within the rate
        elif isinstance(st, Log):
            logged = True
        elif isinstance(st, VMap):
            value = _field(st.key, pkt)
            if value is None or st.map not in table.maps:
                if st.map not in table.maps:
                    raise TraceError(f"rule refers to missing map @{st.map}")
                return None
            for key, verdict in table.maps[st.map].elements:
                if _element_matches(key, value):
                    result.steps.append(Step(chain.name, index, rule, rule_text(rule)))
                    return verdict
            return None
        elif isinstance(st, Verdict):
            result.steps.append(Step(chain.name, index, rule, rule_text(rule)))
            result.counters += counters
            result.logged |= logged
            return st
        else:
            raise TraceError(f"cannot trace statement {st!r}")
    # A rule without a verdict (counter or log only) matched: note it and go on.
    result.steps.append(Step(chain.name, index, rule, rule_text(rule)))
    result.counters += counters
    result.logged |= logged
    return None
