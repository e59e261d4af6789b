"""The agent's /metrics, /healthz and /readyz (DESIGN.md §5).

Drop and spoof counts live in the kernel, in the named counters the drop rules count into;
they are read at scrape time by a custom collector (nothing to keep in step between scrapes).
Kernel counters start again at zero when a counter object is re-created (a pod's rules are
removed and come back, `netfence cleanup`, another agent run), so the exported totals are a
ledger of increases: each reading adds what the counter grew since the reading before, and a
counter that went down (re-created) adds its whole new value. The ledger is read just before
and after every full sync, so a counter that a sync deletes has its last counts booked first.
Exported totals therefore only ever grow for the life of the process.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from netfence_agent.nft.kernel import CounterValue
from netfence_agent.render import CounterLabels, RuleCounterLabels

log = logging.getLogger("netfence.metrics")

CounterKey = tuple[str, str, str]  # (family, table, counter name)
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROGRAMMING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TRIGGER_ANNOTATION = "netfence.io/last-change-trigger-time"  # netfence_api.crd.TRIGGER_ANNOTATION


def trigger_seconds(annotations: Mapping[str, str] | None) -> float | None:
    """The publisher's trigger time (RFC 3339, UTC) as a UNIX time; None if absent or unreadable."""
    text = (annotations or {}).get(TRIGGER_ANNOTATION)
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# A held pod waits for the controller: ~1 s normally, up to the hold timeout (120 s by default).
HOLD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class _Total:
    packets: int = 0
    bytes: int = 0


class CounterLedger:
    """Monotonic per-label totals from kernel counters that may be reset or re-created."""

    def __init__(self) -> None:
        self._last: dict[CounterKey, CounterValue] = {}
        self.totals: dict[CounterLabels | RuleCounterLabels, _Total] = {}

    def observe(self, readings: Mapping[CounterKey, CounterValue],
                labels: Mapping[str, CounterLabels | RuleCounterLabels]) -> None:
        for key, value in readings.items():
            owner = labels.get(key[2])
            if owner is None:
                continue  # not rendered by this process (yet): nobody to book it to
            last = self._last.get(key)
            if last is None or value.packets < last.packets or value.bytes < last.bytes:
                grown = value  # new, or re-created since the last reading
            else:
                grown = CounterValue(value.packets - last.packets, value.bytes - last.bytes)
            total = self.totals.setdefault(owner, _Total())
            total.packets += grown.packets
            total.bytes += grown.bytes
            self._last[key] = value
        for key in set(self._last) - set(readings):
            del self._last[key]  # gone from the kernel: if it comes back, it starts at zero

    def declare(self, labels: Iterable[CounterLabels | RuleCounterLabels]) -> None:
        """Export zeros for counters that exist but have not been read yet."""
        for owner in labels:
            self.totals.setdefault(owner, _Total())


@dataclass
class ApplyHistogram:
    buckets: tuple[float, ...] = APPLY_BUCKETS
    counts: list[int] = field(default_factory=list)
    count: int = 0
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.buckets)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1


class AgentMetrics:
    """State behind /metrics; the daemon updates it, scrapes read it (thread-safe)."""

    def __init__(self, read_counters: Callable[[], Mapping[CounterKey, CounterValue]] | None = None):
        self.read_counters = read_counters
        self.ledger = CounterLedger()
        self.labels: dict[str, CounterLabels | RuleCounterLabels] = {}
        self.rules_applied = 0
        self.apply_failures = 0
        self.apply_duration = ApplyHistogram()
        self.programming_duration = ApplyHistogram(PROGRAMMING_BUCKETS)
        self._programmed: tuple[str | None, int | None, float] | None = None
        self.generation = 0
        self.unprotected_pods = 0
        self.anti_spoofing_repairs = 0
        self.held_pods = 0
        self.hold_duration = ApplyHistogram(HOLD_BUCKETS)
        self.hold_timeouts = 0
        self.lock = threading.RLock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # ------------------------------------------------------------------ updates from the daemon
    def set_labels(self, labels: Mapping[str, CounterLabels | RuleCounterLabels]) -> None:
        """Counter name -> whose drops it counts: a pod's direction (or spoofing), or a
        ClusterNetworkPolicy Deny rule (whose drops the pod's counter counts too)."""
        with self.lock:
            self.labels = dict(labels)
            self.ledger.declare(labels.values())

    def book_counters(self) -> None:
        """Read the kernel counters into the ledger now (around syncs, and on every scrape)."""
        if self.read_counters is None:
            return
        with self.lock:
            try:
                readings = self.read_counters()
            except Exception as exc:  # a scrape must not fail because the kernel said no
                log.warning("cannot read nft counters: %s", exc)
                return
            self.ledger.observe(readings, self.labels)

    def applied(self, seconds: float, generation: int | None) -> None:
        with self.lock:
            self.rules_applied += 1
            self.apply_duration.observe(seconds)
            self.generation = generation or 0

    def programmed(self, uid: str | None, generation: int | None, annotations: Mapping[str, str] | None) -> None:
        """The rules of this NodeRuleSet generation are in the kernel: observe the time since
        the change that triggered it, once per generation and trigger (kube-proxy's network
        programming latency; a peer group's members change without a new generation)."""
        trigger = trigger_seconds(annotations)
        with self.lock:
            if trigger is None or self._programmed == (uid, generation, trigger):
                return
            self._programmed = (uid, generation, trigger)
            self.programming_duration.observe(max(0.0, time.time() - trigger))

    def holds(self, held: int, held_until_covered: Iterable[float], timed_out: int) -> None:
        """After a sync: pods held now, holds that ended with rules (seconds), holds that timed out."""
        with self.lock:
            self.held_pods = held
            for seconds in held_until_covered:
                self.hold_duration.observe(seconds)
            self.hold_timeouts += timed_out

    def failed(self, seconds: float) -> None:
        with self.lock:
            self.apply_failures += 1
            self.apply_duration.observe(seconds)

    def anti_spoofing(self, unprotected_pods: int, repaired: bool = False) -> None:
        with self.lock:
            self.unprotected_pods = unprotected_pods
            self.anti_spoofing_repairs += repaired

    # ------------------------------------------------------------------ prometheus collector
    def collect(self):
        self.book_counters()
        with self.lock:
            dropped_packets = CounterMetricFamily(
                "netfence_dropped_packets", "Packets dropped by NetworkPolicy, per pod and direction.",
                labels=("namespace", "pod", "direction"))
            dropped_bytes = CounterMetricFamily(
                "netfence_dropped_bytes", "Bytes dropped by NetworkPolicy, per pod and direction.",
                labels=("namespace", "pod", "direction"))
            spoofed = CounterMetricFamily(
                "netfence_spoofed_packets", "Frames from a pod's veth with a source address or MAC not the pod's.",
                labels=("namespace", "pod"))
            rule_packets = CounterMetricFamily(
                "netfence_policy_rule_dropped_packets",
                "Packets dropped by a ClusterNetworkPolicy Deny rule, per policy, tier, rule and direction "
                "(also counted per pod in netfence_dropped_packets_total).",
                labels=("policy", "tier", "rule", "direction"))
            rule_bytes = CounterMetricFamily(
                "netfence_policy_rule_dropped_bytes",
                "Bytes dropped by a ClusterNetworkPolicy Deny rule, per policy, tier, rule and direction.",
                labels=("policy", "tier", "rule", "direction"))
            held = CounterMetricFamily(
                "netfence_held_packets", "Packets refused because their local pod is held: new, not yet covered by "
                "the rule set (egress includes frames from its veth).", labels=("direction",))
            pod_totals = [(o, t) for o, t in self.ledger.totals.items() if isinstance(o, CounterLabels)]
            rule_totals: dict[tuple[str, str, str, str], _Total] = {}
            for owner, total in self.ledger.totals.items():
                if isinstance(owner, RuleCounterLabels):
                    # Two rules can share a label set (a rule name used twice): export the sum.
                    summed = rule_totals.setdefault((owner.policy, owner.tier, owner.rule, owner.direction), _Total())
                    summed.packets += total.packets
                    summed.bytes += total.bytes
            for labels, total in sorted(rule_totals.items()):
                rule_packets.add_metric(labels, total.packets)
                rule_bytes.add_metric(labels, total.bytes)
            for owner, total in sorted(pod_totals, key=lambda kv: (kv[0].namespace, kv[0].pod, kv[0].kind)):
                if owner.kind.startswith("held_"):
                    held.add_metric((owner.kind.removeprefix("held_"),), total.packets)
                elif owner.kind == "spoof":
                    spoofed.add_metric((owner.namespace, owner.pod), total.packets)
                else:
                    dropped_packets.add_metric((owner.namespace, owner.pod, owner.kind), total.packets)
                    dropped_bytes.add_metric((owner.namespace, owner.pod, owner.kind), total.bytes)
            yield dropped_packets
            yield dropped_bytes
            yield spoofed
            yield rule_packets
            yield rule_bytes
            yield held
            yield GaugeMetricFamily("netfence_held_pods",
                                    "Local pod veths held closed now: the applied rule set does not cover them yet.",
                                    value=self.held_pods)
            yield CounterMetricFamily("netfence_hold_timeouts",
                                      "Held pods released unpoliced after --hold-new-pods-timeout without rules.",
                                      value=self.hold_timeouts)
            h = self.hold_duration
            yield HistogramMetricFamily("netfence_pod_hold_duration_seconds",
                                        "How long new pods were held until a rule set covering them was applied.",
                                        buckets=[(str(b), c) for b, c in zip(h.buckets, h.counts)] + [("+Inf", h.count)],
                                        sum_value=h.sum)
            yield CounterMetricFamily("netfence_rules_applied", "Rule sets loaded into the kernel.",
                                      value=self.rules_applied)
            yield CounterMetricFamily("netfence_rule_apply_failures", "Rule set loads the kernel rejected.",
                                      value=self.apply_failures)
            h = self.apply_duration
            cumulative = [(str(b), c) for b, c in zip(h.buckets, h.counts)] + [("+Inf", h.count)]
            yield HistogramMetricFamily("netfence_rule_apply_duration_seconds",
                                        "Time to load a rule set into the kernel (one transaction).",
                                        buckets=cumulative, sum_value=h.sum)
            p = self.programming_duration
            yield HistogramMetricFamily(
                "netfence_network_programming_duration_seconds",
                "From the change of the object that triggered a NodeRuleSet generation (as the controller saw it) "
                "to its rules in the kernel.",
                buckets=[(str(b), c) for b, c in zip(p.buckets, p.counts)] + [("+Inf", p.count)], sum_value=p.sum)
            yield GaugeMetricFamily("netfence_ruleset_generation",
                                    "metadata.generation of the NodeRuleSet whose rules are loaded.",
                                    value=self.generation)
            yield GaugeMetricFamily("netfence_unprotected_pods",
                                    "Local pods of the loaded rule set without anti-spoofing in the kernel "
                                    "(no veth found, or its elements missing from the bridge table).",
                                    value=self.unprotected_pods)
            yield CounterMetricFamily("netfence_anti_spoofing_repairs",
                                      "Full syncs made because the kernel lacked anti-spoofing elements the agent "
                                      "had loaded.", value=self.anti_spoofing_repairs)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- HTTP
def parse_bind_address(address: str) -> tuple[str, int]:
    """":9469" (all addresses), "127.0.0.1:9469", "[::1]:9469"."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics-bind-address {address!r}: expected [HOST]:PORT")
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(metrics: AgentMetrics, address: str, health: Callable[[], tuple[bool, str]],
          readiness: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer:
    """Start the HTTP server in a daemon thread; returns it (shutdown() to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, reason = (health if path == "/healthz" else readiness)()
                self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not news
            pass

    host, port = parse_bind_address(address)
    server_class = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server

