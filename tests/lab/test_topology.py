"""The lab's topology with real packets and no policies (root, network namespaces)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.labkit import DEMO_CLUSTER, K3S_CLUSTER, lab_netns, netfence_lab_cli
from netfence_lab import system
from netfence_lab.lab import Lab
from netfence_lab.state import StateStore

pytestmark = pytest.mark.lab


def all_true(matrix):
    return [f"{s}->{d}" for s, row in matrix.items() for d, ok in row.items() if not ok]


def vxlan_tx_packets(netns: str) -> int:
    out = json.loads(system.ip(netns, "-s", "-j", "link", "show", "flannel.1"))
    return out[0]["stats64"]["tx"]["packets"]


def test_every_pod_reaches_every_pod_tcp_and_udp_same_and_cross_node(make_lab):
    lab = make_lab(DEMO_CLUSTER)
    plan = lab.store.load().lab_plan()
    assert len(plan.nodes) == 2 and len(plan.pods) == 9
    pods = {p.key: p for p in plan.pods}
    cross = [(s, d) for s in pods for d in pods if pods[s].node != pods[d].node]
    same = [(s, d) for s in pods for d in pods if s != d and pods[s].node == pods[d].node]
    assert cross and same
    before = {n.name: vxlan_tx_packets(n.netns) for n in plan.nodes}
    for port, proto in ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")):
        m = lab.probe(port, proto)
        assert list(m) == list(pods) and all(list(row) == list(pods) for row in m.values())
        assert all_true(m) == [], f"{port}/{proto}"
    # cross-node pairs went through the VXLAN devices: each node sent over flannel.1
    after = {n.name: vxlan_tx_packets(n.netns) for n in plan.nodes}
    assert all(after[n] - before[n] >= len(cross) // 2 for n in after), (before, after)


def test_unserved_port_is_reported_closed(make_lab):
    lab = make_lab(DEMO_CLUSTER)
    for proto in ("TCP", "UDP"):
        m = lab.probe(82, proto)
        assert not any(ok for row in m.values() for ok in row.values()), proto


def test_nodes_reach_their_local_pods(make_lab):
    lab = make_lab(DEMO_CLUSTER)
    plan = lab.store.load().lab_plan()
    for proto in ("TCP", "UDP"):
        m = lab.probe(80, proto, from_nodes=True)
        assert set(m) == {f"node/{n.name}" for n in plan.nodes}
        for n in plan.nodes:
            assert set(m[f"node/{n.name}"]) == {p.key for p in plan.pods if p.node == n.name}
        assert all_true(m) == [], proto


def test_node_layout_is_flannels(make_lab):
    lab = make_lab(DEMO_CLUSTER)
    plan = lab.store.load().lab_plan()
    n1, n2 = plan.nodes
    ns = n1.netns
    sysctl = system.run(["ip", "netns", "exec", ns, "sysctl", "-n",
                         "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables", "net.ipv4.ip_forward"])
    assert sysctl.split() == ["1", "1", "1"]
    link = json.loads(system.ip(ns, "-d", "-j", "link", "show", "flannel.1"))[0]
    vx = link["linkinfo"]["info_data"]
    assert (vx["id"], vx["port"], vx["learning"], vx["local"]) == (1, 8472, False, n1.underlay_ip)
    assert link["mtu"] == 1450
    addrs = json.loads(system.ip(ns, "-j", "addr", "show", "flannel.1"))[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [(n1.vtep_ip, 32)]
    cni0 = json.loads(system.ip(ns, "-j", "addr", "show", "cni0"))[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in cni0 if a["family"] == "inet"] == [(n1.cni0_ip, 24)]
    route = json.loads(system.ip(ns, "-j", "route", "show", n2.pod_cidr))[0]
    assert route["gateway"] == n2.vtep_ip and route["dev"] == "flannel.1" and "onlink" in route["flags"]
    neigh = json.loads(system.ip(ns, "-j", "neigh", "show", "dev", "flannel.1"))
    assert any(x["dst"] == n2.vtep_ip and x["lladdr"] == n2.vtep_mac and "PERMANENT" in x["state"] for x in neigh)
    fdb = json.loads(system.bridge(ns, "-j", "fdb", "show", "dev", "flannel.1"))
    assert any(x.get("mac") == n2.vtep_mac and x.get("dst") == n2.underlay_ip for x in fdb)
    # pods: veth on cni0 with hairpin, CNI record 0600 naming the veth and the pod netns
    for p in (p for p in plan.pods if p.node == n1.name):
        veth = json.loads(system.ip(ns, "-d", "-j", "link", "show", p.veth))[0]
        assert veth["master"] == "cni0" and veth["linkinfo"]["info_slave_data"]["hairpin"] is True
        rec = lab.store.node_dir(n1.name) / "cni" / "results" / f"cbr0-{p.sandbox_id}-eth0"
        assert stat.S_IMODE(rec.stat().st_mode) == 0o600
        r = json.loads(rec.read_text())
        assert r["result"]["interfaces"][1]["name"] == p.veth
        assert Path(r["result"]["interfaces"][2]["sandbox"]).name == p.netns and system.netns_exists(p.netns)
        eth0 = json.loads(system.ip(p.netns, "-j", "addr", "show", "eth0"))[0]
        assert eth0["address"] == p.mac and eth0["mtu"] == 1450
        assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == [p.ip]
        default = json.loads(system.ip(p.netns, "-j", "route", "show", "default"))[0]
        assert default["gateway"] == n1.cni0_ip
        # wired by the CNI plugins: flannel's route to the cluster network, host-local's lease in the lab dir
        cluster = json.loads(system.ip(p.netns, "-j", "route", "show", plan.cluster_cidr))[0]
        assert cluster["gateway"] == n1.cni0_ip
        lease = lab.store.node_dir(n1.name) / "cni" / "networks" / "cbr0" / p.ip
        assert lease.read_text().splitlines()[0] == p.sandbox_id
        assert not Path("/var/lib/cni/networks/cbr0", p.ip).exists() or p.sandbox_id not in Path(
            "/var/lib/cni/networks/cbr0", p.ip).read_text()
        assert json.loads(system.ip(p.netns, "-j", "link", "show", "lo"))[0]["operstate"] == "UNKNOWN"  # loopback plugin


def test_k3s_shaped_cluster_hostnetwork_and_default_ports(make_lab):
    lab = make_lab(K3S_CLUSTER)
    plan = lab.store.load().lab_plan()
    serves = {p.key: {(x.port, x.protocol) for x in p.ports} for p in plan.pods}
    for port, proto in ((80, "TCP"), (81, "UDP"), (5432, "TCP"), (53, "UDP"), (8080, "TCP")):
        m = lab.probe(port, proto)
        for src, row in m.items():
            for dst, ok in row.items():
                assert ok == ((port, proto) in serves[dst]), f"{src}->{dst} {port}/{proto}"
    # unrelated node subnets (/32 + on-link routes) still carry VXLAN between the nodes
    assert lab.probe(80, "TCP")["apps/api"]["default/web"] is True
    assert any("80/SCTP not served" in n for n in lab.store.load().notes)


def test_dropped_packets_read_as_blocked_within_the_timeout(make_lab):
    """A drop (here: our own nft table in our own node netns) is a timeout, reported as blocked."""
    lab = make_lab(DEMO_CLUSTER)
    plan = lab.store.load().lab_plan()
    target = plan.pods[0]
    node = plan.node(target.node)
    rules = (f"table inet nflab_probe_test {{\n chain fwd_test {{\n  type filter hook forward priority 0;\n"
             f"  ip daddr {target.ip} tcp dport 80 drop\n  ip daddr {target.ip} udp dport 80 drop\n }}\n}}\n")
    system.run(["ip", "netns", "exec", node.netns, "nft", "-f", "-"], input=rules)
    try:
        for proto in ("TCP", "UDP"):
            t0 = time.monotonic()
            m = lab.probe(80, proto)
            took = time.monotonic() - t0
            blocked = sorted(f"{s}->{d}" for s, row in m.items() for d, ok in row.items() if not ok)
            # forwarded traffic to the target drops; the target to itself never leaves its netns
            expect = sorted(f"{p.key}->{target.key}" for p in plan.pods if p.key != target.key)
            assert blocked == expect, proto
            assert took < 6, f"{proto} probe took {took:.1f}s"
    finally:
        system.run(["ip", "netns", "exec", node.netns, "nft", "delete", "table", "inet", "nflab_probe_test"])


def test_down_removes_everything_and_is_idempotent(lab_dir):
    lab = Lab(StateStore(lab_dir))
    lab.up(_docs(), agents=False)
    state = lab.store.load()
    names = list(state.netns)
    pids = [(p.pid, p.starttime) for p in state.processes]
    assert len(names) == 1 + 2 + 9 and len(pids) == 9
    assert all(system.netns_exists(n) for n in names) and all(system.is_alive(*p) for p in pids)
    removed = lab.down()
    assert sum(r.startswith("netns") for r in removed) == len(names)
    assert not any(system.netns_exists(n) for n in names)
    assert not any(system.is_alive(*p) for p in pids)
    assert not lab_dir.exists()
    assert lab.down() == []


def test_up_refuses_a_second_lab_and_leaves_the_first_alone(make_lab):
    lab = make_lab(DEMO_CLUSTER)
    with pytest.raises(system.LabError, match="already recorded"):
        Lab(lab.store).up(_docs(), agents=False)
    assert all_true(lab.probe(80, "TCP")) == []


def test_cli_round_trip_and_probe_json_shape(lab_dir):
    try:
        r = netfence_lab_cli("up", "-f", str(DEMO_CLUSTER), "--no-agent")
        assert r.returncode == 0, r.stderr
        assert "9 pods" in r.stdout
        r = netfence_lab_cli("probe", "--port", "80/TCP", "-o", "json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["port"] == "80/TCP"
        keys = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]
        assert sorted(out["matrix"]) == keys and all(sorted(row) == keys for row in out["matrix"].values())
        assert all(v is True for row in out["matrix"].values() for v in row.values())
        r = netfence_lab_cli("probe", "--port", "81/udp")
        assert r.returncode == 0 and "x/a" in r.stdout and "X" not in r.stdout.splitlines()[-1]
        r = netfence_lab_cli("status")
        assert r.returncode == 0 and "server up" in r.stdout and "DOWN" not in r.stdout
        # without agents, apply records the policy set but says plainly that nothing enforces it
        pol = lab_dir.parent / "deny.yaml"
        pol.write_text("kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: d, namespace: x}\n"
                       "spec: {podSelector: {}}\n")
        r = netfence_lab_cli("apply", "-f", str(pol))
        assert r.returncode == 1 and "without agents" in r.stderr
        r = netfence_lab_cli("probe", "--port", "80/SCTP")
        assert r.returncode == 1 and "SCTP" in r.stderr
        r = netfence_lab_cli("probe", "--port", "eighty")
        assert r.returncode == 2
    finally:
        r = netfence_lab_cli("down")
    assert r.returncode == 0, r.stderr
    assert "removed 12 namespaces, 9 processes" in r.stdout
    r = netfence_lab_cli("down")
    assert r.returncode == 0 and "nothing was up" in r.stdout


def test_bad_manifest_exits_2_and_builds_nothing(lab_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\nmetadata: {name: a}\nspec: {nodeName: n}\nstatus: {podIP: 1.2.3.4}\n"
                   "---\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.9.0.0/24}\n")
    before = lab_netns()
    r = netfence_lab_cli("up", "-f", str(bad), "--no-agent")
    assert r.returncode == 2 and "Pod default/a" in r.stderr and "status.podIP" in r.stderr
    assert lab_netns() == before and not (lab_dir / "state.json").exists()


def test_crash_mid_up_then_down_cleans_up(lab_dir):
    """`lab up` dies hard after 4 pods (no teardown runs): the record still covers everything."""
    before = lab_netns()
    r = netfence_lab_cli("up", "-f", str(DEMO_CLUSTER), "--no-agent", env={"NETFENCE_LAB_CRASH_AFTER_PODS": "4"})
    assert r.returncode == 70, r.stderr
    state = StateStore(lab_dir).load()
    assert state is not None and state.phase == "building"
    made = lab_netns() - before
    assert len(made) == 1 + 2 + 4 and made == set(state.netns)
    servers = [p for p in state.processes if system.is_alive(p.pid, p.starttime)]
    assert len(servers) == 4
    r = netfence_lab_cli("down")
    assert r.returncode == 0, r.stderr
    assert lab_netns() == before
    assert not any(system.is_alive(p.pid, p.starttime) for p in servers)
    assert str(lab_dir) not in system.run(["ps", "-eo", "args"]), "a server of the crashed lab still runs"


def test_killed_mid_up_then_down_cleans_up(lab_dir):
    """SIGKILL `lab up` once some pods exist (whatever it was doing then); `lab down` removes it all."""
    before = lab_netns()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "agent"),
                                                        str(Path(__file__).parents[2] / "operator")])}
    proc = subprocess.Popen([sys.executable, "-m", "netfence_lab", "lab", "up", "-f", str(DEMO_CLUSTER), "--no-agent"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = StateStore(lab_dir)
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            state = store.load() if store.exists() else None
            if state is not None and len(state.netns) >= 6:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert store.load() is not None
    assert lab_netns() - before, "the kill came after nothing was made"
    r = netfence_lab_cli("down")
    assert r.returncode == 0, r.stderr
    assert lab_netns() == before
    assert not lab_dir.exists()
    assert str(lab_dir) not in system.run(["ps", "-eo", "args"]), "a server of the killed lab still runs"


def _docs():
    from netfence_lab.lab import load_manifests

    return load_manifests([str(DEMO_CLUSTER)])
