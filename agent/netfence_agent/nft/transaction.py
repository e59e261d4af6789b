"""From the rules in the kernel to the rules wanted, in one atomic libnftables transaction.

Pure: models (and what the kernel holds) in, one list of libnftables JSON commands out.

Three kinds, all one transaction, so the kernel never holds a half-written rule set:

- **elements**: only set and map elements differ from what this process loaded last (a pod
  joined a peer group, a pod IP moved): `delete element` / `add element` for the difference.
- **partial**: objects differ too (a pod gained a policy, a veth appeared): only the chains,
  sets, maps and counters that changed are touched, as kube-proxy's nftables proxier does in
  its partial syncs. A chain whose rules changed is flushed and refilled; one whose comment or
  declaration changed is re-created; new objects are added, old ones deleted once nothing
  refers to them. Everything else, and every counter's value, stays as it is.
- **full**: nothing is known to be loaded by this process (agent start) or a change a partial
  sync cannot express safely. In the style of kube-proxy's full sync: `add table` (never
  deleted), every existing chain and map flushed, every wanted object declared with `add`
  (idempotent: an existing counter keeps its counts) and filled, and whatever is no longer
  rendered - or changed a declaration `add` cannot change - deleted after the flushes removed
  every reference to it.

Why partial syncs: libnftables 1.0.6 re-reads the whole table (every rule and element) to
evaluate a batch, so a full sync costs seconds at a thousand pods while a partial one costs
tens of milliseconds (docs/benchmarks.md). A new veth must be policed within milliseconds.

Deletion order matters inside one transaction: a chain can go once no rule jumps to it and no
map element names it, a set, map or counter once no rule refers to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from netfence_agent.nft.model import Chain, CounterRef, Map, Match, Rule, Ruleset, Set, SetRef, Table, Verdict, VMap
from netfence_agent.nft.serialize import (
    chain_json,
    clean_comment,
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
    """What `add chain` cannot change in place: base chain type, hook, priority, policy; comment."""

    hook: str | None = None
    type: str | None = None
    priority: int | None = None
    policy: str | None = None
    comment: str = ""


@dataclass(frozen=True)
class SetDecl:
    type: tuple[str, ...]
    flags: frozenset[str] = frozenset()
    comment: str = ""


@dataclass
class TableInventory:
    """Declarations of the objects of one table in the kernel (no rules, no elements)."""

    chains: dict[str, ChainDecl] = field(default_factory=dict)
    sets: dict[str, SetDecl] = field(default_factory=dict)
    maps: dict[str, SetDecl] = field(default_factory=dict)
    counters: set[str] = field(default_factory=set)


Inventory = dict[TableKey, TableInventory]  # only tables that exist


def chain_decl(chain: Chain) -> ChainDecl:
    comment = clean_comment(chain.comment)
    if not chain.is_base:
        return ChainDecl(comment=comment)
    # The kernel reports the default policy of a base chain as "accept".
    return ChainDecl(chain.hook, chain.type, chain.priority, chain.policy or "accept", comment)


def set_decl(obj: Set | Map) -> SetDecl:
    return SetDecl(tuple(obj.type), frozenset(obj.flags), clean_comment(obj.comment))


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Transaction:
    kind: Literal["noop", "elements", "partial", "full"]
    commands: list[dict] = field(default_factory=list)
    why: str = ""  # for a full sync: why not partial

    def payload(self) -> dict:
        return {"nftables": self.commands}


def plan(desired: Ruleset, applied: Ruleset | None, inventory: Callable[[], Inventory]) -> Transaction:
    """The transaction taking the kernel to `desired`.

    `applied` is the rule set this process last loaded successfully, None before the first
    success (or when the kernel may no longer hold it). `inventory` reads what the kernel holds
    now; it is only called for a full sync.
    """
    if applied is None:
        return Transaction("full", full_sync_commands(desired, inventory()), "nothing loaded by this process yet")
    diff = partial_diff(applied, desired)
    if isinstance(diff, str):
        return Transaction("full", full_sync_commands(desired, inventory()), diff)
    commands, structural = diff
    if not commands:
        return Transaction("noop")
    return Transaction("partial" if structural else "elements", commands)


# --------------------------------------------------------------------------- partial
def partial_diff(applied: Ruleset, desired: Ruleset) -> tuple[list[dict], bool] | str:
    """(commands, whether objects change) taking `applied` to `desired`, or why that cannot be
    done safely without a full sync."""
    if [(t.family, t.name, t.comment) for t in applied.tables] != [(t.family, t.name, t.comment) for t in desired.tables]:
        return "the set of tables changed"
    commands: list[dict] = []
    structural = False
    for old, new in zip(applied.tables, desired.tables):
        diff = _table_diff(old, new)
        if isinstance(diff, str):
            return f"table {new.family} {new.name}: {diff}"
        commands += diff.commands
        structural |= diff.structural
    return commands, structural


@dataclass
class _TableDiff:
    commands: list[dict]
    structural: bool


def _table_diff(old: Table, new: Table) -> _TableDiff | str:
    ref = {"family": new.family, "table": new.name}
    added_chains = [c for n, c in new.chains.items() if n not in old.chains]
    removed_chains = [n for n in old.chains if n not in new.chains]
    recreated: list[Chain] = []
    refilled: list[Chain] = []
    for name, chain in new.chains.items():
        before = old.chains.get(name)
        if before is None:
            continue
        if not _same_declaration(before, chain):
            if chain.is_base or before.is_base:
                return f"base chain {name} changed its declaration"
            recreated.append(chain)
        elif before.rules != chain.rules:
            refilled.append(chain)
    for m in new.maps.values():
        if len(dict(m.elements)) != len(_unique(m.elements)):
            return f"map {m.name} has a key with two verdicts"  # a full sync lets the kernel refuse it
    for kind, olds, news in (("set", old.sets, new.sets), ("map", old.maps, new.maps)):
        for name in olds.keys() & news.keys():
            a, b = olds[name], news[name]
            if (a.type, a.flags, a.comment) != (b.type, b.flags, b.comment):
                return f"{kind} {name} changed its declaration"
    added_sets = [s for n, s in new.sets.items() if n not in old.sets]
    removed_sets = [n for n in old.sets if n not in new.sets]
    added_maps = [m for n, m in new.maps.items() if n not in old.maps]
    removed_maps = [n for n in old.maps if n not in new.maps]
    added_counters = [c for n, c in new.counters.items() if n not in old.counters]
    removed_counters = [n for n in old.counters if n not in new.counters]

    # Whatever goes (or is re-created) must lose every reference in this same transaction:
    # rules referring to it must sit in chains that are flushed here.
    flushed = {c.name for c in refilled} | {c.name for c in recreated} | set(removed_chains)
    doomed_chains = {c.name for c in recreated} | set(removed_chains)
    doomed = {("chain", n) for n in doomed_chains} | {("set", n) for n in removed_sets} \
        | {("set", n) for n in removed_maps} | {("counter", n) for n in removed_counters}
    for chain in old.chains.values() if doomed else ():
        if chain.name in flushed:
            continue
        for rule in chain.rules:
            for reference in _references(rule):
                if reference in doomed:
                    return f"{reference[0]} {reference[1]} goes but chain {chain.name} still refers to it"

    cmds: list[dict] = []
    # 1. New objects that rules and map elements below will refer to.
    cmds += [{"add": counter_json(new, c)} for c in added_counters]
    for s in added_sets:
        cmds.append({"add": set_json(new, s, with_elements=False)})
        if s.elements:
            cmds.append({"add": element_json(new, s.name, list(_unique(s.elements)))})
    cmds += [{"add": chain_json(new, c)} for c in added_chains]
    # 2. Drop the references held by rules.
    cmds += [{"flush": {"chain": {**ref, "name": n}}} for n in sorted(flushed)]
    # 3. Objects that go, now unreferenced by rules; then element removals (including every
    #    map element jumping to a chain about to be deleted or re-created).
    cmds += [{"delete": {"map": {**ref, "name": n}}} for n in removed_maps]
    cmds += [{"delete": {"set": {**ref, "name": n}}} for n in removed_sets]
    cmds += [{"delete": {"counter": {**ref, "name": n}}} for n in removed_counters]
    element_adds: list[dict] = []
    for name in old.sets.keys() & new.sets.keys():
        before, after = old.sets[name].elements, new.sets[name].elements
        if before == after:
            continue
        before_u, after_u = _unique(before), _unique(after)
        gone = [e for e in before_u if e not in after_u]
        added = [e for e in after_u if e not in before_u]
        if gone:
            cmds.append({"delete": element_json(new, name, gone)})
        if added:
            element_adds.append({"add": element_json(new, name, added)})
    for name in old.maps.keys() & new.maps.keys():
        before, after = dict(old.maps[name].elements), dict(new.maps[name].elements)
        if before == after and not doomed_chains:
            continue
        gone = [(k, v) for k, v in before.items() if after.get(k) != v or v.target in doomed_chains]
        added = [(k, v) for k, v in after.items() if before.get(k) != v or v.target in doomed_chains]
        if gone:
            cmds.append({"delete": map_elements_json(new, name, gone)})
        if added:
            element_adds.append({"add": map_elements_json(new, name, added)})
    # 4. Chains that go or are re-created, now that no rule and no map element names them.
    cmds += [{"delete": {"chain": {**ref, "name": n}}} for n in sorted(doomed_chains)]
    cmds += [{"add": chain_json(new, c)} for c in recreated]
    # 5. Map verdicts name chains, so maps and their elements come once every chain exists.
    for m in added_maps:
        cmds.append({"add": map_json(new, m, with_elements=False)})
        if m.elements:
            cmds.append({"add": map_elements_json(new, m.name, list(_unique(m.elements)))})
    cmds += element_adds
    # 6. Rules of the new, refilled and re-created chains, in the desired order.
    for chain in new.chains.values():
        if chain.name in flushed or chain.name not in old.chains:
            cmds += [{"add": rule_json(new, chain, r)} for r in chain.rules]
    structural = bool(added_chains or removed_chains or recreated or refilled or added_sets or removed_sets
                      or added_maps or removed_maps or added_counters or removed_counters)
    return _TableDiff(cmds, structural)


def _same_declaration(a: Chain, b: Chain) -> bool:
    return (a.comment, a.hook, a.type, a.priority, a.policy) == (b.comment, b.hook, b.type, b.priority, b.policy)


def _references(rule: Rule) -> set[tuple[str, str]]:
    """("chain"|"set"|"counter", name) of every object a rule refers to (maps count as sets)."""
    out: set[tuple[str, str]] = set()
    for st in rule.statements:
        if isinstance(st, Verdict) and st.target:
            out.add(("chain", st.target))
        elif isinstance(st, VMap):
            out.add(("set", st.map))
        elif isinstance(st, Match) and isinstance(st.right, SetRef):
            out.add(("set", st.right.name))
        elif isinstance(st, CounterRef):
            out.add(("counter", st.name))
    return out


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
    #    (type, flags, base chain hook or priority, comment): those are re-created in step 3.
    #    Counters are only deleted when gone: their counts matter more than their comments.
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
            # Identical entries once; one key with two verdicts goes to the kernel, which refuses it.
            cmds.append({"add": map_elements_json(table, m.name, list(_unique(m.elements)))})
    cmds += [{"add": rule_json(table, c, r)} for c in table.chains.values() for r in c.rules]
    return cmds
