"""The agent end to end: a node netns with cni0 (br_netfilter on), pods on veths with TCP and UDP
servers, the agent as a process in the node netns reading its rule set from a file.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from kernel.conftest import HELPERS, PYTHON, REPO, Node, Pod, in_netns, owned_tables, probe, run_ip, wait_serving
from netfence_api import AllowRule, Isolation, NodeRuleSet, NodeRuleSetSpec, PeerGroup, PolicedPod, PortRange, TierRule
from netfence_agent.render import counter_name

pytestmark = pytest.mark.kernel

TCP80 = PortRange(protocol="TCP", port=80)
UDP80 = PortRange(protocol="UDP", port=80)


def policed(pod: Pod, ingress: list[AllowRule] | None = None, egress: list[AllowRule] | None = None) -> PolicedPod:
    return PolicedPod(
        namespace=pod.namespace, name=pod.name, uid=f"uid-{pod.name}", ips=[pod.ip],
        isolation=Isolation(ingress=ingress is not None, egress=egress is not None),
        ingressPolicies=[f"{pod.namespace}/in"] if ingress is not None else [],
        egressPolicies=[f"{pod.namespace}/out"] if egress is not None else [],
        ingress=ingress or [], egress=egress or [],
    )


def allow(group: str | None, *ports: PortRange, origin: str = "x/policy ingress[0]") -> AllowRule:
    return AllowRule(origin=[origin], peers=group, ports=list(ports) or None)


def group(name: str, *pods: Pod, extra: tuple[str, ...] = ()) -> PeerGroup:
    return PeerGroup(name=name, selector=f"pods {name}", cidrs=[f"{p.ip}/32" for p in pods] + list(extra))


def rule_set(node: Node, pods: list[PolicedPod], groups: list[PeerGroup], generation: int) -> NodeRuleSet:
    spec = NodeRuleSetSpec(nodeName=node.name, pods=pods, peerGroups=groups)
    return NodeRuleSet.for_node(spec, generation=generation)


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    return None


def three_pods(node: Node) -> tuple[Pod, Pod, Pod]:
    pods = tuple(node.add_pod("x", name) for name in ("a", "b", "c"))
    for pod in pods:
        wait_serving(pod)
    return pods


def started(node: Node, rs: NodeRuleSet, *extra: str, **kwargs) -> subprocess.Popen:
    spec_hash = node.write_rules(rs)
    agent = node.start_agent(*extra, **kwargs)
    node.wait_applied(spec_hash)
    return agent


# --------------------------------------------------------------------------- policy
def test_allowed_connects_denied_is_dropped_and_counted(node: Node):
    a, b, c = three_pods(node)
    pods = [
        policed(c, ingress=[allow("from-a", TCP80, UDP80)]),          # c: only a, only port 80
        policed(a, egress=[allow("to-c", origin="x/policy egress[0]")]),  # a: only to c
        policed(b),
    ]
    started(node, rule_set(node, pods, [group("from-a", a), group("to-c", c)], 1))

    assert probe(a, c, 80) and probe(a, c, 80, udp=True)
    assert not probe(a, c, 81, timeout=0.5) and not probe(a, c, 81, udp=True, timeout=0.5)
    assert not probe(b, c, 80, timeout=0.5) and not probe(b, c, 80, udp=True, timeout=0.5)
    assert not probe(a, b, 80, timeout=0.5), "a's egress allows only c"
    assert probe(b, a, 80) and probe(c, b, 80), "not isolated for ingress: open"

    code, text = node.http("/metrics")
    assert code == 200
    assert metric(text, "netfence_dropped_packets_total", direction="ingress", namespace="x", pod="c") >= 4
    assert metric(text, "netfence_dropped_bytes_total", direction="ingress", namespace="x", pod="c") > 0
    assert metric(text, "netfence_dropped_packets_total", direction="egress", namespace="x", pod="a") >= 1
    assert metric(text, "netfence_dropped_packets_total", direction="ingress", namespace="x", pod="a") is None
    assert metric(text, "netfence_rules_applied_total") >= 1
    assert metric(text, "netfence_rule_apply_failures_total") == 0
    assert metric(text, "netfence_ruleset_generation") == 1
    assert metric(text, "netfence_rule_apply_duration_seconds_count") >= 1
    assert node.http("/readyz")[0] == 200 and node.http("/healthz")[0] == 200


def tier_rule(action: str, group: str, *ports: PortRange, tier: str = "Admin", rule: str = "ingress[0]",
              name: str = "") -> TierRule:
    return TierRule(action=action, policy=f"cnp-{action.lower()}", tier=tier, priority=10, rule=rule, name=name,
                    peers=group, ports=list(ports) or None)


def test_cluster_network_policy_tiers_in_the_kernel(node: Node):
    """Admin Deny beats nothing-isolating, Admin Accept beats a NetworkPolicy default deny,
    Pass falls to NetworkPolicy, a pod's traffic to its own node meets Admin egress rules;
    a Deny drop is counted for the pod and for the rule."""
    a, b, c = three_pods(node)
    node_server = subprocess.Popen(["ip", "netns", "exec", node.netns, PYTHON, str(HELPERS / "netprobe.py"),
                                    "serve", "--port", "82"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    b.servers.append(node_server)  # stopped with the pods, whatever happens
    node_address = f"{node.prefix}.1"  # cni0's address: the node itself
    pods = [
        # c: not isolated; the Admin tier denies b, passes a (NetworkPolicy then: none -> allowed)
        PolicedPod(namespace="x", name="c", uid="uid-c", ips=[c.ip], adminIngress=[
            tier_rule("Pass", "from-a"), tier_rule("Deny", "from-b", TCP80, rule="ingress[1]", name="no-b")]),
        # a: NetworkPolicy denies all egress, the Admin tier accepts to c on 80 and denies the node on 82
        PolicedPod(namespace="x", name="a", uid="uid-a", ips=[a.ip], isolation=Isolation(egress=True),
                   egressPolicies=["x/deny-egress"], adminEgress=[
                       tier_rule("Accept", "to-c", TCP80, rule="egress[0]"),
                       tier_rule("Deny", "the-node", PortRange(protocol="TCP", port=82), rule="egress[1]")]),
        # b: Baseline denies egress to the node, nothing isolates b
        PolicedPod(namespace="x", name="b", uid="uid-b", ips=[b.ip], baselineEgress=[
            tier_rule("Deny", "the-node", tier="Baseline", rule="egress[0]", name="no-node")]),
    ]
    groups = [group("from-a", a), group("from-b", b), group("to-c", c),
              PeerGroup(name="the-node", selector="the node", cidrs=[f"{node_address}/32"])]
    started(node, rule_set(node, pods, groups, 1))

    assert probe(a, c, 80), "Admin Accept overrides the NetworkPolicy default deny"
    assert not probe(a, c, 81, timeout=0.5), "not accepted by the Admin tier: the NetworkPolicy decides"
    assert not probe(a, b, 80, timeout=0.5)
    assert not probe(b, c, 80, timeout=0.5) and not probe(b, c, 80, timeout=0.5), "Admin Deny"
    assert probe(b, c, 81), "the Deny rule is for port 80 only; c is not isolated"
    assert probe(c, a, 80) and probe(c, b, 80), "no rule for these directions"
    assert not probe(a, node_address, 82, timeout=0.5), "Admin egress Deny to the pod's own node"
    assert not probe(b, node_address, 82, timeout=0.5), "Baseline egress Deny to the pod's own node"
    assert probe(c, node_address, 82), "no ClusterNetworkPolicy egress for c: its node stays reachable"

    text = node.http("/metrics")[1]
    assert metric(text, "netfence_dropped_packets_total", direction="ingress", namespace="x", pod="c") >= 2
    assert metric(text, "netfence_policy_rule_dropped_packets_total", policy="cnp-deny", tier="Admin", rule="no-b",
                  direction="ingress") >= 2
    assert metric(text, "netfence_policy_rule_dropped_bytes_total", policy="cnp-deny", tier="Admin", rule="no-b",
                  direction="ingress") > 0
    assert metric(text, "netfence_policy_rule_dropped_packets_total", policy="cnp-deny", tier="Baseline",
                  rule="no-node", direction="egress") >= 1
    assert metric(text, "netfence_dropped_packets_total", direction="egress", namespace="x", pod="b") >= 1


def test_drop_counts_stay_monotonic_when_counters_are_recreated_and_resynced(node: Node):
    a, b, c = three_pods(node)
    groups = [group("from-a", a)]
    with_c = rule_set(node, [policed(c, ingress=[allow("from-a", TCP80)]), policed(a), policed(b)], groups, 1)
    started(node, with_c)
    for _ in range(3):
        assert not probe(b, c, 80, timeout=0.3)
    first = metric(node.http("/metrics")[1], "netfence_dropped_packets_total", direction="ingress", namespace="x", pod="c")
    assert first and first >= 3

    # c no longer isolated: its counter is deleted from the kernel; the metric keeps its total.
    node.wait_applied(node.write_rules(rule_set(node, [policed(a), policed(b), policed(c)], groups, 2)))
    assert metric(node.http("/metrics")[1], "netfence_dropped_packets_total", direction="ingress", namespace="x", pod="c") == first
    # Isolated again: a new kernel counter from zero; the metric goes on from where it was.
    node.wait_applied(node.write_rules(with_c.model_copy(update={"metadata": with_c.metadata.model_copy(update={"generation": 3})})))
    assert not probe(b, c, 80, timeout=0.3)
    second = metric(node.http("/metrics")[1], "netfence_dropped_packets_total", direction="ingress", namespace="x", pod="c")
    assert second >= first + 1

    # Someone deletes our bridge table: the next sync is a full one (counters re-declared, kept).
    in_netns(node.netns, "nft", "delete", "table", "bridge", "netfence")
    node.wait_applied(node.write_rules(with_c.model_copy(update={"metadata": with_c.metadata.model_copy(update={"generation": 4})})))
    assert "full sync" in node.agent_log()
    assert not probe(b, c, 80, timeout=0.3)
    third = metric(node.http("/metrics")[1], "netfence_dropped_packets_total", direction="ingress", namespace="x", pod="c")
    kernel = json.loads(in_netns(node.netns, "nft", "-j", "list", "counter", "inet", "netfence",
                                 counter_name("x", "c", "ingress")).stdout)
    in_kernel = next(i["counter"]["packets"] for i in kernel["nftables"] if "counter" in i)
    assert third == first + in_kernel, "counted once: the full sync kept the kernel counter"
    assert owned_tables(node.nft_tables()) == ["table inet netfence", "table bridge netfence"]


# --------------------------------------------------------------------------- atomicity
def start_prober(source: Pod, allow_targets: list[str], deny_targets: list[str]) -> subprocess.Popen:
    args = [a for t in allow_targets for a in ("--allow", t)] + [a for t in deny_targets for a in ("--deny", t)]
    prober = subprocess.Popen(["ip", "netns", "exec", source.netns, PYTHON, str(HELPERS / "netprobe.py"), "loop", *args],
                              stdout=subprocess.PIPE, text=True)
    assert prober.stdout.readline().strip() == "ready"
    return prober


def stop_prober(prober: subprocess.Popen) -> dict:
    prober.terminate()
    out, _ = prober.communicate(timeout=30)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_100_rule_set_changes_under_continuous_traffic_never_break_a_connection(node: Node):
    a, b, c = three_pods(node)
    d = node.add_pod("y", "d")
    wait_serving(d)

    def variant(i: int) -> NodeRuleSet:
        # Every variant: a -> b:80 allowed (TCP, UDP), a -> d:80 allowed, a -> c:80 denied.
        # Odd steps change only peer group members (element-level syncs); even steps also
        # change rules, the chain of c (the one denying a), a's egress isolation and pods
        # (partial syncs). A transaction that was not atomic would open windows in c's chain
        # (denied traffic passes) or b's (allowed traffic dropped).
        j = i // 2
        extra = (f"10.9.{i % 7}.1/32",) if i % 2 else ()  # single addresses: the set kind stays
        c_ports = [[TCP80], [TCP80, PortRange(protocol="TCP", port=81)], [UDP80, TCP80]][j % 3]
        b_rules = [allow("from-a", TCP80, UDP80)] + ([allow("other", TCP80, origin=f"x/p{j}")] if j % 3 == 0 else [])
        pods = [policed(b, ingress=b_rules), policed(c, ingress=[allow("other", *c_ports, origin=f"x/c{j}")]),
                policed(a, egress=[allow("a-to", origin="x/e egress[0]")] if j % 2 else None), policed(d)]
        if j % 5 == 0:
            pods.append(PolicedPod(namespace="z", name=f"ghost-{j}", ips=[f"10.244.9.{j % 200 + 1}"],
                                   isolation=Isolation(ingress=True), ingressPolicies=["z/p"]))
        groups = [group("from-a", a, extra=extra), group("other", d, extra=extra), group("a-to", b, d)]
        return rule_set(node, pods, groups, i + 1)

    started(node, variant(0))
    denied = [f"{c.ip}:80", f"{c.ip}:80/udp"] * 4  # several at once: a short window is hit sooner
    prober = start_prober(a, [f"{b.ip}:80", f"{b.ip}:80/udp", f"{d.ip}:80"], denied)
    try:
        for i in range(1, 101):
            node.wait_applied(node.write_rules(variant(i)))
    finally:
        summary = stop_prober(prober)
    log = node.agent_log()
    assert log.count("applied generation") >= 100
    assert "elements sync" in log and "partial sync" in log
    assert summary["allowed_attempts"] > 100 and summary["denied_attempts"] > 20, summary
    assert summary["allowed_failures"] == 0 and summary["syn_retransmits"] == 0, summary
    assert summary["denied_successes"] == 0, summary["failures"]


# --------------------------------------------------------------------------- restart
def test_rules_stay_when_the_agent_stops_and_a_restart_has_no_gap(node: Node):
    a, b, c = three_pods(node)
    rs = rule_set(node, [policed(b, ingress=[allow("from-a", TCP80)]), policed(a), policed(c)], [group("from-a", a)], 1)
    agent = started(node, rs)
    prober = start_prober(a, [f"{b.ip}:80"], [])
    denier = start_prober(c, [], [f"{b.ip}:80"])
    try:
        node.stop_agent(agent)
        assert agent.returncode == 0
        assert "rules stay loaded" in node.agent_log()
        assert owned_tables(node.nft_tables()) == ["table inet netfence", "table bridge netfence"]
        time.sleep(1.0)  # enforcing without an agent
        node.start_agent()
        node.wait_status(lambda s: node.agent_log().count("applied generation") >= 2)
        time.sleep(0.5)
    finally:
        allowed, denied = stop_prober(prober), stop_prober(denier)
    assert "from a previous run are in the kernel" in node.agent_log()
    assert allowed["allowed_attempts"] > 10 and allowed["allowed_failures"] == allowed["syn_retransmits"] == 0, allowed
    assert denied["denied_attempts"] > 5 and denied["denied_successes"] == 0, denied
    assert owned_tables(node.nft_tables()) == ["table inet netfence", "table bridge netfence"]


def test_a_periodic_full_sync_repairs_what_others_changed_in_our_tables(node: Node):
    a, b, c = three_pods(node)
    rs = rule_set(node, [policed(b, ingress=[allow("from-a", TCP80)]), policed(a), policed(c)], [group("from-a", a)], 1)
    started(node, rs, "--full-sync-period", "2")
    assert not probe(c, b, 80, timeout=0.5)
    # Someone opens everything by hand and leaves a chain of their own in our table.
    in_netns(node.netns, "nft", "insert", "rule", "inet", "netfence", "forward_hook", "accept")
    in_netns(node.netns, "nft", "add", "chain", "inet", "netfence", "by_hand")
    assert probe(c, b, 80), "the edit took effect"
    def listing() -> str:
        return in_netns(node.netns, "nft", "list", "table", "inet", "netfence").stdout
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "by_hand" in listing():
        time.sleep(0.2)
    assert "by_hand" not in listing()
    assert not probe(c, b, 80, timeout=0.5), "denied again"
    assert probe(a, b, 80)
    assert "full sync: periodic, every 2 s" in node.agent_log()


def test_cleanup_removes_the_netfence_tables_and_nothing_else(node: Node):
    a, b, c = three_pods(node)
    agent = started(node, rule_set(node, [policed(b, ingress=[])], [], 1))
    node.stop_agent(agent)
    in_netns(node.netns, "nft", "add", "table", "inet", "not_ours")
    env = {"PYTHONPATH": f"{REPO}/agent:{REPO}/operator", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    out = subprocess.run(["ip", "netns", "exec", node.netns, PYTHON, "-m", "netfence_agent", "cleanup"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert owned_tables(node.nft_tables()) == []
    assert "table inet not_ours" in node.nft_tables()
    assert probe(a, b, 80), "no rules left"


# --------------------------------------------------------------------------- anti-spoofing
def test_spoofed_source_ip_and_mac_are_dropped_and_counted(node: Node):
    a, b, c = three_pods(node)
    started(node, rule_set(node, [policed(a), policed(b), policed(c)], [], 1))
    assert probe(a, b, 80)

    run_ip("addr", "add", "10.244.0.200/24", "dev", "eth0", netns=a.netns)
    out = in_netns(a.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", b.ip, "80", "--source", "10.244.0.200",
                   "--timeout", "0.5", check=False)
    assert out.returncode == 1, "another source IP leaves a's veth: dropped"
    run_ip("addr", "del", "10.244.0.200/24", "dev", "eth0", netns=a.netns)
    assert probe(a, b, 80)

    run_ip("link", "set", "eth0", "address", "02:42:de:ad:be:ef", netns=a.netns)
    assert not probe(a, b, 80, timeout=0.5), "another MAC: dropped"
    assert not probe(a, b, 80, udp=True, timeout=0.5)
    run_ip("link", "set", "eth0", "address", a.mac, netns=a.netns)
    assert probe(a, b, 80, timeout=3)

    spoofed = metric(node.http("/metrics")[1], "netfence_spoofed_packets_total", namespace="x", pod="a")
    assert spoofed and spoofed >= 3
    assert metric(node.http("/metrics")[1], "netfence_spoofed_packets_total", namespace="x", pod="b") == 0


def test_a_pod_sending_as_another_local_pod_from_its_own_veth_is_dropped(node: Node):
    """Another pod's IP and MAC are in the node's address sets; only the veth they came in on
    tells the impostor apart, so the fast path must key on it too."""
    a, b, c = three_pods(node)
    started(node, rule_set(node, [policed(a), policed(b), policed(c)], [], 1))
    run_ip("link", "set", "eth0", "address", b.mac, netns=a.netns)
    run_ip("addr", "add", f"{b.ip}/32", "dev", "eth0", netns=a.netns)
    # Without ARP (which would be dropped first), so the datagrams themselves reach the bridge.
    run_ip("neigh", "replace", c.ip, "lladdr", c.mac, "dev", "eth0", "nud", "permanent", netns=a.netns)
    sent = 5
    for _ in range(sent):
        out = in_netns(a.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", c.ip, "80", "--udp", "--source", b.ip,
                       "--timeout", "0.2", check=False)
        assert out.returncode == 1, "no answer: the datagram must not get past a's veth"
    text = node.http("/metrics")[1]
    assert (metric(text, "netfence_spoofed_packets_total", namespace="x", pod="a") or 0) >= sent
    assert metric(text, "netfence_spoofed_packets_total", namespace="x", pod="b") == 0
    assert probe(b, c, 80), "the real b is not affected"


# --------------------------------------------------------------------------- a bad rule set
def test_a_rejected_rule_set_keeps_the_last_good_rules_and_says_so(node: Node):
    a, b, c = three_pods(node)
    good = rule_set(node, [policed(b, ingress=[allow("from-a", TCP80)]), policed(a), policed(c)], [group("from-a", a)], 1)
    started(node, good)
    good_hash = good.spec.content_hash()
    # Overlapping CIDRs in one peer group: the interval set refuses them.
    bad = rule_set(node, [policed(b, ingress=[allow("from-a", TCP80)]), policed(a), policed(c)],
                   [group("from-a", a, extra=("192.168.0.0/16", "192.168.1.0/24"))], 2)
    node.write_rules(bad)
    status = node.wait_status(lambda s: any(c["type"] == "Degraded" and c["status"] == "True" for c in s["conditions"]))
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "KernelRejected" and "interval" in degraded["message"]
    assert status["appliedHash"] == good_hash and status["observedGeneration"] == 2
    assert next(c for c in status["conditions"] if c["type"] == "Applied")["status"] == "False"
    code, text = node.http("/metrics")
    assert metric(text, "netfence_rule_apply_failures_total") >= 1
    assert metric(text, "netfence_ruleset_generation") == 1
    code, reason = node.http("/readyz")
    assert code == 503 and "rejected" in reason
    assert probe(a, b, 80) and not probe(c, b, 80, timeout=0.5), "generation 1 still enforced"
    # It retries with backoff (more failures counted), and a good rule set heals it.
    time.sleep(1.6)
    assert metric(node.http("/metrics")[1], "netfence_rule_apply_failures_total") >= 2
    fixed = rule_set(node, good.spec.pods, [group("from-a", a, extra=("192.168.0.0/16",))], 3)
    status = node.wait_applied(node.write_rules(fixed))
    assert next(c for c in status["conditions"] if c["type"] == "Degraded")["status"] == "False"
    assert node.http("/readyz")[0] == 200


# --------------------------------------------------------------------------- discovery
def test_a_new_veth_gets_its_rules_within_milliseconds(node: Node, record_property):
    a, b, c = three_pods(node)
    late_ip = f"{node.prefix}.50"
    spec_pods = [policed(a), policed(b), policed(c),
                 PolicedPod(namespace="x", name="late", ips=[late_ip], isolation=Isolation())]
    started(node, rule_set(node, spec_pods, [], 1))
    netns = node.netns_factory("pod")
    (node.netns_dir / netns).symlink_to(f"/var/run/netns/{netns}")  # containerd makes the netns first
    veth = "vethfeed0001"
    t0 = time.monotonic()
    run_ip("link", "add", "eth0", "address", "02:42:0a:f4:00:32", "type", "veth", "peer", "name", veth,
           "netns", node.netns, netns=netns)
    run_ip("link", "set", veth, "master", "cni0", "up", netns=node.netns)
    run_ip("link", "set", "eth0", "up", netns=netns)
    run_ip("addr", "add", f"{late_ip}/24", "dev", "eth0", netns=netns)  # the CNI plugin's order: address last
    wired = time.monotonic()
    deadline = t0 + 10
    while time.monotonic() < deadline:
        listing = in_netns(node.netns, "nft", "list", "map", "bridge", "netfence", "pod_ports").stdout
        if veth in listing:
            break
        time.sleep(0.002)
    seen = time.monotonic()
    latency_ms = (seen - wired) * 1000
    record_property("new_veth_rules_ms", round(latency_ms, 1))
    print(f"new veth: anti-spoofing rules {latency_ms:.1f} ms after its IP was set "
          f"({(seen - t0) * 1000:.1f} ms after the veth was created)")
    assert veth in listing, node.agent_log()
    assert latency_ms < 1000
    counter = json.loads(in_netns(node.netns, "nft", "-j", "list", "counters", "table", "bridge", "netfence").stdout)
    assert counter_name("x", "late", "spoof") in json.dumps(counter)


def test_pods_found_through_the_cni_cache_alone_and_stale_records_ignored(node: Node):
    a = node.add_pod("x", "a", netns_link=False, cni_record=True)  # no netns file: cache only
    b = node.add_pod("x", "b", cni_record=True)
    gone = node.add_pod("x", "gone", serve=False, netns_link=False, cni_record=True)
    run_ip("link", "del", gone.veth, netns=node.netns)  # the record outlives its veth
    pods = [policed(p) for p in (a, b, gone)]
    started(node, rule_set(node, pods, [], 1))
    listing = in_netns(node.netns, "nft", "list", "map", "bridge", "netfence", "pod_ports").stdout
    assert a.veth in listing and b.veth in listing and gone.veth not in listing


# --------------------------------------------------------------------------- drop log, br_netfilter
def test_log_drops_writes_one_json_line_per_drop(node: Node):
    a, b, c = three_pods(node)
    out_path = node.workdir / "drops.jsonl"
    with open(out_path, "w") as out:
        started(node, rule_set(node, [policed(b, ingress=[allow("from-a", TCP80)]), policed(a), policed(c)],
                               [group("from-a", a)], 1), "--log-drops", stdout=out)
        assert not probe(c, b, 80, timeout=0.3)
        assert not probe(c, b, 81, udp=True, timeout=0.3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and out_path.read_text().count("\n") < 2:
            time.sleep(0.05)
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    tcp = next(r for r in records if r["protocol"] == "tcp")
    assert (tcp["namespace"], tcp["pod"], tcp["direction"], tcp["reason"]) == ("x", "b", "ingress", "policy")
    assert (tcp["src"], tcp["dst"], tcp["dport"]) == (c.ip, b.ip, 80) and tcp["sport"] > 0
    udp = next(r for r in records if r["protocol"] == "udp")
    assert (udp["pod"], udp["dport"]) == ("b", 81)


def test_br_netfilter_is_turned_on_at_start(node: Node):
    in_netns(node.netns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0")
    a, b, c = three_pods(node)
    started(node, rule_set(node, [policed(b, ingress=[])], [], 1))
    for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
        assert in_netns(node.netns, "sysctl", "-n", key).stdout.strip() == "1"
    assert not probe(a, b, 80, timeout=0.5), "same-node traffic reaches the policy"
    assert node.http("/readyz")[0] == 200
