"""The publisher: the one place that writes to the API (NodeRuleSets and Events).

It waits until the initial listing of every watched kind is in the state (so it never
publishes a half-known cluster), loads what is already published, then loops: collect dirty
nodes, wait a short quiet period (many events become one write), compute each dirty node's
spec, and write only where the content hash differs from what the API holds. Nodes that no
longer exist lose their NodeRuleSet. A periodic resync re-reads the published NodeRuleSets
(repairing manual edits and deletions) and a relist of a watched kind triggers a check for
objects whose deletion was missed.
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
from pydantic import ValidationError

from netfence_api import NodeRuleSetSpec, short_hash
from netfence_api.crd import HASH_ANNOTATION, PODS_ANNOTATION, RULES_ANNOTATION, TRIGGER_ANNOTATION
from netfence_operator.compile.compiler import TIER_FIELDS
from netfence_operator.compile.objects import CNP_API_VERSION
from netfence_operator.kube import KubeApi, conflict_or_missing
from netfence_operator.metrics import ControllerMetrics
from netfence_operator.state import ClusterState, PolicyProblem

log = logging.getLogger("netfence.controller.publish")

MANAGED_BY = {"app.kubernetes.io/managed-by": "netfence-controller"}
COMPONENT = "netfence-controller"
_EVENT_MESSAGE_LIMIT = 1024


def published_hash(obj: dict[str, Any]) -> str:
    """Content hash of a stored NodeRuleSet's spec ('invalid' if it does not parse)."""
    try:
        return NodeRuleSetSpec.model_validate(obj.get("spec") or {}).content_hash()
    except ValidationError:
        return "invalid"


def ruleset_metadata(spec: NodeRuleSetSpec, digest: str) -> dict[str, Any]:
    rules = sum(len(p.ingress) + len(p.egress) + sum(len(p.tier_rules(t, d)) for t, d in TIER_FIELDS)
                for p in spec.pods)
    return {
        "labels": dict(MANAGED_BY),
        "annotations": {PODS_ANNOTATION: str(len(spec.pods)), RULES_ANNOTATION: str(rules), HASH_ANNOTATION: digest},
    }


def trigger_time(seconds: float) -> str:
    """RFC 3339 with microseconds, as kube-proxy's trigger-time annotation (sub-second latencies)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spec_body(spec: NodeRuleSetSpec) -> dict[str, Any]:
    # Every top-level spec field is always present (none is optional), so a merge patch of
    # this body replaces the stored spec exactly: lists are replaced whole, no key lingers.
    return spec.model_dump(mode="json", exclude_none=True)


def event_body(problem: PolicyProblem, instance: str) -> dict[str, Any]:
    if problem.kind == "ClusterNetworkPolicy":
        involved = {"apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy", "name": problem.name,
                    "uid": problem.uid}
    else:
        involved = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "namespace": problem.namespace, "name": problem.name, "uid": problem.uid}
    return warning_event(involved, problem.reason, problem.message, instance)


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
    # node -> (content hash, reason, message) of a spec the API refused; not sent again unchanged
    refused: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    _failures: int = 0
    instance: str = field(default_factory=socket.gethostname)
    # Network programming latency starts when the controller sees the change (the watch event):
    # the first event since the last round, kept per node until that node's write succeeds.
    _first_change: float | None = None
    _triggers: dict[str, float] = field(default_factory=dict)

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
            if time.monotonic() >= next_resync:
                await self._load_published()
                self.state.mark_all_dirty(self.published)
                next_resync = time.monotonic() + self.resync_interval
                continue
            if not ok:
                await asyncio.sleep(self._retry_delay())
                continue
            self._wake.clear()
            if not self.state.dirty:  # the dirty set, not the wake flag, is the truth
                try:
                    wait = min(self._relist_wait(), max(0.0, next_resync - time.monotonic()))
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
                stored = await asyncio.to_thread(self.api.list_rulesets)
                break
            except Exception as e:  # noqa: BLE001 - any API trouble: retry, the loop must survive
                wait = next(delay, self.retry_backoff[-1])
                log.warning("listing NodeRuleSets failed (%s); retrying in %ss", _short(e), wait)
                await asyncio.sleep(wait)
        self.published = {name: published_hash(obj) for name, obj in stored.items()}

    async def _round(self) -> bool:
        """One publish round; False if something failed and must be retried."""
        await self._check_relists()
        self.state.rebuild_if_broken()
        ok = True
        for kind, count in self.state.counts().items():
            self.metrics.objects_watched.labels(kind).set(count)
        trigger, self._first_change = self._first_change or time.time(), None
        dirty = self.state.take_dirty()
        for node in dirty:
            self._triggers.setdefault(node, trigger)
        if dirty:
            names = self.state.compiler.node_names()
            for node in sorted(dirty):
                if node in names:
                    try:
                        with self.metrics.compile_duration.labels("publish").time():
                            spec = self.state.compiler.node_spec(node)
                    except Exception:  # noqa: BLE001 - a compiler bug: keep the published rules, say so loudly
                        log.exception("compiling node %s failed; its published rules stay", node)
                        self.metrics.publish_failures.inc()
                        continue
                    written = await self._write(node, spec)
                elif node in self.published:
                    written = await self._delete(node)
                else:
                    written = True
                if not written:
                    self.state.dirty.add(node)
                    ok = False
        ok = await self._report_problems() and ok
        self._failures = 0 if ok else self._failures + 1
        return ok

    async def _write(self, node: str, spec: NodeRuleSetSpec) -> bool:
        digest = spec.content_hash()
        if self.published.get(node) == digest:
            self._triggers.pop(node, None)
            return True
        if self.refused.get(node, ("",))[0] == digest:
            return True  # the API would refuse it again; the node's Degraded condition says so
        metadata = ruleset_metadata(spec, digest)
        metadata["annotations"][TRIGGER_ANNOTATION] = trigger_time(self._triggers.get(node, time.time()))
        try:
            if node in self.published:
                try:
                    stored = await asyncio.to_thread(self.api.patch_ruleset, node, {"metadata": metadata, "spec": spec_body(spec)})
                    action = "patch"
                except ApiException as e:
                    if e.status != 404:
                        raise
                    stored, action = await asyncio.to_thread(self.api.create_ruleset, self._new(node, metadata, spec)), "create"
            else:
                try:
                    stored = await asyncio.to_thread(self.api.create_ruleset, self._new(node, metadata, spec))
                    action = "create"
                except ApiException as e:
                    if e.status != 409:
                        raise
                    stored = await asyncio.to_thread(self.api.patch_ruleset, node, {"metadata": metadata, "spec": spec_body(spec)})
                    action = "patch"
        except Exception as e:  # noqa: BLE001
            self.metrics.publish_failures.inc()
            reason = refusal(e)
            if reason is None:
                log.warning("writing NodeRuleSet %s failed: %s", node, _short(e))
                return False
            await self._refused(node, digest, reason, _api_message(e), len(json.dumps(spec_body(spec))))
            return True
        if self.refused.pop(node, None) is not None:
            self.metrics.rulesets_refused.remove(node)
            log.info("NodeRuleSet %s is accepted by the API again", node)
        self.published[node] = published_hash(stored)
        self._triggers.pop(node, None)
        if self.published[node] != digest:
            log.error("NodeRuleSet %s was stored differently from what was sent (CRD schema out of date?)", node)
        self.metrics.rulesets_published.labels(action).inc()
        log.info("%s NodeRuleSet %s: %s pods, %s rules, generation %s", action, node,
                 metadata["annotations"][PODS_ANNOTATION], metadata["annotations"][RULES_ANNOTATION],
                 (stored.get("metadata") or {}).get("generation"))
        return True

    async def _refused(self, node: str, digest: str, reason: str, api_message: str, size: int) -> None:
        """Never silent: the node keeps its last rules, and the metric, an Event on the Node and
        a Degraded condition on its NodeRuleSet say that they are out of date and why."""
        message = (f"the API refused NodeRuleSet {node} ({size} bytes of spec): {api_message}; "
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

    @staticmethod
    def _new(node: str, metadata: dict[str, Any], spec: NodeRuleSetSpec) -> dict[str, Any]:
        return {"apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet",
                "metadata": {"name": node, **metadata}, "spec": spec_body(spec)}

    async def _delete(self, node: str) -> bool:
        try:
            await asyncio.to_thread(self.api.delete_ruleset, node)
        except Exception as e:  # noqa: BLE001
            if conflict_or_missing(e) != 404:
                log.warning("deleting NodeRuleSet %s failed: %s", node, _short(e))
                self.metrics.publish_failures.inc()
                return False
        self.published.pop(node, None)
        self._triggers.pop(node, None)
        self.metrics.rulesets_published.labels("delete").inc()
        log.info("deleted NodeRuleSet %s: the node is gone", node)
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
                    log.warning("posting an Event on %s failed: %s", problem.label, _short(e))
                    ok = False
                    continue
            reported.add(key)
            log.warning("%s: %s: %s", problem.label, problem.reason, problem.message)
        # What is no longer a problem is forgotten, so that it is reported again if it comes back.
        self._reported = reported
        return ok


def _short(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"
