"""Controller metrics and the small HTTP server that exposes them with /healthz and /readyz."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ControllerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.compile_duration = Histogram(
            "netfence_controller_compile_duration_seconds",
            "Time spent compiling: 'update' feeds one object change to the compiler, "
            "'publish' computes the specs of the nodes one publish round touches.",
            ["phase"], buckets=_BUCKETS, registry=r)
        self.rulesets_published = Counter(
            "netfence_controller_rulesets_published",
            "NodeRuleSet writes, by action (create, patch, delete). Unchanged specs are not written.",
            ["action"], registry=r)
        self.slices_published = Counter(
            "netfence_controller_slices_published",
            "Writes of the PeerGroupSlices that hold the peer groups of large clusters, by kind "
            "(PeerGroupSlice) and action (create, patch, delete).", ["kind", "action"], registry=r)
        self.publish_failures = Counter(
            "netfence_controller_publish_failures",
            "NodeRuleSet writes that failed (retried with backoff).", registry=r)
        self.rulesets_refused = Gauge(
            "netfence_controller_rulesets_refused",
            "1 for each node one of whose objects (its NodeRuleSet, or a PeerGroupSlice its rules use) "
            "the API refuses to store (too large, invalid): that node keeps its last rules "
            "until objects the API accepts.", ["node"], registry=r)
        self.objects_watched = Gauge(
            "netfence_controller_objects_watched",
            "Objects the controller currently knows, by kind.", ["kind"], registry=r)
        self.policy_problems = Gauge(
            "netfence_controller_policy_problems",
            "Problems reported on NetworkPolicies, by reason (InvalidPolicy, PolicyWarning).",
            ["reason"], registry=r)
        self.events_posted = Counter(
            "netfence_controller_events_posted",
            "Kubernetes Events posted on NetworkPolicies and ClusterNetworkPolicies.", registry=r)
        self.cluster_network_policies = Gauge(
            "netfence_controller_cluster_network_policies_watched",
            "1 when the ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) was found at start and "
            "ClusterNetworkPolicies are enforced; 0 when it was not installed.", registry=r)
        for action in ("create", "patch", "delete"):
            self.rulesets_published.labels(action)
        for reason in ("InvalidPolicy", "PolicyWarning"):
            self.policy_problems.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_bind_address(text: str) -> tuple[str, int]:
    """':9470' -> ('0.0.0.0', 9470); '127.0.0.1:0' -> ephemeral port on loopback; '[::]:9470' too."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"bind address {text!r} needs a port (HOST:PORT or :PORT)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class MetricsServer:
    """/metrics, /healthz (the process serves) and /readyz (the first full publish is done)."""

    def __init__(self, bind_address: str, metrics: ControllerMetrics, ready: Callable[[], bool]):
        host, port = parse_bind_address(bind_address)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ok = outer.ready()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"initial sync not done\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # scrapes every few seconds are not news

        self.metrics = metrics
        self.ready = ready
        server_class = http.server.ThreadingHTTPServer
        if ":" in host:
            class V6Server(http.server.ThreadingHTTPServer):
                import socket as _socket
                address_family = _socket.AF_INET6
            server_class = V6Server
        self.server = server_class((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="netfence-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
