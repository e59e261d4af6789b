"""The one place that talks to the kernel's nftables: python-nftables (libnftables) JSON.

No `nft` subprocess: libnftables takes the whole transaction as one JSON document and commits
it as one netlink batch, so a rule set is loaded completely or not at all, and the kernel's
error message comes back as a string.

A libnftables context opens its netlink socket when it is created, in the network namespace of
the creating thread; the agent creates it in its own namespace (tests and benchmarks create it
from a thread inside the namespace under test, see netfence_agent.netns).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

import nftables

from netfence_agent.nft.dump import ElementInfo, NftDumper
from netfence_agent.nft.transaction import ChainDecl, Inventory, SetDecl, TableInventory, TableKey, Transaction

OWNED_TABLES: tuple[TableKey, ...] = (("inet", "netfence"), ("bridge", "netfence"))


class NftError(RuntimeError):
    """libnftables refused a command; the message is what the kernel (or the parser) said."""

    def __init__(self, message: str, rc: int = 1):
        super().__init__(message.strip() or f"libnftables returned {rc}")
        self.rc = rc


@dataclass(frozen=True)
class CounterValue:
    packets: int
    bytes: int


class Kernel:
    """A libnftables context for changes and an nfnetlink socket for reads, each behind its own
    lock: the sync loop applies while a /metrics scrape reads counters, and a long full sync
    must not hold up the scrape."""

    def __init__(self) -> None:
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()
        self._dumper = NftDumper()
        self._read_lock = threading.Lock()

    # ------------------------------------------------------------------ raw
    def run(self, commands: list[dict]) -> list[dict]:
        """One batch: every command commits or none does. Returns the listed objects, if any."""
        if not commands:
            return []
        with self._lock:
            rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(error, rc)
        if isinstance(output, dict):
            return [item for item in output.get("nftables", []) if "metainfo" not in item]
        return []

    def apply(self, transaction: Transaction) -> None:
        self.run(transaction.commands)

    # ------------------------------------------------------------------ reading
    # Reads go to the kernel directly (nft/dump.py): libnftables 1.0.6 would first load every
    # rule and set element into its cache, seconds at a thousand pods.
    def tables(self) -> set[TableKey]:
        with self._read_lock:
            return self._dumper.tables()

    def inventory(self, keys: Iterable[TableKey] = OWNED_TABLES) -> Inventory:
        """Declarations of every object of the given tables that exist (no rules, no elements)."""
        inventory: Inventory = {}
        with self._read_lock:
            present = self._dumper.tables()
            for family, name in keys:
                if (family, name) not in present:
                    continue
                have = TableInventory()
                for c in self._dumper.chains(family, name):
                    have.chains[c.name] = ChainDecl(c.hook, c.type, c.priority, c.policy, c.comment)
                for s in self._dumper.sets(family, name):
                    (have.maps if s.is_map else have.sets)[s.name] = SetDecl(s.type, s.flags, s.comment)
                have.counters = {c.name for c in self._dumper.counters(family, name)}
                inventory[(family, name)] = have
        return inventory

    def counters(self, keys: Iterable[TableKey] = OWNED_TABLES) -> dict[tuple[str, str, str], CounterValue]:
        """Named counters of the given tables: (family, table, name) -> packets and bytes."""
        values: dict[tuple[str, str, str], CounterValue] = {}
        with self._read_lock:
            present = self._dumper.tables()
            for family, name in keys:
                if (family, name) in present:
                    for c in self._dumper.counters(family, name):
                        values[(family, name, c.name)] = CounterValue(c.packets, c.bytes)
        return values

    def set_elements(self, family: str, table: str, names: Iterable[str]) -> dict[str, list[ElementInfo]]:
        """Elements of the named sets and maps of one table that exist, by name (a few ms for a
        few thousand: read straight from the kernel, like the counters)."""
        out: dict[str, list[ElementInfo]] = {}
        with self._read_lock:
            if (family, table) not in self._dumper.tables():
                return out
            declared = {s.name: s for s in self._dumper.sets(family, table)}
            for name in names:
                if name in declared:
                    s = declared[name]
                    out[name] = self._dumper.elements(family, table, name, s.type, "interval" in s.flags)
        return out

    def ruleset_json(self, keys: Iterable[TableKey] = OWNED_TABLES) -> list[dict]:
        """Everything of the given tables, set elements included (for tests and debugging)."""
        present = self.tables()
        # One table per call: libnftables 1.0.6 filters its cache by the first `list table`
        # of a batch and then cannot find the second one.
        return [item for f, n in keys if (f, n) in present
                for item in self.run([{"list": {"table": {"family": f, "name": n}}}])]

    # ------------------------------------------------------------------ removing
    def delete_tables(self, keys: Iterable[TableKey] = OWNED_TABLES) -> list[TableKey]:
        """Delete the given tables where they exist, in one transaction; returns those deleted."""
        present = self.tables()
        doomed = [k for k in keys if k in present]
        self.run([{"delete": {"table": {"family": f, "name": n}}} for f, n in doomed])
        return doomed

