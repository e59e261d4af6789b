"""Which new pods are held and for how long (netfence_agent.hold), and the agent's timer that
releases them, against a kernel double (tests/kernel/test_new_pods.py has the real thing)."""

from __future__ import annotations

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from agent.test_periodic_full_sync import NullSource, RecordingKernel
from netfence_agent.nft.dump import ElementInfo
from netfence_agent.nft.model import Verdict
from netfence_agent.daemon import Agent, AgentConfig
from netfence_agent.hold import HoldBook, next_book
from netfence_agent.metrics import AgentMetrics
from netfence_agent.nft.kernel import CounterValue
from netfence_agent.nflog import LoggedPacket, drop_record
from netfence_agent.render import HELD_EGRESS, HELD_INGRESS, HELD_VETH, HELD_LABELS, HeldPort, PodPort
from netfence_api import Isolation, NodeRuleSet, NodeRuleSetSpec, PolicedPod

VETH_A, VETH_B = PodPort("vetha", "02:00:00:00:00:0a", 10), PodPort("vethb", "02:00:00:00:00:0b", 11)
POD_A = PolicedPod(namespace="x", name="a", uid="ua", ips=["10.244.0.2"], isolation=Isolation())
POD_B = PolicedPod(namespace="x", name="b", uid="ub", ips=["10.244.0.3"], isolation=Isolation())
ONLY_A = NodeRuleSetSpec(nodeName="n1", pods=[POD_A])
BOTH = NodeRuleSetSpec(nodeName="n1", pods=[POD_A, POD_B])
PORTS = {"10.244.0.2": VETH_A, "10.244.0.3": VETH_B}


def test_an_uncovered_veth_is_held_from_before_its_ip_until_its_rules_arrive():
    book = next_book(HoldBook(), ONLY_A, {"10.244.0.2": VETH_A}, {11: VETH_B}, now=100.0, timeout=60)
    assert book.held == (HeldPort(VETH_B, ()),) and book.started == book.held
    assert book.next_deadline == 160.0
    book = next_book(book, ONLY_A, PORTS, {}, now=100.5, timeout=60)  # the IP appeared
    assert book.held == (HeldPort(VETH_B, ("10.244.0.3",)),) and book.started == ()
    assert book.next_deadline == 160.0, "the clock runs from when the veth was first held"
    book = next_book(book, BOTH, PORTS, {}, now=101.25, timeout=60)
    assert book.held == () and book.next_deadline is None
    assert book.covered == ((HeldPort(VETH_B, ("10.244.0.3",)), 1.25),)


def test_a_hold_times_out_and_the_veth_stays_released_until_covered_or_gone():
    book = next_book(HoldBook(), ONLY_A, PORTS, {}, now=0.0, timeout=60)
    book = next_book(book, ONLY_A, PORTS, {}, now=59.9, timeout=60)
    assert book.held and not book.timed_out
    book = next_book(book, ONLY_A, PORTS, {}, now=60.0, timeout=60)
    assert book.held == () and book.timed_out == (HeldPort(VETH_B, ("10.244.0.3",)),)
    assert list(book.released) == [11] and book.next_deadline is None
    book = next_book(book, ONLY_A, PORTS, {}, now=500.0, timeout=60)
    assert book.held == () and book.timed_out == () and list(book.released) == [11]
    assert next_book(book, BOTH, PORTS, {}, now=501.0, timeout=60).released == {}
    gone = next_book(book, ONLY_A, {"10.244.0.2": VETH_A}, {}, now=501.0, timeout=60)
    assert gone.released == {} and gone.gone == (11,)


def test_a_pod_dropped_from_the_rule_set_is_held_again_with_a_fresh_clock():
    book = next_book(HoldBook(), BOTH, PORTS, {}, now=0.0, timeout=60)
    assert book.held == ()
    book = next_book(book, ONLY_A, PORTS, {}, now=1000.0, timeout=60)  # deleted; its veth lingers
    assert book.held == (HeldPort(VETH_B, ("10.244.0.3",)),) and book.next_deadline == 1060.0


def test_only_the_uncovered_ips_of_a_covered_veth_are_held():
    ports = {**PORTS, "10.244.0.9": VETH_A}
    book = next_book(HoldBook(), BOTH, ports, {}, now=0.0, timeout=60)
    assert book.held == (HeldPort(VETH_A, ("10.244.0.9",)),)


# --------------------------------------------------------------------------- the agent's timer
class LoadedKernel(RecordingKernel):
    """Reads back what the agent last loaded, as a kernel that keeps it does: the agent checks
    its anti-spoofing in the kernel after syncs (tests/kernel covers the real read-back)."""

    agent: Agent | None = None

    def set_elements(self, family, table, names):
        if self.agent is None or self.agent.applied is None:
            return {}
        model = self.agent.applied.ruleset.table(family, table)
        out = {}
        for name in names:
            found = model.maps.get(name) or model.sets.get(name)
            if found is not None:
                out[name] = [ElementInfo((e[0],), verdict=(e[1].kind, e[1].target)) if isinstance(e[1], Verdict)
                             else ElementInfo(tuple(v if isinstance(v, (int, str)) else str(v) for v in e))
                             for e in found.elements]
        return out


def agent_with(kernel: RecordingKernel, tmp_path, **config) -> Agent:
    sysctl = tmp_path / "net" / "bridge"
    sysctl.mkdir(parents=True)
    for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        (sysctl / name).write_text("1\n")
    agent = Agent(AgentConfig(node="n1", metrics_bind_address=None, proc_sys=str(tmp_path), **config),
                  NullSource(), kernel)
    agent.set_ports(PORTS)
    agent.set_rule_set(NodeRuleSet.for_node(ONLY_A, generation=1))
    if isinstance(kernel, LoadedKernel):
        kernel.agent = agent
    return agent


def test_the_agent_releases_a_held_pod_at_the_timeout_without_other_input(tmp_path):
    kernel = LoadedKernel()
    agent = agent_with(kernel, tmp_path, hold_new_pods_timeout=0.5)
    thread = threading.Thread(target=agent.loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not agent.hold.released:
            time.sleep(0.01)
    finally:
        agent.stop()
        thread.join(timeout=10)
    (first_at, first), (released_at, second) = kernel.kinds[:2]
    assert (first, second) == ("full", "elements"), kernel.kinds
    assert 0.45 <= released_at - first_at < 1.5
    assert agent.hold.held == () and list(agent.hold.released) == [11]
    assert agent.metrics.hold_timeouts == 1 and agent.metrics.held_pods == 0


def test_new_pods_open_holds_nothing(tmp_path):
    agent = agent_with(LoadedKernel(), tmp_path, new_pods="open")
    agent.sync_once()
    assert agent.hold == HoldBook()
    assert HELD_INGRESS not in {str(v.target) for _, v in
                                agent.applied.ruleset.table("inet", "netfence").maps["ingress_v4"].elements}


def test_a_released_pod_makes_the_node_degraded_until_it_is_covered(tmp_path):
    reports = []
    agent = agent_with(LoadedKernel(), tmp_path, hold_new_pods_timeout=0.05)
    agent.source.report = reports.append
    agent.sync_once()
    time.sleep(0.1)
    agent.sync_once()
    degraded = next(c for c in reports[-1].conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "NewPodsReleasedUnpoliced")
    assert "vethb (10.244.0.3)" in degraded.message
    agent.set_rule_set(NodeRuleSet.for_node(BOTH, generation=2))
    agent.sync_once()
    assert next(c for c in reports[-1].conditions if c.type == "Degraded").status == "False"


# --------------------------------------------------------------------------- metrics, drop log
def test_held_metrics_by_direction_and_not_among_the_policy_drops():
    readings = {("inet", "netfence", HELD_EGRESS): CounterValue(2, 120), ("bridge", "netfence", HELD_VETH): CounterValue(3, 90),
                ("inet", "netfence", HELD_INGRESS): CounterValue(4, 240)}
    metrics = AgentMetrics(read_counters=lambda: readings)
    metrics.set_labels({HELD_EGRESS: HELD_LABELS["egress"], HELD_VETH: HELD_LABELS["egress"],
                        HELD_INGRESS: HELD_LABELS["ingress"]})
    metrics.holds(2, [0.8, 1.3], 1)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("netfence_held_packets_total", (("direction", "egress"),))] == 5
    assert samples[("netfence_held_packets_total", (("direction", "ingress"),))] == 4
    assert samples[("netfence_held_pods", ())] == 2
    assert samples[("netfence_hold_timeouts_total", ())] == 1
    assert samples[("netfence_pod_hold_duration_seconds_count", ())] == 2
    assert samples[("netfence_pod_hold_duration_seconds_bucket", (("le", "1.0"),))] == 1
    assert not families["netfence_dropped_packets"].samples, "held drops are not a pod's policy drops"
    assert families["netfence_held_pods"].type == "gauge" and families["netfence_held_packets"].type == "counter"


def test_a_logged_held_drop_says_held_and_its_direction():
    packet = LoggedPacket(prefix=f"netfence:{HELD_VETH}", hw_protocol=0x0800, payload=b"")
    record = drop_record(packet, {HELD_VETH: HELD_LABELS["egress"]})
    assert (record["direction"], record["reason"]) == ("egress", "held-new-pod")
