"""The controller's own Kubernetes API calls (kopf does the watching), over the sync client.

Only the publisher calls these, from worker threads. Reads: the NodeRuleSets already published
(on start and on resync) and the uids of a watched kind (after a relist). Writes: NodeRuleSets
and the PeerGroupSlices they name (netfence_api.slices; the controller's condition in a NodeRuleSet's
status when the API refuses one of its objects) and Events, nothing else.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import kubernetes
from kubernetes.client.exceptions import ApiException

from netfence_api import API_GROUP, API_VERSION, PLURAL

log = logging.getLogger("netfence.controller.kube")

# kind -> (API path prefix, plural, namespaced)
WATCHED_PATHS = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Node": ("/api/v1", "nodes", False),
    "Pod": ("/api/v1", "pods", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "ClusterNetworkPolicy": ("/apis/policy.networking.k8s.io/v1alpha2", "clusternetworkpolicies", False),
}
_METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"




def conflict_or_missing(e: Exception) -> int | None:
    return e.status if isinstance(e, ApiException) and e.status in (404, 409) else None


@dataclass
class KubeApi:
    client: kubernetes.client.ApiClient
    namespaces: Sequence[str] = ()  # glob patterns; empty: all namespaces

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.client)

    # ------------------------------------------------------------------ NodeRuleSets
    def set_ruleset_condition(self, name: str, type_: str, status: str, reason: str, message: str) -> None:
        """Put one condition into a NodeRuleSet's status, keeping the agent's others."""
        for attempt in range(3):
            stored = self.custom.get_cluster_custom_object(API_GROUP, API_VERSION, PLURAL, name)
            conditions = [c for c in (stored.get("status") or {}).get("conditions") or [] if c.get("type") != type_]
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            conditions.append({"type": type_, "status": status, "reason": reason, "message": message[:1000],
                               "lastTransitionTime": now})
            # The list is replaced whole, so the write is conditional on what was read: an agent
            # reporting in between makes it 409, and it is read again.
            patch = {"metadata": {"resourceVersion": stored["metadata"]["resourceVersion"]},
                     "status": {"conditions": conditions}}
            try:
                self.custom.patch_cluster_custom_object_status(API_GROUP, API_VERSION, PLURAL, name, patch)
                return
            except ApiException as e:
                if e.status != 409 or attempt == 2:
                    raise

    # ------------------------------------------------------------------ discovery
    def serves(self, kind: str) -> bool:
        """Does the API serve this watched kind (for a custom resource: is its CRD installed)?"""
        prefix, plural, _ = WATCHED_PATHS[kind]
        try:
            listing = self.client.call_api(*self.client.param_serialize(
                method="GET", resource_path=prefix, auth_settings=["BearerToken"]))
            data = listing.read()
        except Exception as e:  # noqa: BLE001 - unreachable API: kopf will say so loudly
            log.warning("discovery of %s failed: %s", prefix, e)
            return False
        if listing.status >= 400:
            return False
        return any(r.get("name") == plural for r in json.loads(data).get("resources", []))

    # ------------------------------------------------------------------ netfence.io objects (NodeRuleSets, PeerGroupSlices)
    def list_objects(self, plural: str) -> dict[str, dict[str, Any]]:
        listing = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, plural)
        return {item["metadata"]["name"]: item for item in listing.get("items", [])}

    def create_object(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_cluster_custom_object(API_GROUP, API_VERSION, plural, body)

    def patch_object(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_cluster_custom_object(API_GROUP, API_VERSION, plural, name, patch)

    def json_patch_object(self, plural: str, name: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        return self.custom.patch_cluster_custom_object(API_GROUP, API_VERSION, plural, name, operations,
                                                       _content_type="application/json-patch+json")

    def delete_object(self, plural: str, name: str) -> None:
        self.custom.delete_cluster_custom_object(API_GROUP, API_VERSION, plural, name)

    # ------------------------------------------------------------------ Events
    def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        kubernetes.client.CoreV1Api(self.client).create_namespaced_event(namespace, body)

    # ------------------------------------------------------------------ relist check
    def list_uids(self, kind: str) -> set[str]:
        """uids of every object of a watched kind in scope (metadata only, when the server can)."""
        prefix, plural, namespaced = WATCHED_PATHS[kind]
        response = self.client.call_api(
            *self.client.param_serialize(
                method="GET",
                resource_path=f"{prefix}/{plural}",
                header_params={"Accept": _METADATA_LIST},
                auth_settings=["BearerToken"],
            )
        )
        data = response.read()
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason, body=data)
        items = json.loads(data).get("items", [])
        uids = set()
        for item in items:
            meta = item.get("metadata") or {}
            if namespaced and self.namespaces and not any(
                fnmatch.fnmatch(meta.get("namespace", ""), pattern) for pattern in self.namespaces
            ):
                continue
            uids.add(meta.get("uid", ""))
        return uids
