"""The lab's pure planning: addresses, placement, names, CNI records (no root needed)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import itertools
from pathlib import Path

import pytest
import yaml

from availability import shared_path
from netfence_lab.cli import parse_port
from netfence_lab.lab import format_table, load_manifests
from netfence_lab import cni
from netfence_lab.model import ManifestError, PortSpec, plan_lab, read_apply_documents

HERE = Path(__file__).resolve().parent
K3S_CLUSTER = HERE / "data" / "k3s-style-cluster.yaml"
DEMO_CLUSTER = HERE.parents[1] / "agent" / "netfence_lab" / "data" / "demo-cluster.yaml"


def counter_hex():
    """Deterministic 'random' hex: sha256 of a counter."""
    c = itertools.count(1)
    return lambda n: (hashlib.sha256(str(next(c)).encode()).hexdigest() * 2)[:n]


def plan(docs, **kw):
    return plan_lab(docs, new_hex=counter_hex(), new_uid=lambda: "uid-1", **kw)


def pod(name, ns="default", node=None, ip=None, ports=None, host=False, labels=None):
    spec = {"containers": [{"name": "c", "ports": ports or []}]}
    if node:
        spec["nodeName"] = node
    if host:
        spec["hostNetwork"] = True
    d = {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": spec}
    if ip:
        d["status"] = {"podIP": ip}
    return d


def node(name, cidr=None, ip=None):
    d = {"kind": "Node", "metadata": {"name": name}, "spec": {}}
    if cidr:
        d["spec"]["podCIDR"] = cidr
    if ip:
        d["status"] = {"addresses": [{"type": "InternalIP", "address": ip}]}
    return d


def test_conformance_cluster_keeps_manifest_addresses():
    p = plan(load_manifests([str(shared_path("conformance-sample/cluster.yaml"))]))
    assert [(n.name, n.pod_cidr, n.underlay_ip, n.cni0_ip, n.vtep_ip) for n in p.nodes] == [
        ("node-1", "10.244.1.0/24", "172.18.0.2", "10.244.1.1", "10.244.1.0"),
        ("node-2", "10.244.2.0/24", "172.18.0.3", "10.244.2.1", "10.244.2.0"),
    ]
    assert {x.key: (x.node, x.ip) for x in p.pods}["y/b"] == ("node-1", "10.244.1.22")
    assert len(p.pods) == 9
    assert all(x.ports_of("TCP") == [80, 81] and x.ports_of("UDP") == [80, 81] for x in p.pods)
    assert all({(s.port, s.protocol) for s in x.skipped} == {(80, "SCTP"), (81, "SCTP")} for x in p.pods)
    assert {ns["metadata"]["name"] for ns in p.namespaces} == {"x", "y", "z"}


def test_k3s_cluster_cidrs_are_never_replaced_by_10_244():
    p = plan(load_manifests([str(K3S_CLUSTER)]))
    assert [(n.name, n.pod_cidr, n.underlay_ip) for n in p.nodes] == [
        ("server-1", "10.42.0.0/24", "10.10.0.5"),
        ("agent-1", "10.42.1.0/24", "192.168.7.9"),
    ]
    # unrelated node subnets: /32 on eth0, peers reached on-link
    assert {n.underlay_prefix for n in p.nodes} == {32}
    by = {x.key: x for x in p.pods}
    assert by["apps/api"].node == "agent-1" and by["apps/api"].ip == "10.42.1.50"  # placed by its IP
    assert by["default/web"].ip == "10.42.0.2"  # assigned: first after the gateway
    assert by["default/web"].ports_of("TCP") == [80, 81] and by["default/web"].ports_of("UDP") == [80, 81]
    assert by["default/db"].ports == [PortSpec(5432, "TCP", "pg"), PortSpec(53, "UDP", "dns")]
    assert by["default/db"].skipped == [PortSpec(80, "SCTP", "sctp")]
    host = by["kube-system/hostnet"]
    assert host.host_network and host.ip == "192.168.7.9" and host.netns == "nflab-agent-1" and host.veth == ""
    assert p.ignored_kinds == ["Service"]
    # namespaces the pods use exist, with the apiserver's name label
    labels = {ns["metadata"]["name"]: ns["metadata"]["labels"] for ns in p.namespaces}
    assert labels["apps"] == {"team": "blue", "kubernetes.io/metadata.name": "apps"}
    assert labels["kube-system"] == {"kubernetes.io/metadata.name": "kube-system"}


def test_missing_nodes_and_cidrs_follow_the_clusters_range():
    p = plan([node("a", cidr="10.42.3.0/24"), pod("p", node="b")], node_count=3)
    assert [n.name for n in p.nodes] == ["a", "b", "node-1"]
    cidrs = [ipaddress.ip_network(n.pod_cidr) for n in p.nodes]
    assert all(c.subnet_of(ipaddress.ip_network("10.42.0.0/16")) for c in cidrs)
    assert len(set(cidrs)) == 3
    assert [n.underlay_ip for n in p.nodes] == ["172.18.0.2", "172.18.0.3", "172.18.0.4"]
    assert {n.underlay_prefix for n in p.nodes} == {16}


def test_default_lab_has_two_nodes_and_round_robin_placement():
    p = plan([pod("a"), pod("b"), pod("c")])
    assert [(n.name, n.pod_cidr) for n in p.nodes] == [("node-1", "10.244.1.0/24"), ("node-2", "10.244.2.0/24")]
    assert [(x.name, x.node, x.ip) for x in p.pods] == [
        ("a", "node-1", "10.244.1.2"), ("b", "node-2", "10.244.2.2"), ("c", "node-1", "10.244.1.3")]


def test_assigned_ips_skip_ones_the_manifest_uses():
    p = plan([node("n", cidr="10.9.0.0/24"), pod("a", node="n"), pod("b", node="n", ip="10.9.0.2")])
    assert {x.name: x.ip for x in p.pods} == {"a": "10.9.0.3", "b": "10.9.0.2"}


@pytest.mark.parametrize("docs,needle", [
    ([node("n", cidr="10.9.0.0/24"), pod("a", node="n", ip="10.8.0.5")], "not a pod address of node n"),
    ([node("n", cidr="10.9.0.0/24"), pod("a", node="n", ip="10.9.0.1")], "not a pod address"),
    ([node("n", cidr="10.9.0.0/24"), pod("a", node="n", ip="10.9.0.5"), pod("b", node="n", ip="10.9.0.5")], "used by another pod"),
    ([node("n", cidr="10.9.0.0/33")], "spec.podCIDR"),
    ([node("n", cidr="10.9.0.0/24"), node("m", cidr="10.9.0.128/25")], "overlaps"),
    ([pod("a", ports=[{"containerPort": 0}])], "containerPort"),
    ([pod("a", ports=[{"containerPort": 80, "protocol": "ICMP"}])], "protocol"),
    ([node("Bad_Name")], "metadata.name"),
])
def test_bad_manifests_name_object_and_field(docs, needle):
    with pytest.raises(ManifestError, match=needle):
        plan(docs)


def test_names_are_prefixed_and_unique():
    p = plan_lab(yaml.safe_load_all(DEMO_CLUSTER.read_text()))
    assert all(n.netns.startswith("nflab-") for n in p.nodes)
    assert all(x.netns.startswith("nflab-pod-") and len(x.netns) == len("nflab-pod-") + 8 for x in p.pods)
    assert all(x.veth == "" for x in p.pods)  # the CNI plugin names the veth when it wires the pod
    assert len({x.netns for x in p.pods}) == len(p.pods) == 9
    assert len({x.sandbox_id for x in p.pods}) == 9 and all(len(x.sandbox_id) == 64 for x in p.pods)
    assert len({x.uid for x in p.pods}) == 9


def test_cni_delegate_config_is_flannels():
    """Exactly what flannel's plugin hands `bridge` (DESIGN §4), plus host-local's dataDir."""
    p = plan([node("n", cidr="10.42.0.0/24"), pod("a", ns="x", node="n")])
    assert p.cluster_cidr == "10.42.0.0/16"
    conf = cni.delegate_config(p.nodes[0].pod_cidr, p.cluster_cidr, 1450, "/lab/n/cni/networks")
    assert conf == {
        "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge", "hairpinMode": True, "isDefaultGateway": True,
        "isGateway": True, "ipMasq": False, "mtu": 1450,
        "ipam": {"type": "host-local", "dataDir": "/lab/n/cni/networks", "ranges": [[{"subnet": "10.42.0.0/24"}]],
                 "routes": [{"dst": "10.42.0.0/16"}]},
    }


def test_cni_cache_entry_is_libcnis():
    x = plan([node("n", cidr="10.42.0.0/24"), pod("a", ns="x", node="n")]).pods[0]
    args = cni.cni_args("x", "a", x.uid, x.sandbox_id, "10.42.0.9")
    assert dict(args)["K8S_POD_NAMESPACE"] == "x" and dict(args)["K8S_POD_NAME"] == "a"
    assert dict(args)["K8S_POD_UID"] == x.uid and dict(args)["IP"] == "10.42.0.9"
    assert "IP" not in dict(cni.cni_args("x", "a", x.uid, x.sandbox_id, None))
    result = {"cniVersion": "0.3.1", "interfaces": [
        {"name": "cni0", "mac": "aa:00:00:00:00:01"}, {"name": "veth0123abcd", "mac": "aa:00:00:00:00:02"},
        {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/run/netns/" + x.netns}],
        "ips": [{"version": "4", "interface": 2, "address": "10.42.0.9/24", "gateway": "10.42.0.1"}]}
    entry = cni.cache_entry(x.sandbox_id, b'{"name":"cbr0"}', "/run/netns/" + x.netns, args, result)
    assert cni.cache_filename(x.sandbox_id) == f"cbr0-{x.sandbox_id}-eth0"
    assert entry["kind"] == "cniCacheV1" and entry["containerId"] == x.sandbox_id
    assert entry["ifName"] == "eth0" and entry["networkName"] == "cbr0" and entry["result"] == result
    assert base64.b64decode(entry["config"]) == b'{"name":"cbr0"}'
    assert ["K8S_POD_NAME", "a"] in entry["cniArgs"]
    assert cni.wired_interfaces(result) == ("veth0123abcd", "aa:00:00:00:00:02", "aa:00:00:00:00:03", "10.42.0.9")


def test_plan_round_trips_through_its_record():
    from netfence_lab.model import LabPlan

    p = plan(load_manifests([str(K3S_CLUSTER)]))
    assert LabPlan.from_dict(p.to_dict()) == p


def test_table_and_port_parsing():
    m = {"x/a": {"x/a": True, "x/b": False}, "x/b": {"x/a": False, "x/b": True}}
    assert format_table(m).splitlines() == ["-   x/a x/b", "x/a .   X", "x/b X   ."]
    assert parse_port("80/tcp") == (80, "TCP") and parse_port("53/UDP") == (53, "UDP") and parse_port("81") == (81, "TCP")
    for bad in ("x/TCP", "0/TCP", "80/ICMP"):
        with pytest.raises(ManifestError):
            parse_port(bad)


def test_apply_documents_sorted_by_what_they_change():
    np = {"kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": {"podSelector": {}}}
    cnp = {"kind": "ClusterNetworkPolicy", "metadata": {"name": "c"}, "spec": {}}
    docs = [np, cnp,
            {"kind": "Namespace", "metadata": {"name": "x", "labels": {"team": "a"}}},
            {"kind": "Pod", "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}}},
            {"kind": "Pod", "metadata": {"name": "b"}},
            {"kind": "Node", "metadata": {"name": "node-1"}},
            {"kind": "ConfigMap", "metadata": {"name": "cm"}}]
    request = read_apply_documents(docs, ["node-1"])
    assert [p["metadata"]["name"] for p in request.policies] == ["p", "c"]
    # an unnamespaced NetworkPolicy goes to "default"; the caller's document is left as it was
    assert request.policies[0]["metadata"]["namespace"] == "default" and "namespace" not in np["metadata"]
    assert "namespace" not in request.policies[1]["metadata"]
    assert request.namespace_labels == {"x": {"team": "a"}}
    assert request.pod_labels == {("x", "a"): {"app": "web"}, ("default", "b"): {}}
    assert request.ignored_kinds == {"ConfigMap"}


@pytest.mark.parametrize("docs, message", [
    ([{"kind": "NetworkPolicy", "metadata": {"name": "p"}},
      {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "default"}}], "NetworkPolicy default/p is given twice"),
    ([{"kind": "ClusterNetworkPolicy", "metadata": {"name": "c"}}] * 2, "^ClusterNetworkPolicy c is given twice"),
    ([{"kind": "Node", "metadata": {"name": "node-9"}}], "Node node-9: the lab cannot add nodes"),
    ([{"kind": "Pod", "metadata": {}}], "Pod without metadata.name"),
])
def test_apply_documents_refused_naming_the_object(docs, message):
    with pytest.raises(ManifestError, match=message):
        read_apply_documents(docs, ["node-1"])
