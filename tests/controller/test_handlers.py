"""The kopf wiring: handlers run on the event loop (kopf would run plain functions in threads)."""

from __future__ import annotations

import inspect

import kopf

from netfence_operator import handlers
from netfence_operator.kube import KubeApi
from netfence_operator.metrics import ControllerMetrics
from netfence_operator.publish import Publisher
from netfence_operator.state import ClusterState


def test_handlers_are_coroutines_for_every_watched_kind():
    registry = kopf.OperatorRegistry()
    state, metrics = ClusterState(), ControllerMetrics()
    handlers.register(registry, state, Publisher(state, KubeApi(client=None), metrics), metrics)
    indexing = registry._indexing.get_all_handlers()
    watching = registry._watching.get_all_handlers()
    plurals = ("namespaces", "nodes", "pods", "networkpolicies")
    assert {h.id for h in indexing} == {f"observe-{p}" for p in plurals}
    assert {h.id for h in watching} == {f"event-{p}" for p in plurals}
    assert all(inspect.iscoroutinefunction(h.fn) for h in [*indexing, *watching])
    # nothing that would make kopf write to the watched objects (finalizers, progress annotations)
    assert not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers()
