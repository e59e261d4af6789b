"""The lab's kubelet (and scheduler) for its nodes on an API server.

It watches the API's pods. A pod bound to a lab node is wired (its netns, CNI ADD with
flannel's delegate config, its echo server) and its status patched as a kubelet patches it
(podIP(s), hostIP, phase Running, Ready conditions). A pod bound to no node is bound to the
lab node with the fewest pods (pods/binding, as a scheduler does). A pod being deleted
(deletionTimestamp) or gone is unwired (server stopped, CNI DEL, netns deleted), then a
terminating one is deleted with grace 0, as a kubelet confirms a pod's end. Nodes are kept
alive as a kubelet does: a Lease in kube-node-lease renewed every 10 s and the node's Ready
condition refreshed every minute, so a real control plane's node lifecycle controller never
evicts the lab's pods.

What it made is recorded in <lab dir>/kubelet.json (a LabState of its own: every pod netns
before it is created, every server process once started), so `lab down` removes it all even
after a crash. `lab up` wires the cluster file's pods with this class in-process, then starts
`python -m netfence_lab.kubelet` in the background for whatever comes later.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from netfence_lab import system
from netfence_lab.kubeapi import LEASE_NAMESPACE, LEASES, NODES, PODS, LabApi, now_rfc3339, short
from netfence_lab.model import POD_NETNS_PREFIX, LabPlan, NodePlan, PodPlan, served_ports
from netfence_lab.state import LabState, StateStore, lab_dir
from netfence_lab.topology import Builder, unwire_pod

log = logging.getLogger("netfence.lab.kubelet")

KUBELET_RECORD = "kubelet.json"
LEASE_RENEW_SECONDS = 10.0
LEASE_DURATION_SECONDS = 40
NODE_STATUS_SECONDS = 60.0
WATCH_SECONDS = 60
BACKOFF = (0.5, 1.0, 2.0, 5.0)
POD_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready", "PodScheduled")


def kubelet_store(root: Path) -> StateStore:
    return StateStore(root, KUBELET_RECORD)


def node_status(node: NodePlan) -> dict[str, Any]:
    now = now_rfc3339()
    return {
        "addresses": [{"type": "InternalIP", "address": node.underlay_ip}, {"type": "Hostname", "address": node.name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "netfence lab node",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "nodeInfo": {"kubeletVersion": "netfence-lab", "containerRuntimeVersion": "netfence-lab://", "operatingSystem": "linux",
                     "architecture": "amd64", "osImage": "netfence lab", "kernelVersion": "", "kubeProxyVersion": "",
                     "machineID": "", "systemUUID": "", "bootID": ""},
    }


def pod_status(pod: PodPlan, node: NodePlan, containers: list[dict[str, Any]]) -> dict[str, Any]:
    now = now_rfc3339()
    return {
        "phase": "Running",
        "podIP": pod.ip,
        "podIPs": [{"ip": pod.ip}],
        "hostIP": node.underlay_ip,
        "hostIPs": [{"ip": node.underlay_ip}],
        "startTime": now,
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": now} for t in POD_CONDITIONS],
        "containerStatuses": [
            {"name": c.get("name", f"c{i}"), "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
             "restartCount": 0, "state": {"running": {"startedAt": now}}}
            for i, c in enumerate(containers)
        ],
    }


class LabKubelet:
    def __init__(self, root: Path, api: LabApi, nodes: list[NodePlan] | None = None, cluster_cidr: str | None = None):
        self.api = api
        self.store = kubelet_store(root)
        state = self.store.load()
        if state is None:
            if nodes is None or cluster_cidr is None:
                raise system.LabError(f"no kubelet record in {root} and no nodes given")
            plan = LabPlan(nodes=nodes, pods=[], namespaces=[], node_objects=[], pod_objects=[], policies=[],
                           cluster_cidr=cluster_cidr)
            state = LabState(phase="up", plan=plan.to_dict())
            self.store.save(state)
        self.state = state
        self.plan = state.lab_plan()
        self.builder = Builder(self.store, state)
        self.nodes = {n.name: n for n in self.plan.nodes}
        self._lock = threading.Lock()  # the watch loop and a caller of wire() never interleave

    # ------------------------------------------------------------------ record
    def _save(self) -> None:
        self.state.plan = self.plan.to_dict()
        self.store.save(self.state)

    def wired(self) -> dict[str, PodPlan]:
        return {p.uid: p for p in self.plan.pods}

    # ------------------------------------------------------------------ wiring
    def wire(self, obj: dict[str, Any], ip: str | None = None) -> PodPlan:
        """Wire a pod bound to a lab node and report it Running/Ready on the API."""
        with self._lock:
            md, spec = obj["metadata"], obj.get("spec") or {}
            node = self.nodes[spec["nodeName"]]
            host_network = bool(spec.get("hostNetwork"))
            taken = {p.sandbox_id[:8] for p in self.plan.pods}
            sandbox = secrets.token_hex(32)
            while sandbox[:8] in taken:
                sandbox = secrets.token_hex(32)
            serve, skipped = served_ports(obj)
            pod = PodPlan(
                namespace=md.get("namespace") or "default", name=md["name"], uid=md["uid"], node=node.name,
                ip=node.underlay_ip if host_network else (ip or ""), host_network=host_network, sandbox_id=sandbox,
                netns=node.netns if host_network else POD_NETNS_PREFIX + sandbox[:8], ports=serve, skipped=skipped,
            )
            self.plan.pods.append(pod)
            self._save()  # on record before its netns exists
            try:
                self.builder.build_pod(self.plan, pod)
                self._save()
                self.builder.wait_servers([pod])
            except BaseException:
                self._unwire(pod)
                raise
        status = pod_status(pod, node, spec.get("containers") or [])
        self.api.merge_patch(PODS, pod.name, {"status": status}, pod.namespace, sub="status")
        log.info("wired pod %s on %s: %s via %s", pod.key, node.name, pod.ip, pod.veth or "host network")
        return pod

    def unwire(self, uid: str) -> PodPlan | None:
        with self._lock:
            pod = self.wired().get(uid)
            if pod is not None:
                self._unwire(pod)
                log.info("unwired pod %s from %s (%s)", pod.key, pod.node, pod.ip)
            return pod

    def _unwire(self, pod: PodPlan) -> None:
        servers = [r for r in self.state.processes if r.role == "server" and r.owner == pod.key and r.netns == pod.netns]
        system.terminate([(r.pid, r.starttime) for r in servers])
        node = self.nodes[pod.node]
        if pod.veth and system.netns_exists(pod.netns):
            try:
                unwire_pod(self.builder.store, node, self.plan.cluster_cidr, pod)
            except system.LabError as e:
                log.warning("%s", e)  # deleting the netns below removes the veth anyway
        if not pod.host_network:
            system.netns_delete(pod.netns)
            if pod.netns in self.state.netns:
                self.state.netns.remove(pod.netns)
        for f in self.builder.pod_files(pod):
            f.unlink(missing_ok=True)
        self.state.processes = [r for r in self.state.processes if r not in servers]
        self.plan.pods = [p for p in self.plan.pods if p.uid != pod.uid]
        self._save()

    # ------------------------------------------------------------------ what a pod event means
    def handle(self, etype: str, obj: dict[str, Any]) -> None:
        md, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        uid, node = md.get("uid", ""), spec.get("nodeName")
        wired = uid in self.wired()
        if etype == "DELETED":
            if wired:
                self.unwire(uid)
            return
        if not node:
            if not md.get("deletionTimestamp") and (obj.get("status") or {}).get("phase", "Pending") == "Pending":
                self.bind(obj)
            return
        if node not in self.nodes:
            return
        if md.get("deletionTimestamp"):
            if wired:
                self.unwire(uid)
            # The kubelet's last word: its containers are gone, the pod may go now.
            self.api.delete(PODS, md["name"], md.get("namespace"), grace=0)
            return
        if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            if wired:
                self.unwire(uid)
            return
        if not wired:
            try:
                self.wire(obj)
            except system.LabError as e:
                log.error("cannot wire pod %s/%s: %s", md.get("namespace"), md.get("name"), e)
        elif not (obj.get("status") or {}).get("podIP"):  # wired, but its status patch did not make it
            pod = self.wired()[uid]
            status = pod_status(pod, self.nodes[pod.node], spec.get("containers") or [])
            self.api.merge_patch(PODS, pod.name, {"status": status}, pod.namespace, sub="status")

    def bind(self, obj: dict[str, Any]) -> None:
        """The scheduler's part: the lab node with the fewest pods."""
        md = obj["metadata"]
        counts = {n: 0 for n in self.nodes}
        for p in self.plan.pods:
            counts[p.node] = counts.get(p.node, 0) + 1
        target = min(sorted(counts), key=lambda n: counts[n])
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": md["name"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": target}}
        try:
            self.api.request("POST", PODS.path(md.get("namespace") or "default", md["name"], "binding"), body=binding)
            log.info("bound pod %s/%s to %s", md.get("namespace"), md["name"], target)
        except Exception as e:  # noqa: BLE001 - someone else bound it, or it is gone: the watch says which
            log.info("binding pod %s/%s failed: %s", md.get("namespace"), md["name"], short(e))

    def reconcile(self, items: list[dict[str, Any]]) -> None:
        """After a (re)list: every pod as if ADDED, and what is wired but no longer listed is gone."""
        present = {(o.get("metadata") or {}).get("uid") for o in items}
        for uid in [u for u in self.wired() if u not in present]:
            self.unwire(uid)
        for obj in items:
            self.handle("ADDED", obj)

    # ------------------------------------------------------------------ heartbeats
    def heartbeat(self, stop: threading.Event) -> None:
        next_status = 0.0
        leases = True
        while not stop.is_set():
            for node in self.nodes.values():
                try:
                    if leases:
                        self._renew_lease(node.name)
                    if time.monotonic() >= next_status:
                        self.api.merge_patch(NODES, node.name, {"status": node_status(node)}, sub="status")
                except Exception as e:  # noqa: BLE001
                    if leases and "404" in short(e) and self.api.get(NODES, node.name) is not None:
                        log.warning("no Leases on this API server (%s); node status heartbeats only", short(e))
                        leases = False
                    else:
                        log.warning("heartbeat of node %s failed: %s", node.name, short(e))
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + NODE_STATUS_SECONDS
            stop.wait(LEASE_RENEW_SECONDS)

    def _renew_lease(self, node: str) -> None:
        spec = {"holderIdentity": node, "leaseDurationSeconds": LEASE_DURATION_SECONDS, "renewTime": now_rfc3339(micro=True)}
        if self.api.get(LEASES, node, LEASE_NAMESPACE) is None:
            self.api.create(LEASES, {"apiVersion": LEASES.api_version, "kind": "Lease",
                                     "metadata": {"name": node, "namespace": LEASE_NAMESPACE}, "spec": spec})
        else:
            self.api.merge_patch(LEASES, node, {"spec": {"renewTime": spec["renewTime"]}}, LEASE_NAMESPACE)

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        threading.Thread(target=self.heartbeat, args=(stop,), name="heartbeat", daemon=True).start()
        resource_version: str | None = None
        failures = 0
        while not stop.is_set():
            try:
                if resource_version is None:
                    listing = self.api.list(PODS)
                    resource_version = listing["metadata"]["resourceVersion"]
                    self.reconcile(listing.get("items") or [])
                for event in self.api.watch(PODS, resource_version, timeout_seconds=WATCH_SECONDS):
                    if stop.is_set():
                        return
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        log.info("re-listing pods: %s", obj.get("message"))
                        resource_version = None
                        break
                    resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                    if event.get("type") != "BOOKMARK":
                        self.handle(event["type"], obj)
                failures = 0
            except Exception as e:  # noqa: BLE001 - API down or a bug: keep serving the pods we have
                if stop.is_set():
                    return
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                log.warning("watching pods failed (%s); retrying in %ss", short(e), delay)
                stop.wait(delay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netfence_lab.kubelet", description="the lab's kubelet for its nodes")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--lab-dir", default=None, help="default $NETFENCE_LAB_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.lab_dir) if args.lab_dir else lab_dir()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    api = LabApi(args.kubeconfig)
    kubelet = LabKubelet(root, api)
    runner = threading.Thread(target=kubelet.run, args=(stop,), name="kubelet", daemon=True)
    runner.start()
    stop.wait()
    log.info("stopping; the pods stay wired (`netfence lab down` removes them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
