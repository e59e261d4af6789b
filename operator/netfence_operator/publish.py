"""The publisher: the one place that writes to the API (NodeRuleSets, PeerGroupSlices, Events).

It waits until the initial listing of every watched kind is in the state (so it never
publishes a half-known cluster), loads what is already published, then loops: collect dirty
nodes, wait a short quiet period (many events become one write), compute each dirty node's
spec, lay it out (netfence_api.slices: the NodeRuleSet with the node's pods and rules, its peer
groups inline while the cluster's rule data is small, else in PeerGroupSlices shared by all
nodes) and write only the objects whose content hash differs from what the API holds, group
slices before the NodeRuleSets naming them; slices nothing references any more are deleted
last. Nodes that no longer exist lose their NodeRuleSet. A periodic resync re-reads what is
published (repairing manual edits and deletions) and a relist of a watched kind triggers a
check for objects whose deletion was missed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from netfence_api import PLURAL, short_hash
from netfence_api.runtime import freeze_heap
from netfence_api.slices import (
    GROUP_LABEL,
    GROUP_SLICE_KIND,
    GROUP_SLICE_PLURAL,
    HASH_ANNOTATION,
    PODS_ANNOTATION,
    RULES_ANNOTATION,
    NodeObjects,
    Splitter,
    canonical_size,
    groups_inline,
    ruleset_hash,
    ruleset_patch,
    slice_hash,
)
from netfence_api.crd import COMPANIONS_ANNOTATION, TRIGGER_ANNOTATION, companions_value
from netfence_operator.compile.objects import CNP_API_VERSION
from netfence_operator.kube import KubeApi, conflict_or_missing
from netfence_operator.metrics import ControllerMetrics
from netfence_operator.state import ClusterState, PolicyProblem

log = logging.getLogger("netfence.controller.publish")

MANAGED_BY = {"app.kubernetes.io/managed-by": "netfence-controller"}
COMPONENT = "netfence-controller"
_EVENT_MESSAGE_LIMIT = 1024


def published_hash(obj: dict[str, Any]) -> str:
    """Content hash of a stored NodeRuleSet's spec, as the objects written carry it (ruleset_hash).

    Every top-level field of an object's spec is always sent, so a merge patch of the spec
    replaces the stored one exactly (lists are replaced whole, no key lingers) and an equal
    hash means an equal spec."""
    return ruleset_hash(obj.get("spec") or {})


def event_body(problem: PolicyProblem, instance: str) -> dict[str, Any]:
    if problem.kind == "ClusterNetworkPolicy":
        involved = {"apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy", "name": problem.name,
                    "uid": problem.uid}
    else:
        involved = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "namespace": problem.namespace, "name": problem.name, "uid": problem.uid}
    return warning_event(involved, problem.reason, problem.message, instance)


def trigger_time(seconds: float) -> str:
    """RFC 3339 with microseconds, as kube-proxy's trigger-time annotation (sub-second latencies)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def warning_event(involved: dict[str, str], reason: str, message: str, instance: str) -> dict[str, Any]:
    """A Warning Event about `involved` (namespaced objects' Events live in their namespace,
    cluster-scoped objects' in "default", as kubectl looks for them)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    message = message if len(message) <= _EVENT_MESSAGE_LIMIT else message[: _EVENT_MESSAGE_LIMIT - 3] + "..."
    namespace = involved.get("namespace") or "default"
    # Named after the object's uid and the message: re-reporting the same problem (e.g. after a
    # controller restart) hits 409 AlreadyExists instead of piling up duplicates.
    name = f"{involved['name'][:200]}.netfence.{short_hash([involved.get('uid', ''), reason, message], 16)}"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": "Warning",
        "source": {"component": COMPONENT},
        "reportingComponent": "netfence.io/controller",
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def refusal(e: Exception) -> str | None:
    """Why the API will never store this object as sent (None: a failure worth retrying as is).

    Too large: 413 from the apiserver's 3 MiB body limit or etcd's 1.5 MiB object limit (older
    apiservers pass etcd's "request is too large" on as a 500); invalid: 400/422.
    """
    if not isinstance(e, ApiException):
        return None
    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")
    if e.status == 413 or (e.status == 500 and "too large" in body):
        return "TooLarge"
    if e.status in (400, 422):
        return "Invalid"
    return None


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message") or _short(e)
    except (TypeError, ValueError, AttributeError):
        return _short(e)


@dataclass
class Publisher:
    state: ClusterState
    api: KubeApi
    metrics: ControllerMetrics
    debounce: float = 0.2
    resync_interval: float = 600.0
    relist_quiet: float = 2.0
    retry_backoff: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30)

    published: dict[str, str] = field(default_factory=dict)  # node -> content hash held by the API
    synced: bool = False  # the first full publish round succeeded (readiness)
    indexed: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _relisted: dict[str, float] = field(default_factory=dict)  # kind -> monotonic time of its last listing event
    _reported: set[tuple[str, str, str]] = field(default_factory=set)  # (uid, reason, message) posted
    # node -> (content hash, reason, message) of a node with an object the API refused
    refused: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    write_concurrency: int = 8
    splitter: Splitter = field(default_factory=Splitter)
    # PeerGroupSlice name -> content hash held by the API, and the group it is of
    published_slices: dict[str, str] = field(default_factory=dict)
    slice_owner: dict[str, str] = field(default_factory=dict)
    _owned: dict[str, set[str]] = field(default_factory=dict)  # group -> names of its slices the API holds
    node_groups: dict[str, frozenset[str]] = field(default_factory=dict)  # node -> groups it reads from slices
    _group_users: dict[str, int] = field(default_factory=dict)  # group -> how many nodes read it (set by _set_groups)
    _unused: set[str] = field(default_factory=set)  # groups that may have no user left: their slices may go
    inline: bool | None = None  # the cluster's layout: groups inline in the NodeRuleSets, or in slices
    _changed_groups: set[str] = field(default_factory=set)  # members changed since their slices were looked at
    _unwritten: set[str] = field(default_factory=set)  # groups whose slices did not all get through
    # node -> (content hash, spec) of the NodeRuleSet last written: the base of the next JSON Patch
    _written_specs: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    _written_groups: dict[str, Any] = field(default_factory=dict)  # group -> the model whose slices the API holds
    # (plural, name) -> (content hash, refusal) of an object the API refused; not sent again unchanged
    refused_objects: dict[tuple[str, str], tuple[str, Any]] = field(default_factory=dict)
    _failures: int = 0
    _counted: float = float("-inf")  # monotonic time objects_watched was last set
    problems_interval: float = 1.0
    _problems_at: float = float("-inf")  # monotonic time policy problems were last reported
    _problems_due: bool = False
    instance: str = field(default_factory=socket.gethostname)
    # Network programming latency starts when the controller sees a change (the watch event).
    # Every object written carries the time of the first change not yet published in full; it
    # is kept until a round publishes everything.
    _first_change: float | None = None
    _trigger: float | None = None

    # ------------------------------------------------------------------ signals from handlers
    def wake(self) -> None:
        if self._first_change is None:
            self._first_change = time.time()
        self._wake.set()

    def relisted(self, kind: str) -> None:
        """A listing event of `kind` after the initial sync: its watch was re-listed (410 Gone)."""
        self._relisted[kind] = time.monotonic()
        self._wake.set()

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        await self.indexed.wait()
        log.info("initial listing complete: %s", self.state.counts())
        await self._load_published()
        self.state.mark_all_dirty(self.published)
        next_resync = time.monotonic() + self.resync_interval
        while True:
            ok = await self._round()
            if ok and not self.synced:
                self.synced = True
                log.info("initial sync published: %d node rule sets", len(self.published))
                freeze_heap()
            if time.monotonic() >= next_resync:
                await self._load_published()
                self.state.mark_all_dirty(self.published)
                next_resync = time.monotonic() + self.resync_interval
                freeze_heap()  # what the cluster built up since is long-lived too
                continue
            if not ok:
                await asyncio.sleep(self._retry_delay())
                continue
            self._wake.clear()
            if not self.state.dirty:  # the dirty set, not the wake flag, is the truth
                try:
                    wait = min(self._relist_wait(), max(0.0, next_resync - time.monotonic()))
                    if self._problems_due:
                        wait = min(wait, max(0.0, self._problems_at + self.problems_interval - time.monotonic()))
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            await asyncio.sleep(self.debounce)

    def _retry_delay(self) -> float:
        return self.retry_backoff[min(max(self._failures, 1), len(self.retry_backoff)) - 1]

    def _relist_wait(self) -> float:
        if not self._relisted:
            return self.resync_interval
        return max(0.05, min(t + self.relist_quiet for t in self._relisted.values()) - time.monotonic())

    async def _load_published(self) -> None:
        delay = iter(self.retry_backoff)
        while True:
            try:
                stored = {plural: await asyncio.to_thread(self.api.list_objects, plural)
                          for plural in (PLURAL, GROUP_SLICE_PLURAL)}
                break
            except Exception as e:  # noqa: BLE001 - any API trouble: retry, the loop must survive
                wait = next(delay, self.retry_backoff[-1])
                log.warning("listing NodeRuleSets and PeerGroupSlices failed (%s); retrying in %ss", _short(e), wait)
                await asyncio.sleep(wait)
        self.published = {name: published_hash(obj) for name, obj in stored[PLURAL].items()}
        self.published_slices, self.slice_owner, self._owned = {}, {}, {}
        self._written_groups = {}  # check every group against the listing again
        for name, obj in stored[GROUP_SLICE_PLURAL].items():
            self._stored_slice(name, obj)
        self._unused |= set(self._owned)  # left by an earlier run, maybe

    def _stored_slice(self, name: str, obj: dict[str, Any]) -> None:
        """Remember a PeerGroupSlice the API holds: its content hash and the group it is of."""
        owner = ((obj.get("metadata") or {}).get("labels") or {}).get(GROUP_LABEL, "")
        self._forget_slice(name)
        self.published_slices[name] = slice_hash(obj.get("spec") or {})
        self.slice_owner[name] = owner
        self._owned.setdefault(owner, set()).add(name)

    def _forget_slice(self, name: str) -> None:
        self.published_slices.pop(name, None)
        owner = self.slice_owner.pop(name, None)
        if owner is not None:
            names = self._owned.get(owner, set())
            names.discard(name)
            if not names:
                self._owned.pop(owner, None)

    def _slices_of(self, group: str) -> set[str]:
        return set(self._owned.get(group, ()))

    async def _round(self) -> bool:
        """One publish round; False if something failed and must be retried."""
        await self._check_relists()
        self.state.rebuild_if_broken()
        ok = True
        if time.monotonic() - self._counted >= 1.0:  # counting walks every object: not on every event
            self._counted = time.monotonic()
            for kind, count in self.state.counts().items():
                self.metrics.objects_watched.labels(kind).set(count)
        dirty = self.state.take_dirty()
        if self._trigger is None:
            self._trigger = self._first_change or time.time()
        self._first_change = None
        if dirty:
            ok = await self._publish(dirty)
        if ok:
            self._trigger = None
        # Finding the policies' problems walks every policy: during a burst of pod events, once
        # a second (the rules are published first either way).
        if not dirty or time.monotonic() - self._problems_at >= self.problems_interval:
            self._problems_at = time.monotonic()
            self._problems_due = False
            ok = await self._report_problems() and ok
        else:
            self._problems_due = True
        self._failures = 0 if ok else self._failures + 1
        return ok

    # ------------------------------------------------------------------ publishing
    def _plan(self, nodes: set[str], names: set[str]) -> dict[str, NodeObjects | None]:
        """Each node's objects (None: the node is gone and its NodeRuleSet goes too)."""
        plans: dict[str, NodeObjects | None] = {}
        for node in sorted(nodes):
            if node in names:
                try:
                    with self.metrics.compile_duration.labels("publish").time():
                        plans[node] = self.splitter.node_objects(self.state.compiler.node_spec(node))
                except Exception:  # noqa: BLE001 - a compiler bug: keep the published rules, say so loudly
                    log.exception("compiling node %s failed; its published rules stay", node)
                    self.metrics.publish_failures.inc()
            elif node in self.published:
                plans[node] = None
        return plans

    def _set_groups(self, node: str, groups: frozenset[str] | None) -> None:
        """The groups `node` reads from slices (None: the node is gone), with a count of each
        group's users kept along, so that finding unused groups costs the groups that lost one."""
        before = self.node_groups.get(node, frozenset())
        now = groups or frozenset()
        for name in now - before:
            self._group_users[name] = self._group_users.get(name, 0) + 1
        for name in before - now:
            left = self._group_users.pop(name) - 1
            if left:
                self._group_users[name] = left
            else:
                self._unused.add(name)
        if groups is None:
            self.node_groups.pop(node, None)
        else:
            self.node_groups[node] = groups

    def _groups_to_write(self, plans: dict[str, NodeObjects | None]) -> dict[str, Any]:
        """The groups whose slices may need writing: those the planned nodes name that were never
        written whole, and those the compiler says changed (or whose last write failed) that some
        node uses. Not every group of every planned node: a member change marks every node that
        names the group dirty, and each names hundreds of groups at scale."""
        compiler = self.state.compiler
        names: set[str] = set()
        for objects in plans.values():
            if objects is not None:
                names |= objects.group_names - self._written_groups.keys()
        names |= {name for name in self._changed_groups | self._unwritten if name in self._group_users}
        self._changed_groups = set()
        out = {}
        for name in names:
            group = compiler.group(name)
            if group is not None and self._written_groups.get(name) is not group:
                out[name] = group
        return out

    async def _publish(self, dirty: set[str]) -> bool:
        """Write what the dirty nodes' specs need, referenced objects first: group slices, then
        NodeRuleSets; delete what nothing references any more last. A node whose objects did not
        all get through keeps its last NodeRuleSet (and so its last rules)."""
        names = self.state.compiler.node_names()
        self._changed_groups |= self.state.compiler.take_changed_groups()  # every round: else it piles up
        plans = self._plan(dirty, names)
        total = sum(self.splitter.inline_size(n) for n in names)
        inline = groups_inline(total, self.splitter.bounds)
        if inline != self.inline:
            # The layout is the cluster's: every NodeRuleSet is written again in the new one.
            if self.inline is not None:
                log.info("peer groups move %s (the rule data of all nodes is %d bytes)",
                         "inline into the NodeRuleSets" if inline else "out into PeerGroupSlices", total)
            self.inline = inline
            plans.update(self._plan(names - set(plans), names))
            if inline:
                self._written_groups.clear()
        # Until a node's new NodeRuleSet is written, the groups its old one names are still in use.
        wanted: dict[str, frozenset[str]] = {}
        for node, objects in plans.items():
            if objects is not None:
                wanted[node] = frozenset() if inline else objects.group_names
                before = self.node_groups.get(node)
                if before is not wanted[node]:
                    self._set_groups(node, wanted[node] if before is None else before | wanted[node])
        failed: set[str] = set()  # nodes to publish again next round
        refused: dict[str, Any] = {}  # node -> (reason, message, size) of a refused object

        # Slices of groups not exactly as last written whole (most of a node's groups did not
        # move): those the API does not hold at all first, as the NodeRuleSets below may name
        # them; those it holds (members changed) together with the NodeRuleSets.
        groups = {} if inline else self._groups_to_write(plans)
        if inline:
            self._changed_groups, self._unwritten = set(), set()
        group_objects = {name: self.splitter.group_objects(g) for name, g in groups.items()}
        new_groups = [name for name in group_objects if not self._owned.get(name)]
        whole_groups: set[str] = set()

        def settle_groups(names: list[str], results: dict[str, Any]) -> None:
            for name in names:
                bad = [results[o["metadata"]["name"]] for o in group_objects[name]
                       if results[o["metadata"]["name"]] is not None]
                if not bad:
                    whole_groups.add(name)
                    continue
                users = {n for n, used in self.node_groups.items() if name in used}
                for outcome in bad:
                    if outcome == "failed":
                        failed.update(users & set(plans))
                    else:
                        refused.update({n: outcome for n in users})

        if new_groups:
            settle_groups(new_groups, await self._put_all(
                GROUP_SLICE_PLURAL, [o for name in new_groups for o in group_objects[name]]))
        old_groups = [name for name in group_objects if name not in new_groups]
        rulesets = [objects.ruleset(inline) for node, objects in plans.items()
                    if objects is not None and node not in failed and node not in refused]
        # Each side names the other (written-with): an agent that receives one of them first waits
        # for the rest and applies the pod event in one sync.
        slices = [o for name in old_groups for o in group_objects[name]]
        group_results, ruleset_results = await asyncio.gather(
            self._put_all(GROUP_SLICE_PLURAL, slices, {COMPANIONS_ANNOTATION: self._companions(PLURAL, rulesets)}),
            self._put_all(PLURAL, rulesets, {COMPANIONS_ANNOTATION: self._companions(GROUP_SLICE_PLURAL, slices)}))
        settle_groups(old_groups, group_results)
        for name in whole_groups:
            self._written_groups[name] = groups[name]
        self._unwritten = (self._unwritten | set(groups)) - whole_groups
        for node, outcome in ruleset_results.items():
            if outcome == "failed":
                failed.add(node)
            elif outcome is not None:
                refused[node] = outcome
        for node, groups_now in wanted.items():
            if node not in failed and node not in refused:
                self._set_groups(node, groups_now)

        # Deletions: NodeRuleSets of gone nodes, then slices nothing references.
        doomed: list[str] = []  # PeerGroupSlices
        for node, objects in plans.items():
            if objects is None:
                if node in self.published and not await self._delete(PLURAL, node):
                    failed.add(node)
                    continue
                self._set_groups(node, None)
        for name in whole_groups:
            keep = {o["metadata"]["name"] for o in group_objects[name]}
            doomed += self._slices_of(name) - keep
        if set(self.node_groups) >= names and not failed and not refused and not self.refused:
            # every node's groups are known and every node holds what it was given: the others are garbage
            for name in self._unused:
                if name in self._group_users:
                    continue
                doomed += self._slices_of(name)
                self.splitter.forget_group(name)
                self._written_groups.pop(name, None)
            self._unused = set()
        for name in doomed:
            owner = self.slice_owner.get(name, "")
            if not await self._delete(GROUP_SLICE_PLURAL, name):
                # a stale slice overlapping its group's new ones: agents wait until it is gone
                self._written_groups.pop(owner, None)
                failed |= {n for n, used in self.node_groups.items() if owner in used} or {""}
        for node in plans:
            if plans[node] is None:
                self.splitter.forget_node(node)

        for node in set(plans) - failed:
            if node in refused:
                reason, message, size = refused[node]
                objects = plans[node]
                digest = objects.ruleset(inline)["metadata"]["annotations"][HASH_ANNOTATION] if objects is not None else ""
                await self._refused(node, digest, reason, message, size)
            elif self.refused.pop(node, None) is not None:
                self.metrics.rulesets_refused.remove(node)
                log.info("the objects of node %s are accepted by the API again", node)
        self.state.dirty |= failed - {""}
        return not failed

    def _companions(self, plural: str, objects: list[dict[str, Any]]) -> str | None:
        """The written-with annotation naming those of the objects that will be written."""
        return companions_value({name: digest for obj in objects if self._will_write(
            plural, name := obj["metadata"]["name"], digest := obj["metadata"]["annotations"][HASH_ANNOTATION])})

    def _held(self, plural: str) -> dict[str, str]:
        """name -> content hash of the objects of this kind the API holds."""
        return self.published if plural == PLURAL else self.published_slices

    def _will_write(self, plural: str, name: str, digest: str) -> bool:
        """Whether _put_all sends this content: the API holds other content, and has not refused it."""
        return self._held(plural).get(name) != digest and self.refused_objects.get((plural, name), (None,))[0] != digest

    async def _put_all(self, plural: str, objects: list[dict[str, Any]],
                       annotations: dict[str, str | None] | None = None) -> dict[str, Any]:
        """Write the objects whose content (their spec-hash annotation) the API does not hold yet,
        a few at a time, with these annotations too (None: removed). Per name: None (stored),
        "failed" (retry) or (reason, message, size) of a refusal."""
        results: dict[str, Any] = {}
        todo = []
        for obj in objects:
            name, digest = obj["metadata"]["name"], obj["metadata"]["annotations"][HASH_ANNOTATION]
            if self._will_write(plural, name, digest):
                todo.append(obj)
            elif (plural, name) in self.refused_objects and self.refused_objects[(plural, name)][0] == digest:
                results[name] = self.refused_objects[(plural, name)][1]  # the API would refuse it again
            else:
                results[name] = None
        semaphore = asyncio.Semaphore(self.write_concurrency)

        async def put(obj: dict[str, Any]) -> None:
            async with semaphore:
                results[obj["metadata"]["name"]] = await self._put(plural, obj, annotations or {})

        await asyncio.gather(*(put(obj) for obj in todo))
        return results

    async def _put(self, plural: str, obj: dict[str, Any], extra: dict[str, str | None]) -> Any:
        name = obj["metadata"]["name"]
        key = (plural, name)
        digest = obj["metadata"]["annotations"][HASH_ANNOTATION]
        held = name in self._held(plural)
        # The trigger time rides on every object (an agent applies group-slice changes without a
        # new NodeRuleSet); the object's own dict may be shared with the splitter's memory.
        annotations = {**obj["metadata"]["annotations"], TRIGGER_ANNOTATION: trigger_time(self._trigger or time.time()),
                       **{k: v for k, v in extra.items() if v is not None}}
        obj = {**obj, "metadata": {**obj["metadata"], "annotations": annotations}}
        # a merge patch removes what is null (an earlier round's companions)
        patch = {"metadata": {"labels": obj["metadata"]["labels"], "annotations": {**annotations, **{
            k: None for k, v in extra.items() if v is None}}}, "spec": obj["spec"]}
        try:
            stored = await self._patch_pods(name, obj) if plural == PLURAL and held else None
            patched = stored is not None
            if patched:
                action = "patch"
            elif held:
                try:
                    stored, action = await asyncio.to_thread(self.api.patch_object, plural, name, patch), "patch"
                except ApiException as e:
                    if e.status != 404:
                        raise
                    stored, action = await asyncio.to_thread(self.api.create_object, plural, obj), "create"
            else:
                try:
                    stored, action = await asyncio.to_thread(self.api.create_object, plural, obj), "create"
                except ApiException as e:
                    if e.status != 409:
                        raise
                    stored, action = await asyncio.to_thread(self.api.patch_object, plural, name, patch), "patch"
        except Exception as e:  # noqa: BLE001
            self.metrics.publish_failures.inc()
            reason = refusal(e)
            if reason is None:
                log.warning("writing %s %s failed: %s", obj["kind"], name, _short(e))
                return "failed"
            outcome = (reason, f"{obj['kind']} {name} ({canonical_size(obj)} bytes): {_api_message(e)}",
                       canonical_size(obj))
            self.refused_objects[key] = (digest, outcome)
            return outcome
        self.refused_objects.pop(key, None)
        if plural == PLURAL:
            # a patched result was compared with what was meant already
            self.published[name] = digest if patched else published_hash(stored)
            self._written_specs[name] = (self.published[name], obj["spec"])
            self.metrics.rulesets_published.labels(action).inc()
            log.info("%s NodeRuleSet %s: %s pods, %s rules, %d groups inline, generation %s", action, name,
                     obj["metadata"]["annotations"][PODS_ANNOTATION], obj["metadata"]["annotations"][RULES_ANNOTATION],
                     len(obj["spec"]["peerGroups"]) + len(obj["spec"]["peerPortGroups"]),
                     (stored.get("metadata") or {}).get("generation"))
            now = self.published[name]
        else:
            self._stored_slice(name, stored)
            self.metrics.slices_published.labels(obj["kind"], action).inc()
            log.debug("%s %s %s", action, obj["kind"], name)
            now = self.published_slices[name]
        if now != digest:
            log.error("%s %s was stored differently from what was sent (CRD schema out of date?)", obj["kind"], name)
        return None

    async def _patch_pods(self, name: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        """A NodeRuleSet the API holds as this publisher last wrote it is updated by a JSON Patch of
        the pods that changed, guarded by its spec-hash (None: write it whole instead)."""
        previous = self._written_specs.get(name)
        if previous is None or previous[0] != self.published.get(name):
            return None
        operations = [{"op": "test", "path": "/metadata/annotations/" + HASH_ANNOTATION.replace("/", "~1"),
                       "value": previous[0]},
                      *ruleset_patch(previous[1], obj["spec"]),
                      {"op": "replace", "path": "/metadata/annotations", "value": obj["metadata"]["annotations"]},
                      {"op": "replace", "path": "/metadata/labels", "value": obj["metadata"]["labels"]}]
        try:
            stored = await asyncio.to_thread(self.api.json_patch_object, PLURAL, name, operations)
        except ApiException as e:
            if e.status not in (409, 422):
                raise
            log.info("NodeRuleSet %s is not as last written (%s); writing it whole", name, _short(e))
            return None
        if stored.get("spec") != obj["spec"]:  # (a comparison: hashing it again costs ~5x more)
            log.warning("NodeRuleSet %s differed from what was last written; writing it whole", name)
            return None
        return stored

    async def _refused(self, node: str, digest: str, reason: str, api_message: str, size: int) -> None:
        """Never silent: the node keeps its last rules, and the metric, an Event on the Node and
        a Degraded condition on its NodeRuleSet say that they are out of date and why."""
        message = (f"the API refused an object of node {node}'s rules: {api_message}; "
                   f"node {node} keeps enforcing the rules it was last given")
        already = self.refused.get(node)
        self.refused[node] = (digest, reason, message)
        self.metrics.rulesets_refused.labels(node).set(1)
        if already is not None and already[1:] == (reason, message):
            return
        log.error("%s", message)
        uid = next((u for u, key in self.state.known_uids("Node").items() if key == node), "")
        involved = {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}
        try:
            await asyncio.to_thread(self.api.create_event, "default",
                                    warning_event(involved, "RuleSetRefused", message, self.instance))
            self.metrics.events_posted.inc()
        except Exception as e:  # noqa: BLE001 - the metric and the log still say it
            if conflict_or_missing(e) != 409:
                log.warning("posting an Event on Node %s failed: %s", node, _short(e))
        try:
            await asyncio.to_thread(self.api.set_ruleset_condition, node, "Degraded", "True", f"RuleSet{reason}", message)
        except Exception as e:  # noqa: BLE001 - no NodeRuleSet to mark (it was never created)
            if conflict_or_missing(e) != 404:
                log.warning("marking NodeRuleSet %s Degraded failed: %s", node, _short(e))

    async def _delete(self, plural: str, name: str) -> bool:
        try:
            await asyncio.to_thread(self.api.delete_object, plural, name)
        except Exception as e:  # noqa: BLE001
            if conflict_or_missing(e) != 404:
                log.warning("deleting %s %s failed: %s", plural, name, _short(e))
                self.metrics.publish_failures.inc()
                return False
        if plural == PLURAL:
            self.published.pop(name, None)
            self._written_specs.pop(name, None)
            self.metrics.rulesets_published.labels("delete").inc()
            log.info("deleted NodeRuleSet %s: the node is gone", name)
        else:
            self._forget_slice(name)
            self.metrics.slices_published.labels(GROUP_SLICE_KIND, "delete").inc()
        return True

    async def _check_relists(self) -> None:
        """Objects deleted while a watch was re-listing never send DELETED: find them by uid."""
        now = time.monotonic()
        for kind in [k for k, t in self._relisted.items() if now - t >= self.relist_quiet]:
            del self._relisted[kind]
            known = self.state.known_uids(kind)
            try:
                present = await asyncio.to_thread(self.api.list_uids, kind)
            except Exception as e:  # noqa: BLE001
                log.warning("checking %s after a relist failed: %s; retrying", kind, _short(e))
                self._relisted[kind] = now
                continue
            dropped = self.state.forget_missing(kind, known, present)
            if dropped:
                log.info("dropped %d %s(s) deleted while the watch was down: %s", len(dropped), kind, ", ".join(dropped[:10]))

    async def _report_problems(self) -> bool:
        problems = self.state.policy_problems()
        for reason in ("InvalidPolicy", "PolicyWarning"):
            self.metrics.policy_problems.labels(reason).set(sum(p.reason == reason for p in problems))
        current = {(p.uid, p.reason, p.message): p for p in problems}
        ok = True
        reported = set()
        for key, problem in current.items():
            if key in self._reported:
                reported.add(key)
                continue
            try:
                event = event_body(problem, self.instance)
                await asyncio.to_thread(self.api.create_event, event["metadata"]["namespace"], event)
                self.metrics.events_posted.inc()
            except Exception as e:  # noqa: BLE001
                if conflict_or_missing(e) != 409:  # 409: already reported under this name
                    log.warning("posting an Event on NetworkPolicy %s/%s failed: %s", problem.namespace, problem.name, _short(e))
                    ok = False
                    continue
            reported.add(key)
            log.warning("NetworkPolicy %s/%s: %s: %s", problem.namespace, problem.name, problem.reason, problem.message)
        # What is no longer a problem is forgotten, so that it is reported again if it comes back.
        self._reported = reported
        return ok


def _short(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"
