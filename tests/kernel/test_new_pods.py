"""New pods are held closed until the rule set covers them (DESIGN.md §3, pod lifecycle).

A node netns with cni0 and the agent as a process; a new pod is wired the way the CNI bridge
plugin does it (veth attached to cni0 first, the IP set later, after its IPAM plugin ran) while
the rule set does not name it yet, as on a real node for the ~1.2 s until the controller's
NodeRuleSet arrives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from kernel.conftest import HELPERS, PYTHON, Node, Pod, in_netns, probe, run_ip, wait_serving
from kernel.test_agent import (
    TCP80,
    allow,
    group,
    metric,
    policed,
    rule_set,
    start_prober,
    started,
    stop_prober,
    three_pods,
)
from kernel.test_discovery_kernel import DiscoveryIn, discovery_in  # noqa: F401 (fixture)

pytestmark = pytest.mark.kernel


def listing(node: Node, *what: str) -> str:
    return in_netns(node.netns, "nft", "list", *what).stdout


def wait_until(predicate, what: str, node: Node, timeout: float = 10.0, step: float = 0.002) -> float:
    """Poll until predicate() holds; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    raise AssertionError(f"never: {what}\n--- agent log ---\n{node.agent_log()}")


def veth_held(node: Node, veth: str) -> bool:
    return f'"{veth}" : jump held_veth' in listing(node, "map", "bridge", "netfence", "pod_ports")


def ip_held(node: Node, ip: str) -> bool:
    return f"{ip} : jump held_ingress" in listing(node, "map", "inet", "netfence", "ingress_v4")


class NewPod:
    """A pod wired step by step in the CNI bridge plugin's order, its server already listening
    (the harshest case: on a real node the containers start after the CNI is done)."""

    def __init__(self, node: Node, namespace: str, name: str, index: int, bridge: str = "cni0", visible: bool = True):
        self.node = node
        self.bridge = bridge
        self.netns = node.netns_factory("pod")
        in_netns(self.netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        self.pod = Pod(namespace, name, self.netns, f"{node.prefix}.{index}", f"02:42:0a:f4:01:{index:02x}",
                       f"veth{os.urandom(4).hex()}")
        node.pods[name] = self.pod  # node.close() stops its server
        if visible:  # containerd makes the netns first
            (node.netns_dir / self.netns).symlink_to(f"/var/run/netns/{self.netns}")
        self.pod.servers.append(subprocess.Popen(
            ["ip", "netns", "exec", self.netns, PYTHON, str(HELPERS / "netprobe.py"), "serve", "--port", "80", "--port", "81"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_serving(self.pod)

    def attach_veth(self) -> None:
        """The bridge plugin's setupVeth: the pair, the host end on cni0 and up, no IP yet."""
        run_ip("link", "add", "eth0", "address", self.pod.mac, "type", "veth", "peer", "name", self.pod.veth,
               "netns", self.node.netns, netns=self.netns)
        run_ip("link", "set", self.pod.veth, "master", self.bridge, "up", netns=self.node.netns)
        run_ip("link", "set", "eth0", "up", netns=self.netns)

    def set_ip(self) -> None:
        """After IPAM: the address and the default route, inside the pod."""
        run_ip("addr", "add", f"{self.pod.ip}/24", "dev", "eth0", netns=self.netns)
        run_ip("route", "add", "default", "via", f"{self.node.prefix}.1", netns=self.netns)


# --------------------------------------------------------------------------- the hold
def test_a_new_pod_accepts_no_connection_until_the_rule_set_covering_it_is_applied(node: Node):
    a, b, c = three_pods(node)
    # Default deny: b and c isolated for ingress with nothing allowed; a is not isolated.
    base = [policed(a), policed(b, ingress=[]), policed(c, ingress=[])]
    started(node, rule_set(node, base, [], 1))
    late = NewPod(node, "x", "late", 60)
    target = late.pod.ip
    # Bounded: the prober stops when the test stops it; each attempt times out in 0.3 s.
    prober = start_prober(a, [], [f"{target}:80"] * 4 + [f"{target}:81/udp"] * 2)
    try:
        late.attach_veth()
        late.set_ip()  # at once: the veth is held from its first frame, before the agent knows it
        wait_until(lambda: ip_held(node, target), "the new IP held", node)
        time.sleep(1.5)  # the window seen on a real node: ~1.2 s until the controller names the pod
        text = node.http("/metrics")[1]
        assert metric(text, "netfence_held_pods") == 1
        held_packets = sum(metric(text, "netfence_held_packets_total", direction=d) or 0 for d in ("ingress", "egress"))
        assert held_packets > 0, "a's SYNs (or late's answers to its ARP) were refused"
        covered_at = time.time()
        rs = rule_set(node, base + [policed(late.pod, ingress=[allow("from-a", TCP80)])], [group("from-a", a)], 2)
        node.wait_applied(node.write_rules(rs))
        time.sleep(1.0)
    finally:
        summary = stop_prober(prober)
    accepted = [f["at"] for f in summary["failures"] if f["ok"]]
    early = [at for at in accepted if at < covered_at]
    assert summary["denied_attempts"] > 20, summary
    assert early == [], f"{len(early)} connections accepted before the rule set covering the pod was written"
    assert any(f["target"] == f"{target}:80" for f in summary["failures"] if f["ok"]), \
        f"TCP/80 accepted once covered and allowed: {summary}"
    assert not probe(a, late.pod, 81, udp=True, timeout=0.5), "81 stays refused by the pod's own policy"
    text = node.http("/metrics")[1]
    assert metric(text, "netfence_held_pods") == 0
    assert metric(text, "netfence_pod_hold_duration_seconds_count") == 1
    log = node.agent_log()
    assert f"holding new pod veth {late.pod.veth}" in log and f"released {late.pod.veth} ({target})" in log, log
    assert "elements sync" in log, "holding a pod changes set elements only"


def test_a_pod_born_while_the_agent_is_not_looking_is_held_by_the_kernel_alone(node: Node):
    """The hold does not wait for the agent to notice the pod: the agent is stopped (SIGSTOP)
    while the pod is wired, and its first frames are dropped all the same."""
    a, b, c = three_pods(node)
    base = [policed(a), policed(b), policed(c)]
    agent = started(node, rule_set(node, base, [], 1))
    late = NewPod(node, "x", "late", 68)
    agent.send_signal(signal.SIGSTOP)
    try:
        late.attach_veth()
        late.set_ip()
        assert not probe(a, late.pod, 80, timeout=1.0), "accepted while nothing but the kernel looked"
        assert not probe(a, late.pod, 81, udp=True, timeout=0.5)
        assert not probe(late.pod, b, 80, timeout=0.5)
        assert held_veth_drops(node) > 0
    finally:
        agent.send_signal(signal.SIGCONT)
    wait_until(lambda: ip_held(node, late.pod.ip), "the agent holds it once it looks", node)
    node.wait_applied(node.write_rules(rule_set(node, base + [policed(late.pod)], [], 2)))
    assert probe(a, late.pod, 80, timeout=3), "covered: open (no policy selects it)"


def test_a_held_pod_cannot_spoof_and_still_talks_to_its_node(node: Node):
    a, b, c = three_pods(node)
    started(node, rule_set(node, [policed(a), policed(b), policed(c)], [], 1))
    late = NewPod(node, "x", "late", 61)
    late.attach_veth()
    late.set_ip()
    wait_until(lambda: ip_held(node, late.pod.ip), "the new IP held", node)
    assert not probe(late.pod, b, 80, timeout=0.5), "held: no egress to other pods"
    assert not probe(a, late.pod, 80, timeout=0.5), "held: no ingress from other pods"
    # kubelet's probes come from the node (DESIGN.md §3: a pod and its node always talk).
    from_node = in_netns(node.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", late.pod.ip, "80",
                         "--timeout", "2", check=False)
    assert from_node.returncode == 0, "the node reaches a held pod"

    # Sending as b (b's IP, and b's MAC too): the frames must not get past the held veth.
    # Without ARP (which would be dropped first), so the datagrams themselves reach the bridge.
    run_ip("neigh", "replace", c.ip, "lladdr", c.mac, "dev", "eth0", "nud", "permanent", netns=late.netns)
    run_ip("addr", "add", f"{b.ip}/32", "dev", "eth0", netns=late.netns)
    for source_mac in (late.pod.mac, b.mac):
        run_ip("link", "set", "eth0", "address", source_mac, netns=late.netns)
        before = held_veth_drops(node)
        for _ in range(5):
            out = in_netns(late.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", c.ip, "80", "--udp",
                           "--source", b.ip, "--timeout", "0.2", check=False)
            assert out.returncode == 1, "a spoofed datagram from a held veth got an answer"
        # (Not every datagram leaves: the pod's stack sends some of these 5 and not others.)
        assert held_veth_drops(node) > before, f"spoofed frames from {source_mac} dropped at the held veth"
    assert (metric(node.http("/metrics")[1], "netfence_held_packets_total", direction="egress") or 0) >= 2
    assert probe(b, c, 80), "the real b is not affected"


def held_veth_drops(node: Node) -> int:
    counters = json.loads(in_netns(node.netns, "nft", "-j", "list", "counter", "bridge", "netfence", "held_veth").stdout)
    return next(i["counter"]["packets"] for i in counters["nftables"] if "counter" in i)


def test_a_held_pod_is_released_unpoliced_after_the_timeout_and_says_so(node: Node):
    a, b, c = three_pods(node)
    base = [policed(a), policed(b), policed(c)]
    started(node, rule_set(node, base, [], 1), "--hold-new-pods-timeout", "2")
    late = NewPod(node, "x", "late", 62)
    # A pod whose namespace the agent cannot see (its mount of the netns directory missed it)
    # is held as well, from its veth's first frame, and released with the same bound.
    unseen = NewPod(node, "x", "unseen", 65, visible=False)
    for pod in (late, unseen):
        pod.attach_veth()
        pod.set_ip()
    held_at = wait_until(lambda: ip_held(node, late.pod.ip) and veth_held(node, unseen.pod.veth), "both held", node)
    assert not probe(a, late.pod, 80, timeout=0.5) and not probe(a, unseen.pod, 80, timeout=0.5)
    assert time.monotonic() - held_at < 1.5, "the probes ran within the hold"
    status = node.wait_status(lambda s: any(c["type"] == "Degraded" and c["status"] == "True" for c in s["conditions"]))
    released_at = time.monotonic()
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "NewPodsReleasedUnpoliced" and late.pod.veth in degraded["message"], degraded
    assert 1.5 <= released_at - held_at < 4.0, "released at the bound, not before"
    status = node.wait_status(lambda s: unseen.pod.veth in next(c["message"] for c in s["conditions"]
                                                                 if c["type"] == "Degraded"), timeout=5)
    assert probe(a, late.pod, 80) and probe(a, unseen.pod, 80), "released: unpoliced, as with --new-pods=open"
    assert not ip_held(node, late.pod.ip) and not veth_held(node, late.pod.veth)
    text = node.http("/metrics")[1]
    assert metric(text, "netfence_hold_timeouts_total") == 2 and metric(text, "netfence_held_pods") == 0
    assert "UNPOLICED" in node.agent_log()
    # Once the rule set covers them, they are no longer released pods. The one whose veth the
    # agent cannot place still lacks anti-spoofing, and the condition now says that instead.
    node.wait_applied(node.write_rules(rule_set(node, base + [policed(late.pod), policed(unseen.pod)], [], 2)))
    status = node.wait_status(lambda s: any(c["type"] == "Degraded" and c["reason"] != "NewPodsReleasedUnpoliced"
                                            for c in s["conditions"]), timeout=20)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PodsUnprotected"), degraded
    assert "x/unseen" in degraded["message"] and "x/late" not in degraded["message"]
    assert metric(node.http("/metrics")[1], "netfence_hold_timeouts_total") == 2


def test_veths_on_a_bridge_without_pods_are_let_through(node: Node):
    """E.g. docker0 beside cni0 on a k3s host: no pods there, nothing to hold."""
    a, b, c = three_pods(node)
    run_ip("link", "add", "docker0", "type", "bridge", netns=node.netns)
    run_ip("link", "set", "docker0", "up", netns=node.netns)
    started(node, rule_set(node, [policed(a), policed(b), policed(c)], [], 1))
    one, two = (NewPod(node, "docker", name, index, bridge="docker0", visible=False)
                for name, index in (("one", 70), ("two", 71)))
    for container in (one, two):
        container.attach_veth()
        container.set_ip()
    wait_until(lambda: probe(one.pod, two.pod, 80, timeout=0.3), "containers on docker0 talk", node, timeout=5)
    assert metric(node.http("/metrics")[1], "netfence_held_pods") == 0
    assert "holding" not in node.agent_log()


def test_new_pods_open_leaves_an_uncovered_pod_unpoliced(node: Node):
    a, b, c = three_pods(node)
    started(node, rule_set(node, [policed(a), policed(b), policed(c)], [], 1), "--new-pods", "open")
    late = NewPod(node, "x", "late", 63)
    late.attach_veth()
    late.set_ip()
    wait_until(lambda: probe(a, late.pod, 80, timeout=0.3), "the uncovered pod reachable", node, timeout=5)
    assert not ip_held(node, late.pod.ip) and not veth_held(node, late.pod.veth)
    assert metric(node.http("/metrics")[1], "netfence_held_pods") == 0
    assert "holding" not in node.agent_log()


# --------------------------------------------------------------------------- discovery
def test_discovery_reports_a_bridge_port_veth_whose_pod_has_no_ip_yet(node: Node, discovery_in):  # noqa: F811
    found = discovery_in(node)
    found.start()
    late = NewPod(node, "x", "late", 64)
    late.attach_veth()
    deadline = time.monotonic() + 10
    snapshot = None
    while time.monotonic() < deadline:
        snapshot = found.changes.get(timeout=max(0.0, deadline - time.monotonic()))
        if any(p.ifname == late.pod.veth for p in snapshot.unaddressed.values()):
            break
    port = next(p for p in snapshot.unaddressed.values() if p.ifname == late.pod.veth)
    assert port.mac == late.pod.mac and port.ifindex in snapshot.unaddressed
    late.set_ip()
    while time.monotonic() < deadline:
        snapshot = found.changes.get(timeout=max(0.0, deadline - time.monotonic()))
        if late.pod.ip in snapshot.pods:
            break
    assert late.pod.ip in snapshot.pods and snapshot.unaddressed == {}


def test_a_veth_into_a_pod_namespace_that_is_no_bridge_port_is_not_reported(node: Node, discovery_in):  # noqa: F811
    """E.g. a lab node's uplink: a veth into the underlay namespace, which shares the netns dir."""
    found = discovery_in(node)
    other = node.netns_factory("uplink")
    (node.netns_dir / other).symlink_to(f"/var/run/netns/{other}")
    run_ip("link", "add", "uplink0", "type", "veth", "peer", "name", "u0", "netns", other, netns=node.netns)
    run_ip("link", "set", "uplink0", "up", netns=node.netns)
    snapshot = found.scan()
    assert snapshot.unaddressed == {} and any("uplink" in i for i in snapshot.incomplete)


def test_discovery_sorts_the_other_bridge_ports(node: Node, discovery_in):  # noqa: F811
    """On a bridge of pods, a veth we cannot place is held like a new pod; ports of other kinds
    and veths on bridges without pods are let through."""
    pod = node.add_pod("x", "a", serve=False)
    unseen = NewPod(node, "x", "unseen", 66, visible=False)
    unseen.attach_veth()
    run_ip("link", "add", "docker0", "type", "bridge", netns=node.netns)
    container = NewPod(node, "docker", "c", 67, bridge="docker0", visible=False)
    container.attach_veth()
    run_ip("link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", netns=node.netns)
    run_ip("link", "set", "vx0", "master", "cni0", netns=node.netns)
    snapshot = discovery_in(node).scan()
    assert set(snapshot.pods) == {pod.ip}
    assert {p.ifname for p in snapshot.unaddressed.values()} == {unseen.pod.veth}
    assert {p.ifname for p in snapshot.other_ports.values()} == {container.pod.veth, "vx0"}
