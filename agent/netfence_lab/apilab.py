"""The lab on an API server (`lab up --kubeconfig K [--controller]`): the product path.

`lab up` builds the node namespaces as usual, then plays kubelet and scheduler for them on
the API: it registers the cluster file's Nodes, Namespaces and Pods, wires each pod with the
CNI plugins and reports it Running/Ready (kubelet.py, which keeps running in the background
for pods created later), runs each node's agent in API mode and, with --controller,
`netfence controller`. Nothing but the API connects the parts: the controller compiles what
it watches, the agents enforce the NodeRuleSets it publishes and report their status there.

`lab apply` writes the policies through the API (the files' policies are the lab's complete
set; policies others created through the API are theirs and stay) and waits until every
NodeRuleSet holds what `netfence compile` gives for the API's objects and every agent reports
that it applied it. `lab down` also deletes what the lab registered on the API.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from netfence_lab import system
from netfence_lab.kubeapi import (
    CRDS,
    LEASE_NAMESPACE,
    LEASES,
    NAMESPACES,
    NODE_RULE_SETS,
    NODES,
    PEER_GROUP_SLICES,
    PODS,
    POLICY_KINDS,
    LabApi,
    Resource,
    server_of,
    short,
    wait_gone,
)
from netfence_lab.kubelet import LabKubelet, kubelet_store, node_status
from netfence_lab.model import ApplyRequest, LabPlan, ManifestError, object_name, pod_namespace
from netfence_lab.state import LabState, ProcessRecord, write_atomic
from netfence_lab.topology import env_with_source_roots, tail, teardown

if TYPE_CHECKING:
    from netfence_lab.lab import Lab

PLACEHOLDER_IMAGE = "netfence-lab/podserver"  # a container the file gives no image gets this one
PROXY_READY_TIMEOUT = 10.0
CONTROLLER_ENV = "NETFENCE_LAB_CONTROLLER"


# ---------------------------------------------------------------------- up
def bring_up(lab: "Lab", state: LabState, plan: LabPlan) -> None:
    """After the node namespaces exist: API registration, pods, kubelet, controller, agents."""
    from netfence_lab.lab import _crash_point

    api = LabApi(state.kubeconfig or "")
    api.check_reachable()
    state.agent_kubeconfig = start_api_proxy(lab, state, plan)
    _ensure_crd(api, state, lab)
    for node in plan.node_objects:
        _register_node(api, state, lab, node, plan)
    for ns in plan.namespaces:
        _put_namespace(api, state, lab, ns)
    kubelet = LabKubelet(lab.store.root, api, plan.nodes, plan.cluster_cidr)
    planned_ip = {p.key: p.ip for p in plan.pods}
    created = [_create_pod(api, state, lab, obj) for obj in plan.pod_objects]
    for obj in created:
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        pod = kubelet.wire(obj, ip=planned_ip.get(key))
        for p in pod.skipped:
            state.notes.append(f"{pod.key}: {p.port}/SCTP not served (no SCTP sockets on this kernel)")
        _crash_point("pod")
    lab.store.save(state)
    _spawn(lab, state, "kubelet", kubelet_command(lab, state))
    if state.controller:
        _spawn(lab, state, "controller", controller_command(state.kubeconfig or ""))
    if state.agents:
        for node in plan.nodes:
            lab._start_agent(state, node.name)
        apply_policies(lab, state, api, plan.policies)
        wait_applied(lab, state, api)
    write_cluster_yaml(lab, api)
    api.close()


def kubelet_command(lab: "Lab", state: LabState) -> list[str]:
    return [sys.executable, "-m", "netfence_lab.kubelet", "--kubeconfig", state.kubeconfig or "", "--lab-dir", str(lab.store.root)]


def controller_command(kubeconfig: str) -> list[str]:
    custom = os.environ.get(CONTROLLER_ENV)
    base = custom.split() if custom else [sys.executable, "-m", "netfence_cli", "controller"]
    # No listeners: the controller runs in the host's namespace, where the lab opens no ports.
    return [*base, "--kubeconfig", kubeconfig, "--metrics-bind-address", "", "--health-bind-address", ""]


def _spawn(lab: "Lab", state: LabState, role: str, argv: list[str]) -> ProcessRecord:
    log = lab.store.root / f"{role}.log"
    pid, start = system.spawn(argv, log, env=env_with_source_roots())
    rec = ProcessRecord(pid, start, role, "lab", "", str(log))
    state.processes.append(rec)
    lab.store.save(state)
    return rec


def start_api_proxy(lab: "Lab", state: LabState, plan: LabPlan) -> str:
    """Relay the API into every node namespace; returns the kubeconfig the agents use there."""
    kubeconfig = state.kubeconfig or ""
    url = urllib.parse.urlsplit(server_of(kubeconfig))
    host = url.hostname or "127.0.0.1"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    listen = "127.0.0.1" if host == "localhost" or not loopback else host
    agent_kubeconfig = kubeconfig
    if not loopback:
        # The agents dial 127.0.0.1 in their namespace; TLS still checks the API's own name.
        with open(kubeconfig) as f:
            cfg = yaml.safe_load(f)
        for c in cfg.get("clusters") or []:
            cluster = c.get("cluster") or {}
            if cluster.get("server") and urllib.parse.urlsplit(cluster["server"]).hostname == host:
                cluster["server"] = f"{url.scheme}://127.0.0.1:{port}{url.path}"
                if url.scheme == "https":
                    cluster.setdefault("tls-server-name", host)
        agent_kubeconfig = str(lab.store.root / "agent-kubeconfig")
        write_atomic(Path(agent_kubeconfig), yaml.safe_dump(cfg), mode=0o600)
    argv = [sys.executable, "-m", "netfence_lab.apiproxy", "--listen", f"{listen}:{port}", "--to", f"{host}:{port}",
            *(str(system.NETNS_DIR / n.netns) for n in plan.nodes)]
    rec = _spawn(lab, state, "apiproxy", argv)
    deadline = time.monotonic() + PROXY_READY_TIMEOUT
    while "relaying" not in Path(rec.log).read_text(errors="replace"):
        if not system.is_alive(rec.pid, rec.starttime):
            raise system.LabError(f"the API relay into the node namespaces failed: {tail(Path(rec.log))}")
        if time.monotonic() > deadline:
            raise system.LabError(f"the API relay did not start within {PROXY_READY_TIMEOUT:.0f}s")
        time.sleep(0.02)
    return agent_kubeconfig


def _record(lab: "Lab", state: LabState, kind: str, name: str, namespace: str | None = None) -> None:
    entry = {"kind": kind, "name": name, **({"namespace": namespace} if namespace else {})}
    if entry not in state.api_objects:
        state.api_objects.append(entry)
        lab.store.save(state)


def _ensure_crd(api: LabApi, state: LabState, lab: "Lab") -> None:
    """netfence's CRDs (NodeRuleSet and the slices it references) where the API lacks them;
    `lab down` deletes those it created."""
    from netfence_api.crd import all_crd_manifests

    for crd in all_crd_manifests():
        names = crd["spec"]["names"]
        res = Resource(f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}", names["kind"],
                       names["plural"], False)
        if api.has_resource(res):
            continue
        _record(lab, state, "CustomResourceDefinition", crd["metadata"]["name"])
        api.create(CRDS, crd)
        deadline = time.monotonic() + 30
        while not api.has_resource(res):  # established: the apiserver serves it
            if time.monotonic() > deadline:
                raise system.LabError(f"the {names['kind']} CRD was created but the API server does not serve it after 30s")
            time.sleep(0.2)


def _register_node(api: LabApi, state: LabState, lab: "Lab", doc: dict[str, Any], plan: LabPlan) -> None:
    name = object_name(doc)
    if api.get(NODES, name) is not None:
        raise system.LabError(f"Node {name} already exists on the API server: another lab or a real node has that name")
    md = doc.get("metadata") or {}
    body = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {**(md.get("labels") or {}), "kubernetes.io/hostname": name},
                         "annotations": md.get("annotations") or {}},
            "spec": copy.deepcopy(doc.get("spec") or {})}
    _record(lab, state, "Node", name)
    api.create(NODES, body)
    api.merge_patch(NODES, name, {"status": node_status(plan.node(name))}, sub="status")


def _label_patch(old: dict[str, str] | None, new: dict[str, str]) -> dict[str, Any]:
    """A merge patch that makes the labels exactly `new` (removed keys set to null)."""
    return {"metadata": {"labels": {**{k: None for k in (old or {}) if k not in new}, **new}}}


def _put_namespace(api: LabApi, state: LabState, lab: "Lab", doc: dict[str, Any]) -> None:
    name = object_name(doc)
    labels = dict((doc.get("metadata") or {}).get("labels") or {})
    labels["kubernetes.io/metadata.name"] = name
    existing = api.get(NAMESPACES, name)
    if existing is not None and (existing.get("metadata") or {}).get("deletionTimestamp"):
        wait_gone(api, NAMESPACES, name)  # a real apiserver finalizes a deleted namespace for a while
        existing = None
    if existing is not None:
        api.merge_patch(NAMESPACES, name, _label_patch(existing["metadata"].get("labels"), labels))
        return
    _record(lab, state, "Namespace", name)
    api.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


def _create_pod(api: LabApi, state: LabState, lab: "Lab", doc: dict[str, Any]) -> dict[str, Any]:
    ns, name = pod_namespace(doc), object_name(doc)
    if api.get(PODS, name, ns) is not None:
        raise system.LabError(f"Pod {ns}/{name} already exists on the API server")
    md = doc.get("metadata") or {}
    spec = copy.deepcopy(doc.get("spec") or {})
    containers = spec.get("containers") or [{"name": "server"}]
    for i, c in enumerate(containers):
        c.setdefault("name", f"c{i}")
        c.setdefault("image", PLACEHOLDER_IMAGE)
    spec["containers"] = containers
    body = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": md.get("labels") or {},
                         "annotations": md.get("annotations") or {}},
            "spec": spec}  # spec.nodeName: the plan placed it, as the scheduler would have
    _record(lab, state, "Pod", name, ns)
    return api.create(PODS, body)


# ---------------------------------------------------------------------- apply
def _policy_key(doc: dict[str, Any]) -> tuple[str, str, str]:
    res = POLICY_KINDS[doc["kind"]]
    return (doc["kind"], pod_namespace(doc) if res.namespaced else "", object_name(doc))


def _policy_body(doc: dict[str, Any]) -> dict[str, Any]:
    kind, ns, name = _policy_key(doc)
    md = doc.get("metadata") or {}
    meta = {"name": name, "labels": md.get("labels") or {}, "annotations": md.get("annotations") or {}}
    if ns:
        meta["namespace"] = ns
    return {"apiVersion": POLICY_KINDS[kind].api_version, "kind": kind, "metadata": meta, "spec": copy.deepcopy(doc.get("spec") or {})}


def apply(lab: "Lab", state: LabState, request: ApplyRequest) -> int:
    from netfence_lab.lab import compile_rule_sets

    node_names = [n.name for n in state.lab_plan().nodes]
    desired = {_policy_key(d): _policy_body(d) for d in request.policies}
    ns_labels, pod_labels = request.namespace_labels, request.pod_labels
    api = LabApi(state.kubeconfig or "")
    try:
        for kind in sorted({k[0] for k in desired}):
            res = POLICY_KINDS[kind]
            if not api.has_resource(res):
                raise system.LabError(f"the API server has no {res.plural} ({res.api_version}): cannot apply {kind}"
                                      + (" (install its CRD: docs/cluster-network-policy.md)" if not res.namespaced else ""))
        # What the API will hold, compiled before anything is written: input the compiler
        # rejects exits 2 and changes nothing.
        objects = api.cluster_objects()
        pods_on_api = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects if o["kind"] == "Pod"}
        for key in pod_labels:
            if key not in pods_on_api:
                raise ManifestError(f"Pod {key[0]}/{key[1]}: not on the API server; `lab apply` changes labels of "
                                    "existing pods (create pods through the API or with `lab up`)")
        previous = {_policy_key(p) for p in state.policies}
        future = [o for o in objects if not (o["kind"] in POLICY_KINDS and _policy_key(o) in previous | set(desired))]
        for o in future:
            md = o["metadata"]
            if o["kind"] == "Namespace" and md["name"] in ns_labels:
                md["labels"] = {**ns_labels[md["name"]], "kubernetes.io/metadata.name": md["name"]}
            elif o["kind"] == "Pod" and (md.get("namespace"), md["name"]) in pod_labels:
                md["labels"] = pod_labels[(md.get("namespace"), md["name"])]
        known_ns = {o["metadata"]["name"] for o in future if o["kind"] == "Namespace"}
        future += [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {**l, "kubernetes.io/metadata.name": n}}}
                   for n, l in ns_labels.items() if n not in known_ns]
        compile_rule_sets(future + list(desired.values()), node_names)

        for name, labels in ns_labels.items():
            _put_namespace(api, state, lab, {"metadata": {"name": name, "labels": labels}})
        for (ns, name), labels in pod_labels.items():
            old = api.get(PODS, name, ns) or {}
            api.merge_patch(PODS, name, _label_patch((old.get("metadata") or {}).get("labels"), labels), ns)
        apply_policies(lab, state, api, list(desired.values()))
        generation = wait_applied(lab, state, api)
        write_cluster_yaml(lab, api)
        return generation
    finally:
        api.close()


def apply_policies(lab: "Lab", state: LabState, api: LabApi, policies: list[dict[str, Any]]) -> None:
    """Create or replace each policy; delete the lab's earlier ones not among them."""
    desired = {_policy_key(p): _policy_body(p) for p in policies}
    previous = {_policy_key(p): p for p in state.policies}
    state.policies = list(desired.values())
    lab.store.save(state)
    for (kind, ns, name), body in desired.items():
        res = POLICY_KINDS[kind]
        existing = api.get(res, name, ns or None)
        if existing is None:
            api.create(res, body)
        else:
            body = copy.deepcopy(body)
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            api.replace(res, body)
    for kind, ns, name in previous.keys() - desired.keys():
        api.delete(POLICY_KINDS[kind], name, ns or None)


def wait_applied(lab: "Lab", state: LabState, api: LabApi, timeout: float | None = None) -> int:
    """Until every lab node's NodeRuleSet is what compile gives for the API's objects and its
    agent reports that content applied. Returns the highest NodeRuleSet generation."""
    from netfence_lab.lab import apply_timeout, compile_rule_sets

    timeout = apply_timeout() if timeout is None else timeout
    nodes = [n.name for n in state.lab_plan().nodes]
    deadline = time.monotonic() + timeout
    while True:
        specs = compile_rule_sets(api.cluster_objects(), nodes)
        published = api.published_specs(nodes)
        pending: list[str] = []
        failures: list[str] = []  # all of them, once every node has answered
        for node in nodes:
            want = specs[node].content_hash()
            if node not in published:
                pending.append(f"{node}: no NodeRuleSet yet")
                continue
            obj, assembled = published[node]
            if isinstance(assembled, str):
                pending.append(f"{node}: {assembled}")
                continue
            have = assembled.content_hash()  # the agents report the assembled spec's hash too
            generation = obj["metadata"].get("generation")
            status = obj.get("status") or {}
            if have != want:
                pending.append(f"{node}: NodeRuleSet generation {generation} holds {have}, compile gives {want}")
            elif status.get("observedGeneration") != generation or status.get("appliedHash") != want:
                failed = [c for c in status.get("conditions") or [] if c.get("type") == "Applied"
                          and c.get("status") == "False" and c.get("reason") not in (None, "Pending")]
                if failed and status.get("observedGeneration") == generation:
                    c = failed[0]
                    failures.append(f"agent of node {node} failed to apply generation {generation}: "
                                    f"{c.get('reason')}: {c.get('message')}")
                    continue
                pending.append(f"{node}: agent reports generation {status.get('observedGeneration')} "
                               f"({status.get('appliedHash')}), not {generation} ({want})")
        _check_processes(lab, state)
        if failures and not pending:
            raise system.LabError("; ".join(failures))
        if not pending:
            return max((published[n][0]["metadata"].get("generation") or 0) for n in nodes)
        if time.monotonic() > deadline:
            raise system.LabError("; ".join(failures + [f"not applied within {timeout:.0f}s: " + "; ".join(pending)]))
        time.sleep(0.1)


def _check_processes(lab: "Lab", state: LabState) -> None:
    for rec in state.processes:
        if rec.role in ("agent", "controller", "kubelet", "apiproxy") and not system.is_alive(rec.pid, rec.starttime):
            what = f"agent of node {rec.owner}" if rec.role == "agent" else f"the lab's {rec.role}"
            raise system.LabError(f"{what} is not running: {tail(Path(rec.log))}")


def write_cluster_yaml(lab: "Lab", api: LabApi) -> None:
    """The API's objects as the compiler reads them: feed it to `netfence explain`/`matrix`."""
    docs = []
    for o in api.cluster_objects():
        o = copy.deepcopy(o)
        o["metadata"].pop("managedFields", None)
        docs.append(o)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    write_atomic(lab.store.root / "cluster.yaml", yaml.dump_all(docs, Dumper=dumper, sort_keys=False))


# ---------------------------------------------------------------------- probe, status
def current_plan(lab: "Lab", state: LabState) -> LabPlan:
    """The lab's nodes with the pods its kubelet has wired now (created later included)."""
    plan = state.lab_plan()
    record = kubelet_store(lab.store.root).load()
    plan.pods = [p for p in (record.lab_plan().pods if record and record.plan else []) if p.ip and p.netns]
    return plan


# ---------------------------------------------------------------------- down
def agent_statuses(state: LabState) -> dict[str, dict[str, Any]]:
    """node -> what its agent reported in its NodeRuleSet's status, with the NodeRuleSet's
    generation (`{}` for a node without one; `{"error": ...}` when the API cannot be read)."""
    api = LabApi(state.kubeconfig or "")
    try:
        return {o["metadata"]["name"]: {**(o.get("status") or {}), "generation": o["metadata"].get("generation")}
                for o in api.items(NODE_RULE_SETS)}
    except Exception as e:  # noqa: BLE001 - status must answer even with the API down
        return {"": {"error": short(e)}}
    finally:
        api.close()


def tear_down(lab: "Lab", state: LabState) -> list[str]:
    done: list[str] = []
    # The lab's processes first: the controller and kubelet must not react to what follows.
    for pid in system.terminate([(p.pid, p.starttime) for p in state.processes]):
        done.append(f"process {pid}")
    kstore = kubelet_store(lab.store.root)
    kstate = kstore.load()
    if kstate is not None:
        done += teardown(kstore, kstate)
    if state.kubeconfig:
        try:
            unregister(state)
        except Exception as e:  # noqa: BLE001 - the kernel side still goes; say what stays on the API
            print(f"warning: could not remove the lab's objects from the API server: {short(e)}; left: "
                  f"{', '.join(o['kind'] + ' ' + o['name'] for o in state.api_objects)}", file=sys.stderr)
    return done + teardown(lab.store, state)


def unregister(state: LabState) -> None:
    api = LabApi(state.kubeconfig or "")
    try:
        # Only nodes the lab registered: a name that was taken (lab up refused it) is someone else's.
        nodes = [o["name"] for o in state.api_objects if o["kind"] == "Node"]
        for p in state.policies:
            kind, ns, name = _policy_key(p)
            api.delete(POLICY_KINDS[kind], name, ns or None)
        # A node that goes takes its pods (those created through the API too): no kubelet is left to end them.
        for node in nodes:
            for pod in api.items(PODS, fieldSelector=f"spec.nodeName={node}"):
                api.delete(PODS, pod["metadata"]["name"], pod["metadata"].get("namespace"), grace=0)
        order = {"Pod": 0, "Namespace": 1, "Node": 2}
        for o in sorted(state.api_objects, key=lambda o: order.get(o["kind"], 3)):
            if o["kind"] == "CustomResourceDefinition":
                continue  # last: the objects of its kind go first
            res: Resource = {"Pod": PODS, "Namespace": NAMESPACES, "Node": NODES}[o["kind"]]
            api.delete(res, o["name"], o.get("namespace"), grace=0 if o["kind"] == "Pod" else None)
        for node in nodes:
            if api.has_resource(NODE_RULE_SETS):
                api.delete(NODE_RULE_SETS, node)
            try:
                api.delete(LEASES, node, LEASE_NAMESPACE)
            except Exception:  # noqa: BLE001 - an API without Leases
                pass
        if state.controller and api.has_resource(PEER_GROUP_SLICES):
            # Peer groups are shared by nodes; with the lab's nodes gone and its controller
            # stopped, nothing else of the lab's publishes or needs them.
            for piece in api.items(PEER_GROUP_SLICES):
                api.delete(PEER_GROUP_SLICES, piece["metadata"]["name"])
        for o in state.api_objects:
            if o["kind"] == "CustomResourceDefinition":
                api.delete(CRDS, o["name"])
        if state.crd_created:  # recorded so by labs before the slices existed
            api.delete(CRDS, "noderulesets.netfence.io")
    finally:
        api.close()
