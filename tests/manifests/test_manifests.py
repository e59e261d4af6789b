"""The deployment files: schema-valid for the Kubernetes versions kind and k3s ship, and saying
what the docs and the code rely on (RBAC, probes, ports, privileges, the generated CRD)."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from netfence_api.crd import all_crd_manifests, crd_manifest, render_yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
# kind v0.33 ships node images for 1.34-1.37 (default 1.37); k3s stable lines are 1.34-1.36.
KUBERNETES_VERSIONS = ("1.34.0", "1.35.0", "1.36.0", "1.37.0")
# Kinds of CRDs not in the Kubernetes schemas (checked by hand below).
FOREIGN_KINDS = {"PodMonitor"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_objects() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(str(path.relative_to(ROOT)), d) for d in documents(path)]
    return out


def find(kind: str, name: str) -> dict:
    matches = [d for _, d in all_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_schema_versions_are_available():
    available = set(kubernetes_validate.utils.all_versions())
    assert {".".join(v.split(".")[:2]) for v in KUBERNETES_VERSIONS} <= {".".join(v.split(".")[:2]) for v in available}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid(version):
    checked = 0
    for source, obj in all_objects():
        if obj["kind"] in FOREIGN_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{source}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 10


def test_podmonitor_shape():
    monitor = find("PodMonitor", "netfence")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "netfence"}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_crd_file_is_the_generated_one():
    assert (MANIFESTS / "crd.yaml").read_text() == render_yaml(), \
        "manifests/crd.yaml is stale: run `PYTHONPATH=operator python -m netfence_api.crd > manifests/crd.yaml`"


def test_crd_columns_and_status_subresource():
    version = crd_manifest()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"] if not c.get("priority")}
    assert columns == {
        "Node": ".spec.nodeName",
        "Pods": ".metadata.annotations.netfence\\.io/pods",
        "Rules": ".metadata.annotations.netfence\\.io/rules",
        "Applied": ".status.observedGeneration",
        "Age": ".metadata.creationTimestamp",
    }
    assert crd_manifest()["spec"]["scope"] == "Cluster"


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


@pytest.mark.parametrize("crd", all_crd_manifests(), ids=lambda c: c["metadata"]["name"])
def test_crd_schema_is_structural(crd):
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path}: no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "default", "additionalProperties"} & set(node), path


def test_rule_set_schema_is_the_nodes_pods_rules_and_groups():
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert set(spec["properties"]) == {"nodeName", "pods", "peerGroups", "peerPortGroups"}
    assert spec["properties"]["pods"]["items"]["properties"]["ips"]["minItems"] == 1
    rule = spec["properties"]["pods"]["items"]["properties"]["ingress"]["items"]
    assert rule["properties"]["peers"]["nullable"] is True


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert not any(r.startswith("extras") for r in kustomization["resources"])


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_controller_rbac_is_least_privilege():
    rules = rules_of(find("ClusterRole", "netfence-controller"))
    expected = {("", r, v) for r in ("pods", "namespaces", "nodes") for v in ("list", "watch")}
    expected |= {("networking.k8s.io", "networkpolicies", v) for v in ("list", "watch")}
    expected |= {("policy.networking.k8s.io", "clusternetworkpolicies", v) for v in ("list", "watch")}
    expected |= {("netfence.io", r, v) for r in ("noderulesets", "peergroupslices")
                 for v in ("list", "create", "patch", "delete")}
    expected |= {("", "events", "create")}
    assert rules == expected
    assert not any("*" in part for rule in rules for part in rule)
    binding = find("ClusterRoleBinding", "netfence-controller")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "netfence-controller", "namespace": "netfence-system"}]


def test_agent_rbac_reads_rule_sets_and_writes_status_only():
    rules = rules_of(find("ClusterRole", "netfence-agent"))
    assert rules == {("netfence.io", r, v) for r in ("noderulesets", "peergroupslices")
                     for v in ("get", "list", "watch")} | {("netfence.io", "noderulesets/status", "patch")}


def container(workload: dict, name: str) -> dict:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def test_agent_daemonset():
    ds = find("DaemonSet", "netfence-agent")
    pod = ds["spec"]["template"]["spec"]
    agent = container(ds, "agent")
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "netfence-agent"
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    assert agent["securityContext"]["privileged"] is False
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert mounts["/var/lib/cni"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["netns"]["hostPath"]["path"] == "/var/run/netns"
    (init,) = pod["initContainers"]
    assert "bridge-nf-call-iptables" in " ".join(init["command"])
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in agent["env"]
    assert agent["args"][:3] == ["agent", "--node", "$(NODE_NAME)"]
    assert {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert [p["containerPort"] for p in agent["ports"]] == [9469]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9469", "prometheus.io/path": "/metrics"}
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"


def host_paths(workload: dict) -> dict[str, dict]:
    return {v["hostPath"]["path"]: v["hostPath"] for v in workload["spec"]["template"]["spec"].get("volumes", [])
            if "hostPath" in v}


def test_agent_starts_on_a_node_without_lib_modules():
    """Issue 12.3: a kernel without modules has no /lib/modules; the agent must start there, and
    no host path is made on the node for it (containerd creates a missing bind source of a
    hostPath with `type: ""`, so an unchecked /lib/modules would litter the node)."""
    ds = find("DaemonSet", "netfence-agent")
    paths = host_paths(ds)
    assert not any(p == "/lib" or p.startswith("/lib/") for p in paths), paths
    pod = ds["spec"]["template"]["spec"]
    for c in pod["initContainers"] + pod["containers"]:
        assert not any(m["mountPath"].startswith("/lib/modules") for m in c.get("volumeMounts", [])), c["name"]
        script = "\n".join(c.get("command", []) + c.get("args", []))
        assert not re.search(r"(^|[;&|(]) *modprobe ", script, re.M), f"{c['name']} runs modprobe"
    # Only the runtime's own directories, which exist wherever pods have networking, may be made.
    assert {p: h.get("type") for p, h in paths.items()} == {"/var/run/netns": "DirectoryOrCreate",
                                                            "/var/lib/cni": "DirectoryOrCreate"}


def test_agent_init_container_tolerates_a_missing_br_netfilter():
    """Without the module, the init container must not fail (the pod would never start and
    the reason would hide in an init log): the agent starts and says what to do, not ready."""
    (init,) = find("DaemonSet", "netfence-agent")["spec"]["template"]["spec"]["initContainers"]
    script = init["command"][-1]
    missing_check = script.index("[ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]")
    assert missing_check < script.index("set -e") < script.index("echo 1 >")
    assert "modprobe br_netfilter" in script, "the message says what to run on the node"


def test_agent_netns_mount_needs_a_shared_node_mount_and_says_so():
    text = (MANIFESTS / "agent.yaml").read_text()
    assert "mount --make-rshared /" in text


def uninstall_objects() -> list[dict]:
    kustomization = yaml.safe_load((MANIFESTS / "uninstall" / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in documents(MANIFESTS / "uninstall" / name)]


def test_uninstall_kustomization_lists_its_manifests_and_the_same_image():
    folder = MANIFESTS / "uninstall"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    main = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert kustomization["images"] == main["images"]


def cleanup_daemonset() -> dict:
    (ds,) = [d for d in uninstall_objects() if d["kind"] == "DaemonSet"]
    return ds


def test_uninstall_runs_netfence_cleanup_on_every_node_with_what_it_needs():
    ds = cleanup_daemonset()
    (namespace,) = [d for d in uninstall_objects() if d["kind"] == "Namespace"]
    # Its own namespace: `kubectl delete -k manifests/` must not take it down, nor the reverse.
    assert ds["metadata"]["namespace"] == namespace["metadata"]["name"] != "netfence-system"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True, "the tables live in the node's network namespace"
    assert {"operator": "Exists"} in pod["tolerations"], "every node the agent may have run on"
    assert pod["automountServiceAccountToken"] is False and not host_paths(ds)
    (cleanup,) = pod["initContainers"]
    assert cleanup["image"] == container(find("DaemonSet", "netfence-agent"), "agent")["image"]
    assert cleanup["command"][:2] == ["bash", "-c"] and cleanup["command"][2].rstrip().endswith("exec netfence cleanup")
    assert cleanup["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert cleanup["securityContext"]["runAsUser"] == 0 and "privileged" not in cleanup["securityContext"]
    (done,) = pod["containers"]
    assert done["command"] == ["sleep", "infinity"] and done["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_uninstall_waits_for_the_agent_on_its_metrics_port():
    """An agent still running would load its tables again; the cleanup refuses while the
    agent's port answers, so the port in the script must be the agent's."""
    agent = container(find("DaemonSet", "netfence-agent"), "agent")
    (port,) = [p["containerPort"] for p in agent["ports"]]
    assert agent["args"][agent["args"].index("--metrics-bind-address") + 1] == f":{port}"
    (cleanup,) = cleanup_daemonset()["spec"]["template"]["spec"]["initContainers"]
    assert f"/dev/tcp/127.0.0.1/{port})" in cleanup["command"][2]


def test_controller_deployment():
    deployment = find("Deployment", "netfence-controller")
    controller = container(deployment, "controller")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert controller["args"][0] == "controller"
    ports = {p["name"]: p["containerPort"] for p in controller["ports"]}
    assert ports == {"metrics": 9470, "health": 8080}
    assert controller["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert controller["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert controller["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dockerfile_is_multi_stage_and_small():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages == ["python:3.11-slim", "python:3.11-slim"]
    final = text.split("\nFROM ")[-1]
    for package in ("nftables", "libnftables1", "iproute2"):
        assert package in final
    for tool in ("gcc", "build-essential", "python3-dev"):
        assert tool not in text
    assert 'ENTRYPOINT ["netfence"]' in final
    assert "COPY --from=build /opt/netfence /opt/netfence" in final


def test_kind_config():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["networking"] == {"disableDefaultCNI": True, "podSubnet": "10.244.0.0/16"}
    assert [n["role"] for n in config["nodes"]] == ["control-plane", "worker", "worker"]
    for n in config["nodes"]:
        assert {"containerPath": "/opt/cni/bin/bridge", "hostPath": "/usr/lib/cni/bridge", "readOnly": True} in n["extraMounts"]


def test_docs_say_they_were_not_run_on_a_cluster():
    for doc in ("kind.md", "k3s.md"):
        head = "\n".join((ROOT / "docs" / doc).read_text().splitlines()[:8])
        assert "not yet run on a real cluster" in head


def test_docs_uninstall_commands_name_what_the_uninstall_manifest_makes():
    ds = cleanup_daemonset()
    namespace, name = ds["metadata"]["namespace"], ds["metadata"]["name"]
    component = ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    (cleanup,) = ds["spec"]["template"]["spec"]["initContainers"]
    agent_component = find("DaemonSet", "netfence-agent")["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    for doc in ("README.md", "docs/kind.md", "docs/k3s.md"):
        text = (ROOT / doc).read_text()
        order = [text.index(step) for step in ("kubectl delete -k manifests/", "kubectl apply -k manifests/uninstall/",
                                               f"kubectl -n {namespace} rollout status ds/{name}",
                                               "kubectl delete -k manifests/uninstall/")]
        assert order == sorted(order), f"{doc}: the uninstall steps out of order"
    for doc in ("docs/kind.md", "docs/k3s.md"):
        text = (ROOT / doc).read_text()
        assert f"logs -l app.kubernetes.io/component={component} -c {cleanup['name']}" in text, doc
        assert f"get pods -A -l app.kubernetes.io/component={agent_component}" in text, doc


def test_docs_show_policy_events_the_way_kubectl_prints_them():
    for doc in ("docs/kind.md", "docs/k3s.md"):
        text = (ROOT / doc).read_text()
        assert "events --for networkpolicy/" in text, doc
        assert not re.search(r"^kubectl .*describe networkpolicy", text, re.M), f"{doc}: describe shows no Events"
