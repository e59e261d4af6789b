"""The agent's rule set from the Kubernetes API: its NodeRuleSet and the peer groups it names,
watched and assembled into the complete spec; status written back.

The NodeRuleSet (name = node) holds the node's pods and their rules; their rules name peer
groups, carried inline in the NodeRuleSet (small clusters) or else held by PeerGroupSlices
shared by every node (netfence_api.slices). Two watches follow them:

* the NodeRuleSet, by fieldSelector metadata.name=<node>;
* every PeerGroupSlice (groups are shared; a node uses most of them in practice, and watching
  all keeps the selector fixed, so a newly named group is already here. docs/design-scale.md
  weighs this against per-node label spans).

Each stream resumes from its last resourceVersion after a disconnect (bookmarks keep it fresh)
and re-lists after 410 Gone. One thread consumes what the streams deliver, and after each
batch assembles the complete spec: only a consistent one is delivered (every group the rules
name inline or held by slices covering it exactly once). Otherwise the agent keeps enforcing
what it has; if that lasts (the objects are missing, not just in flight) or an object is
invalid, the NodeRuleSet's status says so (Degraded). A deleted NodeRuleSet is not an empty
rule set either: the agent keeps enforcing what it has until the controller publishes a new one.
A NodeRuleSet and the slices written in the same round name each other (annotation
netfence.io/written-with), and the NodeRuleSet's watch announces a new generation before its GET:
what arrives first waits for the rest (at most COMING_WAIT), so one pod event is one sync.

Status goes to the /status subresource as a JSON merge patch of the whole status, so the spec
and generation are never touched by the agent.
"""

from __future__ import annotations

import collections
import gzip
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
from netfence_api.crd import HASH_ANNOTATION, TRIGGER_ANNOTATION, companion_of, companions_of, is_companion
from netfence_api.slices import GROUP_SLICE_PLURAL, Incomplete, PeerGroupSliceSpec, assemble, assemble_group
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
                 accept=lambda obj: True, spec_changes_only: bool = False):
        self.api, self.plural, self.out, self._stop = api, plural, out, stop
        self.selectors = {k: v for k, v in (("field_selector", field_selector), ("label_selector", label_selector)) if v}
        self.accept = accept  # belt for a server that ignored the selector
        # Watch metadata only and GET an object when its generation moves: its status changes
        # (the agent's own reports among them) then cost a metadata event, not the whole object.
        self.spec_changes_only = spec_changes_only
        self._have: dict[str, tuple[str, Any]] = {}  # name -> (uid, generation) of the object last put out
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
                    listing = self._read(self.api.list_cluster_custom_object(
                        GROUP, VERSION, self.plural, _request_timeout=30, _preload_content=False,
                        _headers=_GZIP, **self.selectors))
                    resource_version = listing["metadata"]["resourceVersion"]
                    items = [o for o in listing.get("items") or [] if self.accept(o)]
                    self._have = {_name(o): _version(o) for o in items}
                    self.out.put((self.plural, "LIST", items))
                for event in self._watch(resource_version):
                    obj = event["object"]
                    resource_version = obj.get("metadata", {}).get("resourceVersion") or resource_version
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED") and self.accept(obj):
                        self._put(event["type"], obj)
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

    def _put(self, kind: str, obj: dict[str, Any]) -> None:
        name = _name(obj)
        if kind == "DELETED":
            self._have.pop(name, None)
        elif obj.get("kind") == "PartialObjectMetadata":
            if self._have.get(name) == _version(obj):
                return  # status or metadata only
            # Say it is on its way: group slices changed by the same event, arriving meanwhile,
            # wait for it, and the agent syncs once instead of twice.
            self.out.put((self.plural, "COMING", None))
            obj = self._get(name)
            if obj is None:
                return  # gone meanwhile: its DELETED event follows
        self._have[name] = _version(obj) if kind != "DELETED" else None
        self.out.put((self.plural, kind, obj))

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            return self._read(self.api.get_cluster_custom_object(GROUP, VERSION, self.plural, name, _preload_content=False,
                                                                 _request_timeout=30, _headers=_GZIP))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _read(self, response: Any) -> dict[str, Any]:
        """A GET or LIST response's object, counting the bytes as they came over the wire (the
        apiserver gzips those over 128 KiB: a node of 1,000 pods' NodeRuleSet is ~430 KiB)."""
        try:
            raw = response.read(decode_content=False)
        finally:
            response.release_conn()
        self.bytes_received += len(raw)
        if response.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        return json.loads(raw)

    def _watch(self, resource_version: str) -> Iterator[dict[str, Any]]:
        headers = {"Accept": f"{_PARTIAL_METADATA}, application/json"} if self.spec_changes_only else None
        response = self.api.list_cluster_custom_object(
            GROUP, VERSION, self.plural,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=self.WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(10, self.WATCH_SECONDS + 30),
            _headers=headers,
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


_PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
_GZIP = {"Accept-Encoding": "gzip"}


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _name(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def _version(obj: dict[str, Any]) -> tuple[str, Any]:
    meta = obj.get("metadata") or {}
    return meta.get("uid", ""), meta.get("generation")


class ApiRuleSetSource:
    # Objects in flight (a slice ahead of the NodeRuleSet naming it) resolve in milliseconds;
    # what is still missing after this long is reported.
    INCOMPLETE_GRACE = 3.0
    # How long changes wait for a NodeRuleSet whose new generation was announced (its GET): a
    # bound for a GET that fails (the watch then re-lists).
    COMING_WAIT = 1.0

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
                      accept=lambda o: (o.get("metadata") or {}).get("name") == node, spec_changes_only=True),
            _Follower(self.api, GROUP_SLICE_PLURAL, self._events, self._stop),
        ]
        self._ruleset: dict[str, Any] | None = None
        self._group_slices: dict[str, _Held] = {}
        self._slices_of_group: dict[str, set[str]] = {}
        self._groups: dict[str, tuple[tuple, Any]] = {}  # group -> (its slice models, the group)
        self._read: tuple[dict[str, Any], netfence_api.NodeRuleSet] | None = None  # the NodeRuleSet last read
        self._delivered: netfence_api.NodeRuleSet | None = None
        self._waiting: tuple[str, float] | None = None  # (why the spec is incomplete, since)
        # One pod event changes the NodeRuleSet and group slices, written in one round; what
        # arrives first waits for the rest (at most COMING_WAIT), so that it is one sync:
        self._coming: float | None = None  # since when a new NodeRuleSet is expected, until it is here
        self._ruleset_hashes: collections.deque[str] = collections.deque(maxlen=8)  # spec-hashes received lately
        self._slices_due: dict[str, str] = {}  # slices the NodeRuleSet was written with -> their hash start
        self._slices_due_since = 0.0
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
            due = self._expecting_since()
            if due is not None:
                left = max(0.0, due + self.COMING_WAIT - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
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
            due = self._expecting_since()
            if due is not None and time.monotonic() - due < self.COMING_WAIT:
                continue  # the rest of the change is on its way: assemble with it
            self._coming, self._slices_due = None, {}
            found = self._assemble()
            if found is not None:
                yield found

    def _take(self, item: tuple | None) -> None:
        if item is None:
            return
        plural, kind, payload = item
        if plural == PLURAL:
            self._coming = time.monotonic() if kind == "COMING" else None
            if kind == "COMING":
                return
            self._slices_due = {}
            if kind == "LIST":
                self._ruleset = payload[0] if payload else None
            elif kind == "DELETED":
                log.warning("NodeRuleSet %s was deleted; keeping the rules in force until a new one appears", self.node)
                self._ruleset = None
            else:
                self._ruleset = payload
                # written with slices not here yet: wait for them (not on a listing, whose
                # annotations are of some earlier round)
                self._slices_due = {name: digest for name, digest in companions_of(_annotations(payload)).items()
                                    if not (name in self._group_slices and is_companion(
                                        _annotations(self._group_slices[name].obj).get(HASH_ANNOTATION), digest))}
                self._slices_due_since = time.monotonic()
            if self._ruleset is not None:
                self._ruleset_hashes.append(_annotations(self._ruleset).get(HASH_ANNOTATION))
            return
        objects = payload if kind == "LIST" else [payload]
        if kind == "LIST":
            for name in list(self._group_slices):
                self._drop(name)
        elif kind != "DELETED" and self._coming is None:
            # Written with a NodeRuleSet of this node not here yet: wait for it (as for an
            # announced one). Not on a listing either.
            wanted = companion_of(_annotations(payload), self.node)
            if wanted is not None and not any(is_companion(h, wanted) for h in self._ruleset_hashes):
                self._coming = time.monotonic()
        for obj in objects:
            name = (obj.get("metadata") or {}).get("name", "")
            if name in self._slices_due and (kind == "DELETED" or is_companion(
                    _annotations(obj).get(HASH_ANNOTATION), self._slices_due[name])):
                del self._slices_due[name]  # here (or gone): nothing more to wait for
            self._drop(name)
            if kind != "DELETED":
                self._keep(name, obj)

    def _expecting_since(self) -> float | None:
        """Since when part of a change is awaited (None: nothing is)."""
        return self._coming if self._coming is not None else (self._slices_due_since if self._slices_due else None)

    def _keep(self, name: str, obj: dict[str, Any]) -> None:
        entry = _Held(obj)
        group = entry.spec.get("peerGroup") or entry.spec.get("peerPortGroup") or {}
        entry.group = str(group.get("name") if isinstance(group, dict) else "")
        self._group_slices[name] = entry
        self._slices_of_group.setdefault(entry.group, set()).add(name)

    def _drop(self, name: str) -> None:
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
        try:
            if self._read is None or self._read[0] is not self._ruleset:  # else only group slices moved
                self._read = (self._ruleset, self._reader.read(
                    {k: self._ruleset[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in self._ruleset}))
            read = self._read[1]
            spec = assemble(read.spec, self.group)
            rule_set = read if spec is read.spec else read.model_copy(update={
                "spec": spec, "metadata": read.metadata.model_copy(update={"annotations": self._latest_trigger(spec)})})
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

    def _latest_trigger(self, spec: netfence_api.NodeRuleSetSpec) -> dict[str, str]:
        """The newest controller trigger time among the objects this rule set is made of: the
        change that made it (network programming latency; group slices change without the
        NodeRuleSet)."""
        objects = [self._ruleset, *(self._group_slices[n].obj for g in (*spec.peerGroups, *spec.peerPortGroups)
                                    for n in self._slices_of_group.get(g.name, ()))]
        stamps = [t for o in objects if (t := _annotations(o).get(TRIGGER_ANNOTATION))]
        # RFC 3339 in UTC with the same precision: the newest sorts last.
        return {**_annotations(self._ruleset), **({TRIGGER_ANNOTATION: max(stamps)} if stamps else {})}

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
        sees at once which groups changed); None without slices, Incomplete while its slices are
        not one whole."""
        names = sorted(self._slices_of_group.get(name, ()))
        if not names:
            return None
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


def _short(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"
