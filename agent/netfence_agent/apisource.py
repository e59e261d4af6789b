"""The agent's rule set from the Kubernetes API: its NodeRuleSet and the slices it references,
watched and assembled into the complete spec; status written back.

The controller publishes a node's rules split into bounded objects (netfence_api.slices): the
NodeRuleSet (name = node) names the node's PodRuleSlices by content hash, and the pods' rules
name peer groups, each held by PeerGroupSlices. Three watches follow them:

* the NodeRuleSet, by fieldSelector metadata.name=<node>;
* the node's PodRuleSlices, by labelSelector netfence.io/node=<node>;
* every PeerGroupSlice (groups are shared; a node uses most of them in practice, and watching
  all keeps the selector fixed, so a newly named group is already here. docs/design-scale.md
  weighs this against per-node label spans).

Each stream resumes from its last resourceVersion after a disconnect (bookmarks keep it fresh)
and re-lists after 410 Gone. One thread consumes what the streams deliver, and after each
batch assembles the complete spec: only a consistent one is delivered (every referenced
PodRuleSlice present with the content hash the NodeRuleSet names, every named group held by
slices covering it exactly once). Otherwise the agent keeps enforcing what it has; if that
lasts (the objects are missing, not just in flight) or an object is invalid, the NodeRuleSet's
status says so (Degraded). A deleted NodeRuleSet is not an empty rule set either: the agent
keeps enforcing what it has until the controller publishes a new one. A NodeRuleSet in the
complete form (pods inline, no podSlices) is delivered as it is.

Status goes to the /status subresource as a JSON merge patch of the whole status, so the spec
and generation are never touched by the agent.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from pydantic import ValidationError

import netfence_api
from netfence_api.client import load_client
from netfence_api.crd import TRIGGER_ANNOTATION
from netfence_api.slices import (
    GROUP_SLICE_PLURAL,
    NODE_LABEL,
    POD_SLICE_PLURAL,
    Incomplete,
    PeerGroupSliceSpec,
    PodRuleSliceSpec,
    SplitRuleSetSpec,
    assemble,
    assemble_group,
    is_split,
    node_label_value,
    slice_hash,
)
from netfence_agent.source import RuleSetReader

log = logging.getLogger("netfence.apisource")

GROUP, VERSION = netfence_api.API_GROUP, netfence_api.API_VERSION
PLURAL = netfence_api.PLURAL


class _Relist(Exception):
    """The resourceVersion is gone (410) or the stream said something unexpected: list again."""


class _Invalid(Incomplete):
    """An object the rule set needs does not validate: it will not fix itself, report at once."""


def _problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


@dataclass
class _Held:
    """One object as received, and its spec validated once it is needed."""

    obj: dict[str, Any]
    digest: str = ""
    group: str = ""  # a PeerGroupSlice's group
    model: Any = None
    error: str | None = None

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.obj.get("spec")
        return spec if isinstance(spec, dict) else {}


class _Follower:
    """List + watch of one plural (with a selector), feeding events into a queue, in a thread."""

    WATCH_SECONDS = 60  # server-side end of each watch request; the loop just reconnects
    BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

    def __init__(self, api: kubernetes.client.CustomObjectsApi, plural: str, out: queue.Queue,
                 stop: threading.Event, *, field_selector: str | None = None, label_selector: str | None = None,
                 accept=lambda obj: True):
        self.api, self.plural, self.out, self._stop = api, plural, out, stop
        self.selectors = {k: v for k, v in (("field_selector", field_selector), ("label_selector", label_selector)) if v}
        self.accept = accept  # belt for a server that ignored the selector
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._response: Any = None
        self.thread = threading.Thread(target=self.run, name=f"watch {plural}", daemon=True)

    def run(self) -> None:
        resource_version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    listing = self.api.list_cluster_custom_object(GROUP, VERSION, self.plural, _request_timeout=30,
                                                                  **self.selectors)
                    resource_version = listing["metadata"]["resourceVersion"]
                    self.bytes_received += len(json.dumps(listing))
                    self.out.put((self.plural, "LIST", [o for o in listing.get("items") or [] if self.accept(o)]))
                for event in self._watch(resource_version):
                    obj = event["object"]
                    resource_version = obj.get("metadata", {}).get("resourceVersion") or resource_version
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED") and self.accept(obj):
                        self.out.put((self.plural, event["type"], obj))
                failures = 0
            except _Relist as e:
                log.info("re-listing %s: %s", self.plural, e)
                resource_version = None
            except Exception as e:  # noqa: BLE001 - API down, network, auth: back off and retry
                if self._stop.is_set():
                    break
                delay = self.BACKOFF[min(failures, len(self.BACKOFF) - 1)]
                failures += 1
                log.warning("watching %s failed (%s); retrying in %ss", self.plural, _short(e), delay)
                self._stop.wait(delay)

    def _watch(self, resource_version: str) -> Iterator[dict[str, Any]]:
        response = self.api.list_cluster_custom_object(
            GROUP, VERSION, self.plural,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=self.WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(10, self.WATCH_SECONDS + 30),
            **self.selectors,
        )
        with self._lock:
            if self._stop.is_set():
                response.release_conn()
                return
            self._response = response
        try:
            if response.status != 200:
                raise ApiException(status=response.status, reason=response.reason, body=response.data)
            for line in iter_resp_lines(response):
                if not line.strip():
                    continue
                self.bytes_received += len(line) + 1
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise _Relist(f"{status.get('code')} {status.get('reason')}: {status.get('message')}")
                yield event  # a BOOKMARK carries the resourceVersion only
        finally:
            with self._lock:
                self._response = None
            response.release_conn()

    def interrupt(self) -> None:
        """Cut the blocking read (from any thread) by shutting the socket down."""
        with self._lock:
            response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None) if response is not None else None
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ApiRuleSetSource:
    # Objects in flight (a slice ahead of the NodeRuleSet naming it) resolve in milliseconds;
    # what is still missing after this long is reported.
    INCOMPLETE_GRACE = 3.0

    def __init__(self, node: str, kubeconfig: str | None = None, *, client: kubernetes.client.ApiClient | None = None):
        self.node = node
        self.client = client or load_client(kubeconfig)
        self.api = kubernetes.client.CustomObjectsApi(self.client)
        self._stop = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._last_status: netfence_api.NodeRuleSetStatus | None = None
        self._reader = RuleSetReader()  # the complete form: validates only what changed
        self._followers = [
            _Follower(self.api, PLURAL, self._events, self._stop, field_selector=f"metadata.name={node}",
                      accept=lambda o: (o.get("metadata") or {}).get("name") == node),
            _Follower(self.api, POD_SLICE_PLURAL, self._events, self._stop,
                      label_selector=f"{NODE_LABEL}={node_label_value(node)}",
                      accept=lambda o: ((o.get("metadata") or {}).get("labels") or {}).get(NODE_LABEL)
                      == node_label_value(node)),
            _Follower(self.api, GROUP_SLICE_PLURAL, self._events, self._stop),
        ]
        self._ruleset: dict[str, Any] | None = None
        self._pod_slices: dict[str, _Held] = {}
        self._group_slices: dict[str, _Held] = {}
        self._slices_of_group: dict[str, set[str]] = {}
        self._groups: dict[str, tuple[tuple, Any]] = {}  # group -> (its slice models, the group)
        self._delivered: netfence_api.NodeRuleSet | None = None
        self._waiting: tuple[str, float] | None = None  # (why the spec is incomplete, since)
        self._reported_problem: str | None = None

    @property
    def bytes_received(self) -> int:
        """Bytes of objects received from the API so far (listings and watch events)."""
        return sum(f.bytes_received for f in self._followers)

    # ------------------------------------------------------------------ updates
    def updates(self) -> Iterator[netfence_api.NodeRuleSet]:
        for follower in self._followers:
            follower.thread.start()
        while not self._stop.is_set():
            timeout = None
            if self._waiting is not None:
                timeout = max(0.05, self._waiting[1] + self.INCOMPLETE_GRACE - time.monotonic())
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is not None:
                self._take(item)
                while True:  # a batch: everything delivered so far, then assemble once
                    try:
                        item = self._events.get_nowait()
                    except queue.Empty:
                        break
                    self._take(item)
            if self._stop.is_set():
                break
            found = self._assemble()
            if found is not None:
                yield found

    def _take(self, item: tuple | None) -> None:
        if item is None:
            return
        plural, kind, payload = item
        if plural == PLURAL:
            if kind == "LIST":
                self._ruleset = payload[0] if payload else None
            elif kind == "DELETED":
                log.warning("NodeRuleSet %s was deleted; keeping the rules in force until a new one appears", self.node)
                self._ruleset = None
            else:
                self._ruleset = payload
            return
        held = self._pod_slices if plural == POD_SLICE_PLURAL else self._group_slices
        objects = payload if kind == "LIST" else [payload]
        if kind == "LIST":
            for name in list(held):
                self._drop(plural, name)
        for obj in objects:
            name = (obj.get("metadata") or {}).get("name", "")
            self._drop(plural, name)
            if kind != "DELETED":
                self._keep(plural, name, obj)

    def _keep(self, plural: str, name: str, obj: dict[str, Any]) -> None:
        entry = _Held(obj)
        if plural == POD_SLICE_PLURAL:
            entry.digest = slice_hash(entry.spec)
            self._pod_slices[name] = entry
            return
        group = entry.spec.get("peerGroup") or entry.spec.get("peerPortGroup") or {}
        entry.group = str(group.get("name") if isinstance(group, dict) else "")
        self._group_slices[name] = entry
        self._slices_of_group.setdefault(entry.group, set()).add(name)

    def _drop(self, plural: str, name: str) -> None:
        if plural == POD_SLICE_PLURAL:
            self._pod_slices.pop(name, None)
            return
        entry = self._group_slices.pop(name, None)
        if entry is not None:
            names = self._slices_of_group.get(entry.group, set())
            names.discard(name)
            if not names:
                self._slices_of_group.pop(entry.group, None)
                self._groups.pop(entry.group, None)

    # ------------------------------------------------------------------ assembling
    def _assemble(self) -> netfence_api.NodeRuleSet | None:
        if self._ruleset is None:
            return None
        meta = self._ruleset.get("metadata") or {}
        spec = self._ruleset.get("spec") or {}
        try:
            if not is_split(spec):
                rule_set = self._reader.read(
                    {k: self._ruleset[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in self._ruleset})
            else:
                rule_set = self._assemble_split(meta, SplitRuleSetSpec.model_validate(spec))
        except ValidationError as e:
            return self._incomplete(f"NodeRuleSet {self.node} is invalid: {_problems(e)}", invalid=True)
        except Incomplete as e:
            return self._incomplete(str(e), invalid=isinstance(e, _Invalid))
        self._waiting = None
        if self._reported_problem is not None:
            self._reported_problem = None
            self._restore_status()
        if self._delivered is not None and rule_set.spec == self._delivered.spec \
                and rule_set.metadata.generation == self._delivered.metadata.generation \
                and rule_set.metadata.uid == self._delivered.metadata.uid:
            return None  # a status or metadata change, or slices moving without changing the rules
        self._delivered = rule_set
        return rule_set

    def _assemble_split(self, meta: dict[str, Any], ruleset: SplitRuleSetSpec) -> netfence_api.NodeRuleSet:
        pod_slices = {}
        for ref in ruleset.podSlices:
            entry = self._pod_slices.get(ref.name)
            if entry is None:
                continue  # assemble names it
            pod_slices[ref.name] = (entry.digest, self._model(entry, PodRuleSliceSpec, "PodRuleSlice", ref.name))
        spec = assemble(ruleset, pod_slices, _GroupLookup(self))
        spec = spec.model_copy(update={"pods": self._shared_pods(spec.pods)})
        metadata = netfence_api.ObjectMeta(name=meta.get("name", self.node), generation=meta.get("generation"),
                                           resourceVersion=meta.get("resourceVersion"), uid=meta.get("uid"),
                                           annotations=self._latest_trigger(meta, ruleset, spec))
        return netfence_api.NodeRuleSet.model_construct(
            apiVersion=self._ruleset.get("apiVersion", "netfence.io/v1alpha1"), kind="NodeRuleSet",
            metadata=metadata, spec=spec, status=None)

    def _latest_trigger(self, meta: dict[str, Any], ruleset: SplitRuleSetSpec,
                        spec: netfence_api.NodeRuleSetSpec) -> dict[str, str]:
        """The newest controller trigger time among the objects this rule set is made of: the
        change that made it (network programming latency; group slices change without the
        NodeRuleSet)."""
        objects = [self._ruleset, *(self._pod_slices[r.name].obj for r in ruleset.podSlices if r.name in self._pod_slices),
                   *(self._group_slices[n].obj for g in (*spec.peerGroups, *spec.peerPortGroups)
                     for n in self._slices_of_group.get(g.name, ()))]
        stamps = [t for o in objects if (t := ((o.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_ANNOTATION))]
        # RFC 3339 in UTC with the same precision: the newest sorts last.
        return {TRIGGER_ANNOTATION: max(stamps)} if stamps else dict(meta.get("annotations") or {})

    def _shared_pods(self, pods: list) -> list:
        """Pods equal to the last delivery's are its very objects, so that comparing the two
        (render's only_group_members_changed) costs the pods that changed."""
        before = {p.key: p for p in (self._delivered.spec.pods if self._delivered is not None else ())}
        out = []
        for pod in pods:
            old = before.get(pod.key)
            out.append(old if old is not None and (old is pod or old == pod) else pod)
        return out

    def _model(self, entry: _Held, model: type, kind: str, name: str) -> Any:
        if entry.model is None and entry.error is None:
            try:
                entry.model = model.model_validate(entry.spec)
            except ValidationError as e:
                entry.error = _problems(e)
        if entry.error is not None:
            raise _Invalid(f"{kind} {name} is invalid: {entry.error}")
        return entry.model

    def group(self, name: str) -> Any:
        """The assembled group (the same object while its slices are unchanged, so that render
        sees at once which groups changed); Incomplete while its slices are not one whole."""
        names = sorted(self._slices_of_group.get(name, ()))
        models = [self._model(self._group_slices[n], PeerGroupSliceSpec, "PeerGroupSlice", n) for n in names]
        cached = self._groups.get(name)  # holds the slice models, so their ids stay theirs
        if cached is not None and len(cached[0]) == len(models) and all(a is b for a, b in zip(cached[0], models)):
            return cached[1]
        group = assemble_group(name, models)
        self._groups[name] = (tuple(models), group)
        return group

    def _incomplete(self, why: str, invalid: bool) -> None:
        now = time.monotonic()
        if self._waiting is None or self._waiting[0] != why:
            if self._waiting is None:
                log.info("waiting for a consistent rule set: %s", why)
            self._waiting = (why, now if self._waiting is None else self._waiting[1])
        lasting = now - self._waiting[1] >= self.INCOMPLETE_GRACE
        if (invalid or lasting) and self._reported_problem != why:
            self._reported_problem = why
            log.error("rule set of node %s is %s; keeping the rules in force: %s", self.node,
                      "invalid" if invalid else "incomplete", why)
            self._report_problem("InvalidRuleSet" if invalid else "IncompleteRuleSet", why)
        return None

    # ------------------------------------------------------------------ status
    def report(self, status: netfence_api.NodeRuleSetStatus) -> None:
        self._send(status)
        self._last_status = status

    def _send(self, status: netfence_api.NodeRuleSetStatus) -> None:
        body = status.model_dump(mode="json", exclude_none=True)
        for name in netfence_api.NodeRuleSetStatus.model_fields:
            body.setdefault(name, None)  # merge patch: null removes what this status does not say
        self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, self.node, {"status": body},
                                                    _request_timeout=30)

    def _report_problem(self, reason: str, problem: str) -> None:
        degraded = netfence_api.Condition(type="Degraded", status="True", reason=reason,
                                          message=f"{problem}; the rules in force stay"[:1000],
                                          lastTransitionTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        previous = self._last_status or netfence_api.NodeRuleSetStatus()
        status = previous.model_copy(update={
            "conditions": [c for c in previous.conditions if c.type != "Degraded"] + [degraded]})
        try:
            self._send(status)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot report status: %s", _short(e))

    def _restore_status(self) -> None:
        """The problem is over: the status the daemon last reported holds again."""
        if self._last_status is None:
            return
        try:
            self._send(self._last_status)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot report status: %s", _short(e))

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Stop updates() from any thread."""
        self._stop.set()
        self._events.put(None)
        for follower in self._followers:
            follower.interrupt()


class _GroupLookup:
    """groups[name] for assemble(): assembled on demand from the slices held."""

    def __init__(self, source: ApiRuleSetSource):
        self.source = source

    def get(self, name: str, default: Any = None) -> Any:
        return self.source.group(name)


def _short(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"
