"""From the rules in the kernel to the rules wanted, in one atomic libnftables transaction.

Pure: two models (and what the kernel holds) in, one list of JSON commands out. Two kinds:

- **elements**: the wanted rule set has the same tables, chains, rules, counters and set/map
  declarations as the one last applied; only set or map elements differ (a pod joined a peer
  group, a pod's IP changed). `delete element` / `add element` for exactly the difference.
- **full**: anything structural changed, or nothing is known to be applied yet (agent start,
  after a failure). In the style of kube-proxy's nftables proxier, one transaction that
  `add table` (never deletes it), flushes and refills every chain, set and map, re-declares
  counters with `add counter` (idempotent: an existing counter keeps its values) and finally
  deletes what is no longer rendered. A transaction is atomic, so at no moment does the kernel
  hold a half-written rule set: the old rules are replaced in place, with no gap.

Deletion order matters inside one transaction: a chain can only go once no rule jumps to it
and no map names it, a set or counter once no rule refers to it. Flushing every existing chain
and map first removes all those references, so the deletes that follow cannot fail on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from netfence_agent.nft.model import Chain, Map, Ruleset, Set, Table
from netfence_agent.nft.serialize import (
    chain_json,
    counter_json,
    element_json,
    map_elements_json,
    map_json,
    rule_json,
    set_json,
    table_json,
)

TableKey = tuple[str, str]  # (family, name)


# --------------------------------------------------------------------------- what the kernel holds
@dataclass(frozen=True)
class ChainDecl:
    """What `add chain` cannot change in place: a base chain's type, hook, priority, policy."""

    hook: str | None = None
    type: str | None = None
    priority: int | None = None
    policy: str | None = None


@dataclass(frozen=True)
class SetDecl:
    type: tuple[str, ...]
    flags: frozenset[str] = frozenset()


@dataclass
class TableInventory:
    """Names and declarations of the objects of one table in the kernel (no rules, no elements)."""

    chains: dict[str, ChainDecl] = field(default_factory=dict)
    sets: dict[str, SetDecl] = field(default_factory=dict)
    maps: dict[str, SetDecl] = field(default_factory=dict)
    counters: set[str] = field(default_factory=set)


Inventory = dict[TableKey, TableInventory]  # only tables that exist


def chain_decl(chain: Chain) -> ChainDecl:
    if not chain.is_base:
        return ChainDecl()
    # The kernel reports the default policy of a base chain as "accept".
    return ChainDecl(chain.hook, chain.type, chain.priority, chain.policy or "accept")


def set_decl(obj: Set | Map) -> SetDecl:
    return SetDecl(tuple(obj.type), frozenset(obj.flags))


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Transaction:
    kind: Literal["noop", "elements", "full"]
    commands: list[dict] = field(default_factory=list)

    def payload(self) -> dict:
        return {"nftables": self.commands}


def plan(desired: Ruleset, applied: Ruleset | None, inventory: Callable[[], Inventory]) -> Transaction:
    """The transaction taking the kernel to `desired`.

    `applied` is the rule set this process last loaded successfully, None before the first
    success (or when the kernel no longer holds it). `inventory` reads what the kernel holds
    now; it is only called for a full sync.
    """
    if applied is not None and structure(applied) == structure(desired):
        commands = element_commands(applied, desired)
        return Transaction("elements" if commands else "noop", commands)
    return Transaction("full", full_sync_commands(desired, inventory()))


def structure(ruleset: Ruleset) -> tuple:
    """Everything but set and map elements, as a comparable value."""
    return tuple(
        (
            t.family, t.name, t.comment,
            tuple((c.name, c.comment, chain_decl(c), tuple(c.rules)) for c in t.chains.values()),
            tuple((s.name, set_decl(s), s.comment) for s in t.sets.values()),
            tuple((m.name, set_decl(m), m.comment) for m in t.maps.values()),
            tuple((c.name, c.comment) for c in t.counters.values()),
        )
        for t in ruleset.tables
    )


# --------------------------------------------------------------------------- element-level
def element_commands(applied: Ruleset, desired: Ruleset) -> list[dict]:
    """Deletes first, then adds: a map key whose verdict changes is deleted and re-added."""
    deletes: list[dict] = []
    adds: list[dict] = []
    for table in desired.tables:
        old = applied.table(table.family, table.name)
        for s in table.sets.values():
            before, after = _unique(old.sets[s.name].elements), _unique(s.elements)
            gone = [e for e in before if e not in after]
            new = [e for e in after if e not in before]
            if gone:
                deletes.append({"delete": element_json(table, s.name, gone)})
            if new:
                adds.append({"add": element_json(table, s.name, new)})
        for m in table.maps.values():
            before, after = dict(old.maps[m.name].elements), dict(m.elements)
            gone = [(k, v) for k, v in before.items() if after.get(k) != v]
            new = [(k, v) for k, v in after.items() if before.get(k) != v]
            if gone:
                deletes.append({"delete": map_elements_json(table, m.name, gone)})
            if new:
                adds.append({"add": map_elements_json(table, m.name, new)})
    return deletes + adds


def _unique(elements: list) -> dict:
    return dict.fromkeys(elements)  # ordered, O(1) membership


# --------------------------------------------------------------------------- full sync
def full_sync_commands(desired: Ruleset, inventory: Inventory) -> list[dict]:
    commands: list[dict] = []
    for table in desired.tables:
        commands += _full_sync_table(table, inventory.get((table.family, table.name), TableInventory()))
    return commands


def _full_sync_table(table: Table, have: TableInventory) -> list[dict]:
    cmds: list[dict] = [{"add": table_json(table)}]
    ref = {"family": table.family, "table": table.name}

    # 1. Drop every reference between objects: rules (jumps, set and counter references) and
    #    map verdicts (jumps). What stays is refilled below; what goes can now be deleted.
    cmds += [{"flush": {"chain": {**ref, "name": name}}} for name in have.chains]
    cmds += [{"flush": {"map": {**ref, "name": name}}} for name in have.maps]

    # 2. Delete what is no longer rendered, and what changed a declaration `add` cannot change
    #    (set type or flags, base chain hook or priority): those are re-created in step 3.
    kept_maps = {n for n, d in have.maps.items() if n in table.maps and set_decl(table.maps[n]) == d}
    kept_sets = {n for n, d in have.sets.items() if n in table.sets and set_decl(table.sets[n]) == d}
    kept_chains = {n for n, d in have.chains.items() if n in table.chains and chain_decl(table.chains[n]) == d}
    cmds += [{"delete": {"map": {**ref, "name": n}}} for n in have.maps if n not in kept_maps]
    cmds += [{"delete": {"set": {**ref, "name": n}}} for n in have.sets if n not in kept_sets]
    cmds += [{"delete": {"counter": {**ref, "name": n}}} for n in sorted(have.counters - table.counters.keys())]
    cmds += [{"delete": {"chain": {**ref, "name": n}}} for n in have.chains if n not in kept_chains]

    # 3. Declare and fill everything wanted. `add` of an existing object is a no-op, so kept
    #    counters keep their packet and byte counts.
    cmds += [{"add": counter_json(table, c)} for c in table.counters.values()]
    for s in table.sets.values():
        cmds.append({"add": set_json(table, s, with_elements=False)})
        if s.name in kept_sets:
            cmds.append({"flush": {"set": {**ref, "name": s.name}}})
        if s.elements:
            cmds.append({"add": element_json(table, s.name, list(_unique(s.elements)))})
    cmds += [{"add": chain_json(table, c)} for c in table.chains.values()]
    # Maps name chains in their verdicts, so they are filled once every chain exists.
    for m in table.maps.values():
        cmds.append({"add": map_json(table, m, with_elements=False)})
        if m.elements:
            cmds.append({"add": map_elements_json(table, m.name, list(dict(m.elements).items()))})
    cmds += [{"add": rule_json(table, c, r)} for c in table.chains.values() for r in c.rules]
    return cmds
