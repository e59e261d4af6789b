"""A small Kubernetes API server for tests: the real REST + watch protocol over HTTP, in memory.

Written because kmock 0.8's emulator misses exactly the behaviour a controller can get wrong
(DESIGN.md §4). This server is faithful on those points, and tests/controller/test_fakeapi.py
checks each one against the documented apiserver behaviour:

- one global, increasing resourceVersion; every object carries the one of its last write;
  uid and creationTimestamp set on create; `generateName` honoured; 409 on a name taken;
- metadata.generation = 1 on create and +1 only when something outside metadata and status
  changes (for resources with generation tracking);
- a status subresource is separate: writes to the object ignore .status, writes to /status
  change only .status; creating a CR with a status subresource drops the status;
- PUT and PATCH with a stale metadata.resourceVersion get 409 Conflict;
- merge patch (RFC 7386), JSON patch (RFC 6902); strategic merge patch is treated as a merge
  patch (lists replaced whole) -- the only simplification, and nothing here relies on it;
- a no-op write changes nothing: no new resourceVersion, no watch event;
- label selectors (=, ==, !=, in, notin, exists, !key) and field selectors (=, ==, != on any
  dotted path) on list and watch; a watched object that stops (starts) matching is sent as
  DELETED (ADDED), as the apiserver's watch cache does;
- watch from a resourceVersion replays later events; one older than the compaction point gets
  a 410 Expired ERROR event; watch without one starts with synthetic ADDED events;
  BOOKMARK events on request; `timeoutSeconds` ends the stream;
- finalizers: DELETE sets deletionTimestamp while finalizers remain;
- graceful pod deletion: DELETE of a pod bound to a node (spec.nodeName) sets deletionTimestamp
  and deletionGracePeriodSeconds (DeleteOptions.gracePeriodSeconds, else the pod's
  terminationGracePeriodSeconds, else 30) and leaves the pod for its kubelet, which deletes it
  again with grace 0 once its containers are gone; unbound pods and grace 0 go at once;
- pods/binding (what a scheduler POSTs): sets spec.nodeName once, 409 if already bound;
- discovery (/api, /apis, /version) so kopf finds the resources.

`python -m controller.fakeapi --kubeconfig FILE` (tests/ on PYTHONPATH) serves it standalone.

The server runs its own event loop in a thread; test-side methods are thread-safe. It also
records every request, so tests can count the writes a controller made.

Cost (bench/fakeapi_patch.py): a stored object is never changed in place once stored -- a write
makes a new top-level dict and new dicts only along the paths it changes, sharing the rest with
the old version and the request -- so nothing is deep-copied per write; each version is JSON-
encoded once, when it is stored (the size check needs that encoding anyway), and that one
encoding is the response body, every watcher's event line and the history's record. The history
keeps the encodings; only the newest events keep their dicts as well (older ones are decoded
again if a watch replays them). Test-side reads return fresh copies.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import gzip
import json
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp.web
import jsonpatch


# --------------------------------------------------------------------------- resource types
@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False
    generation: bool = False
    singular: str = ""
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version


BUILTIN_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", False, status_subresource=True, short_names=("ns",)),
    ResourceType("", "v1", "nodes", "Node", False, status_subresource=True, short_names=("no",)),
    ResourceType("", "v1", "pods", "Pod", True, status_subresource=True, generation=True, short_names=("po",)),
    ResourceType("", "v1", "events", "Event", True, short_names=("ev",)),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, generation=True,
                 short_names=("netpol",)),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
                 status_subresource=True, generation=True, short_names=("crd",)),
    ResourceType("netfence.io", "v1alpha1", "noderulesets", "NodeRuleSet", False, status_subresource=True,
                 generation=True, short_names=("nrs",)),
    ResourceType("netfence.io", "v1alpha1", "peergroupslices", "PeerGroupSlice", False, generation=True,
                 short_names=("nrgs",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
)
DEFAULT_POD_GRACE_SECONDS = 30
CLUSTER_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")  # what a fresh cluster has
# The network-policy-api CRD, as its manifest declares it (cluster-scoped, status subresource).
# In the defaults, as on a cluster with the CRD installed; leave it out to test one without.
CLUSTER_NETWORK_POLICY_TYPE = ResourceType("policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies",
                                           "ClusterNetworkPolicy", False, status_subresource=True, generation=True,
                                           short_names=("cnp",))
BUILTIN_TYPES = BUILTIN_TYPES + (CLUSTER_NETWORK_POLICY_TYPE,)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


# --------------------------------------------------------------------------- selectors
_SET_EXPR = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str | None, labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    for term in _split_selector(selector or ""):
        m = _SET_EXPR.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _dotted(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_selector_matches(selector: str | None, obj: dict[str, Any]) -> bool:
    for term in _split_selector(selector or ""):
        if "!=" in term:
            path, value = (s.strip() for s in term.split("!=", 1))
            if _dotted(obj, path) == value:
                return False
        elif "=" in term:
            path, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if _dotted(obj, path) != value:
                return False
        else:
            raise ApiError(400, "BadRequest", f"invalid field selector term {term!r}")
    return True


# --------------------------------------------------------------------------- merge patch
def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, without changing `target` or `patch`: the result is new
    wherever the patch changes something and shares the untouched parts of both."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def encode(obj: Any) -> bytes:
    """The one JSON encoding of an object: compact, as etcd's size limit counts it."""
    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the server
@dataclass(eq=False)
class WatchEvent:
    """One change, as every watcher gets it: the object's encoding is made once, when the
    version is stored, and each event line (per event type a watcher may see) once."""

    rv: int
    rtype: ResourceType
    type: str  # ADDED MODIFIED DELETED
    data: bytes  # the object, encoded
    old_data: bytes | None  # the version before, encoded (selectors decide what a watcher sees)
    _obj: dict[str, Any] | None = None  # decoded forms, kept while the event is recent
    _old: dict[str, Any] | None = None
    _lines: dict[str, bytes] = field(default_factory=dict)

    @property
    def obj(self) -> dict[str, Any]:
        return self._obj if self._obj is not None else json.loads(self.data)

    @property
    def old(self) -> dict[str, Any] | None:
        if self.old_data is None:
            return None
        return self._old if self._old is not None else json.loads(self.old_data)

    def line(self, etype: str) -> bytes:
        """The watch stream's line for this event sent as `etype`."""
        found = self._lines.get(etype)
        if found is None:
            found = self._lines[etype] = b'{"type":"' + etype.encode() + b'","object":' + self.data + b"}\n"
        return found

    def cool(self) -> None:
        """Keep only the encodings (an old event of the history)."""
        self._obj = self._old = None
        self._lines.clear()


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    status: int = 0
    raw: bytes | None = None  # the body as sent (bytes: no work for the garbage collector)

    @property
    def body(self) -> Any:
        """The body, decoded (a fresh copy each time)."""
        return None if not self.raw else json.loads(self.raw)


@dataclass(eq=False)
class _Watcher:
    queue: asyncio.Queue
    response: aiohttp.web.StreamResponse | None = None


@dataclass
class FakeApiServer:
    types: tuple[ResourceType, ...] = BUILTIN_TYPES
    bookmark_interval: float = 1.0
    history_limit: int = 100_000
    seed_namespaces: tuple[str, ...] = ("default", "kube-system")
    # The apiserver refuses a write body over 3 MiB, and etcd (--max-request-bytes, 1.5 MiB by
    # default) an object over 1.5 MiB; both reach the client as 413 RequestEntityTooLarge.
    max_request_bytes: int = 3 * 1024 * 1024
    max_object_bytes: int = 1536 * 1024
    port: int = 0  # 0: any free port (the one chosen is here after start())

    # (plural-gv, ns, name) -> the stored object. Never changed in place: a write stores a new dict.
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    hot_events: int = 64  # the newest events of the history keep their decoded objects too
    requests: list[RecordedRequest] = field(default_factory=list)
    _rv: int = 0
    _compacted: int = 0
    _history: collections.deque = field(default_factory=collections.deque)
    _watchers: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self._encoded: dict[tuple[str, str, str], tuple[dict[str, Any], bytes]] = {}  # key -> (object, encoding)
        self._last: tuple[Any, bytes] | None = None  # the object last committed and its encoding
        self._by_path: dict[tuple[str, str], ResourceType] = {(t.group_version, t.plural): t for t in self.types}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: aiohttp.web.AppRunner | None = None
        self._site: aiohttp.web.TCPSite | None = None
        for ns in self.seed_namespaces:
            self._create(self.rtype("namespaces"), None, {"metadata": {"name": ns}}, keep_status=True)

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeApiServer":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start_site())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._stop_site())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fakeapi", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake API server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    async def _start_site(self) -> None:
        app = aiohttp.web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = aiohttp.web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop_site(self) -> None:
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop (all state lives there) and return its result."""
        if self._loop is None:
            return fn()

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    def restart(self, *, compact: bool = True, downtime: float = 0.5, during: Callable[[], Any] | None = None) -> None:
        """Like an apiserver restart: connections drop, the port refuses for a while, and with
        `compact` every older resourceVersion is gone (watches resuming from one get 410).
        `during` runs (in a thread, so it may use the test-side methods) while the port is down."""

        async def bounce() -> None:
            await self._stop_site()
            if during is not None:
                await asyncio.to_thread(during)
            await asyncio.sleep(downtime)  # writes made meanwhile (test-side) are behind the compaction
            if compact:
                self._compacted = self._rv
            await self._start_site()

        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(bounce(), self._loop).result(30)

    def compact(self) -> None:
        """Forget history: a watch from any resourceVersion seen so far gets 410 Gone."""
        self.call(lambda: setattr(self, "_compacted", self._rv))

    def drop_watches(self) -> None:
        """End every open watch stream (clients reconnect from their last resourceVersion)."""
        def end() -> None:
            for watcher in list(self._watchers):
                watcher.queue.put_nowait(None)
        self.call(end)

    # ------------------------------------------------------------------ test-side API
    def rtype(self, plural: str) -> ResourceType:
        matches = [t for t in self.types if t.plural == plural]
        if len(matches) != 1:
            raise KeyError(plural)
        return matches[0]

    def rtype_of(self, obj: dict[str, Any]) -> ResourceType:
        for t in self.types:
            if t.kind == obj.get("kind") and t.api_version == obj.get("apiVersion", t.api_version):
                return t
        raise KeyError(obj.get("kind"))

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object as given, status included (what kubelet and
        controllers would have written). For test setup; the REST paths are the faithful ones."""
        rtype = self.rtype_of(obj)
        ns = obj["metadata"].get("namespace") or ("default" if rtype.namespaced else None)

        body = copy.deepcopy(obj)  # the caller's dict stays the caller's

        def do() -> dict[str, Any]:
            existing = self.objects.get(self._key(rtype, ns, body["metadata"]["name"]))
            if existing is None:
                return self._create(rtype, ns, body, keep_status=True)
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            return self._replace(rtype, ns, existing, body, subresource=None, keep_status=True)

        return copy.deepcopy(self.call(do))

    def delete(self, plural: str, name: str, namespace: str | None = None) -> None:
        rtype = self.rtype(plural)
        self.call(lambda: self._delete(rtype, namespace, name))

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        rtype = self.rtype(plural)
        key = self._key(rtype, namespace, name)
        data = self.call(lambda: None if key not in self.objects else self._data(self.objects[key], key))
        return None if data is None else json.loads(data)

    def list(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        rtype = self.rtype(plural)

        def do() -> list[bytes]:
            return [self._data(o, k) for k, o in sorted(self.objects.items())
                    if k[0] == self._gvp(rtype) and (namespace is None or k[1] == namespace)]

        return [json.loads(data) for data in self.call(do)]

    def writes(self, path_prefix: str = "", methods: tuple[str, ...] = ("POST", "PUT", "PATCH", "DELETE")) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.method in methods and r.path.startswith(path_prefix)]

    @property
    def resource_version(self) -> int:
        return self._rv

    # ------------------------------------------------------------------ storage
    @staticmethod
    def _gvp(rtype: ResourceType) -> str:
        return f"{rtype.group_version}/{rtype.plural}"

    def _key(self, rtype: ResourceType, ns: str | None, name: str) -> tuple[str, str, str]:
        return (self._gvp(rtype), ns or "", name)

    def _data(self, obj: dict[str, Any], key: tuple[str, str, str] | None = None) -> bytes:
        """The encoding of a stored (or just committed) object, made once."""
        if self._last is not None and self._last[0] is obj:
            return self._last[1]
        cached = self._encoded.get(key) if key is not None else None
        if cached is not None and cached[0] is obj:
            return cached[1]
        data = encode(obj)
        if key is not None and self.objects.get(key) is obj:
            self._encoded[key] = (obj, data)
        return data

    def _commit(self, rtype: ResourceType, etype: str, obj: dict[str, Any], old: dict[str, Any] | None,
                data: bytes | None = None) -> None:
        """Record a change that is already in self.objects (objects are never changed in place
        after this, so the event holds them as they are)."""
        key = self._key(rtype, (obj["metadata"].get("namespace") if rtype.namespaced else None), obj["metadata"]["name"])
        old_data = None if old is None else self._data(old, key)
        if data is None:
            data = encode(obj)
        if etype == "DELETED":
            self._encoded.pop(key, None)
        else:
            self._encoded[key] = (obj, data)
        self._last = (obj, data)
        event = WatchEvent(self._rv, rtype, etype, data, old_data, obj, old)
        self._history.append(event)
        if len(self._history) > self.hot_events:
            self._history[-self.hot_events - 1].cool()
        while len(self._history) > self.history_limit:
            dropped = self._history.popleft()
            self._compacted = max(self._compacted, dropped.rv)
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(event)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _create(self, rtype: ResourceType, ns: str | None, body: dict[str, Any], *, keep_status: bool = False) -> dict[str, Any]:
        # New dicts where the server writes; the rest is shared with the body (a parsed request).
        obj = dict(body)
        meta = obj["metadata"] = dict(obj.get("metadata") or {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
            for _ in range(20):
                candidate = meta["generateName"] + secrets.token_hex(3)[:5]
                if self._key(rtype, ns, candidate) not in self.objects:
                    meta["name"] = candidate
                    break
        if rtype.namespaced:
            if not ns:
                raise ApiError(400, "BadRequest", f"{rtype.kind} is namespaced: a namespace is required")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        key = self._key(rtype, ns, meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{rtype.plural}.{rtype.group or "core"} "{meta["name"]}" already exists')
        if rtype.status_subresource and not keep_status:
            obj.pop("status", None)  # with a status subresource, status is ignored on create
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta.pop("deletionTimestamp", None)
        if rtype.generation:
            meta["generation"] = 1
        if rtype.kind == "Namespace":
            meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta["name"]}
        meta["resourceVersion"] = str(self._rv + 1)
        data = self._stored_encoding(obj)
        self._next_rv()
        self.objects[key] = obj
        self._commit(rtype, "ADDED", obj, None, data)
        return obj

    def _replace(self, rtype: ResourceType, ns: str | None, old: dict[str, Any], new: dict[str, Any],
                 *, subresource: str | None, keep_status: bool = False) -> dict[str, Any]:
        """Store `new` in place of `old` with the apiserver's rules; a no-op leaves all alone."""
        sent_rv = (new.get("metadata") or {}).get("resourceVersion")
        if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.plural} "{old["metadata"]["name"]}": '
                                            "the object has been modified; please apply your changes to the latest version and try again")
        # A new top-level dict and metadata; the rest is shared with `new` and `old`, which
        # nothing changes in place.
        obj = dict(new)
        if rtype.status_subresource and not keep_status:
            if subresource == "status":
                # /status writes change the status only (and nothing in metadata but what we keep).
                obj = {**old, "status": new.get("status")}
                if obj["status"] is None:
                    obj.pop("status")
            else:
                obj.pop("status", None)
                if "status" in old:
                    obj["status"] = old["status"]
        meta = obj["metadata"] = dict(obj.get("metadata") or {})
        old_meta = old["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp",
                      "deletionGracePeriodSeconds"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        if rtype.kind == "Namespace":
            meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta["name"]}
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if obj == old:
            return old  # no-op: no new resourceVersion, no event
        if rtype.generation and _without(obj) != _without(old):
            meta["generation"] = old_meta.get("generation", 1) + 1
        meta["resourceVersion"] = str(self._rv + 1)
        data = self._stored_encoding(obj)
        self._next_rv()
        key = self._key(rtype, ns, meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[key]
            self._commit(rtype, "DELETED", obj, old, data)
            return obj
        self.objects[key] = obj
        self._commit(rtype, "MODIFIED", obj, old, data)
        return obj

    def _stored_encoding(self, obj: dict[str, Any]) -> bytes:
        """The object's encoding, as stored (with its new resourceVersion); 413 if etcd would
        refuse it."""
        data = encode(obj)
        if len(data) > self.max_object_bytes:
            raise ApiError(413, "RequestEntityTooLarge", "etcdserver: request is too large")
        return data

    def _delete(self, rtype: ResourceType, ns: str | None, name: str, grace: int | None = None) -> dict[str, Any]:
        key = self._key(rtype, ns, name)
        old = self.objects.get(key)
        if old is None:
            raise ApiError(404, "NotFound", f'{rtype.plural} "{name}" not found')
        if grace is not None and rtype.kind == "Pod" and (old.get("spec") or {}).get("nodeName"):
            # The apiserver's graceful deletion: a bound pod stays, terminating, until its
            # kubelet deletes it again with grace 0 (or the grace is shortened to 0 by anyone).
            period = grace if grace >= 0 else (old.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_POD_GRACE_SECONDS)
            current = old["metadata"].get("deletionGracePeriodSeconds")
            if period > 0 and (current is None or period < current):
                when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=period)
                obj = {**old, "metadata": {**old["metadata"], "deletionTimestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                           "deletionGracePeriodSeconds": period, "resourceVersion": self._next_rv()}}
                self.objects[key] = obj
                self._commit(rtype, "MODIFIED", obj, old)
                return obj
            if period > 0:
                return old  # already terminating with a grace no longer than this one
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            obj = {**old, "metadata": {**old["metadata"], "deletionTimestamp": _now(), "resourceVersion": self._next_rv()}}
            self.objects[key] = obj
            self._commit(rtype, "MODIFIED", obj, old)
            return obj
        obj = {**old, "metadata": {**old["metadata"], "resourceVersion": self._next_rv()}}
        del self.objects[key]
        self._commit(rtype, "DELETED", obj, old)
        return obj

    def _bind(self, rtype: ResourceType, ns: str | None, name: str, body: Any) -> dict[str, Any]:
        """POST pods/{name}/binding: what the scheduler does to put a pod on a node."""
        target = (body or {}).get("target") or {} if isinstance(body, dict) else {}
        if target.get("kind", "Node") != "Node" or not target.get("name"):
            raise ApiError(400, "BadRequest", "binding needs target.kind Node and target.name")
        old = self.objects.get(self._key(rtype, ns, name))
        if old is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        bound = (old.get("spec") or {}).get("nodeName")
        if bound:
            raise ApiError(409, "Conflict", f'pod {name} is already assigned to node "{bound}"')
        if old["metadata"].get("deletionTimestamp"):
            raise ApiError(409, "Conflict", f"pod {name} is being deleted, cannot be assigned to a host")
        # the binding is not a spec update: generation stays
        obj = {**old, "spec": {**(old.get("spec") or {}), "nodeName": target["name"]},
               "metadata": {**old["metadata"], "resourceVersion": self._next_rv()}}
        self.objects[self._key(rtype, ns, name)] = obj
        self._commit(rtype, "MODIFIED", obj, old)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    # ------------------------------------------------------------------ HTTP
    def _parse_path(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None] | None:
        """URL -> (resource type, namespace, name, subresource); None for non-resource URLs."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            gv, rest = "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        if not rest:
            return None
        ns = None
        # /namespaces/{ns}/{plural}... is a namespaced resource; /namespaces[/{name}[/status]] is Namespace.
        if rest[0] == "namespaces" and len(rest) >= 3 and (gv, rest[2]) in self._by_path and self._by_path[(gv, rest[2])].namespaced:
            ns, rest = rest[1], rest[2:]
        rtype = self._by_path.get((gv, rest[0]))
        if rtype is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        known = sub == "status" and rtype.status_subresource or sub == "binding" and rtype.kind == "Pod"
        if sub is not None and not known:
            raise ApiError(404, "NotFound", f"no subresource {sub!r} on {rtype.plural}")
        if rtype.namespaced and name is not None and ns is None:
            raise ApiError(404, "NotFound", f"{rtype.plural} is namespaced")
        return rtype, ns, name, sub

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        record = RecordedRequest(request.method, request.path, dict(request.query), request.content_type)
        self.requests.append(record)
        try:
            if (request.content_length or 0) > self.max_request_bytes:
                raise ApiError(413, "RequestEntityTooLarge",
                               f"Request entity too large: limit is {self.max_request_bytes}")
            body = None
            if request.can_read_body:
                record.raw = await request.read()
                body = json.loads(record.raw)
            response = await self._dispatch(request, body)
        except ApiError as e:
            response = aiohttp.web.json_response(e.status(), status=e.code)
        except json.JSONDecodeError as e:
            response = aiohttp.web.json_response(ApiError(400, "BadRequest", f"invalid JSON: {e}").status(), status=400)
        record.status = response.status
        return response

    async def _dispatch(self, request: aiohttp.web.Request, body: Any) -> aiohttp.web.StreamResponse:
        path, method, q = request.path, request.method, request.query
        discovery = self._discovery(path)
        if discovery is not None:
            return aiohttp.web.json_response(discovery)
        parsed = self._parse_path(path)
        if parsed is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        rtype, ns, name, sub = parsed
        metadata_only = _PARTIAL_METADATA in request.headers.get("Accept", "")
        if name is None:
            if method == "GET" and q.get("watch") in ("true", "1"):
                return await self._watch(request, rtype, ns, metadata_only)
            if method == "GET":
                return _compressed(request, self._list(rtype, ns, q, metadata_only))
            if method == "POST":
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "body must be an object")
                body_ns = (body.get("metadata") or {}).get("namespace")
                if rtype.namespaced and body_ns and ns and body_ns != ns:
                    raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace of the URL")
                return self._respond(self._create(rtype, ns, body), status=201)
            raise ApiError(405, "MethodNotAllowed", f"{method} on a collection")
        key = self._key(rtype, ns, name)
        if method == "DELETE":
            grace = q.get("gracePeriodSeconds")
            if grace is None and isinstance(body, dict):
                grace = body.get("gracePeriodSeconds")
            if grace is None and rtype.kind == "Pod":
                grace = -1  # the pod's own terminationGracePeriodSeconds
            return self._respond(self._delete(rtype, ns, name, grace=None if grace is None else int(grace)), key)
        if sub == "binding":
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", f"{method} on pods/binding")
            return aiohttp.web.json_response(self._bind(rtype, ns, name, body), status=201)
        old = self.objects.get(key)
        if old is None:
            raise ApiError(404, "NotFound", f'{rtype.plural}.{rtype.group or "core"} "{name}" not found')
        if method == "GET":
            return aiohttp.web.json_response(partial_metadata(old)) if metadata_only else \
                _compressed(request, self._data(old, key))
        if method == "PUT":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name in the URL")
            return self._respond(self._replace(rtype, ns, old, body, subresource=sub), key)
        if method == "PATCH":
            ctype = request.content_type
            if ctype == "application/json-patch+json":
                try:
                    # A fresh copy to patch in place: decoding the stored encoding is cheaper than deepcopy.
                    new = jsonpatch.apply_patch(json.loads(self._data(old, key)), body, in_place=True)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    raise ApiError(422, "Invalid", f"JSON patch failed: {e}") from None
            elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "merge patch must be an object")
                # A resourceVersion in the patch is a precondition (checked in _replace).
                new = merge_patch(old, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"patch type {ctype} is not supported here")
            return self._respond(self._replace(rtype, ns, old, new, subresource=sub), key)
        raise ApiError(405, "MethodNotAllowed", method)

    def _matches(self, obj: dict[str, Any], ns: str | None, q: Any) -> bool:
        if ns is not None and obj["metadata"].get("namespace") != ns:
            return False
        return (label_selector_matches(q.get("labelSelector"), obj["metadata"].get("labels"))
                and field_selector_matches(q.get("fieldSelector"), obj))

    def _respond(self, obj: dict[str, Any], key: tuple[str, str, str] | None = None, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=self._data(obj, key), status=status, content_type="application/json")

    def _list(self, rtype: ResourceType, ns: str | None, q: Any, metadata_only: bool = False) -> bytes:
        """The list response, made of the stored encodings of its items."""
        items = [encode(partial_metadata(o)) if metadata_only else self._data(o, k) for k, o in sorted(self.objects.items())
                 if k[0] == self._gvp(rtype) and self._matches(o, ns, q)]
        kind, version = ("PartialObjectMetadataList", "meta.k8s.io/v1") if metadata_only else \
            (f"{rtype.kind}List", rtype.api_version)
        head = encode({"kind": kind, "apiVersion": version, "metadata": {"resourceVersion": str(self._rv)}})
        return head[:-1] + b',"items":[' + b",".join(items) + b"]}"

    async def _watch(self, request: aiohttp.web.Request, rtype: ResourceType, ns: str | None,
                     metadata_only: bool = False) -> aiohttp.web.StreamResponse:
        q = request.query
        since_text = q.get("resourceVersion") or ""
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout_text = q.get("timeoutSeconds") or ""
        if timeout_text and not timeout_text.isdigit():
            # The apiserver parses it as an integer: "300.0" is a 400, as a real cluster would say.
            raise ApiError(400, "BadRequest", f"timeoutSeconds: invalid integer {timeout_text!r}")
        timeout = int(timeout_text) if timeout_text else None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        async def send(etype: str, obj: dict[str, Any]) -> None:
            if metadata_only and etype != "ERROR":
                obj = partial_metadata(obj)
            await response.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        # Snapshot + subscribe with no await in between: nothing can slip through.
        watcher = _Watcher(asyncio.Queue(), response)
        initial: list[bytes] = []
        if since_text in ("", "0"):
            initial = [b'{"type":"ADDED","object":' + (encode(partial_metadata(o)) if metadata_only else self._data(o, k))
                       + b"}\n" for k, o in sorted(self.objects.items())
                       if k[0] == self._gvp(rtype) and self._matches(o, ns, q)]
        else:
            since = int(since_text)
            if since < self._compacted:
                await send("ERROR", ApiError(410, "Expired", f"too old resource version: {since} ({self._compacted})").status())
                return response
            for event in self._history:
                if event.rv > since:
                    watcher.queue.put_nowait(event)
        self._watchers.add(watcher)
        try:
            for line in initial:
                await response.write(line)
            selective = ns is not None or bool(q.get("labelSelector")) or bool(q.get("fieldSelector"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            while True:
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks:
                        await send("BOOKMARK", {"kind": rtype.kind, "apiVersion": rtype.api_version,
                                                "metadata": {"resourceVersion": str(self._rv)}})
                    continue
                if event is None:
                    break
                if event.rtype != rtype:
                    continue
                # Without selectors every object matches: nothing to decode.
                was = event.old_data is not None and event.type != "ADDED" and (
                    not selective or self._matches(event.old, ns, q))
                now = not selective or self._matches(event.obj, ns, q)
                if event.type == "DELETED":
                    etype = "DELETED" if was else None
                elif was and now:
                    etype = "MODIFIED"
                elif now:
                    etype = "ADDED"
                else:
                    etype = "DELETED" if was else None
                if etype is not None and metadata_only:
                    await send(etype, event.obj)
                elif etype is not None:
                    await response.write(event.line(etype))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(watcher)
        return response

    # ------------------------------------------------------------------ discovery
    def _discovery(self, path: str) -> dict[str, Any] | None:
        path = path.rstrip("/")
        if path == "/version":
            return {"major": "1", "minor": "37", "gitVersion": "v1.37.0-fakeapi", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for t in self.types:
                if t.group:
                    versions = groups.setdefault(t.group, [])
                    if t.version not in versions:
                        versions.append(t.version)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in groups.items()]}
        m = re.fullmatch(r"/api/(v1)|/apis/([^/]+/[^/]+)", path)
        if not m:
            return None
        gv = m.group(1) or m.group(2)
        members = [t for t in self.types if t.group_version == gv]
        if not members:
            raise ApiError(404, "NotFound", f"no API group version {gv}")
        resources = []
        for t in members:
            resources.append({"name": t.plural, "singularName": t.singular or t.kind.lower(), "namespaced": t.namespaced,
                              "kind": t.kind, "shortNames": list(t.short_names),
                              "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            if t.status_subresource:
                resources.append({"name": f"{t.plural}/status", "singularName": "", "namespaced": t.namespaced,
                                  "kind": t.kind, "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}


# The apiserver gzips GET and LIST responses over 128 KiB for clients that accept it
# (APIResponseCompression, on by default since 1.16; level 1 since 1.25); watches never.
GZIP_THRESHOLD = 128 * 1024


def _compressed(request: aiohttp.web.Request, body: bytes) -> aiohttp.web.Response:
    if len(body) > GZIP_THRESHOLD and "gzip" in request.headers.get("Accept-Encoding", ""):
        return aiohttp.web.Response(body=gzip.compress(body, compresslevel=1), content_type="application/json",
                                    headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return aiohttp.web.Response(body=body, content_type="application/json")


# `Accept: application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`: the apiserver answers
# GETs, lists and watches with the objects' metadata only (what metadata informers use).
_PARTIAL_METADATA = "as=PartialObjectMetadata"


def partial_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata") or {}}


def _without(obj: dict[str, Any]) -> dict[str, Any]:
    """The part of an object whose change bumps metadata.generation."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def kubeconfig_for(url: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "fake-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }


def main(argv: list[str] | None = None) -> int:
    """Serve the test API server until SIGTERM/SIGINT; write a kubeconfig for it."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m controller.fakeapi", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--kubeconfig", required=True, help="write a kubeconfig for the server here (once it listens)")
    args = parser.parse_args(argv)
    server = FakeApiServer(bookmark_interval=1.0, port=args.port, seed_namespaces=CLUSTER_NAMESPACES).start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    tmp = f"{args.kubeconfig}.tmp"
    with open(tmp, "w") as f:
        json.dump(kubeconfig_for(server.url), f)
    import os

    os.replace(tmp, args.kubeconfig)
    print(f"serving on {server.url}; kubeconfig {args.kubeconfig}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
