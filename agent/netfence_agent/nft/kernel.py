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
from typing import Any, Iterable

import nftables

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
    """A libnftables context. Thread-safe: one lock around every call into the library
    (the sync loop applies while a /metrics scrape reads counters)."""

    def __init__(self) -> None:
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        # Terse: listings leave out set elements, which can be tens of thousands.
        self._nft.set_terse_output(True)
        self._nft.set_handle_output(False)
        self._lock = threading.RLock()  # re-entered by ruleset_json around run()

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

    def _list(self, what: str, body: dict) -> list[dict]:
        return self.run([{"list": {what: body}}])

    # ------------------------------------------------------------------ reading
    def tables(self) -> set[TableKey]:
        return {(t["table"]["family"], t["table"]["name"]) for t in self._list("tables", None) if "table" in t}

    def inventory(self, keys: Iterable[TableKey] = OWNED_TABLES) -> Inventory:
        """Declarations of every object of the given tables that exist (no rules, no elements)."""
        present = self.tables()
        inventory: Inventory = {}
        for family, name in keys:
            if (family, name) not in present:
                continue
            inventory[(family, name)] = TableInventory(
                chains={b["name"]: _chain_decl(b) for b in self._objects("chains", family, name)},
                sets={b["name"]: _set_decl(b) for b in self._objects("sets", family, name)},
                maps={b["name"]: _set_decl(b) for b in self._objects("maps", family, name)},
                counters={b["name"] for b in self._objects("counters", family, name)},
            )
        return inventory

    def _objects(self, what: str, family: str, table: str) -> list[dict]:
        """Bodies of `list chains|sets|maps|counters`, of one table only (libnftables filters
        chains, sets and maps by family alone)."""
        kind = what[:-1]
        return [
            item[kind] for item in self._list(what, {"family": family, "table": table})
            if kind in item and item[kind].get("table") == table and item[kind].get("family") == family
        ]

    def counters(self, keys: Iterable[TableKey] = OWNED_TABLES) -> dict[tuple[str, str, str], CounterValue]:
        """Named counters of the given tables: (family, table, name) -> packets and bytes."""
        present = self.tables()
        values: dict[tuple[str, str, str], CounterValue] = {}
        for family, name in keys:
            if (family, name) not in present:
                continue
            for body in self._objects("counters", family, name):
                values[(family, name, body["name"])] = CounterValue(body.get("packets", 0), body.get("bytes", 0))
        return values

    def ruleset_json(self, keys: Iterable[TableKey] = OWNED_TABLES) -> list[dict]:
        """Everything of the given tables, set elements included (for tests and debugging)."""
        present = self.tables()
        listing = [{"list": {"table": {"family": f, "name": n}}} for f, n in keys if (f, n) in present]
        with self._lock:
            self._nft.set_terse_output(False)
            try:
                return self.run(listing)
            finally:
                self._nft.set_terse_output(True)

    # ------------------------------------------------------------------ removing
    def delete_tables(self, keys: Iterable[TableKey] = OWNED_TABLES) -> list[TableKey]:
        """Delete the given tables where they exist, in one transaction; returns those deleted."""
        present = self.tables()
        doomed = [k for k in keys if k in present]
        self.run([{"delete": {"table": {"family": f, "name": n}}} for f, n in doomed])
        return doomed


def _chain_decl(body: dict[str, Any]) -> ChainDecl:
    if "hook" not in body:
        return ChainDecl()
    return ChainDecl(body["hook"], body.get("type"), body.get("prio"), body.get("policy", "accept"))


def _set_decl(body: dict[str, Any]) -> SetDecl:
    type_ = body["type"]
    return SetDecl(tuple(type_) if isinstance(type_, list) else (type_,), frozenset(body.get("flags", ())))
