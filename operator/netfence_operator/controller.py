"""`netfence controller`: the kopf operator that compiles and publishes NodeRuleSets.

kopf settings chosen here, and why:
* standalone (no peering): one replica with the Recreate strategy; two controllers would
  only write the same content-addressed rule sets, and peering would need its own CRD + RBAC;
* no Kubernetes Events from kopf itself: the publisher is the one writer of Events;
* scanning disabled when cluster-wide: the four built-in kinds need no discovery, and the one
  custom resource read, ClusterNetworkPolicy, is looked up once at start (API discovery, no
  RBAC for CustomResourceDefinitions needed): watched if its CRD is installed, else said so
  once in the log and in a metric (installing the CRD later takes a controller restart);
* watch streams end server-side after a few minutes and resume from their resourceVersion,
  so a silently dead connection is noticed; kopf re-lists on 410 Gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import kopf
import kubernetes

from netfence_operator import handlers
from netfence_api.client import load_client
from netfence_api.slices import DEFAULT_BOUNDS, Bounds, Splitter
from netfence_operator.kube import KubeApi
from netfence_operator.metrics import ControllerMetrics, MetricsServer, parse_bind_address
from netfence_operator.publish import Publisher
from netfence_operator.state import ClusterState

log = logging.getLogger("netfence.controller")

DEFAULT_METRICS_BIND = ":9470"
DEFAULT_HEALTH_BIND = ":8080"


@dataclass
class ControllerConfig:
    kubeconfig: str | None = None
    namespaces: Sequence[str] = ()  # kopf namespace patterns; empty: cluster-wide
    metrics_bind_address: str | None = DEFAULT_METRICS_BIND
    health_bind_address: str | None = DEFAULT_HEALTH_BIND  # kopf's liveness endpoint (/healthz)
    debounce: float = 0.2
    resync_interval: float = 600.0
    watch_server_timeout: int = 300
    inline_groups_bytes: int = DEFAULT_BOUNDS.inline_groups_bytes


@dataclass
class Controller:
    """One controller instance: state, publisher, metrics, kopf registry. `run` blocks."""

    config: ControllerConfig
    metrics: ControllerMetrics = field(default_factory=ControllerMetrics)

    def __post_init__(self) -> None:
        self.client = load_client(self.config.kubeconfig)
        self.state = ClusterState()
        self.api = KubeApi(self.client, namespaces=tuple(self.config.namespaces))
        self.publisher = Publisher(self.state, self.api, self.metrics, debounce=self.config.debounce,
                                   resync_interval=self.config.resync_interval,
                                   splitter=Splitter(Bounds(inline_groups_bytes=self.config.inline_groups_bytes)))
        self.cluster_network_policies = self.api.serves("ClusterNetworkPolicy")
        self.metrics.cluster_network_policies.set(1 if self.cluster_network_policies else 0)
        if not self.cluster_network_policies:
            log.warning("ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) is not served by this cluster: "
                        "ClusterNetworkPolicies are not enforced, NetworkPolicies are. Install the CRD "
                        "(docs/cluster-network-policy.md) and restart the controller to enforce them.")
        self.registry = kopf.OperatorRegistry()
        handlers.register(self.registry, self.state, self.publisher, self.metrics,
                          cluster_network_policies=self.cluster_network_policies)
        self._register_activities()
        self.metrics_server: MetricsServer | None = None

    def _register_activities(self) -> None:
        registry, publisher, client = self.registry, self.publisher, self.client
        tasks: list[asyncio.Task] = []

        @kopf.on.login(registry=registry, id="kubeconfig")
        def login(**_: Any) -> kopf.ConnectionInfo:
            return connection_info(client.configuration)

        @kopf.on.startup(registry=registry, id="start-publisher")
        async def start_publisher(**_: Any) -> None:
            tasks.append(asyncio.create_task(publisher.run(), name="netfence publisher"))

        @kopf.on.cleanup(registry=registry, id="stop-publisher")
        async def stop_publisher(**_: Any) -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        @kopf.on.probe(registry=registry, id="publisher")
        async def publisher_alive(**_: Any) -> dict[str, Any]:
            # Liveness: a dead publisher task means nothing is published any more; restart.
            for task in tasks:
                if task.done():
                    raise kopf.PermanentError(f"publisher stopped: {task.exception() if not task.cancelled() else 'cancelled'}")
            return {"indexed": publisher.indexed.is_set(), "synced": publisher.synced, "rulesets": len(publisher.published)}

    def settings(self) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        settings.peering.standalone = True
        settings.posting.enabled = False
        settings.scanning.disabled = not self.config.namespaces
        # An integer: kopf sends it as given, and the apiserver rejects "300.0".
        settings.watching.server_timeout = int(self.config.watch_server_timeout)
        settings.watching.client_timeout = int(self.config.watch_server_timeout) + 60
        settings.watching.connect_timeout = 30
        settings.networking.request_timeout = 60
        return settings

    def run(self, *, stop_flag: threading.Event | None = None, ready_flag: threading.Event | None = None) -> None:
        if self.config.metrics_bind_address:
            self.metrics_server = MetricsServer(self.config.metrics_bind_address, self.metrics,
                                                ready=lambda: self.publisher.synced).start()
            log.info("serving metrics on port %d", self.metrics_server.port)
        liveness = None
        if self.config.health_bind_address:
            host, port = parse_bind_address(self.config.health_bind_address)
            liveness = f"http://{host}:{port}/healthz"
        try:
            kopf.run(
                registry=self.registry,
                settings=self.settings(),
                standalone=True,
                clusterwide=not self.config.namespaces,
                namespaces=list(self.config.namespaces),
                liveness_endpoint=liveness,
                stop_flag=stop_flag,
                ready_flag=ready_flag,
            )
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.client.close()


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same client configuration the publisher uses."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )
