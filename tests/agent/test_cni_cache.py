"""CNI result cache records (libcni's cniCacheV1), as containerd + flannel's bridge plugin write them."""

from __future__ import annotations

import json

from netfence_agent.discovery import parse_cni_record

LIBCNI_RECORD = {
    "kind": "cniCacheV1",
    "containerId": "6f1c0e",
    "config": "eyJjbmlWZXJzaW9uIjoiMS4wLjAifQ==",
    "ifName": "eth0",
    "networkName": "cbr0",
    "netns": "/var/run/netns/cni-1234",
    "cniArgs": [["IgnoreUnknown", "1"], ["K8S_POD_NAMESPACE", "shop"], ["K8S_POD_NAME", "db-0"],
                ["K8S_POD_INFRA_CONTAINER_ID", "6f1c0e"], ["K8S_POD_UID", "u-1"]],
    "result": {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "8a:1f:00:00:00:01"}, {"name": "veth6f1c0e12", "mac": "8a:1f:00:00:00:02"},
                       {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/cni-1234"}],
        "ips": [{"interface": 2, "address": "10.244.0.5/24", "gateway": "10.244.0.1"}],
        "routes": [{"dst": "10.244.0.0/16"}],
        "dns": {},
    },
}


def test_libcni_record():
    record = parse_cni_record("/var/lib/cni/results/cbr0-6f1c0e-eth0", json.dumps(LIBCNI_RECORD))
    assert record is not None
    assert (record.namespace, record.name) == ("shop", "db-0")
    assert record.ips == ("10.244.0.5",)
    assert record.mac == "0a:58:0a:f4:00:05"
    assert record.host_ifnames == ("cni0", "veth6f1c0e12")
    assert record.sandbox == "/var/run/netns/cni-1234"


def test_cni_args_as_an_object_and_dual_stack():
    data = json.loads(json.dumps(LIBCNI_RECORD))
    data["cniArgs"] = {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "db-0"}
    data["result"]["ips"].append({"interface": 2, "address": "fd00:10:244::5/64"})
    record = parse_cni_record("f", json.dumps(data))
    assert record.name == "db-0" and record.ips == ("10.244.0.5", "fd00:10:244::5")


def test_records_without_a_pod_address_or_not_json_are_skipped():
    data = json.loads(json.dumps(LIBCNI_RECORD))
    data["result"]["ips"] = []
    assert parse_cni_record("f", json.dumps(data)) is None
    assert parse_cni_record("f", "not json") is None
    assert parse_cni_record("f", json.dumps({"kind": "cniCacheV1"})) is None
