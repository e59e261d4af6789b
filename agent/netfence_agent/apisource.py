"""The agent's rule set from the Kubernetes API: its own NodeRuleSet, watched; status written back.

Watches only the NodeRuleSet named after the node (fieldSelector metadata.name=<node>), so the
agent receives nothing about other nodes and its RBAC can be `get/list/watch noderulesets` plus
`patch noderulesets/status`. The stream resumes from the last resourceVersion after a
disconnect (bookmarks keep it fresh) and re-lists after 410 Gone. A NodeRuleSet is delivered
when its uid or generation changes -- spec changes only: the agent's own status writes, and
metadata edits, bump neither. A deleted NodeRuleSet is not an empty rule set: the agent keeps
enforcing what it has until the controller publishes a new one.

Status goes to the /status subresource as a JSON merge patch of the whole status, so the spec
and generation are never touched by the agent.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any, Iterator

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from pydantic import ValidationError

import netfence_api
from netfence_api.client import load_client
from netfence_agent.source import RuleSetReader

log = logging.getLogger("netfence.apisource")

GROUP, VERSION = netfence_api.API_GROUP, netfence_api.API_VERSION
PLURAL = netfence_api.PLURAL




class _Relist(Exception):
    """The resourceVersion is gone (410) or the stream said something unexpected: list again."""


class ApiRuleSetSource:
    WATCH_SECONDS = 60  # server-side end of each watch request; the loop just reconnects
    BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

    def __init__(self, node: str, kubeconfig: str | None = None, *, client: kubernetes.client.ApiClient | None = None):
        self.node = node
        self.client = client or load_client(kubeconfig)
        self.api = kubernetes.client.CustomObjectsApi(self.client)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self._delivered: tuple[str, int | None] | None = None  # (uid, generation) last yielded
        self._last_status: netfence_api.NodeRuleSetStatus | None = None
        self._reader = RuleSetReader()  # validates only what changed since the last update

    # ------------------------------------------------------------------ updates
    def updates(self) -> Iterator[netfence_api.NodeRuleSet]:
        resource_version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version, found = self._list()
                    if found is not None:
                        yield from self._deliver(found)
                for event in self._watch(resource_version):
                    obj = event["object"]
                    resource_version = obj.get("metadata", {}).get("resourceVersion") or resource_version
                    if event["type"] in ("ADDED", "MODIFIED"):
                        yield from self._deliver(obj)
                    elif event["type"] == "DELETED":
                        log.warning("NodeRuleSet %s was deleted; keeping the rules in force until a new one appears", self.node)
                        self._delivered = None
                failures = 0
            except _Relist as e:
                log.info("re-listing NodeRuleSet %s: %s", self.node, e)
                resource_version = None
            except Exception as e:  # noqa: BLE001 - API down, network, auth: back off and retry
                if self._stop.is_set():
                    break
                delay = self.BACKOFF[min(failures, len(self.BACKOFF) - 1)]
                failures += 1
                log.warning("watching NodeRuleSet %s failed (%s); retrying in %ss", self.node, _short(e), delay)
                self._stop.wait(delay)

    def _list(self) -> tuple[str, dict[str, Any] | None]:
        listing = self.api.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, field_selector=f"metadata.name={self.node}", _request_timeout=30)
        items = listing.get("items") or []
        return listing["metadata"]["resourceVersion"], (items[0] if items else None)

    def _watch(self, resource_version: str) -> Iterator[dict[str, Any]]:
        response = self.api.list_cluster_custom_object(
            GROUP, VERSION, PLURAL,
            field_selector=f"metadata.name={self.node}",
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=self.WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(10, self.WATCH_SECONDS + 30),
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
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise _Relist(f"{status.get('code')} {status.get('reason')}: {status.get('message')}")
                if event.get("type") == "BOOKMARK":
                    yield event  # carries the resourceVersion only
                    continue
                if (event.get("object") or {}).get("metadata", {}).get("name") != self.node:
                    continue  # a server that ignored the field selector
                yield event
        finally:
            with self._lock:
                self._response = None
            response.release_conn()

    def _deliver(self, obj: dict[str, Any]) -> Iterator[netfence_api.NodeRuleSet]:
        meta = obj.get("metadata") or {}
        key = (meta.get("uid") or "", meta.get("generation"))
        if key == self._delivered:
            return  # a status or metadata change: nothing for the agent to apply
        try:
            rule_set = self._reader.read(
                {k: obj[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in obj})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            log.error("NodeRuleSet %s generation %s is invalid; keeping the rules in force: %s", self.node, key[1], problems)
            self._delivered = key
            self._report_invalid(problems)
            return
        self._delivered = key
        yield rule_set

    # ------------------------------------------------------------------ status
    def report(self, status: netfence_api.NodeRuleSetStatus) -> None:
        body = status.model_dump(mode="json", exclude_none=True)
        for name in netfence_api.NodeRuleSetStatus.model_fields:
            body.setdefault(name, None)  # merge patch: null removes what this status does not say
        self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, self.node, {"status": body},
                                                    _request_timeout=30)
        self._last_status = status

    def _report_invalid(self, problems: str) -> None:
        degraded = netfence_api.Condition(type="Degraded", status="True", reason="InvalidRuleSet",
                                          message=f"NodeRuleSet does not parse: {problems}"[:1000],
                                          lastTransitionTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        previous = self._last_status or netfence_api.NodeRuleSetStatus()
        status = previous.model_copy(update={
            "conditions": [c for c in previous.conditions if c.type != "Degraded"] + [degraded]})
        try:
            self.report(status)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot report status: %s", _short(e))

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Stop updates() from any thread: the blocking read is cut by shutting the socket down."""
        with self._lock:
            self._stop.set()
            response = self._response
        if response is not None:
            sock = getattr(getattr(response, "connection", None), "sock", None)
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _short(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"
