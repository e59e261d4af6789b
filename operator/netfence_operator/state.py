"""What the controller knows about the cluster, fed from watch events into the pure Compiler.

Pure (no I/O, no kopf): the kopf handlers call `observe` and `forget`, the publisher reads
`take_dirty`, `problems` and the Compiler. Three things are decided here:

* **One name, several objects.** A StatefulSet pod deleted and re-created under the same name
  is two objects (two uids) whose watch events kopf handles concurrently, so events of the old
  one may arrive after the new one's. Every live uid is kept per name; the compiler gets the
  one that is not terminating (else the latest seen), and a DELETED removes only its own uid.
* **Invalid input never widens or silently drops anything.** An object whose current version
  does not parse keeps its last valid version (same uid) compiled. A NetworkPolicy that never
  had a valid version is compiled as an *isolating substitute*: the pods it selects are
  isolated in the directions it names, with no allow rules — what the author asked for, minus
  whatever could not be understood. If even its podSelector is unreadable, the substitute
  selects every pod of its namespace (fail closed). Its errors are reported as Events.
* **Terminating pods** (deletionTimestamp set) keep their rules while they still hold their IP,
  as kube-router and kube-network-policies do: containers may still be draining. Succeeded
  or Failed pods have given their IP back (the Compiler drops them), and a pod without an IP
  yet has nothing to police.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from pydantic import BaseModel, ValidationError

from netfence_operator.compile import Compiler, InputError, parse_object
from netfence_operator.compile.objects import ClusterObjects, Interner, LabelSelector, NetworkPolicy, Pod, describe_object

log = logging.getLogger("netfence.controller.state")

KINDS = ("Namespace", "Node", "Pod", "NetworkPolicy", "ClusterNetworkPolicy")
CLUSTER_SCOPED = ("Namespace", "Node", "ClusterNetworkPolicy")
POLICY_KINDS = ("NetworkPolicy", "ClusterNetworkPolicy")
_SOURCE = "api"
_TOMBSTONES = 50_000  # uids remembered as deleted, so late events of a deleted object are ignored
_NO_ERRORS: tuple[str, ...] = ()


def object_key(kind: str, body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    if kind in CLUSTER_SCOPED:
        return meta.get("name", "")
    return f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"


def strip_source(problem: str, body: Mapping[str, Any]) -> str:
    """'api: NetworkPolicy ns/name: spec.x: msg' -> 'spec.x: msg' (the Event already names the object)."""
    prefix = f"{_SOURCE}: {describe_object(dict(body))}: "
    return problem[len(prefix):] if problem.startswith(prefix) else problem


@dataclass(slots=True)
class Version:
    """The latest state of one object (one uid)."""

    uid: str
    model: BaseModel | None  # the current version, parsed; None if it is invalid
    errors: list[str] | tuple[str, ...]  # why the current version is invalid (field-naming messages)
    last_good: BaseModel | None  # the last valid version of this uid
    terminating: bool
    substitute: BaseModel | None = None  # NetworkPolicy only: isolating stand-in when never valid

    @property
    def compiled(self) -> BaseModel | None:
        return self.model or self.last_good or self.substitute


@dataclass(frozen=True)
class PolicyProblem:
    namespace: str  # "" for a ClusterNetworkPolicy
    name: str
    uid: str
    reason: str  # InvalidPolicy | PolicyWarning
    message: str
    kind: str = "NetworkPolicy"  # or ClusterNetworkPolicy

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


def isolating_substitute(body: Mapping[str, Any]) -> NetworkPolicy:
    """A NetworkPolicy that never parsed, reduced to what is safe: isolate, allow nothing."""
    spec = body.get("spec") if isinstance(body.get("spec"), Mapping) else {}
    try:
        selector = LabelSelector.model_validate(spec.get("podSelector") or {})
    except ValidationError:
        selector = LabelSelector()  # unreadable selector: every pod of the namespace
    types = spec.get("policyTypes")
    if types is None:
        egress = spec.get("egress")
        types = ["Ingress", "Egress"] if isinstance(egress, list) and egress else ["Ingress"]
    elif not (isinstance(types, list) and types and all(t in ("Ingress", "Egress") for t in types)):
        types = ["Ingress", "Egress"]  # unreadable policyTypes: isolate both ways
    meta = body.get("metadata") or {}
    return NetworkPolicy.model_validate({
        "metadata": {"name": meta.get("name", ""), "namespace": meta.get("namespace") or "default",
                     "uid": meta.get("uid", ""), "labels": meta.get("labels") or {}},
        "spec": {"podSelector": selector.model_dump(exclude_none=True), "policyTypes": sorted(set(types))},
    })


@dataclass
class ClusterState:
    compiler_factory: Callable[[ClusterObjects | None], Compiler] = Compiler
    compiler: Compiler = field(init=False)
    dirty: set[str] = field(default_factory=set)
    _live: dict[tuple[str, str], dict[str, Version]] = field(default_factory=dict)
    _policy_keys: set[tuple[str, str]] = field(default_factory=set)  # (kind, key) of policies in _live: problems are looked up per round
    _compiled: dict[tuple[str, str], BaseModel] = field(default_factory=dict)
    _gone: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    _broken: bool = False
    _interner: Interner = field(default_factory=Interner)  # pods share equal parts (memory)

    def __post_init__(self) -> None:
        self.compiler = self.compiler_factory(None)

    # ------------------------------------------------------------------ feeding
    def observe(self, kind: str, body: Mapping[str, Any]) -> None:
        """A created or changed object (a watch ADDED/MODIFIED or a listing)."""
        meta = body.get("metadata") or {}
        uid = meta.get("uid") or ""
        if (kind, uid) in self._gone:
            return  # a late event of an object already deleted
        key = object_key(kind, body)
        versions = self._live.setdefault((kind, key), {})
        if kind in POLICY_KINDS:
            self._policy_keys.add((kind, key))
        previous = versions.pop(uid, None)  # re-inserted last: the most recently seen
        try:
            model, errors = parse_object(dict(body), _SOURCE), _NO_ERRORS
            if isinstance(model, Pod):
                model = self._interner.pod(model)
        except InputError as e:
            model, errors = None, [strip_source(p, body) for p in e.problems]
            log.warning("invalid %s %s: %s", kind, key, "; ".join(errors))
        version = Version(
            uid=uid,
            model=model,
            errors=errors,
            last_good=model or (previous.last_good if previous else None),
            terminating=bool(meta.get("deletionTimestamp")),
        )
        if version.compiled is None and kind == "NetworkPolicy":
            version.substitute = isolating_substitute(body)
        versions[uid] = version
        self._sync(kind, key)

    def forget(self, kind: str, body: Mapping[str, Any]) -> None:
        """A deleted object (watch DELETED)."""
        uid = (body.get("metadata") or {}).get("uid") or ""
        self._forget_uid(kind, object_key(kind, body), uid)

    def _forget_uid(self, kind: str, key: str, uid: str) -> None:
        self._gone[(kind, uid)] = None
        while len(self._gone) > _TOMBSTONES:
            self._gone.popitem(last=False)
        versions = self._live.get((kind, key))
        if versions is not None:
            versions.pop(uid, None)
            if not versions:
                del self._live[(kind, key)]
                self._policy_keys.discard((kind, key))
        self._sync(kind, key)

    def known_uids(self, kind: str) -> dict[str, str]:
        """uid -> key of every live object of a kind."""
        return {uid: key for (k, key), versions in self._live.items() if k == kind for uid in versions}

    def forget_missing(self, kind: str, known_before: Mapping[str, str], present: Iterable[str]) -> list[str]:
        """After a relist: drop objects known before the list was taken that it no longer has
        (their DELETED events were lost, e.g. behind a 410 Gone). Returns their keys."""
        present = set(present)
        dropped = []
        for uid, key in known_before.items():
            if uid not in present and uid in self._live.get((kind, key), {}):
                self._forget_uid(kind, key, uid)
                dropped.append(key)
        return dropped

    # ------------------------------------------------------------------ compiling
    def _choose(self, versions: dict[str, Version]) -> Version | None:
        ordered = list(versions.values())  # oldest seen first
        for version in reversed(ordered):
            if not version.terminating and version.compiled is not None:
                return version
        for version in reversed(ordered):
            if version.compiled is not None:
                return version
        return None

    def _sync(self, kind: str, key: str) -> None:
        chosen = self._choose(self._live.get((kind, key), {}))
        model = chosen.compiled if chosen is not None else None
        current = self._compiled.get((kind, key))
        if model == current:
            return
        try:
            if model is None:
                del self._compiled[(kind, key)]
                self.dirty |= self.compiler.delete(kind, key)
            else:
                self._compiled[(kind, key)] = model
                self.dirty |= self.compiler.upsert(model)
        except Exception:
            # A compiler bug must not leave it half-updated: rebuild it from scratch before the next publish.
            log.exception("compiler failed on %s %s; rebuilding it", kind, key)
            self._broken = True

    def rebuild_if_broken(self) -> None:
        if not self._broken:
            return
        objects = ClusterObjects()
        for model in self._compiled.values():
            objects.add(model)
        old_nodes = self.compiler.node_names()
        self.compiler = self.compiler_factory(objects)
        self._broken = False
        self.dirty |= old_nodes | self.compiler.node_names()

    def mark_all_dirty(self, extra: Iterable[str] = ()) -> None:
        self.dirty |= self.compiler.node_names() | set(extra)

    def take_dirty(self) -> set[str]:
        taken, self.dirty = self.dirty, set()
        return taken

    # ------------------------------------------------------------------ reporting
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for kind, _ in self._live:
            out[kind] += 1
        return out

    def policy_problems(self) -> list[PolicyProblem]:
        """Every problem a user should see on a (Cluster)NetworkPolicy: invalid input, compiler warnings."""
        out: list[PolicyProblem] = []
        warnings = self.compiler.problems()
        for kind, key in sorted(self._policy_keys):
            versions = self._live[(kind, key)]
            chosen = self._choose(versions)
            if chosen is None:
                # A ClusterNetworkPolicy that never parsed: there is no safe stand-in (leaving
                # out an Accept narrows, leaving out a Deny widens), so it is not enforced.
                chosen = next(reversed(versions.values()), None) if kind == "ClusterNetworkPolicy" else None
                if chosen is None:
                    continue
            namespace, name = key.split("/", 1) if kind == "NetworkPolicy" else ("", key)
            for message in chosen.errors:
                if chosen.last_good is not None:
                    message += " (the last valid version stays in force)"
                elif kind == "ClusterNetworkPolicy":
                    message += " (it is not enforced until it is fixed)"
                else:
                    message += " (the pods it selects stay isolated with no allow rules until it is fixed)"
                out.append(PolicyProblem(namespace, name, chosen.uid, "InvalidPolicy", message, kind))
            if chosen.model is not None:
                for message in warnings.get(key, ()):
                    out.append(PolicyProblem(namespace, name, chosen.uid, "PolicyWarning", message, kind))
        return out
