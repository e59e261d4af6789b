#!/usr/bin/env python3
"""Pod birth: what holding new pods closed costs a pod that no policy selects.

Two nodes side by side (network namespaces with cni0 and br_netfilter), each with its agent:
one with the default `--new-pods=hold`, one with `--new-pods=open` (the baseline: the old,
fail-open behaviour). PODS new pods are born one after another, alternating between the nodes,
each wired by the real CNI `bridge` + `host-local` plugins with flannel's delegate config
(DESIGN.md §4) while the node's rule set does not name it yet; its server listens before the
CNI runs (the harshest case: on a real node containers start after it). A client pod on the
same node starts connecting to the new pod's IP before the CNI runs (a new attempt every
--interval s, each timing out after 0.25 s; its ARP requests repeated every 10 ms instead of
every second) and stops at the first connection accepted. After
CNI ADD returns, the bench waits --delay seconds (the controller: ~1.2 s on a real node, 0 for
the agent's own share) and writes the rule set naming the pod, unisolated, as the controller
would.

Per pod:  ip_to_connect_s  from CNI ADD's return (the IP is set a few ms before it) to the first
                           connection established (negative: before CNI ADD returned)
          early            a connection was accepted before the rule set naming the pod was written
          held_before_ip   (hold) the agent held the veth before the pod had an IP (from its log)
Prints p50/p99/max per mode as JSON, with the machine. Root; everything is made in namespaces
named nf-bench-<id>-* and removed by name at the end, also on failure or SIGTERM.

    sudo .venv/bin/python bench/pod_birth.py --pods 40 --delay 0
    sudo .venv/bin/python bench/pod_birth.py --pods 40 --delay 1.2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent"), str(REPO / "bench")]

from bench_machine import machine  # noqa: E402
from netfence_api import Isolation, NodeRuleSet, NodeRuleSetSpec, PolicedPod  # noqa: E402

CNI_BIN = Path("/usr/lib/cni")
PREFIX = {"hold": "10.244.0", "open": "10.244.1"}

# Runs in the client pod. Reads "IP PORT" lines; probes that address until the first connection
# is accepted (or 20 s pass) and prints one JSON line: {"ip", "first_ok" (monotonic time the
# first connection was established, or null), "attempts"}. An attempt started before the IP
# existed can still connect later (its SYN waits for ARP): what counts is when it connected.
PROBER = r"""
import asyncio, json, socket, sys, time
interval = float(sys.argv[1])
async def attempt(loop, ip, port):
    s = socket.socket()
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, (ip, port)), 0.25)
        return time.monotonic()  # when the handshake completed: the connection was accepted
    except (asyncio.TimeoutError, OSError):
        return None
    finally:
        s.close()
async def probe(loop, ip, port):
    accepted, attempts, tasks = [], 0, set()
    deadline = time.monotonic() + 20
    while not accepted and time.monotonic() < deadline:
        attempts += 1
        tasks.add(loop.create_task(attempt(loop, ip, port)))
        await asyncio.sleep(interval)
        for t in [t for t in tasks if t.done()]:
            tasks.discard(t)
            if t.result() is not None:
                accepted.append(t.result())
    accepted += [at for at in await asyncio.gather(*tasks) if at is not None]
    print(json.dumps({"ip": ip, "first_ok": min(accepted, default=None), "attempts": attempts}), flush=True)
async def main():
    loop = asyncio.get_running_loop()
    for line in sys.stdin:
        ip, port = line.split()
        await probe(loop, ip, int(port))
asyncio.run(main())
"""


def run(*cmd: str, input: str | None = None, env: dict | None = None, timeout: float = 30) -> str:
    out = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tag = f"nf-bench-{uuid.uuid4().hex[:6]}"
        self.work = Path(tempfile.mkdtemp(prefix="netfence-pod-birth-"))
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, dict] = {}

    # ------------------------------------------------------------------ setup
    def add_netns(self, name: str) -> str:
        name = f"{self.tag}-{name}"
        run("ip", "netns", "add", name)
        self.netns.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def spawn(self, netns: str, *argv: str, log: Path | None = None, **kwargs) -> subprocess.Popen:
        out = open(log, "w") if log else subprocess.DEVNULL
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=kwargs.pop("stdout", subprocess.DEVNULL),
                                stderr=out, **kwargs)
        self.procs.append(proc)
        return proc

    def node(self, mode: str) -> dict:
        prefix = PREFIX[mode]
        ns = self.add_netns(f"node-{mode}")
        run("ip", "-n", ns, "link", "add", "cni0", "type", "bridge")
        run("ip", "-n", ns, "addr", "add", f"{prefix}.1/24", "dev", "cni0")
        run("ip", "-n", ns, "link", "set", "cni0", "up")
        run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1",
            "net.bridge.bridge-nf-call-ip6tables=1", "net.ipv4.ip_forward=1")
        work = self.work / mode
        for d in ("netns", "cni", "ipam"):
            (work / d).mkdir(parents=True)
        node = {"mode": mode, "netns": ns, "prefix": prefix, "work": work, "pods": [], "next": 10,
                "rules": work / "rules.json", "generation": 0}
        self.nodes[mode] = node
        client = self.pod(node, "client", serve=False)
        # An unanswered ARP request is repeated after 1 s by default, which would then dominate
        # both modes alike: the client asks again every 10 ms, and does not give up.
        self.cni_add(node, client)
        run("ip", "netns", "exec", client["netns"], "sysctl", "-qw", "net.ipv4.neigh.eth0.retrans_time_ms=10",
            "net.ipv4.neigh.eth0.mcast_solicit=1000")
        self.write_rules(node)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("agent", "operator")))
        node["agent_log"] = work / "agent.log"
        self.spawn(ns, sys.executable, "-m", "netfence_agent", "agent", "--node", f"node-{mode}",
                   "--rules-file", str(node["rules"]), "--netns-dir", str(work / "netns"), "--cni-dir", str(work / "cni"),
                   "--metrics-bind-address", "", "--new-pods", mode, log=node["agent_log"], env=env)
        node["prober"] = self.spawn(client["netns"], sys.executable, "-c", PROBER, str(self.args.interval),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while "applied generation 1" not in node["agent_log"].read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent of {ns} did not start: {node['agent_log'].read_text()[-2000:]}")
            time.sleep(0.05)
        return node

    def pod(self, node: dict, name: str, serve: bool = True) -> dict:
        """A pod netns wired by the CNI bridge plugin (its server listening first)."""
        ns = self.add_netns(f"{node['mode']}-{name}")
        ip = f"{node['prefix']}.{node['next']}"
        node["next"] += 1
        (node["work"] / "netns" / ns).symlink_to(f"/var/run/netns/{ns}")  # containerd makes the netns first
        if serve:
            self.spawn(ns, sys.executable, str(REPO / "bench" / "connrate.py"), "serve", "--port", "80")
            time.sleep(0.15)  # the server binds 0.0.0.0:80 before there is any interface
        pod = {"name": name, "netns": ns, "ip": ip, "id": uuid.uuid4().hex}
        node["pods"].append(pod)
        return pod

    def cni_add(self, node: dict, pod: dict) -> None:
        config = {
            "cniVersion": "1.0.0", "name": "cbr0", "type": "bridge", "bridge": "cni0", "hairpinMode": True,
            "isDefaultGateway": True, "isGateway": True, "ipMasq": False, "mtu": 1450,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{node['prefix']}.0/24"}]],
                     "routes": [{"dst": "10.244.0.0/16"}], "dataDir": str(node["work"] / "ipam")},
        }
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": pod["id"], "CNI_NETNS": f"/var/run/netns/{pod['netns']}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_BIN), "CNI_ARGS": f"IgnoreUnknown=1;IP={pod['ip']}",
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        run("ip", "netns", "exec", node["netns"], str(CNI_BIN / "bridge"), input=json.dumps(config), env=env)

    def write_rules(self, node: dict) -> None:
        """As the controller: every live local pod, none selected by a policy."""
        node["generation"] += 1
        pods = [PolicedPod(namespace="bench", name=p["name"], uid=p["id"], ips=[p["ip"]], isolation=Isolation())
                for p in node["pods"]]
        rs = NodeRuleSet.for_node(NodeRuleSetSpec(nodeName=f"node-{node['mode']}", pods=pods), generation=node["generation"])
        tmp = node["rules"].with_suffix(".tmp")
        tmp.write_text(rs.model_dump_json())
        os.replace(tmp, node["rules"])

    # ------------------------------------------------------------------ one birth
    def birth(self, node: dict, index: int) -> dict:
        pod = self.pod(node, f"p{index}")
        node["pods"].pop()  # not in the rule set until the "controller" writes it
        prober = node["prober"]
        prober.stdin.write(f"{pod['ip']} 80\n")
        prober.stdin.flush()
        time.sleep(0.05)  # the client is connecting before the IP exists
        self.cni_add(node, pod)
        ip_at = time.monotonic()
        if self.args.delay:
            time.sleep(self.args.delay)
        node["pods"].append(pod)
        written_at = time.monotonic()
        self.write_rules(node)
        result = json.loads(prober.stdout.readline())
        first = result["first_ok"]
        return {"ip": pod["ip"], "ip_to_connect_s": None if first is None else first - ip_at,
                "early": first is not None and first < written_at, "attempts": result["attempts"]}

    def main(self) -> dict:
        for mode in ("hold", "open"):
            self.node(mode)
        results: dict[str, list[dict]] = {"hold": [], "open": []}
        for i in range(self.args.pods):
            for mode in (("hold", "open") if i % 2 == 0 else ("open", "hold")):
                results[mode].append(self.birth(self.nodes[mode], i))
        log = self.nodes["hold"]["agent_log"].read_text()
        out: dict = {"command": " ".join(sys.argv), "machine": machine(), "pods_per_mode": self.args.pods,
                     "controller_delay_s": self.args.delay, "probe_interval_s": self.args.interval}
        if self.args.rows:
            out["rows"] = results
        for mode, rows in results.items():
            times = sorted(r["ip_to_connect_s"] for r in rows if r["ip_to_connect_s"] is not None)
            out[mode] = {
                "ip_to_connect_p50_s": round(percentile(times, 50), 4) if times else None,
                "ip_to_connect_p99_s": round(percentile(times, 99), 4) if times else None,
                "ip_to_connect_max_s": round(times[-1], 4) if times else None,
                "never_connected": sum(r["ip_to_connect_s"] is None for r in rows),
                "accepted_before_rules": sum(r["early"] for r in rows),
            }
        # The agent logs a hold once, naming the pod's IPs or "no IP yet" when it held the veth first.
        out["hold"]["holds_logged"] = log.count("holding new pod veth")
        out["hold"]["held_before_ip"] = log.count("(no IP yet) closed")
        return out

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for name in reversed(self.netns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(self.work, ignore_errors=True)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=40, help="new pods per mode (default 40)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds from CNI ADD to the rule set naming the pod")
    p.add_argument("--interval", type=float, default=0.005, help="seconds between connection attempts")
    p.add_argument("--rows", action="store_true", help="print every pod's figures too")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/pod_birth.py needs root (network namespaces)", file=sys.stderr)
        return 2
    if not (CNI_BIN / "bridge").exists():
        print(f"no CNI bridge plugin in {CNI_BIN} (Debian: containernetworking-plugins)", file=sys.stderr)
        return 2
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally: cleanup
    try:
        print(json.dumps(bench.main(), indent=1))
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
