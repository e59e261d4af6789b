"""Build and tear down the lab's namespaces, links and processes from a LabPlan.

The layout is flannel's vxlan backend, node by node:
  underlay netns: bridge br0, one veth port u<N> per node
  node netns:     eth0 (underlay IP), cni0 bridge (podCIDR .1, hairpin ports), flannel.1 VXLAN
                  (VNI 1, UDP 8472, nolearning, <podCIDR network>/32), and per other node an
                  onlink route to its podCIDR via its flannel.1 address, a permanent neighbour
                  entry for that address and an fdb entry sending its VTEP MAC to its underlay IP
  pod netns:      eth0 (veth peer of veth<hex> on cni0), pod IP/prefix, default via cni0
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from pathlib import Path

from netfence_lab import system
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
    cni_result,
    cni_result_filename,
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
        # cni0: the pods' bridge and gateway.
        cidr = ipaddress.ip_network(node.pod_cidr)
        system.ip(ns, "link", "add", "cni0", "address", node.cni0_mac, "type", "bridge")
        system.ip(ns, "addr", "add", f"{node.cni0_ip}/{cidr.prefixlen}", "dev", "cni0")
        system.ip(ns, "link", "set", "cni0", "mtu", str(POD_MTU), "up")
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
        ndir = self.store.node_dir(node.name)
        (ndir / "cni" / "results").mkdir(parents=True, exist_ok=True)
        (ndir / "cni" / "networks" / "cbr0").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- pods
    def build_pod(self, plan: LabPlan, pod: PodPlan) -> None:
        node = plan.node(pod.node)
        if not pod.host_network:
            ns = pod.netns
            self._add_netns(ns)
            system.ip(ns, "link", "set", "lo", "up")
            system.ip(
                node.netns, "link", "add", pod.veth, "address", pod.veth_mac, "mtu", str(POD_MTU),
                "type", "veth", "peer", "name", "eth0", "address", pod.mac, "mtu", str(POD_MTU), "netns", ns,
            )
            system.ip(node.netns, "link", "set", pod.veth, "master", "cni0")
            system.ip(node.netns, "link", "set", pod.veth, "type", "bridge_slave", "hairpin", "on")
            system.ip(node.netns, "link", "set", pod.veth, "up")
            prefix = ipaddress.ip_network(node.pod_cidr).prefixlen
            system.ip(ns, "addr", "add", f"{pod.ip}/{prefix}", "dev", "eth0")
            system.ip(ns, "link", "set", "eth0", "up")
            system.ip(ns, "route", "add", "default", "via", node.cni0_ip, "dev", "eth0")
            self.write_cni_record(plan, pod)
        self.start_server(pod)

    def write_cni_record(self, plan: LabPlan, pod: PodPlan) -> None:
        node = plan.node(pod.node)
        cni = self.store.node_dir(node.name) / "cni"
        write_atomic(cni / "results" / cni_result_filename(pod), json.dumps(cni_result(pod, node)), mode=0o600)
        # host-local's lease: the container ID, then the interface (as the IPAM plugin writes it)
        write_atomic(cni / "networks" / "cbr0" / pod.ip, f"{pod.sandbox_id}\r\neth0", mode=0o644)

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


def teardown(store: StateStore, state: LabState) -> list[str]:
    """Remove everything the record names: processes, then namespaces, then the lab's files.

    Returns what was removed, for the user. Safe to repeat; names not present are skipped.
    """
    done: list[str] = []
    recorded = [(p.pid, p.starttime) for p in state.processes]
    for pid in system.terminate(recorded):
        done.append(f"process {pid}")
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


def _remove_files(store: StateStore, state: LabState) -> None:
    import shutil

    names: set[str] = set()
    if state.plan:
        names.update(n["name"] for n in state.plan.get("nodes", []))
    for n in names:
        d = store.node_dir(n)
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
    for extra in ("cluster.yaml",):
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
