"""Anti-spoofing for a pod's whole life, end to end (issue 12): the agent as a process in a node
netns, pods on veths in cni0, spoofing attempts from a pod's own namespace.

On a real node the anti-spoofing of every pod went 15 s after it started, when the bridge's
forward_delay ended. Here cni0's forward_delay is 2 s (measured: the kernel announces its end
with STP off too, tests/kernel/test_discovery_kernel.py), and the pods live through it, a carrier
flap and an MTU change before they try to spoof.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from kernel.conftest import HELPERS, PYTHON, Node, Pod, in_netns, run_ip
from kernel.test_agent import TCP80, allow, group, metric, policed, rule_set, started, three_pods

pytestmark = pytest.mark.kernel

FORWARD_DELAY = 2.0  # seconds; the bridge's minimum with STP on (centiseconds in `ip link`)
CHECK = ("--anti-spoofing-check-period", "1")


def short_forward_delay(node: Node) -> None:
    """Before any pod: a port's forward_delay timer starts, with the bridge's value, when it comes up."""
    run_ip("link", "set", "cni0", "type", "bridge", "forward_delay", str(int(FORWARD_DELAY * 100)), netns=node.netns)


def count_arrivals(pod: Pod, source: Pod, port: int = 80) -> None:
    """A counter inside the pod's own namespace: what reaches it from `source`'s address."""
    rules = (f"add table inet arrivals\n"
             f"add chain inet arrivals input {{ type filter hook input priority 0; }}\n"
             f"add rule inet arrivals input ip saddr {source.ip} tcp dport {port} counter\n")
    subprocess.run(["ip", "netns", "exec", pod.netns, "nft", "-f", "-"], input=rules, text=True, check=True,
                   capture_output=True, timeout=30)


def arrivals(pod: Pod) -> int:
    listing = json.loads(in_netns(pod.netns, "nft", "-j", "list", "table", "inet", "arrivals").stdout)
    return sum(e["counter"]["packets"] for item in listing["nftables"] if "rule" in item
               for e in item["rule"]["expr"] if "counter" in e)


def spoof_syns(impostor: Pod, victim: Pod, target: Pod, attempts: int = 3) -> None:
    """The impostor connects to target:80 with the victim's source address (a second address on
    its eth0): a SYN an allowed client would send, from the wrong veth."""
    run_ip("addr", "add", f"{victim.ip}/32", "dev", "eth0", netns=impostor.netns)
    # Without ARP (its sender address would be the victim's, dropped first): the SYNs themselves.
    run_ip("neigh", "replace", target.ip, "lladdr", target.mac, "dev", "eth0", "nud", "permanent", netns=impostor.netns)
    try:
        for _ in range(attempts):
            in_netns(impostor.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", target.ip, "80",
                     "--source", victim.ip, "--timeout", "0.3", check=False)
    finally:
        run_ip("addr", "del", f"{victim.ip}/32", "dev", "eth0", netns=impostor.netns)


def pod_ports(node: Node) -> str:
    return in_netns(node.netns, "nft", "list", "map", "bridge", "netfence", "pod_ports").stdout


def wait_for(predicate, what: str, node: Node, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}\n--- agent log ---\n{node.agent_log()}")


def degraded(node: Node) -> tuple[str, str, str]:
    c = next(c for c in node.status().get("conditions", []) if c["type"] == "Degraded")
    return c["status"], c["reason"], c.get("message") or ""


@pytest.mark.slow
def test_spoofing_is_dropped_after_forward_delay_a_carrier_flap_and_an_mtu_change(node: Node):
    short_forward_delay(node)
    a, b, c = three_pods(node)
    count_arrivals(c, a)
    # c takes port 80 from a only; b is the impostor that would like to be a.
    started(node, rule_set(node, [policed(c, ingress=[allow("from-a", TCP80)]), policed(a), policed(b)],
                           [group("from-a", a)], 1), *CHECK)
    node_started = time.monotonic()

    time.sleep(FORWARD_DELAY + 0.5)  # every port reached forwarding: an AF_BRIDGE RTM_NEWLINK each
    run_ip("link", "set", c.veth, "mtu", "1400", netns=node.netns)
    run_ip("link", "set", "eth0", "down", netns=b.netns)  # a carrier flap on b's veth
    run_ip("link", "set", "eth0", "up", netns=b.netns)
    run_ip("route", "replace", "default", "via", f"{node.prefix}.1", netns=b.netns)
    # b's port runs through forward_delay again: the last word on b's veth is an AF_BRIDGE message.
    time.sleep(FORWARD_DELAY + 0.5)
    assert time.monotonic() - node_started > 2 * FORWARD_DELAY

    spoof_syns(b, a, c)
    assert arrivals(c) == 0, f"a SYN with a's address from b's veth reached c; pod_ports: {pod_ports(node)}"
    assert all(p.veth in pod_ports(node) for p in (a, b, c))
    text = node.http("/metrics")[1]
    assert (metric(text, "netfence_spoofed_packets_total", namespace="x", pod="b") or 0) >= 3
    assert metric(text, "netfence_unprotected_pods") == 0
    assert node.http("/readyz")[0] == 200 and degraded(node)[0] == "False"
    # a itself still gets through: its own frames match its own veth, MAC and address.
    in_netns(a.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", c.ip, "80", "--timeout", "2")
    assert arrivals(c) >= 1


def test_anti_spoofing_removed_from_the_kernel_is_noticed_and_repaired(node: Node):
    a, b, c = three_pods(node)
    count_arrivals(c, a)
    started(node, rule_set(node, [policed(c, ingress=[allow("from-a", TCP80)]), policed(a), policed(b)],
                           [group("from-a", a)], 1), *CHECK)
    # Someone takes b's veth out of the dispatch map: b's frames would no longer be checked.
    in_netns(node.netns, "nft", "delete", "element", "bridge", "netfence", "pod_ports", f'{{ "{b.veth}" }}')
    assert b.veth not in pod_ports(node)
    wait_for(lambda: b.veth in pod_ports(node), "b's veth back in pod_ports", node)
    log = node.agent_log()
    assert f"x/b ({b.veth} not in pod_ports)" in log and "loading the whole rule set again" in log
    assert "full sync: anti-spoofing missing from the kernel: x/b" in log
    assert "1 local pods without anti-spoofing in the kernel: x/b" in log
    text = node.http("/metrics")[1]
    assert metric(text, "netfence_anti_spoofing_repairs_total") == 1
    assert metric(text, "netfence_unprotected_pods") == 0
    assert degraded(node)[0] == "False" and node.http("/readyz")[0] == 200
    spoof_syns(b, a, c)
    assert arrivals(c) == 0, "repaired: b's spoofed SYNs are dropped again"

    # A whole set flushed (b's and every other pod's own addresses): repaired as well.
    in_netns(node.netns, "nft", "flush", "set", "bridge", "netfence", "pod_addresses_v4")
    wait_for(lambda: metric(node.http("/metrics")[1], "netfence_anti_spoofing_repairs_total") == 2, "a second repair",
             node)
    wait_for(lambda: a.ip in in_netns(node.netns, "nft", "list", "set", "bridge", "netfence", "pod_addresses_v4").stdout,
             "the addresses back", node)
    assert in_netns(a.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", c.ip, "80", "--timeout", "2",
                    check=False).returncode == 0


def test_a_pod_without_a_veth_is_reported_until_its_veth_appears(node: Node):
    a, b, c = three_pods(node)
    late_ip = f"{node.prefix}.60"
    late = policed(Pod("x", "late", "", late_ip, "", ""))
    started(node, rule_set(node, [policed(a), policed(b), policed(c), late], [], 1), *CHECK,
            "--unprotected-grace", "0.5")
    wait_for(lambda: metric(node.http("/metrics")[1], "netfence_unprotected_pods") == 1, "the gauge at 1", node)
    wait_for(lambda: degraded(node)[:2] == ("True", "PodsUnprotected"), "Degraded: PodsUnprotected", node)
    assert f"x/late (no veth found for {late_ip})" in degraded(node)[2]
    code, why = node.http("/readyz")
    assert code == 503 and "x/late" in why
    assert next(c for c in node.status()["conditions"] if c["type"] == "Applied")["status"] == "True"

    # Its veth comes (the CNI plugin was slow): covered, the condition clears, ready again.
    netns = node.netns_factory("pod")
    (node.netns_dir / netns).symlink_to(f"/var/run/netns/{netns}")
    run_ip("link", "add", "eth0", "address", "02:42:0a:f4:00:3c", "type", "veth", "peer", "name", "vethlate0001",
           "netns", node.netns, netns=netns)
    run_ip("link", "set", "vethlate0001", "master", "cni0", "up", netns=node.netns)
    run_ip("link", "set", "eth0", "up", netns=netns)
    run_ip("addr", "add", f"{late_ip}/24", "dev", "eth0", netns=netns)
    wait_for(lambda: degraded(node)[0] == "False", "Degraded back to False", node)
    assert metric(node.http("/metrics")[1], "netfence_unprotected_pods") == 0
    assert node.http("/readyz")[0] == 200
    assert "anti-spoofing covers every local pod again" in node.agent_log()
