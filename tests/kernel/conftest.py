"""Kernel test fixtures: nftables in network namespaces the tests create, and a small node.

Everything is created in namespaces named nf-test-* (the shared netns_factory), which are
deleted by name afterwards, also when a test fails. The test process itself never leaves its
namespace: kernel calls run on a worker thread that lives in the test namespace
(netfence_agent.netns.executor_in), and agents run as `ip netns exec` subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netfence_agent.netns import executor_in
from netfence_agent.nft.kernel import OWNED_TABLES, Kernel

HELPERS = Path(__file__).resolve().parent / "helpers"
REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def in_netns(netns: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], check=check, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- nftables in a netns
class NetnsKernel:
    """A Kernel whose every call runs on a thread inside the test namespace."""

    def __init__(self, netns: str):
        self.netns = netns
        self.executor = executor_in(netns)
        self.kernel: Kernel = self.call(Kernel)

    def call(self, fn, *args, **kwargs):
        return self.executor.submit(fn, *args, **kwargs).result(timeout=120)

    def __getattr__(self, name):
        method = getattr(self.kernel, name)
        return lambda *a, **kw: self.call(method, *a, **kw)

    def nft(self, text: str) -> None:
        """A text command through libnftables, for test setup only."""
        import nftables

        def run():
            rc, _out, err = nftables.Nftables().cmd(text)
            assert rc == 0, err
        self.call(run)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class NullSource:
    """A rule-set source for an agent the caller feeds itself (set_rule_set); status goes nowhere."""

    def updates(self):
        return iter(())

    def report(self, status) -> None:
        pass

    def close(self) -> None:
        pass


def driven_agent(node: str, kernel, workdir: Path, **config):
    """An agent run by its caller, one sync_once at a time, on `kernel` (a NetnsKernel): no
    source, no HTTP, no discovery; br_netfilter's sysctls faked under `workdir`."""
    from netfence_agent.daemon import Agent, AgentConfig

    sysctl = Path(workdir) / "net" / "bridge"
    sysctl.mkdir(parents=True, exist_ok=True)
    for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        (sysctl / name).write_text("1\n")
    config = AgentConfig(node=node, metrics_bind_address=None, proc_sys=str(workdir), **{"full_sync_period": 0, **config})
    return Agent(config, NullSource(), kernel)


@pytest.fixture
def kernel_in(netns_factory) -> Iterator:
    made: list[NetnsKernel] = []

    def make(tag: str = "nft") -> NetnsKernel:
        handle = NetnsKernel(netns_factory(tag))
        made.append(handle)
        return handle

    yield make
    for handle in made:
        handle.close()


def normalized(listing: list[dict]) -> dict:
    """A kernel listing (list table ... JSON) as a comparable value: no handles, no counts,
    set elements in a stable order."""
    out: dict = {}
    for item in listing:
        kind, body = next(iter(item.items()))
        body = {k: v for k, v in body.items() if k not in ("handle", "packets", "bytes")}
        if "elem" in body:
            body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        if kind == "rule":
            out.setdefault(("rules", body["family"], body["chain"]), []).append(body)
        else:
            out[(kind, body.get("family"), body.get("table", ""), body["name"])] = body
    return out


# --------------------------------------------------------------------------- a node with pods
@dataclass
class Pod:
    namespace: str
    name: str
    netns: str
    ip: str
    mac: str
    veth: str
    servers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Node:
    """A node netns with a cni0 bridge (br_netfilter on), pods on veths, and its agent."""

    name: str
    netns: str
    workdir: Path
    netns_factory: object
    pods: dict[str, Pod] = field(default_factory=dict)
    agents: list[subprocess.Popen] = field(default_factory=list)
    prefix: str = "10.244.0"
    _next_ip: int = 2

    @property
    def netns_dir(self) -> Path:
        return self.workdir / "netns"

    @property
    def cni_dir(self) -> Path:
        return self.workdir / "cni"

    @property
    def rules_file(self) -> Path:
        return self.workdir / "rules.json"

    @property
    def status_file(self) -> Path:
        return self.workdir / "rules.json.status.json"

    def add_pod(self, namespace: str, name: str, serve: bool = True, netns_link: bool = True,
                cni_record: bool = False) -> Pod:
        """A pod netns with eth0 veth-paired into cni0, like the CNI bridge plugin makes it."""
        netns = self.netns_factory("pod")
        # An IPv4-only pod network: without this, the pods' IPv6 link-local chatter (router
        # solicitations, MLD) counts as spoofed in the bridge anti-spoofing chains.
        in_netns(netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        index = self._next_ip
        self._next_ip += 1
        ip = f"{self.prefix}.{index}"
        mac = f"02:42:0a:f4:00:{index:02x}"
        veth = f"veth{os.urandom(4).hex()}"
        run_ip("link", "add", "eth0", "address", mac, "type", "veth", "peer", "name", veth, "netns", self.netns, netns=netns)
        run_ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=netns)
        run_ip("link", "set", "eth0", "up", netns=netns)
        run_ip("route", "add", "default", "via", f"{self.prefix}.1", netns=netns)
        run_ip("link", "set", veth, "master", "cni0", "up", netns=self.netns)
        pod = Pod(namespace, name, netns, ip, mac, veth)
        if netns_link:
            (self.netns_dir / netns).symlink_to(f"/var/run/netns/{netns}")
        if cni_record:
            write_cni_record(self.cni_dir, pod)
        if serve:
            pod.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", netns, PYTHON, str(HELPERS / "netprobe.py"), "serve", "--port", "80", "--port", "81"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.pods[name] = pod
        return pod

    # ------------------------------------------------------------------ the agent
    def start_agent(self, *extra: str, metrics_port: int = 9469, stdout=subprocess.DEVNULL) -> subprocess.Popen:
        cmd = ["ip", "netns", "exec", self.netns, PYTHON, "-m", "netfence_agent", "agent", "--node", self.name,
               "--rules-file", str(self.rules_file), "--netns-dir", str(self.netns_dir), "--cni-dir", str(self.cni_dir),
               "--metrics-bind-address", f"127.0.0.1:{metrics_port}", *extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("agent", "operator")))
        log = open(self.workdir / f"agent-{len(self.agents)}.log", "w")
        agent = subprocess.Popen(cmd, stdout=stdout, stderr=log, env=env, text=True)
        self.agents.append(agent)
        return agent

    def stop_agent(self, agent: subprocess.Popen) -> None:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=20)

    def agent_log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.workdir.glob("agent-*.log")))

    def write_rules(self, rule_set) -> str:
        """Write a NodeRuleSet the atomic way; returns its spec hash."""
        tmp = self.rules_file.with_suffix(".tmp")
        tmp.write_text(rule_set.model_dump_json())
        os.replace(tmp, self.rules_file)
        return rule_set.spec.content_hash()

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def wait_status(self, predicate, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status and predicate(status):
                return status
            time.sleep(0.005)
        raise AssertionError(f"status never matched; last: {self.status()}\n--- agent log ---\n{self.agent_log()}")

    def wait_applied(self, spec_hash: str, timeout: float = 20.0) -> dict:
        return self.wait_status(lambda s: s.get("appliedHash") == spec_hash and _condition(s, "Applied") == "True", timeout)

    def http(self, path: str, port: int = 9469) -> tuple[int, str]:
        out = in_netns(self.netns, PYTHON, str(HELPERS / "netprobe.py"), "http", f"http://127.0.0.1:{port}{path}", check=False)
        code, _, body = out.stdout.partition("\n")
        return int(code or 0), body

    def nft_tables(self) -> list[str]:
        return in_netns(self.netns, "nft", "list", "tables").stdout.split("\n")

    def close(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)
        for pod in self.pods.values():
            for server in pod.servers:
                server.kill()
                server.wait(timeout=10)


def _condition(status: dict, kind: str) -> str | None:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == kind), None)


def run_ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


def write_cni_record(cni_dir: Path, pod: Pod, sandbox: str | None = None) -> Path:
    """A libcni result cache file as containerd + flannel's bridge plugin leave it."""
    sandbox = sandbox or os.urandom(32).hex()
    record = {
        "kind": "cniCacheV1", "containerId": sandbox, "ifName": "eth0", "networkName": "cbr0",
        "cniArgs": [["IgnoreUnknown", "1"], ["K8S_POD_NAMESPACE", pod.namespace], ["K8S_POD_NAME", pod.name],
                    ["K8S_POD_INFRA_CONTAINER_ID", sandbox], ["K8S_POD_UID", f"uid-{pod.name}"]],
        "result": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "02:00:00:00:00:01"}, {"name": pod.veth, "mac": "02:00:00:00:00:02"},
                           {"name": "eth0", "mac": pod.mac, "sandbox": f"/var/run/netns/{pod.netns}"}],
            "ips": [{"interface": 2, "address": f"{pod.ip}/24", "gateway": pod.ip.rsplit(".", 1)[0] + ".1"}],
        },
    }
    path = cni_dir / f"cbr0-{sandbox}-eth0"
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def node_factory(netns_factory) -> Iterator:
    made: list[Node] = []
    workdirs: list[str] = []

    def make(name: str = "node-a", prefix: str = "10.244.0") -> Node:
        netns = netns_factory("node")
        workdir = Path(tempfile.mkdtemp(prefix="nf-test-agent-"))
        workdirs.append(str(workdir))
        node = Node(name, netns, workdir, netns_factory, prefix=prefix)
        node.netns_dir.mkdir()
        node.cni_dir.mkdir()
        run_ip("link", "add", "cni0", "type", "bridge", netns=netns)
        run_ip("addr", "add", f"{prefix}.1/24", "dev", "cni0", netns=netns)
        run_ip("link", "set", "cni0", "up", netns=netns)
        in_netns(netns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()
    for path in workdirs:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node(node_factory) -> Node:
    return node_factory()


def probe(pod: Pod, target: Pod | str, port: int = 80, udp: bool = False, timeout: float = 1.0) -> bool:
    """One connection attempt from a pod (True: connected / answered)."""
    address = target.ip if isinstance(target, Pod) else target
    args = ["connect", address, str(port), "--timeout", str(timeout)] + (["--udp"] if udp else [])
    out = in_netns(pod.netns, PYTHON, str(HELPERS / "netprobe.py"), *args, check=False, timeout=timeout + 20)
    return out.returncode == 0


def wait_serving(pod: Pod, timeout: float = 10.0) -> None:
    """The pod's server answers on its own loopback (not through any policy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_netns(pod.netns, PYTHON, str(HELPERS / "netprobe.py"), "connect", "127.0.0.1", "80", "--timeout", "0.5",
                    check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"server in {pod.key} never came up")


def owned_tables(listing: list[str]) -> list[str]:
    return [t for t in listing if t.strip() in {f"table {f} {n}" for f, n in OWNED_TABLES}]
