"""The typed model as `nft -f` text and as libnftables JSON, from one place.

Text is what people read (`netfence compile -o nft`, golden files, `nft -c` checks); JSON is
what the agent hands libnftables. Both are written from the same model by the same element
formatting, so they cannot drift apart.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from netfence_agent.nft.model import (
    AnonSet,
    Chain,
    Concat,
    Counter,
    CounterRef,
    Ct,
    Expr,
    Fib,
    Limit,
    Log,
    Map,
    Match,
    Meta,
    Payload,
    Range,
    Rule,
    Ruleset,
    Set,
    SetRef,
    Table,
    Verdict,
    VMap,
)

COMMENT_MAX = 127  # libnftnl keeps at most 128 bytes of comment, NUL included

# How values of an expression or set type are spelt.
_TYPE_KIND = {
    "ipv4_addr": "addr",
    "ipv6_addr": "addr",
    "inet_proto": "word",
    "inet_service": "int",
    "ifname": "string",
    "iface_index": "int",
    "ether_addr": "word",
    "mark": "int",
}
_META_KIND = {"iifname": "string", "oifname": "string", "iif": "int", "l4proto": "word", "nfproto": "word", "mark": "int"}


def clean_comment(text: str) -> str:
    """nft comments may not hold double quotes and are capped in length."""
    text = text.replace('"', "'").replace("\n", " ")
    encoded = text.encode()
    if len(encoded) > COMMENT_MAX:
        text = encoded[: COMMENT_MAX - 3].decode(errors="ignore") + "..."
    return text


def expr_kinds(expr: Expr) -> tuple[str, ...]:
    """The value kind of each part of an expression (one part unless it is a concatenation)."""
    if isinstance(expr, Concat):
        return tuple(k for part in expr.parts for k in expr_kinds(part))
    if isinstance(expr, Payload):
        return ("int",) if expr.field in ("dport", "sport", "type") and expr.protocol != "ether" else (
            ("word",) if expr.protocol == "ether" else ("addr",)
        )
    if isinstance(expr, Meta):
        return (_META_KIND.get(expr.key, "word"),)
    return ("word",)


def set_kinds(type_: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_TYPE_KIND.get(t, "word") for t in type_)


# --------------------------------------------------------------------------- text
def _elem_text(value: Any, kinds: tuple[str, ...]) -> str:
    if isinstance(value, tuple):
        return " . ".join(_elem_text(v, (k,)) for v, k in zip(value, kinds))
    kind = kinds[0] if kinds else "word"
    if isinstance(value, Range):
        return f"{_elem_text(value.lo, (kind,))}-{_elem_text(value.hi, (kind,))}"
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        if value.prefixlen == value.max_prefixlen:
            return str(value.network_address)
        return str(value)
    if kind == "string":
        return f'"{value}"'
    return str(value)


def expr_text(expr: Expr) -> str:
    if isinstance(expr, Payload):
        if expr.protocol == "arp" and expr.field in ("saddr ip", "daddr ip"):
            return f"arp {expr.field}"
        return f"{expr.protocol} {expr.field}"
    if isinstance(expr, Meta):
        return expr.key if expr.key in ("iifname", "oifname", "iif") else f"meta {expr.key}"
    if isinstance(expr, Ct):
        return f"ct {expr.key}"
    if isinstance(expr, Fib):
        return f"fib {' . '.join(expr.flags)} {expr.result}"
    if isinstance(expr, Concat):
        return " . ".join(expr_text(p) for p in expr.parts)
    raise TypeError(expr)


def _value_text(value: Any, kinds: tuple[str, ...]) -> str:
    if isinstance(value, SetRef):
        return f"@{value.name}"
    if isinstance(value, AnonSet):
        return "{ " + ", ".join(_elem_text(e, kinds) for e in value.elements) + " }"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return _elem_text(value, kinds)


def verdict_text(v: Verdict) -> str:
    return f"{v.kind} {v.target}" if v.target else v.kind


def statement_text(st: Any) -> str:
    if isinstance(st, Match):
        op = "!= " if st.op == "!=" else ""
        return f"{expr_text(st.left)} {op}{_value_text(st.right, expr_kinds(st.left))}"
    if isinstance(st, Verdict):
        return verdict_text(st)
    if isinstance(st, VMap):
        return f"{expr_text(st.key)} vmap @{st.map}"
    if isinstance(st, CounterRef):
        return f'counter name "{st.name}"'
    if isinstance(st, Limit):
        burst = f" burst {st.burst} packets" if st.burst else ""
        return f"limit rate {st.rate}/{st.per}{burst}"
    if isinstance(st, Log):
        prefix = f'prefix "{clean_comment(st.prefix)}" ' if st.prefix else ""
        return f"log {prefix}group {st.group}"
    raise TypeError(st)


def rule_text(rule: Rule) -> str:
    body = " ".join(statement_text(s) for s in rule.statements)
    return f'{body} comment "{clean_comment(rule.comment)}"' if rule.comment else body


def _elements_text(elements: list, kinds: tuple[str, ...], indent: str) -> list[str]:
    if not elements:
        return []
    parts = [_elem_text(e, kinds) for e in elements]
    return [f"{indent}elements = {{ " + f",\n{indent}             ".join(parts) + " }"]


def table_text(table: Table) -> str:
    t1, t2 = "\t", "\t\t"
    lines = [f"table {table.family} {table.name} {{"]
    if table.comment:
        lines.append(f'{t1}comment "{clean_comment(table.comment)}"')
    for counter in table.counters.values():
        if counter.comment:
            lines += [f"{t1}counter {counter.name} {{", f'{t2}comment "{clean_comment(counter.comment)}"', f"{t1}}}"]
        else:
            lines.append(f"{t1}counter {counter.name} {{ }}")
    for s in table.sets.values():
        lines.append(f"{t1}set {s.name} {{")
        lines.append(f"{t2}type {' . '.join(s.type)}")
        if s.flags:
            lines.append(f"{t2}flags {','.join(s.flags)}")
        if s.comment:
            lines.append(f'{t2}comment "{clean_comment(s.comment)}"')
        lines += _elements_text(s.elements, set_kinds(s.type), t2)
        lines.append(f"{t1}}}")
    for m in table.maps.values():
        lines.append(f"{t1}map {m.name} {{")
        lines.append(f"{t2}type {' . '.join(m.type)} : verdict")
        if m.flags:
            lines.append(f"{t2}flags {','.join(m.flags)}")
        if m.comment:
            lines.append(f'{t2}comment "{clean_comment(m.comment)}"')
        kinds = set_kinds(m.type)
        entries = [f"{_elem_text(k, kinds)} : {verdict_text(v)}" for k, v in m.elements]
        if entries:
            lines.append(f"{t2}elements = {{ " + f",\n{t2}             ".join(entries) + " }")
        lines.append(f"{t1}}}")
    for chain in table.chains.values():
        lines.append(f"{t1}chain {chain.name} {{")
        if chain.comment:
            lines.append(f'{t2}comment "{clean_comment(chain.comment)}"')
        if chain.is_base:
            policy = f" policy {chain.policy};" if chain.policy else ""
            lines.append(f"{t2}type {chain.type} hook {chain.hook} priority {chain.priority};{policy}")
        lines += [f"{t2}{rule_text(r)}" for r in chain.rules]
        lines.append(f"{t1}}}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def ruleset_text(ruleset: Ruleset) -> str:
    return "\n".join(table_text(t) for t in ruleset.tables)


# --------------------------------------------------------------------------- JSON
def _elem_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"concat": [_elem_json(v) for v in value]}
    if isinstance(value, Range):
        return {"range": [_elem_json(value.lo), _elem_json(value.hi)]}
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        if value.prefixlen == value.max_prefixlen:
            return str(value.network_address)
        return {"prefix": {"addr": str(value.network_address), "len": value.prefixlen}}
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    return value


def expr_json(expr: Expr) -> Any:
    if isinstance(expr, Payload):
        return {"payload": {"protocol": expr.protocol, "field": expr.field}}
    if isinstance(expr, Meta):
        return {"meta": {"key": expr.key}}
    if isinstance(expr, Ct):
        return {"ct": {"key": expr.key}}
    if isinstance(expr, Fib):
        return {"fib": {"flags": list(expr.flags), "result": expr.result}}
    if isinstance(expr, Concat):
        return {"concat": [expr_json(p) for p in expr.parts]}
    raise TypeError(expr)


def _value_json(value: Any) -> Any:
    if isinstance(value, SetRef):
        return f"@{value.name}"
    if isinstance(value, AnonSet):
        return {"set": [_elem_json(e) for e in value.elements]}
    if isinstance(value, frozenset):
        return sorted(value)
    return _elem_json(value)


def verdict_json(v: Verdict) -> dict:
    return {v.kind: {"target": v.target}} if v.target else {v.kind: None}


def statement_json(st: Any) -> dict:
    if isinstance(st, Match):
        op = st.op
        if isinstance(st.right, frozenset):
            op = "in" if op == "==" else op
        return {"match": {"op": op, "left": expr_json(st.left), "right": _value_json(st.right)}}
    if isinstance(st, Verdict):
        return verdict_json(st)
    if isinstance(st, VMap):
        return {"vmap": {"key": expr_json(st.key), "data": f"@{st.map}"}}
    if isinstance(st, CounterRef):
        return {"counter": st.name}
    if isinstance(st, Limit):
        body: dict[str, Any] = {"rate": st.rate, "per": st.per}
        if st.burst:
            body["burst"] = st.burst
        return {"limit": body}
    if isinstance(st, Log):
        body = {"group": st.group}
        if st.prefix:
            body["prefix"] = clean_comment(st.prefix)
        return {"log": body}
    raise TypeError(st)


def _type_json(type_: tuple[str, ...]) -> Any:
    return type_[0] if len(type_) == 1 else list(type_)


def table_json(table: Table) -> dict:
    body = {"family": table.family, "name": table.name}
    if table.comment:
        body["comment"] = clean_comment(table.comment)
    return {"table": body}


def chain_json(table: Table, chain: Chain) -> dict:
    body: dict[str, Any] = {"family": table.family, "table": table.name, "name": chain.name}
    if chain.comment:
        body["comment"] = clean_comment(chain.comment)
    if chain.is_base:
        body.update(type=chain.type, hook=chain.hook, prio=chain.priority)
        if chain.policy:
            body["policy"] = chain.policy
    return {"chain": body}


def set_json(table: Table, s: Set) -> dict:
    body: dict[str, Any] = {"family": table.family, "table": table.name, "name": s.name, "type": _type_json(s.type)}
    if s.flags:
        body["flags"] = list(s.flags)
    if s.comment:
        body["comment"] = clean_comment(s.comment)
    if s.elements:
        body["elem"] = [_elem_json(e) for e in s.elements]
    return {"set": body}


def map_json(table: Table, m: Map) -> dict:
    body: dict[str, Any] = {
        "family": table.family, "table": table.name, "name": m.name,
        "type": _type_json(m.type), "map": "verdict",
    }
    if m.flags:
        body["flags"] = list(m.flags)
    if m.comment:
        body["comment"] = clean_comment(m.comment)
    if m.elements:
        body["elem"] = [map_element_json(k, v) for k, v in m.elements]
    return {"map": body}


def map_element_json(key: Any, verdict: Verdict) -> list:
    return [_elem_json(key), verdict_json(verdict)]


def counter_json(table: Table, c: Counter) -> dict:
    body: dict[str, Any] = {"family": table.family, "table": table.name, "name": c.name}
    if c.comment:
        body["comment"] = clean_comment(c.comment)
    return {"counter": body}


def rule_json(table: Table, chain: Chain, rule: Rule) -> dict:
    body: dict[str, Any] = {
        "family": table.family, "table": table.name, "chain": chain.name,
        "expr": [statement_json(s) for s in rule.statements],
    }
    if rule.comment:
        body["comment"] = clean_comment(rule.comment)
    return {"rule": body}


def element_json(table: Table, set_name: str, elements: list, interval: bool = False) -> dict:
    """Set elements for an `add`/`delete element` command. In an interval set a single address
    is written as a full-length prefix: libnftables 1.0.6 turns a bare address into a range when
    adding but not when deleting from a set of concatenated intervals (the kernel then finds no
    such element)."""
    return {"element": {"family": table.family, "table": table.name, "name": set_name,
                        "elem": [_interval_elem_json(e) if interval else _elem_json(e) for e in elements]}}


def _interval_elem_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"concat": [_interval_elem_json(v) for v in value]}
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return {"prefix": {"addr": str(value.network_address), "len": value.prefixlen}}
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return {"prefix": {"addr": str(value), "len": value.max_prefixlen}}
    return _elem_json(value)


def map_elements_json(table: Table, map_name: str, elements: list[tuple[Any, Verdict]]) -> dict:
    return {"element": {"family": table.family, "table": table.name, "name": map_name,
                        "elem": [map_element_json(k, v) for k, v in elements]}}


def table_add_commands(table: Table) -> list[dict]:
    """`add` commands creating the whole table, in dependency order (objects before rules)."""
    cmds: list[dict] = [{"add": table_json(table)}]
    cmds += [{"add": counter_json(table, c)} for c in table.counters.values()]
    cmds += [{"add": set_json(table, s)} for s in table.sets.values()]
    cmds += [{"add": chain_json(table, c)} for c in table.chains.values()]
    # Maps hold jumps to chains, so they come after the chains they name.
    cmds += [{"add": map_json(table, m)} for m in table.maps.values()]
    cmds += [{"add": rule_json(table, c, r)} for c in table.chains.values() for r in c.rules]
    return cmds
