"""From the rules in the kernel to the rules wanted, in one atomic libnftables transaction.

Pure: models (and what the kernel holds) in, one list of libnftables JSON commands out.

Three kinds, all one transaction, so the kernel never holds a half-written rule set:

- **elements**: only set and map elements differ from what this process loaded last (a pod
  joined a peer group, a pod IP moved): the difference, written in the commands libnftables
  evaluates without reading the rule set back (see REFILL_MAX).
- **partial**: objects differ too (a pod gained a policy, a veth appeared): only the chains,
  sets, maps and counters that changed are touched, as kube-proxy's nftables proxier does in
  its partial syncs. A chain whose rules changed is flushed and refilled; one whose comment or
  declaration changed is re-created; new objects are added, old ones deleted once nothing
  refers to them; elements that go are deleted one by one (such a transaction has libnftables
  read every declaration anyway). Everything else, and every counter's value, stays as it is.
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

from dataclasses import dataclass, field, replace
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
    if old is new:
        return _TableDiff([], False)
    ref = {"family": new.family, "table": new.name}
    same_chains = new.chains is old.chains  # shared by a render that changed set elements only
    added_chains = [] if same_chains else [c for n, c in new.chains.items() if n not in old.chains]
    removed_chains = [] if same_chains else [n for n in old.chains if n not in new.chains]
    recreated: list[Chain] = []
    refilled: list[Chain] = []
    for name, chain in new.chains.items() if not same_chains else ():
        before = old.chains.get(name)
        if before is None or before is chain:
            continue
        if not _same_declaration(before, chain):
            if chain.is_base or before.is_base:
                return f"base chain {name} changed its declaration"
            recreated.append(chain)
        elif before.rules != chain.rules:
            refilled.append(chain)
    for name, m in new.maps.items():
        if m is not old.maps.get(name) and len(dict(m.elements)) != len(_unique(m.elements)):
            return f"map {m.name} has a key with two verdicts"  # a full sync lets the kernel refuse it
    for kind, olds, news in (("set", old.sets, new.sets), ("map", old.maps, new.maps)):
        for name in olds.keys() & news.keys():
            a, b = olds[name], news[name]
            if a is not b and (a.type, a.flags, a.comment) != (b.type, b.flags, b.comment):
                return f"{kind} {name} changed its declaration"
    added_sets = [s for n, s in new.sets.items() if n not in old.sets]
    removed_sets = [n for n in old.sets if n not in new.sets]
    added_maps = [m for n, m in new.maps.items() if n not in old.maps]
    removed_maps = [n for n in old.maps if n not in new.maps]
    same_counters = new.counters is old.counters
    added_counters = [] if same_counters else [c for n, c in new.counters.items() if n not in old.counters]
    removed_counters = [] if same_counters else [n for n in old.counters if n not in new.counters]

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

    structural = bool(added_chains or removed_chains or recreated or refilled or added_sets or removed_sets
                      or added_maps or removed_maps or added_counters or removed_counters)
    # A transaction that adds rules or deletes objects has libnftables read every chain, set and
    # counter declaration anyway: there `delete element` costs no more than the few elements
    # that go, where a refill would write the whole set again (see REFILL_MAX).
    refill = not structural

    cmds: list[dict] = []
    # 1. New objects that rules and map elements below will refer to.
    cmds += [{"add": counter_json(new, c)} for c in added_counters]
    for s in added_sets:
        cmds.append({"add": set_json(new, _deduplicated(s))})
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
        a, b = old.sets[name], new.sets[name]
        if a is not b and a.elements != b.elements:
            removals, additions = _element_changes(new, b, _unique(a.elements), _unique(b.elements), set_json,
                                                  refill=refill)
            cmds += removals
            element_adds += additions
    for name in old.maps.keys() & new.maps.keys():
        a, b = old.maps[name], new.maps[name]
        if a is b and not doomed_chains:
            continue
        before, after = dict(a.elements), dict(b.elements)
        # An element jumping to a chain that is re-created must go and come back with it.
        stale = {k for k, v in before.items() if v.target in doomed_chains}
        if before == after and not stale:
            continue
        removals, additions = _element_changes(new, b, before, after, map_json, stale, refill)
        cmds += removals
        element_adds += additions
    # 4. Chains that go or are re-created, now that no rule and no map element names them.
    cmds += [{"delete": {"chain": {**ref, "name": n}}} for n in sorted(doomed_chains)]
    cmds += [{"add": chain_json(new, c)} for c in recreated]
    # 5. Map verdicts name chains, so maps and their elements come once every chain exists.
    cmds += [{"add": map_json(new, _deduplicated(m))} for m in added_maps]
    cmds += element_adds
    # 6. Rules of the new, refilled and re-created chains, in the desired order.
    for chain in new.chains.values() if not same_chains else ():
        if chain.name in flushed or chain.name not in old.chains:
            cmds += [{"add": rule_json(new, chain, r)} for r in chain.rules]
    return _TableDiff(cmds, structural)


# Element changes are written so that libnftables 1.0.6 need not read the whole rule set back
# first. It fills its cache before evaluating a batch, and what it reads depends on the commands:
# `add element` and `delete element` make it read every chain, set, counter and the elements of
# every interval set in the namespace (~25 ms at 1,000 pods, growing with the rule set), while
# `add set` and `flush set` need only the table and set declarations (~3 ms). So elements are
# added by re-declaring the set (`add set` of an existing set with the same declaration is a
# no-op apart from its elements) and removed by flushing a small set and declaring it again
# with everything it holds, all in the one transaction, so packets never see it empty.
# Re-adding costs ~4 µs an element: past REFILL_MAX elements, `delete element` is cheaper.
# Except in a set of concatenated intervals (the kernel's pipapo backend: the bridge table's
# pod_addresses_v6): the kernel rebuilds its lookup tables for every element removed, so its
# flush costs ~0.2 ms an element (40 ms at 110 pods), while `delete element` of the few that go
# costs that per element only. Those sets are never refilled.
REFILL_MAX = 2048


def removes_slowly(obj: Set | Map) -> bool:
    """A set the kernel keeps in its pipapo backend (intervals of a concatenation)."""
    return "interval" in obj.flags and len(obj.type) > 1


def _element_changes(table: Table, obj: Set | Map, before: dict, after: dict, declare,
                     stale: set = frozenset(), refill: bool = True) -> tuple[list[dict], list[dict]]:
    """(removals, additions) taking a set's or map's elements from `before` to `after`.

    Removals go early in the transaction (before the chains a map element names are deleted),
    additions late (after the chains they name exist). For a map, `before`/`after` map each key
    to its verdict; a key whose verdict changes, or that is `stale`, is removed and added again.
    """
    is_map = isinstance(obj, Map)
    if is_map:
        gone = [(k, v) for k, v in before.items() if after.get(k) != v or k in stale]
        added = [(k, v) for k, v in after.items() if before.get(k) != v or k in stale]
    else:
        gone = [e for e in before if e not in after]
        added = [e for e in after if e not in before]
    ref = {"family": table.family, "table": table.name, "name": obj.name}
    kind = "map" if is_map else "set"
    if gone and refill and len(after) <= REFILL_MAX and not removes_slowly(obj):
        everything = list(after.items()) if is_map else list(after)
        filled = replace(obj, elements=everything)
        return [{"flush": {kind: ref}}], ([{"add": declare(table, filled)}] if everything else [])
    removals = []
    if gone:
        removals.append({"delete": map_elements_json(table, obj.name, gone) if is_map
                         else element_json(table, obj.name, gone, interval="interval" in obj.flags)})
    if not added:
        return removals, []
    return removals, [{"add": declare(table, replace(obj, elements=added))}]


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


def _deduplicated(obj: Set | Map) -> Set | Map:
    """The set or map with identical elements once; one map key with two verdicts stays, for the
    kernel to refuse."""
    unique = list(_unique(obj.elements))
    return obj if len(unique) == len(obj.elements) else replace(obj, elements=unique)


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
    # Elements go inline in `add set`: a separate `add element` would make libnftables read
    # every interval set's elements back first (see REFILL_MAX).
    for s in table.sets.values():
        if s.name in kept_sets:
            cmds.append({"flush": {"set": {**ref, "name": s.name}}})
        cmds.append({"add": set_json(table, _deduplicated(s))})
    cmds += [{"add": chain_json(table, c)} for c in table.chains.values()]
    # Maps name chains in their verdicts, so they are filled once every chain exists.
    cmds += [{"add": map_json(table, _deduplicated(m))} for m in table.maps.values()]
    cmds += [{"add": rule_json(table, c, r)} for c in table.chains.values() for r in c.rules]
    return cmds
