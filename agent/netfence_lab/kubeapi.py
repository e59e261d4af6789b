"""The lab's calls to a Kubernetes API server (lab up/apply/down and the lab's kubelet).

Plain REST over the `kubernetes` client's ApiClient, with JSON dicts in and out: the lab reads
and writes whole manifests, which the typed models would only convert back and forth.
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from netfence_lab.model import POLICY_KINDS as MODEL_POLICY_KINDS
from netfence_lab.model import ManifestError
from netfence_lab.system import LabError

LAB_MANAGED = {"app.kubernetes.io/managed-by": "netfence-lab"}
LEASE_NAMESPACE = "kube-node-lease"
REQUEST_TIMEOUT = 30


@dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{urllib.parse.quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{urllib.parse.quote(name)}"
        if sub:
            base += f"/{sub}"
        return base


NAMESPACES = Resource("v1", "Namespace", "namespaces", False)
NODES = Resource("v1", "Node", "nodes", False)
PODS = Resource("v1", "Pod", "pods", True)
LEASES = Resource("coordination.k8s.io/v1", "Lease", "leases", True)
NODE_RULE_SETS = Resource("netfence.io/v1alpha1", "NodeRuleSet", "noderulesets", False)
PEER_GROUP_SLICES = Resource("netfence.io/v1alpha1", "PeerGroupSlice", "peergroupslices", False)
CRDS = Resource("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False)

# The policy kinds `lab apply` manages declaratively (model.POLICY_KINDS), and where the API
# serves them. ClusterNetworkPolicy is served only where its CRD is installed.
_POLICY_RESOURCES = {
    "NetworkPolicy": Resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", True),
    "ClusterNetworkPolicy": Resource("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy",
                                     "clusternetworkpolicies", False),
}
POLICY_KINDS: dict[str, Resource] = {kind: _POLICY_RESOURCES[kind] for kind in sorted(MODEL_POLICY_KINDS)}
# What the compiler reads from the API (policies on top).
CLUSTER_KINDS = (NAMESPACES, NODES, PODS)


def now_rfc3339(micro: bool = False) -> str:
    t = datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def server_of(kubeconfig: str) -> str:
    """The API URL of the kubeconfig's current context."""
    try:
        with open(kubeconfig) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"--kubeconfig {kubeconfig}: cannot read: {e}") from None
    ctx_name = cfg.get("current-context")
    ctx = next((c.get("context") or {} for c in cfg.get("contexts") or [] if c.get("name") == ctx_name), {})
    cluster = next((c.get("cluster") or {} for c in cfg.get("clusters") or [] if c.get("name") == ctx.get("cluster")), {})
    server = cluster.get("server")
    if not server:
        raise ManifestError(f"--kubeconfig {kubeconfig}: the current context names no cluster server")
    return server


def short(e: Exception) -> str:
    if isinstance(e, ApiException):
        try:
            message = json.loads(e.body or "{}").get("message")
        except ValueError:
            message = None
        return f"HTTP {e.status} {message or e.reason}"
    return f"{type(e).__name__}: {e}"


class LabApi:
    def __init__(self, kubeconfig: str):
        from netfence_api.client import load_client

        self.kubeconfig = kubeconfig
        self._served: dict[str, bool] = {}
        try:
            self.client = load_client(kubeconfig)
        except Exception as e:  # noqa: BLE001 - a bad kubeconfig: say which
            raise ManifestError(f"--kubeconfig {kubeconfig}: {e}") from None

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ REST
    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                content_type: str | None = None, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = self.client.param_serialize(method=method, resource_path=path, query_params=list((query or {}).items()),
                                             header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.client.call_api(*params, _request_timeout=timeout)
        data = response.read()
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason, body=data)
        return json.loads(data) if data else {}

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.request("GET", res.path(namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, res: Resource, namespace: str | None = None, **query: Any) -> dict[str, Any]:
        return self.request("GET", res.path(namespace), query={k: v for k, v in query.items() if v is not None})

    def items(self, res: Resource, namespace: str | None = None, **query: Any) -> list[dict[str, Any]]:
        return self.list(res, namespace, **query).get("items") or []

    def create(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        ns = (obj.get("metadata") or {}).get("namespace") if res.namespaced else None
        return self.request("POST", res.path(ns), body=obj)

    def replace(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        md = obj["metadata"]
        return self.request("PUT", res.path(md.get("namespace") if res.namespaced else None, md["name"]), body=obj)

    def merge_patch(self, res: Resource, name: str, patch: dict[str, Any], namespace: str | None = None,
                    sub: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", res.path(namespace, name, sub), body=patch, content_type="application/merge-patch+json")

    def delete(self, res: Resource, name: str, namespace: str | None = None, grace: int | None = None) -> bool:
        """True if it was there. grace 0 removes a pod at once (no kubelet has to confirm)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        try:
            self.request("DELETE", res.path(namespace, name), body=body)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def watch(self, res: Resource, resource_version: str, timeout_seconds: int = 60, **query: Any) -> Iterator[dict[str, Any]]:
        """Watch events (BOOKMARKs included) until the server ends the stream."""
        q = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
             "timeoutSeconds": str(timeout_seconds), **{k: v for k, v in query.items() if v is not None}}
        params = self.client.param_serialize(method="GET", resource_path=res.path(), query_params=list(q.items()),
                                             header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        response = self.client.call_api(*params, _request_timeout=(10, timeout_seconds + 30))
        raw = response.response
        try:
            if response.status != 200:
                raise ApiException(status=response.status, reason=response.reason, body=raw.data)
            for line in iter_resp_lines(raw):
                if line.strip():
                    yield json.loads(line)
        finally:
            raw.release_conn()

    # ------------------------------------------------------------------ discovery
    def has_resource(self, res: Resource) -> bool:
        base = "/api/v1" if res.api_version == "v1" else f"/apis/{res.api_version}"
        try:
            listing = self.request("GET", base)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("name") == res.plural for r in listing.get("resources") or [])

    def serves(self, res: Resource) -> bool:
        """has_resource, asked once per kind: whether a CRD is installed does not change under a lab."""
        if res.kind not in self._served:
            self._served[res.kind] = self.has_resource(res)
        return self._served[res.kind]

    def check_reachable(self) -> None:
        try:
            self.request("GET", "/version", timeout=10)
        except Exception as e:  # noqa: BLE001
            raise LabError(f"the API server of {self.kubeconfig} does not answer: {short(e)}") from None

    def published_specs(self, nodes: list[str]) -> dict[str, Any]:
        """node -> (its NodeRuleSet object, the complete spec assembled from it and the group
        slices it names on the API, or the reason it cannot be assembled yet)."""
        from netfence_api.slices import assemble_from_objects

        def typed(res: Resource) -> list[dict[str, Any]]:
            return [{**item, "apiVersion": res.api_version, "kind": res.kind} for item in self.items(res)]

        rulesets = {o["metadata"]["name"]: o for o in typed(NODE_RULE_SETS)}
        slices = typed(PEER_GROUP_SLICES)
        out: dict[str, Any] = {}
        for node in nodes:
            obj = rulesets.get(node)
            if obj is None:
                continue
            try:
                out[node] = (obj, assemble_from_objects([obj, *slices])[node])
            except ValueError as e:  # Incomplete (slices in flight), or invalid
                out[node] = (obj, f"not assembled: {e}")
        return out

    # ------------------------------------------------------------------ the cluster, as the compiler sees it
    def cluster_objects(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for res in (*CLUSTER_KINDS, *(r for r in POLICY_KINDS.values() if self.serves(r))):
            for item in self.items(res):
                item.setdefault("apiVersion", res.api_version)
                item.setdefault("kind", res.kind)
                out.append(item)
        return out


def wait_gone(api: LabApi, res: Resource, name: str, namespace: str | None = None, timeout: float = 60.0) -> None:
    """A namespace being deleted (a real apiserver finalizes it asynchronously) blocks re-creating it."""
    deadline = time.monotonic() + timeout
    while api.get(res, name, namespace) is not None:
        if time.monotonic() > deadline:
            raise LabError(f"{res.kind} {name} is still being deleted after {timeout:.0f}s")
        time.sleep(0.2)
