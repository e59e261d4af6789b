"""The agent notices when the kernel's anti-spoofing no longer covers a local pod (issue 12):
the pure check, its grace, and the agent's answer (gauge, Degraded condition, /readyz, repair)
against a kernel double whose bridge-table elements the test controls. The kernel tests
(tests/kernel/test_agent_anti_spoofing.py) do the same against the real thing."""

from __future__ import annotations

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from agent.test_periodic_full_sync import RecordingKernel

from netfence_api import Isolation, NodeRuleSet, NodeRuleSetSpec, PolicedPod
from netfence_agent.coverage import CoverageWatch, Gap, LoadedAntiSpoofing, anti_spoofing_gaps, loaded_from
from netfence_agent.daemon import Agent, AgentConfig
from netfence_agent.nft.dump import ElementInfo
from netfence_agent.render import PodPort, counter_name

A = PolicedPod(namespace="x", name="a", uid="ua", ips=["10.244.0.2"], isolation=Isolation(ingress=True))
B = PolicedPod(namespace="x", name="b", uid="ub", ips=["10.244.0.3"], isolation=Isolation())
SIX = PolicedPod(namespace="x", name="six", uid="u6", ips=["10.244.0.4", "fd00:0::4"], isolation=Isolation())
PORT_A = PodPort("veth0000000a", "02:42:0A:F4:00:02", 5)
PORT_B = PodPort("veth0000000b", "02:42:0a:f4:00:03", 6)
PORT_SIX = PodPort("veth00000006", "02:42:0a:f4:00:04", 7)


def elements(*pods_ports: tuple[PolicedPod, PodPort]) -> dict[str, list[ElementInfo]]:
    """The bridge table's anti-spoofing elements as nft/dump.py reads them back."""
    out: dict[str, list[ElementInfo]] = {"pod_ports": [], "pod_addresses_v4": [], "pod_addresses_v6": []}
    for pod, port in pods_ports:
        out["pod_ports"].append(ElementInfo((port.ifname,), verdict=("jump", counter_name(pod.namespace, pod.name, "spoof"))))
        for ip in pod.ips:
            family = "pod_addresses_v6" if ":" in ip else "pod_addresses_v4"
            address = "fd00::4" if ip == "fd00:0::4" else ip
            key = (port.ifindex, port.mac.lower(), address)
            out[family].append(ElementInfo(key, key_end=key if ":" in ip else None))
    return out


# --------------------------------------------------------------------------- the pure check
def test_a_pod_with_its_veth_and_elements_is_covered():
    loaded = loaded_from(elements((A, PORT_A), (SIX, PORT_SIX)))
    assert anti_spoofing_gaps([A, SIX], {A.ips[0]: PORT_A, SIX.ips[0]: PORT_SIX}, loaded) == []


def test_each_missing_piece_is_a_gap_that_says_what():
    ports = {A.ips[0]: PORT_A, B.ips[0]: PORT_B}
    full = elements((A, PORT_A), (B, PORT_B))

    def gaps(held: dict, pods=(A, B), with_ports=ports) -> list[Gap]:
        return anti_spoofing_gaps(list(pods), with_ports, loaded_from(held))

    assert gaps(full, with_ports={A.ips[0]: PORT_A}) == [Gap("x/b", "no veth found for 10.244.0.3", loaded=False)]
    without_a_port = {**full, "pod_ports": full["pod_ports"][1:]}
    assert gaps(without_a_port) == [Gap("x/a", "veth0000000a not in pod_ports", loaded=True)]
    # a's veth jumping to b's chain would let a send as b: not a's anti-spoofing.
    swapped = {**full, "pod_ports": [ElementInfo((PORT_A.ifname,), verdict=("jump", counter_name("x", "b", "spoof")))]
               + full["pod_ports"][1:]}
    assert [g.pod for g in gaps(swapped)] == ["x/a"]
    without_b_address = {**full, "pod_addresses_v4": full["pod_addresses_v4"][:1]}
    assert gaps(without_b_address) == [Gap("x/b", "10.244.0.3 of veth0000000b not in pod_addresses_v4", loaded=True)]
    assert gaps({}) == [Gap("x/a", "veth0000000a not in pod_ports", True), Gap("x/b", "veth0000000b not in pod_ports", True)]


def test_ipv6_addresses_are_looked_up_in_their_interval_set():
    held = elements((SIX, PORT_SIX))
    ports = {ip: PORT_SIX for ip in SIX.ips}
    assert anti_spoofing_gaps([SIX], ports, loaded_from(held)) == []
    held["pod_addresses_v6"] = []
    assert anti_spoofing_gaps([SIX], ports, loaded_from(held)) == [
        Gap("x/six", "fd00:0::4 of veth00000006 not in pod_addresses_v6", loaded=True)]


def test_a_port_without_mac_needs_only_its_pod_ports_entry():
    """render checks such a pod's source address in its chain (no address-set elements)."""
    bare = PodPort(PORT_A.ifname)
    held = {"pod_ports": elements((A, PORT_A))["pod_ports"]}
    assert anti_spoofing_gaps([A], {A.ips[0]: bare}, loaded_from(held)) == []


def test_loaded_from_ignores_interval_ends_and_non_jumps():
    held = {"pod_ports": [ElementInfo(("veth1",), verdict=("accept", None))],
            "pod_addresses_v6": [ElementInfo((1, "02:00:00:00:00:01", "fd00::1"), interval_end=True)]}
    assert loaded_from(held) == LoadedAntiSpoofing({}, frozenset())


def test_a_missing_veth_counts_after_the_grace_lost_elements_at_once():
    watch = CoverageWatch(grace=10.0)
    no_veth, lost = Gap("x/b", "no veth", False), Gap("x/a", "gone", True)
    assert watch.judge([no_veth, lost], now=100.0) == ({"x/a": "gone"}, 110.0)
    assert watch.judge([no_veth], now=109.9) == ({}, 110.0)
    assert watch.judge([no_veth], now=110.0) == ({"x/b": "no veth"}, None)
    assert watch.judge([], now=111.0) == ({}, None)
    assert watch.judge([no_veth], now=112.0) == ({}, 122.0), "a new gap starts a new grace"


# --------------------------------------------------------------------------- the agent
class KernelDouble(RecordingKernel):
    """Holds bridge-table elements the test can take away; a sync loads `full` (what the
    agent's rules hold: a full sync all of it, any other the difference to what it loaded)."""

    def __init__(self, full: dict[str, list[ElementInfo]]) -> None:
        super().__init__()
        self.full = full
        self.held = {k: list(v) for k, v in full.items()}
        self.kinds: list[str] = []  # transaction kinds only, in order

    def apply(self, transaction) -> None:
        self.kinds.append(transaction.kind)
        if transaction.kind != "noop":
            self.held = {k: list(v) for k, v in self.full.items()}

    def set_elements(self, family, table, names):
        assert (family, table) == ("bridge", "netfence")
        return {n: list(self.held[n]) for n in names if n in self.held}


class Statuses:
    def __init__(self) -> None:
        self.sent: list = []

    def report(self, status) -> None:
        self.sent.append(status)

    def close(self) -> None:
        pass

    def degraded(self) -> tuple[str, str, str]:
        c = next(c for c in self.sent[-1].conditions if c.type == "Degraded")
        return c.status, c.reason, c.message or ""


class Rescans:
    def __init__(self) -> None:
        self.requested = 0

    def request_rescan(self) -> None:
        self.requested += 1

    def stop(self) -> None:
        pass


def agent_with(kernel: KernelDouble, tmp_path, pods=(A, B), ports=None, **config) -> tuple[Agent, Statuses]:
    sysctl = tmp_path / "net" / "bridge"
    sysctl.mkdir(parents=True, exist_ok=True)
    for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        (sysctl / name).write_text("1\n")
    statuses = Statuses()
    agent = Agent(AgentConfig(node="n1", metrics_bind_address=None, proc_sys=str(tmp_path), **config), statuses, kernel)
    agent.discovery = Rescans()
    agent.set_ports(ports if ports is not None else {A.ips[0]: PORT_A, B.ips[0]: PORT_B})
    agent.set_rule_set(NodeRuleSet.for_node(NodeRuleSetSpec(nodeName="n1", pods=list(pods)), generation=1))
    return agent, statuses


def exported(agent: Agent) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(agent.metrics.exposition().decode())
            for s in f.samples}


def test_elements_removed_from_the_kernel_are_reported_and_repaired(tmp_path):
    kernel = KernelDouble(elements((A, PORT_A), (B, PORT_B)))
    agent, statuses = agent_with(kernel, tmp_path)
    assert agent.sync_once().kind == "full"
    assert agent.unprotected == {} and statuses.degraded()[0] == "False" and agent.readiness()[0]
    assert exported(agent)["netfence_unprotected_pods"] == 0

    kernel.held["pod_addresses_v4"] = [e for e in kernel.held["pod_addresses_v4"] if e.key[2] != B.ips[0]]
    agent._next_coverage_check = 0.0  # the periodic check is due
    assert agent._anti_spoofing_check_due()
    assert agent.unprotected == {"x/b": "10.244.0.3 of veth0000000b not in pod_addresses_v4"}
    status, reason, message = statuses.degraded()
    assert (status, reason) == ("True", "PodsUnprotected") and "x/b" in message and "x/a" not in message
    ready, why = agent.readiness()
    assert not ready and "x/b" in why
    metrics = exported(agent)
    assert metrics["netfence_unprotected_pods"] == 1 and metrics["netfence_anti_spoofing_repairs_total"] == 1

    # The repair: the next sync is a full one, saying why, and the check after it is clean.
    assert agent._repair_why is not None
    outcome = agent.sync_once()
    assert outcome.kind == "full" and kernel.kinds == ["full", "full"]
    assert agent.unprotected == {} and statuses.degraded() == ("False", "AsExpected", "") and agent.readiness()[0]
    assert exported(agent)["netfence_unprotected_pods"] == 0


def test_a_repair_that_does_not_hold_is_not_retried_before_the_next_period(tmp_path):
    kernel = KernelDouble(elements((A, PORT_A), (B, PORT_B)))
    agent, statuses = agent_with(kernel, tmp_path, anti_spoofing_check_period=30.0)
    agent.sync_once()
    kernel.full = elements((A, PORT_A))  # b's elements do not come back (someone keeps deleting them)
    kernel.held = kernel.full
    agent.check_anti_spoofing()
    agent.sync_once()
    assert kernel.kinds == ["full", "full"] and "x/b" in agent.unprotected
    assert agent._repair_why is None, "no repair loop: the next attempt waits for the next period"
    assert statuses.degraded()[1] == "PodsUnprotected"


def test_a_pod_without_a_veth_counts_after_the_grace_and_discovery_looks_again(tmp_path):
    kernel = KernelDouble(elements((A, PORT_A)))
    agent, statuses = agent_with(kernel, tmp_path, ports={A.ips[0]: PORT_A}, unprotected_grace=0.3)
    agent.sync_once()
    assert agent.unprotected == {} and statuses.degraded()[0] == "False", "b is within its grace"
    assert agent._next_coverage_check is not None and agent._next_coverage_check - time.monotonic() <= 0.3
    assert agent.discovery.requested == 0
    time.sleep(0.3)
    assert agent._anti_spoofing_check_due()
    assert agent.unprotected == {"x/b": "no veth found for 10.244.0.3"}
    assert statuses.degraded()[1] == "PodsUnprotected" and not agent.readiness()[0]
    assert agent.discovery.requested == 1
    assert agent._repair_why is None, "nothing to repair in the kernel: the veth is unknown"
    # The veth turns up: the sync that loads it also clears the condition.
    agent.set_ports({A.ips[0]: PORT_A, B.ips[0]: PORT_B})
    kernel.full = elements((A, PORT_A), (B, PORT_B))
    agent.sync_once()
    assert agent.unprotected == {} and statuses.degraded()[0] == "False"


def test_the_loop_checks_periodically_and_repairs_without_any_other_trigger(tmp_path):
    kernel = KernelDouble(elements((A, PORT_A), (B, PORT_B)))
    agent, _ = agent_with(kernel, tmp_path, anti_spoofing_check_period=0.2)
    thread = threading.Thread(target=agent.loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while kernel.kinds != ["full"] and time.monotonic() < deadline:
            time.sleep(0.01)
        kernel.held = {}  # someone flushed the bridge table's sets and map
        while len(kernel.kinds) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        agent.stop()
        thread.join(timeout=10)
    assert kernel.kinds == ["full", "full"]
    assert kernel.held == kernel.full and agent.unprotected == {}
    assert exported(agent)["netfence_anti_spoofing_repairs_total"] == 1


def test_group_member_syncs_do_not_read_the_kernel_back(tmp_path):
    """The common change (a pod joins a peer group elsewhere) leaves anti-spoofing alone."""
    kernel = KernelDouble(elements((A, PORT_A), (B, PORT_B)))
    reads = []
    original = kernel.set_elements
    kernel.set_elements = lambda *a: reads.append(a) or original(*a)
    agent, _ = agent_with(kernel, tmp_path)
    agent.sync_once()
    assert len(reads) == 1
    agent.set_rule_set(NodeRuleSet.for_node(NodeRuleSetSpec(nodeName="n1", pods=[A, B]), generation=2))
    assert agent.sync_once().kind == "noop"
    assert len(reads) == 1


def test_a_repair_with_periodic_full_syncs_off_is_one_full_sync(tmp_path):
    kernel = KernelDouble(elements((A, PORT_A), (B, PORT_B)))
    agent, _ = agent_with(kernel, tmp_path, full_sync_period=0, anti_spoofing_check_period=0.2)
    thread = threading.Thread(target=agent.loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        kernel.held = {}
        time.sleep(0.8)
    finally:
        agent.stop()
        thread.join(timeout=10)
    assert kernel.kinds == ["full", "full"], "the repair, and no full sync after it"
