"""Which local pods are held closed, and for how long (DESIGN.md §3, "Pod lifecycle").

A pod's veth and IP exist about a second before the controller's rule set names the pod
(kubelet status -> controller -> API -> agent); a pod left open in that window takes connections
that its policies refuse. So a veth that discovery reports and the applied rule set does not
cover is held: its uncovered IPs are refused both ways, and frames from its veth other than its
own addresses are dropped (render.HeldPort). That includes a veth whose pod has no IP yet. Before
discovery has seen a veth at all, the kernel holds it (render.Holds.enabled): the book only
decides how long, and what the agent says about it.

A hold ends when a rule set covering the veth's IPs is applied, when the veth goes away, or
after `timeout` seconds: then the pod is released unpoliced, as it was before holds existed
(the agent warns, counts it and reports Degraded). A released veth stays released until it goes
or is covered.

The deleted pod whose veth lingers for a moment is not covered either and is held too, which
is the safe side: its open connections still drain (render keeps its own addresses passing to
the established-flow accept of the forward hook).

Pure: the rule set, the discovered veths and a clock reading in, the next book out; the daemon
keeps the book of the last rule set it applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from netfence_api import NodeRuleSetSpec
from netfence_agent.render import HeldPort, PodPort

# How long a new pod is held closed waiting for its rules. The controller normally names a pod
# ~1 s after its IP appears; a restarting controller (crash, rolling update, CrashLoopBackOff's
# first retries at 10, 20 and 40 s) takes tens of seconds to list the cluster again. Two minutes
# rides that out, and is still short next to Kubernetes' own patience with a lost node (5 min).
DEFAULT_HOLD_TIMEOUT = 120.0

VethKey = int | str  # the host veth's ifindex (never reused while the kernel runs), else its name


def veth_key(port: PodPort) -> VethKey:
    return port.ifindex if port.ifindex is not None else port.ifname


def describe(entry: HeldPort) -> str:
    return f"{entry.port.ifname} ({', '.join(entry.ips) if entry.ips else 'no IP yet'})"


@dataclass(frozen=True)
class HoldBook:
    """The holds after one sync, and what changed to get there."""

    held: tuple[HeldPort, ...] = ()
    since: Mapping[VethKey, float] = field(default_factory=dict)  # held veths: held since (monotonic)
    released: Mapping[VethKey, HeldPort] = field(default_factory=dict)  # held past the timeout
    # What this book changed from the one before (for logs and metrics).
    started: tuple[HeldPort, ...] = ()
    covered: tuple[tuple[HeldPort, float], ...] = ()  # released because covered, after seconds held
    timed_out: tuple[HeldPort, ...] = ()
    gone: tuple[VethKey, ...] = ()  # held or released veths that no longer exist
    timeout: float = 0.0

    @property
    def next_deadline(self) -> float | None:
        """When the oldest hold times out (monotonic), None while nothing is held."""
        return min(self.since.values()) + self.timeout if self.since else None


def next_book(previous: HoldBook, spec: NodeRuleSetSpec, ports: Mapping[str, PodPort],
              unaddressed: Mapping[int, PodPort], now: float, timeout: float) -> HoldBook:
    """The holds for rendering `spec` with the veths discovery reports, at time `now`.

    `ports`: pod IP -> its veth; `unaddressed`: veths leading into pod namespaces without an IP.
    """
    covered_ips = {ip for pod in spec.pods for ip in pod.ips}
    veths: dict[VethKey, tuple[PodPort, list[str]]] = {}
    for ip, port in ports.items():
        veths.setdefault(veth_key(port), (port, []))[1].append(ip)
    for port in unaddressed.values():
        veths.setdefault(veth_key(port), (port, []))
    since: dict[VethKey, float] = {}
    released: dict[VethKey, HeldPort] = {}
    held: list[HeldPort] = []
    started: list[HeldPort] = []
    covered: list[tuple[HeldPort, float]] = []
    timed_out: list[HeldPort] = []
    for key in sorted(veths, key=str):
        port, ips = veths[key]
        uncovered = tuple(sorted(ip for ip in ips if ip not in covered_ips))
        entry = HeldPort(port, uncovered)
        if ips and not uncovered:
            if key in previous.since:
                covered.append((HeldPort(port, tuple(sorted(ips))), now - previous.since[key]))
            continue
        if key in previous.released:
            released[key] = entry
            continue
        began = previous.since.get(key)
        if began is None:
            began = now
            started.append(entry)
        if now - began >= timeout:
            released[key] = entry
            timed_out.append(entry)
            continue
        since[key] = began
        held.append(entry)
    gone = tuple(k for k in (*previous.since, *previous.released) if k not in veths)
    return HoldBook(tuple(held), since, released, tuple(started), tuple(covered), tuple(timed_out), gone, timeout)
