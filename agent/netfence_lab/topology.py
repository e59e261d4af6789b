"""Build and tear down the lab's namespaces, links and processes from a LabPlan.

The layout is flannel's vxlan backend, node by node:
  underlay netns: bridge br0, one veth port u<N> per node
  node netns:     eth0 (underlay IP), flannel.1 VXLAN (VNI 1, UDP 8472, nolearning,
                  <podCIDR network>/32), and per other node an onlink route to its podCIDR via
                  its flannel.1 address, a permanent neighbour entry for that address and an
                  fdb entry sending its VTEP MAC to its underlay IP; br_netfilter's sysctls
  pod netns:      wired by the CNI bridge plugin with flannel's delegate config (cni.py): the
                  plugin makes cni0 (podCIDR .1) on the node's first pod, a veth<hex> port with
                  hairpin on it, eth0 with the pod IP and the routes in the pod
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from netfence_lab import cni, system
from netfence_lab.model import (
    POD_MTU,
    UNDERLAY_BRIDGE,
    UNDERLAY_MTU,
    UNDERLAY_NETNS,
    VXLAN_PORT,
    VXLAN_VNI,
    LabPlan,
    NodePlan,
    PodPlan,
)
from netfence_lab.state import LabState, ProcessRecord, StateStore, write_atomic

HERE = Path(__file__).resolve().parent
PODSERVER = HERE / "podserver.py"
SERVER_READY_TIMEOUT = 15.0


class Builder:
    """Creates what the plan names, recording each name in the state before creating it."""

    def __init__(self, store: StateStore, state: LabState):
        self.store = store
        self.state = state

    # ---------------------------------------------------------------- record-then-create
    def _add_netns(self, name: str) -> None:
        if system.netns_exists(name):
            raise system.LabError(
                f"network namespace {name} already exists and is not part of this lab's record; "
                f"if it is left from an older lab, remove it with `ip netns delete {name}`"
            )
        self.state.netns.append(name)
        self.store.save(self.state)
        system.netns_add(name)

    def _record_process(self, rec: ProcessRecord) -> None:
        self.state.processes.append(rec)
        self.store.save(self.state)

    # ---------------------------------------------------------------- nodes
    def build_underlay(self, plan: LabPlan) -> None:
        self._add_netns(UNDERLAY_NETNS)
        system.ip(UNDERLAY_NETNS, "link", "set", "lo", "up")
        system.ip(UNDERLAY_NETNS, "link", "add", UNDERLAY_BRIDGE, "type", "bridge")
        system.ip(UNDERLAY_NETNS, "link", "set", UNDERLAY_BRIDGE, "up")

    def build_node(self, plan: LabPlan, node: NodePlan) -> None:
        ns = node.netns
        self._add_netns(ns)
        system.ip(ns, "link", "set", "lo", "up")
        system.sysctl(
            ns,
            {
                "net.ipv4.ip_forward": "1",
                # br_netfilter behaviour: bridged pod traffic passes the inet hooks (DESIGN §4)
                "net.bridge.bridge-nf-call-iptables": "1",
                "net.bridge.bridge-nf-call-ip6tables": "1",
            },
        )
        # Underlay: a veth from the underlay bridge into the node, named eth0 inside the node.
        system.ip(UNDERLAY_NETNS, "link", "add", node.underlay_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        system.ip(UNDERLAY_NETNS, "link", "set", node.underlay_if, "master", UNDERLAY_BRIDGE, "up")
        system.ip(ns, "link", "set", "eth0", "mtu", str(UNDERLAY_MTU), "up")
        system.ip(ns, "addr", "add", f"{node.underlay_ip}/{node.underlay_prefix}", "dev", "eth0")
        if node.underlay_prefix == 32:  # addresses share no subnet: reach each peer on-link
            for other in plan.nodes:
                if other.name != node.name:
                    system.ip(ns, "route", "add", f"{other.underlay_ip}/32", "dev", "eth0", "scope", "link")
        # cni0 is not made here: the CNI bridge plugin makes it with the node's first pod.
        # flannel.1: the VXLAN device; the pod network's other /24s are reached through it.
        system.ip(
            ns, "link", "add", "flannel.1", "address", node.vtep_mac, "type", "vxlan",
            "id", str(VXLAN_VNI), "local", node.underlay_ip, "dev", "eth0",
            "dstport", str(VXLAN_PORT), "nolearning",
        )
        system.ip(ns, "link", "set", "flannel.1", "mtu", str(POD_MTU), "up")
        system.ip(ns, "addr", "add", f"{node.vtep_ip}/32", "dev", "flannel.1")
        for other in plan.nodes:
            if other.name == node.name:
                continue
            system.ip(ns, "route", "add", other.pod_cidr, "via", other.vtep_ip, "dev", "flannel.1", "onlink")
            system.ip(ns, "neigh", "add", other.vtep_ip, "lladdr", other.vtep_mac, "dev", "flannel.1", "nud", "permanent")
            system.bridge(ns, "fdb", "append", other.vtep_mac, "dev", "flannel.1", "dst", other.underlay_ip)
        cni_results_dir(self.store, node.name).mkdir(parents=True, exist_ok=True)
        cni_networks_dir(self.store, node.name).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- pods
    def build_pod(self, plan: LabPlan, pod: PodPlan) -> None:
        if not pod.host_network:
            self._add_netns(pod.netns)
            wire_pod(self.store, plan.node(pod.node), plan.cluster_cidr, pod)
            self.state.plan = plan.to_dict()  # what the plugin chose (veth, MACs) goes on record
            self.store.save(self.state)
        self.start_server(pod)

    def pod_files(self, pod: PodPlan) -> tuple[Path, Path]:
        base = self.store.node_dir(pod.node) / "pods" / f"{pod.namespace}_{pod.name}"
        return base.with_suffix(".log"), base.with_suffix(".ready")

    def start_server(self, pod: PodPlan) -> None:
        log, ready = self.pod_files(pod)
        ready.unlink(missing_ok=True)
        argv = [
            "ip", "netns", "exec", pod.netns, sys.executable, "-I", "-S", str(PODSERVER),
            "--tcp", ",".join(map(str, pod.ports_of("TCP"))),
            "--udp", ",".join(map(str, pod.ports_of("UDP"))),
            "--ready-file", str(ready),
        ]
        if pod.host_network:
            # In the node netns a wildcard UDP socket replies from the route's source address
            # (cni0 or flannel.1), which a connected client discards: answer from the pod's IP.
            argv += ["--bind", pod.ip]
        pid, start = system.spawn(argv, log)
        self._record_process(ProcessRecord(pid, start, "server", pod.key, pod.netns, str(log)))

    def wait_servers(self, pods: list[PodPlan]) -> None:
        by_key = {r.owner: r for r in self.state.processes if r.role == "server"}
        pending = {p.key: p for p in pods}
        deadline = time.monotonic() + SERVER_READY_TIMEOUT
        while pending:
            for key, pod in list(pending.items()):
                rec = by_key[key]
                if self.pod_files(pod)[1].exists():
                    del pending[key]
                elif not system.is_alive(rec.pid, rec.starttime):
                    raise system.LabError(f"server of pod {key} exited: {_tail(Path(rec.log))}")
            if pending and time.monotonic() > deadline:
                raise system.LabError(f"servers of pods {sorted(pending)} not ready after {SERVER_READY_TIMEOUT:.0f}s")
            if pending:
                time.sleep(0.02)


# ---------------------------------------------------------------------- CNI wiring
def cni_results_dir(store: StateStore, node: str) -> Path:
    """The node's libcni result cache (a node's /var/lib/cni/results): what the agent reads."""
    return store.node_dir(node) / "cni" / "results"


def cni_networks_dir(store: StateStore, node: str) -> Path:
    """host-local's dataDir (a node's /var/lib/cni/networks): leases in cbr0/<ip>."""
    return store.node_dir(node) / "cni" / "networks"


def _cni_call(store: StateStore, node: NodePlan, cluster_cidr: str, pod: PodPlan, ip: str | None):
    config = cni.delegate_config(node.pod_cidr, cluster_cidr, POD_MTU, str(cni_networks_dir(store, node.name)))
    args = cni.cni_args(pod.namespace, pod.name, pod.uid, pod.sandbox_id, ip)
    return config, args, str(system.NETNS_DIR / pod.netns)


def wire_pod(store: StateStore, node: NodePlan, cluster_cidr: str, pod: PodPlan, ask_ip: bool = True) -> None:
    """CNI ADD for a pod whose netns exists; fills in what the plugin chose (IP when not asked
    for one, veth name, MACs) and writes libcni's result cache for the agent."""
    config, args, netns_path = _cni_call(store, node, cluster_cidr, pod, pod.ip if ask_ip and pod.ip else None)
    result, raw = cni.add(node.netns, netns_path, pod.sandbox_id, config, args)
    pod.veth, pod.veth_mac, pod.mac, ip = cni.wired_interfaces(result)
    if ask_ip and pod.ip and ip != pod.ip:
        raise cni.CniError(f"host-local gave pod {pod.key} {ip}, not the {pod.ip} asked for")
    pod.ip = ip
    entry = cni.cache_entry(pod.sandbox_id, raw, netns_path, args, result)
    write_atomic(cni_results_dir(store, node.name) / cni.cache_filename(pod.sandbox_id), json.dumps(entry), mode=0o600)


def unwire_pod(store: StateStore, node: NodePlan, cluster_cidr: str, pod: PodPlan) -> None:
    """CNI DEL (the lease goes back, the veth goes away), then the cache entry, as libcni does."""
    config, args, netns_path = _cni_call(store, node, cluster_cidr, pod, None)
    cni.delete(node.netns, netns_path, pod.sandbox_id, config, args)
    (cni_results_dir(store, node.name) / cni.cache_filename(pod.sandbox_id)).unlink(missing_ok=True)


def teardown(store: StateStore, state: LabState) -> list[str]:
    """Remove everything the record names: processes, then pods (CNI DEL), then namespaces,
    then the lab's files.

    Returns what was removed, for the user. Safe to repeat; names not present are skipped.
    """
    done: list[str] = []
    recorded = [(p.pid, p.starttime) for p in state.processes]
    for pid in system.terminate(recorded):
        done.append(f"process {pid}")
    unwire_all(store, state)
    # Anything else still running inside our namespaces was started by us too (e.g. a server
    # whose record a crash cut off): those namespaces hold nothing else.
    for name in reversed(state.netns):
        pids = system.netns_pids(name)
        starts = [(p, s) for p in pids if (s := system.process_starttime(p)) is not None]
        for pid in system.terminate(starts):
            done.append(f"process {pid} (in {name})")
    for name in reversed(state.netns):
        if system.netns_exists(name):
            system.netns_delete(name)
            done.append(f"netns {name}")
    _remove_files(store, state)
    return done


def unwire_all(store: StateStore, state: LabState) -> None:
    """CNI DEL for every wired pod whose namespaces still exist. A failure is no reason to stop:
    deleting the namespaces below removes the veths anyway, and the leases live in the lab dir."""
    if not state.plan:
        return
    plan = state.lab_plan()
    nodes = {n.name: n for n in plan.nodes}
    for pod in plan.pods:
        node = nodes.get(pod.node)
        if pod.host_network or not pod.veth or node is None:
            continue
        if not (system.netns_exists(node.netns) and system.netns_exists(pod.netns)):
            continue
        try:
            unwire_pod(store, node, plan.cluster_cidr, pod)
        except system.LabError as e:
            print(f"warning: {e}", file=sys.stderr)


def _remove_files(store: StateStore, state: LabState) -> None:
    import shutil

    names: set[str] = set()
    if state.plan:
        names.update(n["name"] for n in state.plan.get("nodes", []))
    for n in names:
        d = store.node_dir(n)
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
    # cluster.yaml; on an API server also the kubelet's record, the agents' kubeconfig, the logs of the lab's own processes
    for extra in ("cluster.yaml", "kubelet.json", "agent-kubeconfig", "kubelet.log", "controller.log", "apiproxy.log"):
        (store.root / extra).unlink(missing_ok=True)
    store.path.unlink(missing_ok=True)
    try:
        store.root.rmdir()
    except OSError:
        pass  # not empty: something not ours is in there; leave it


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def tail(path: Path, lines: int = 5) -> str:
    return _tail(path, lines)


def env_with_source_roots() -> dict[str, str]:
    """The environment for child Pythons: our source roots on PYTHONPATH, as in this process."""
    import netfence_lab

    roots = [str(Path(netfence_lab.__file__).resolve().parent.parent)]
    try:
        import netfence_api

        roots.append(str(Path(netfence_api.__file__).resolve().parent.parent))
    except ImportError:
        pass
    env = dict(os.environ)
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + ([old] if old else [])))
    return env
