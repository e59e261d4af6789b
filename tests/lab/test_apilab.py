"""The product path end to end: the lab on the project's test API server, the real controller
compiling what it watches, agents in API mode enforcing their NodeRuleSets, pods wired by the
CNI plugins, real packets. Changes are made with the kubernetes client, as `kubectl` would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client import CoreV1Api, NetworkingV1Api

from availability import shared_path
from controller.fakeapi import CLUSTER_NAMESPACES, FakeApiServer, kubeconfig_for
from lab.labkit import require_real_agent, require_root
from netfence_lab import system
from netfence_lab.apilab import CONTROLLER_ENV
from netfence_lab.kubelet import kubelet_store
from netfence_lab.lab import Lab, metric_lines
from netfence_lab.state import StateStore

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NETPROBE = REPO / "tests" / "kernel" / "helpers" / "netprobe.py"


def ns(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(namespace, name, node, **labels):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]}}


CLUSTER = [ns("x"), ns("y"), pod("x", "a", "node-1", app="a"), pod("x", "b", "node-2", app="b"),
           pod("y", "a", "node-1", app="a"), pod("y", "b", "node-2", app="b")]


def netpol(namespace, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


DENY_X = netpol("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})
X_FROM_BLUE = netpol("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"],
                                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]})


def blocked(matrix):
    return sorted(f"{s}->{d}" for s, row in matrix.items() for d, ok in row.items() if not ok)


def into(matrix, targets, sources=None):
    """Cells into `targets` from other pods (or from `sources`), as 'from->to'."""
    return sorted(f"{s}->{d}" for s in matrix for d in matrix[s]
                  if d in targets and s != d and (sources is None or s in sources))


@pytest.fixture
def api_server():
    require_root()
    require_real_agent()
    server = FakeApiServer(bookmark_interval=0.5, seed_namespaces=CLUSTER_NAMESPACES).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(api_server, tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(kubeconfig_for(api_server.url)))
    return str(path)


@pytest.fixture
def k8s(api_server):
    client = kubernetes.config.new_client_from_config_dict(kubeconfig_for(api_server.url))
    yield client
    client.close()


@pytest.fixture(params=["inline"])
def group_layout(request, monkeypatch):
    """Where the controller puts peer groups: inline in the NodeRuleSets (what a cluster this small
    gets) or, with --inline-groups-bytes 0, in PeerGroupSlices (what a large cluster gets)."""
    if request.param == "slices":
        monkeypatch.setenv(CONTROLLER_ENV, f"{sys.executable} -m netfence_cli controller --inline-groups-bytes 0")
    return request.param


@pytest.fixture
def api_lab(lab_dir, kubeconfig, api_server, group_layout):
    lab = Lab(StateStore(lab_dir))
    lab.up(CLUSTER, kubeconfig=kubeconfig, controller=True)
    try:
        yield lab
    finally:
        names = list(lab.store.load().netns) + list((kubelet_store(lab_dir).load() or lab.store.load()).netns)
        lab.down()
        left = [n for n in names if system.netns_exists(n)]
        assert not left, f"lab down left namespaces: {left}"
        assert api_server.list("nodes") == [] and api_server.list("pods") == [], "lab down left objects on the API"


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


# ---------------------------------------------------------------------------- the conformance sample
def test_conformance_sample_through_the_api_lab(lab_dir, kubeconfig):
    """shared/conformance-sample/check.py --mode lab with the lab on the API server, the controller
    compiling and the agents watching: the whole product path, case by case."""
    checker = shared_path("conformance-sample/check.py")
    env = {**os.environ, "NETFENCE": f"{sys.executable} -m netfence_cli",
           "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "agent")])}
    r = subprocess.run([sys.executable, str(checker), "--mode", "lab", "--lab-up-args", f"--kubeconfig {kubeconfig} --controller"],
                       capture_output=True, text=True, env=env, timeout=900, cwd=lab_dir.parent)
    assert r.stdout.strip().splitlines()[-1] == "8 passed, 0 failed", r.stdout + r.stderr
    assert r.returncode == 0


# ---------------------------------------------------------------------------- API objects -> packets
def test_lab_up_registers_a_kubelets_view_of_its_nodes_and_pods(api_lab, api_server):
    nodes = {n["metadata"]["name"]: n for n in api_server.list("nodes")}
    assert set(nodes) == {"node-1", "node-2"}
    for n in nodes.values():
        assert n["spec"]["podCIDR"] and {"type": "Ready", "status": "True"}.items() <= n["status"]["conditions"][0].items()
        assert n["status"]["addresses"][0]["type"] == "InternalIP"
    assert {l["metadata"]["name"] for l in api_server.list("leases", "kube-node-lease")} == {"node-1", "node-2"}
    for p in api_server.list("pods"):
        status = p["status"]
        assert status["phase"] == "Running" and status["podIP"] and status["podIPs"] == [{"ip": status["podIP"]}]
        assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    # every agent watches its NodeRuleSet and reports the content applied
    for rs in api_server.list("noderulesets"):
        assert rs["status"]["observedGeneration"] == rs["metadata"]["generation"]
        assert rs["status"]["appliedHash"] == rs["metadata"]["annotations"]["netfence.io/spec-hash"]
    # and `lab status` shows what they reported there
    shown = {n["name"]: (n["observedGeneration"], n["generation"]) for n in api_lab.status()["nodes"]}
    assert shown == {rs["metadata"]["name"]: (rs["metadata"]["generation"],) * 2 for rs in api_server.list("noderulesets")}


def test_policies_created_replaced_and_deleted_through_the_api(api_lab, k8s):
    net = NetworkingV1Api(k8s)
    assert blocked(api_lab.probe(80, "TCP")) == []
    net.create_namespaced_network_policy("x", DENY_X)
    api_lab.wait_converged()
    m = api_lab.probe(80, "TCP")
    assert blocked(m) == into(m, {"x/a", "x/b"})
    for node in ("node-1", "node-2"):  # the controller's trigger time reached the agents' latency histogram
        (count,) = metric_lines(api_lab.node_metrics(node), "netfence_network_programming_duration_seconds_count")
        assert float(count.split()[-1]) >= 1, node
    current = net.read_namespaced_network_policy("deny", "x")
    replaced = {**X_FROM_BLUE, "metadata": {**X_FROM_BLUE["metadata"], "resourceVersion": current.metadata.resource_version}}
    net.replace_namespaced_network_policy("deny", "x", replaced)
    CoreV1Api(k8s).patch_namespace("y", {"metadata": {"labels": {"team": "blue"}}})
    api_lab.wait_converged()
    m = api_lab.probe(80, "TCP")
    assert blocked(m) == into(m, {"x/a", "x/b"}, sources={"x/a", "x/b"})  # y is blue now
    net.delete_namespaced_network_policy("deny", "x")
    api_lab.wait_converged()
    assert blocked(api_lab.probe(80, "TCP")) == []


@pytest.mark.parametrize("group_layout", ["inline", "slices"], indirect=True)
def test_namespace_relabel_through_the_api(api_lab, api_server, k8s, group_layout):
    core = CoreV1Api(k8s)
    NetworkingV1Api(k8s).create_namespaced_network_policy("x", X_FROM_BLUE)
    api_lab.wait_converged()
    in_slices = [g for rs in api_server.list("noderulesets") for g in rs["spec"]["peerGroups"]] == []
    assert in_slices == (group_layout == "slices") and bool(api_server.list("peergroupslices")) == in_slices
    m = api_lab.probe(81, "UDP")
    assert blocked(m) == into(m, {"x/a", "x/b"})
    core.patch_namespace("y", {"metadata": {"labels": {"team": "blue"}}})
    api_lab.wait_converged()
    m = api_lab.probe(81, "UDP")
    assert blocked(m) == into(m, {"x/a", "x/b"}, sources={"x/a", "x/b"})
    core.patch_namespace("y", {"metadata": {"labels": {"team": None}}})
    api_lab.wait_converged()
    m = api_lab.probe(81, "UDP")
    assert blocked(m) == into(m, {"x/a", "x/b"})


def test_a_pod_created_through_the_api_is_wired_and_policed_and_unwired_when_deleted(api_lab, api_server, k8s, lab_dir):
    core = CoreV1Api(k8s)
    NetworkingV1Api(k8s).create_namespaced_network_policy("x", DENY_X)
    new = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "new", "namespace": "x", "labels": {"app": "new"}},
           "spec": {"containers": [{"name": "main", "image": "x", "ports": [{"containerPort": 80}]}]}}
    core.create_namespaced_pod("x", new)  # no node: the lab schedules it
    ready = wait_for(lambda: (p := api_server.get("pods", "new", "x")) and (p.get("status") or {}).get("podIP") and p, what="x/new Running")
    assert ready["spec"]["nodeName"] in ("node-1", "node-2") and ready["status"]["phase"] == "Running"
    record = next(p for p in kubelet_store(lab_dir).load().lab_plan().pods if p.key == "x/new")
    assert system.netns_exists(record.netns)
    cache = lab_dir / ready["spec"]["nodeName"] / "cni" / "results" / f"cbr0-{record.sandbox_id}-eth0"
    lease = lab_dir / ready["spec"]["nodeName"] / "cni" / "networks" / "cbr0" / record.ip
    assert json.loads(cache.read_text())["cniArgs"] and lease.exists()
    api_lab.wait_converged()
    m = api_lab.probe(80, "TCP")
    assert "x/new" in m and blocked(m) == into(m, {"x/a", "x/b", "x/new"})
    core.delete_namespaced_pod("new", "x")  # graceful: the lab's kubelet unwires it, then confirms
    wait_for(lambda: api_server.get("pods", "new", "x") is None, what="x/new gone from the API")
    assert not system.netns_exists(record.netns) and not cache.exists() and not lease.exists()
    api_lab.wait_converged()
    assert "x/new" not in api_lab.probe(80, "TCP")


# ---------------------------------------------------------------------------- restarts under load
def test_controller_and_agent_restarts_during_continuous_probes(api_lab, k8s):
    """Restarting the controller, an agent, and the kubelet never opens or closes a connection
    the policies decide: every probe in between gives exactly the expected matrix."""
    CoreV1Api(k8s).patch_namespace("y", {"metadata": {"labels": {"team": "blue"}}})
    NetworkingV1Api(k8s).create_namespaced_network_policy("x", netpol("x", "deny", {
        "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}))
    api_lab.wait_converged()
    expected = {s: {d: not (d == "x/a" and s.startswith("x/") and s != d) for d in ("x/a", "x/b", "y/a", "y/b")}
                for s in ("x/a", "x/b", "y/a", "y/b")}
    assert api_lab.probe(80, "TCP") == expected
    results: list[dict] = []
    stop = threading.Event()

    def probing():
        while not stop.is_set() and len(results) < 200:
            results.append(api_lab.probe(80, "TCP", connect_timeout=0.5))

    prober = threading.Thread(target=probing)
    prober.start()
    try:
        time.sleep(1)
        api_lab.restart("controller")
        time.sleep(3)
        api_lab.restart("agent", "node-1")
        time.sleep(3)
        api_lab.restart("agent", "node-2")
        time.sleep(3)
        api_lab.restart("kubelet")
        time.sleep(2)
        api_lab.wait_converged()
    finally:
        stop.set()
        prober.join(60)
    assert len(results) >= 5
    wrongly_allowed = [(i, s, d) for i, m in enumerate(results) for s in m for d in m[s] if m[s][d] and not expected[s][d]]
    wrongly_denied = [(i, s, d) for i, m in enumerate(results) for s in m for d in m[s] if not m[s][d] and expected[s][d]]
    assert wrongly_allowed == [] and wrongly_denied == [], (len(results), wrongly_allowed[:5], wrongly_denied[:5])
    assert api_lab.probe(80, "TCP") == expected


# ---------------------------------------------------------------------------- a node's bridge, for real
@pytest.mark.parametrize("older_than_forward_delay", [False, True], ids=["new pod", "pod older than the forward delay"])
def test_pods_are_protected_from_spoofing_also_after_the_bridge_forward_delay(api_lab, older_than_forward_delay):
    """The CNI bridge plugin's ports leave the forward delay after 15 s with an AF_BRIDGE
    RTM_NEWLINK for the veth (DESIGN §4); the anti-spoofing rules must survive it."""
    plan = api_lab.current_plan(api_lab.store.load())
    a, b = (next(p for p in plan.pods if p.key == k) for k in ("x/a", "y/a"))  # both on node-1
    assert a.node == b.node
    forward_delay = json.loads(system.ip(plan.node(a.node).netns, "-d", "-j", "link", "show", "cni0"))[0][
        "linkinfo"]["info_data"]["forward_delay"] / 100
    assert forward_delay == 15
    if older_than_forward_delay:
        time.sleep(forward_delay + 2)
    spoofed_ip = str(__import__("ipaddress").ip_address(a.ip) + 150)
    system.ip(a.netns, "addr", "add", f"{spoofed_ip}/32", "dev", "eth0")
    r = subprocess.run(["ip", "netns", "exec", a.netns, sys.executable, str(NETPROBE), "connect", b.ip, "80", "--source",
                        spoofed_ip, "--timeout", "0.5"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, "a packet with another source IP got out of x/a's veth"
    text = api_lab.node_metrics(a.node)
    spoofed = [l for l in metric_lines(text, "netfence_spoofed_packets_total") if 'namespace="x"' in l and 'pod="a"' in l]
    assert spoofed and float(spoofed[0].split()[-1]) >= 1, spoofed


# ---------------------------------------------------------------------------- lab apply on an API lab
def test_lab_apply_goes_through_the_api_and_prunes_only_its_own(api_lab, api_server, k8s):
    NetworkingV1Api(k8s).create_namespaced_network_policy("y", netpol("y", "theirs", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    api_lab.apply([DENY_X])
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in api_server.list("networkpolicies")} == {
        ("x", "deny"), ("y", "theirs")}
    m = api_lab.probe(80, "TCP")
    assert blocked(m) == into(m, {"x/a", "x/b", "y/a", "y/b"})
    api_lab.apply([ns("y", team="blue"), X_FROM_BLUE])
    assert api_server.get("namespaces", "y")["metadata"]["labels"]["team"] == "blue"
    api_lab.apply([])  # the lab's policies go; the one made through the API stays
    assert [p["metadata"]["name"] for p in api_server.list("networkpolicies")] == ["theirs"]
    m = api_lab.probe(80, "TCP")
    assert blocked(m) == into(m, {"y/a", "y/b"})
