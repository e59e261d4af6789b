"""kopf handlers: a few lines each; the state and the publisher do the work.

Per watched kind, two handlers:

* an **index** handler, which kopf calls for every listed or changed object *before* anything
  else, and which feeds the object into the state. kopf holds every non-index handler back
  until the initial listing of every indexed kind has been indexed, so when the first event
  handler runs, the state holds the whole cluster: that is the publisher's start signal and
  why nothing half-known is ever published. (The kopf index itself stays empty: the state
  keeps the objects, because kopf's indexes cannot drop objects whose deletion was missed
  while a watch re-listed after 410 Gone; the state can.)
* an **event** handler, which handles deletions (no index handler runs for those) and
  notices re-listings (kopf marks listed objects with event type None).

No handler calls the API; on.event and index handlers make kopf write nothing to the objects
(no finalizers, no annotations). The handlers are coroutines on purpose: kopf runs plain
functions in a thread pool, and the state, the compiler and the publisher's signals are
single-threaded; as coroutines they all run on the operator's event loop, one at a time.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from netfence_operator.metrics import ControllerMetrics
from netfence_operator.publish import Publisher
from netfence_operator.state import ClusterState

log = logging.getLogger("netfence.controller")

WATCHED = {
    "Namespace": ("", "v1", "namespaces"),
    "Node": ("", "v1", "nodes"),
    "Pod": ("", "v1", "pods"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
}
# Watched only when its CRD (network-policy-api, v1alpha2) is installed: kopf would otherwise
# hold every handler back waiting for a listing that never comes.
CLUSTER_NETWORK_POLICY = ("policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies")


def register(registry: kopf.OperatorRegistry, state: ClusterState, publisher: Publisher, metrics: ControllerMetrics,
             cluster_network_policies: bool = False) -> None:
    watched = dict(WATCHED)
    if cluster_network_policies:
        watched["ClusterNetworkPolicy"] = CLUSTER_NETWORK_POLICY
    for kind, (group, version, plural) in watched.items():
        _register_kind(registry, state, publisher, metrics, kind, group, version, plural)


def _register_kind(registry: kopf.OperatorRegistry, state: ClusterState, publisher: Publisher,
                   metrics: ControllerMetrics, kind: str, group: str, version: str, plural: str) -> None:
    update_time = metrics.compile_duration.labels("update")

    @kopf.index(group, version, plural, registry=registry, id=f"observe-{plural}")
    async def observe(body: kopf.Body, **_: Any) -> None:
        with update_time.time():
            state.observe(kind, dict(body))
        publisher.wake()

    @kopf.on.event(group, version, plural, registry=registry, id=f"event-{plural}")
    async def event(type: str | None, body: kopf.Body, **_: Any) -> None:  # noqa: A002 - kopf's kwarg name
        if not publisher.indexed.is_set():
            publisher.indexed.set()  # kopf runs this only once every kind is indexed
        if type == "DELETED":
            with update_time.time():
                state.forget(kind, dict(body))
            publisher.wake()
        elif type is None and publisher.synced:
            publisher.relisted(kind)
