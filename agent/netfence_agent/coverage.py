"""Does the kernel's anti-spoofing cover every local pod of the loaded rule set? Pure.

Issue 12: discovery lost pods' veths 15 s after they started, their elements left the bridge
table, and nothing said so - the rule set still read Applied and /readyz stayed 200, while a pod
could send with an allowed client's address through a deny policy. So the agent reads the
bridge table back (nft/kernel.py) and checks, pod by pod, what anti-spoofing needs:

  - the pod's veth is known (discovery found it);
  - `pod_ports` sends frames from that veth to the pod's own chain (without it, nothing checks
    what the veth sends: the hook's policy accepts);
  - `pod_addresses_v4` / `_v6` hold the veth's (ifindex, MAC, address) for each pod IP
    (without them, the pod's own traffic is dropped as spoofed).

A pod lacking any of it is a Gap. Gaps of elements the agent loaded and the kernel no longer
holds are repaired at once (someone removed them); a pod without a veth gets a grace, as its
veth may be being created or deleted right now (CoverageWatch).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from netfence_api import PolicedPod
from netfence_agent.nft.dump import ElementInfo
from netfence_agent.render import PodPort, counter_name

PORTS_MAP = "pod_ports"
ADDRESS_SETS = {4: "pod_addresses_v4", 6: "pod_addresses_v6"}


@dataclass(frozen=True)
class LoadedAntiSpoofing:
    """The bridge table's anti-spoofing elements as read back from the kernel."""

    ports: Mapping[str, str | None]  # veth name -> the chain its frames jump to (pod_ports)
    addresses: frozenset[tuple[int, str, str]]  # (ifindex, MAC, address) of pod_addresses_v4/_v6


def loaded_from(elements: Mapping[str, list[ElementInfo]]) -> LoadedAntiSpoofing:
    """LoadedAntiSpoofing from Kernel.set_elements of the bridge table (a set not there: empty)."""
    ports = {e.key[0]: e.verdict[1] for e in elements.get(PORTS_MAP, ())
             if e.verdict is not None and e.verdict[0] in ("jump", "goto")}
    # In the interval set a pod's own address is a one-address range: its first key.
    addresses = frozenset(e.key for name in ADDRESS_SETS.values() for e in elements.get(name, ()) if not e.interval_end)
    return LoadedAntiSpoofing(ports, addresses)


@dataclass(frozen=True)
class Gap:
    pod: str  # namespace/name
    why: str
    loaded: bool  # the agent loaded this pod's anti-spoofing: the kernel lost it (repair now)


def canonical_ip(ip: str) -> tuple[int, str]:
    """(4|6, address as inet_ntop spells it): how nft/dump.py reads addresses back."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return (6 if family == socket.AF_INET6 else 4), socket.inet_ntop(family, socket.inet_pton(family, ip))


def needed_families(pods: Iterable[PolicedPod]) -> tuple[int, ...]:
    """The address families whose sets need reading back (IPv6 only where a pod has an IPv6 IP)."""
    return (4, 6) if any(":" in ip for pod in pods for ip in pod.ips) else (4,)


def anti_spoofing_gaps(pods: Iterable[PolicedPod], ports: Mapping[str, PodPort],
                       loaded: LoadedAntiSpoofing) -> list[Gap]:
    """The pods (of the rule set, with the veths it was rendered with) the kernel does not cover."""
    gaps = []
    for pod in pods:
        key = f"{pod.namespace}/{pod.name}"
        port = next((ports[ip] for ip in pod.ips if ip in ports), None)
        if port is None:
            gaps.append(Gap(key, f"no veth found for {', '.join(pod.ips) or 'a pod without IPs'}", loaded=False))
            continue
        chain = counter_name(pod.namespace, pod.name, "spoof")
        if loaded.ports.get(port.ifname) != chain:
            gaps.append(Gap(key, f"{port.ifname} not in {PORTS_MAP}", loaded=True))
            continue
        if port.mac and port.ifindex is not None:
            mac = port.mac.lower()
            missing = [ip for ip in pod.ips if (port.ifindex, mac, canonical_ip(ip)[1]) not in loaded.addresses]
            if missing:
                family = canonical_ip(missing[0])[0]
                gaps.append(Gap(key, f"{', '.join(missing)} of {port.ifname} not in {ADDRESS_SETS[family]}", loaded=True))
    return gaps


@dataclass
class CoverageWatch:
    """Which gaps count: loaded elements the kernel lost at once, a missing veth after `grace`
    seconds (a pod's veth is created a moment before or deleted a moment after its rule-set
    entry changes), so that such transients neither flap the status nor the gauge."""

    grace: float
    _since: dict[str, float] = field(default_factory=dict)

    def judge(self, gaps: list[Gap], now: float) -> tuple[dict[str, str], float | None]:
        """(unprotected pods -> why, when to look again for gaps still in their grace)."""
        self._since = {g.pod: self._since.get(g.pod, now) for g in gaps}
        unprotected = {g.pod: g.why for g in gaps if g.loaded or now - self._since[g.pod] >= self.grace}
        waiting = [self._since[g.pod] + self.grace for g in gaps if g.pod not in unprotected]
        return unprotected, min(waiting) if waiting else None
