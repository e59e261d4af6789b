#!/usr/bin/env python3
"""Datapath benchmark: what netfence's rules cost traffic between two pods on one node.

A node netns with bridge cni0 (br_netfilter on, as flannel needs it) and two pods on veths:
a client and a server. Measured in one run, for each configuration:
  - iperf3 TCP throughput, client -> server (one stream)
  - TCP connections per second (bench/connrate.py: full handshake, then RST), every one a new
    flow through the policy chains
Configurations: no netfence tables and no connection tracking ("bare"); no netfence tables but
connection tracking on (the baseline: every Kubernetes node has it on, for kube-proxy and
flannel's NAT, and any stateful policy needs it); then netfence with 10, 1,000 and 10,000
policies.
Policies select IP-keyed synthetic pods of the node plus the two real ones; every pod, the
client and the server included, is selected by its share of them (policies / pods), so the
server's ingress chain and the client's egress chain grow with the policy count, and the rule
allowing client -> server is the last one in each. Results are ratios to the conntrack
baseline measured just before and after each configuration (bare shows what conntrack costs).

Root only; creates netns nf-bench-dp-<hex>-{node,client,server} and deletes them by name.
Needs iperf3 (Debian package iperf3).

    .venv/bin/python bench/datapath.py [--policies 10,1000,10000] [--seconds 5] [--repeat 3]
Target: >= 97% of baseline, flat in the number of policies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("operator", "agent", "tests")]

from bench_machine import machine  # noqa: E402
from netfence_api import AllowRule, Isolation, NodeRuleSetSpec, PeerGroup, PolicedPod, PortRange  # noqa: E402
from netfence_agent.netns import executor_in  # noqa: E402
from netfence_agent.nft.kernel import Kernel  # noqa: E402
from netfence_agent.nft.transaction import plan  # noqa: E402
from netfence_agent.render import PodPort, render  # noqa: E402

CLIENT_IP, SERVER_IP = "10.244.0.2", "10.244.0.3"
IPERF_PORT, CONN_PORT = 5201, 5001
SYNTHETIC_PODS = 1000
CONNTRACK_TABLE = ("inet", "nf_bench_conntrack")


def sh(*cmd: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=capture, text=True, timeout=600)


def spec_with(policies: int) -> NodeRuleSetSpec:
    """`policies` policies over SYNTHETIC_PODS + 2 pods; client -> server allowed last."""
    pod_count = min(policies, SYNTHETIC_PODS) + 2
    names = ["client", "server"] + [f"pod-{i}" for i in range(pod_count - 2)]
    ips = [CLIENT_IP, SERVER_IP] + [f"10.244.{100 + i // 250}.{i % 250 + 2}" for i in range(pod_count - 2)]
    groups = [PeerGroup(name=f"g-{j}", selector=f"app=peer-{j}", cidrs=[f"10.245.{j // 250 % 250}.{j % 250 + 2}/32",
                                                                       f"10.246.{j % 250}.0/24"])
              for j in range(min(policies, 2000))]
    ingress: dict[int, list[AllowRule]] = {i: [] for i in range(pod_count)}
    egress: dict[int, list[AllowRule]] = {i: [] for i in range(pod_count)}
    for n in range(policies):
        target = n % pod_count
        group = groups[n % len(groups)].name
        ingress[target].append(AllowRule(origin=[f"ns/policy-{n} ingress[0]"], peers=group,
                                         ports=[PortRange(port=8000 + n % 1000), PortRange(protocol="UDP", port=53)]))
        egress[target].append(AllowRule(origin=[f"ns/policy-{n} egress[0]"], peers=group,
                                        ports=[PortRange(port=5432)]))
    groups += [PeerGroup(name="g-client", selector="app=client", cidrs=[f"{CLIENT_IP}/32"]),
               PeerGroup(name="g-server", selector="app=server", cidrs=[f"{SERVER_IP}/32"])]
    ingress[1].append(AllowRule(origin=["ns/allow-client ingress[0]"], peers="g-client",
                                ports=[PortRange(port=IPERF_PORT), PortRange(port=CONN_PORT)]))
    egress[0].append(AllowRule(origin=["ns/client-out egress[0]"], peers="g-server"))
    pods = [PolicedPod(namespace="ns", name=names[i], uid=f"u{i}", ips=[ips[i]],
                       isolation=Isolation(ingress=True, egress=True),
                       ingressPolicies=["ns/policies"], egressPolicies=["ns/policies"],
                       ingress=ingress[i], egress=egress[i]) for i in range(pod_count)]
    return NodeRuleSetSpec(nodeName="bench", pods=pods, peerGroups=groups)


class Bench:
    def __init__(self, seconds: float):
        tag = os.urandom(3).hex()
        self.node, self.client, self.server = (f"nf-bench-dp-{tag}-{r}" for r in ("node", "client", "server"))
        self.seconds = seconds
        self.processes: list[subprocess.Popen] = []
        self.failed = 0  # connection attempts that failed, over the whole run
        self.executor = None

    def up(self) -> None:
        for ns in (self.node, self.client, self.server):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.node, "link", "add", "cni0", "type", "bridge")
        sh("ip", "-n", self.node, "addr", "add", "10.244.0.1/24", "dev", "cni0")
        sh("ip", "-n", self.node, "link", "set", "cni0", "up")
        sh("ip", "netns", "exec", self.node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1",
           "net.bridge.bridge-nf-call-ip6tables=1")
        self.macs = {}
        for ns, ip, veth in ((self.client, CLIENT_IP, "vethclient"), (self.server, SERVER_IP, "vethserver")):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", veth, "netns", self.node)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.node, "link", "set", veth, "master", "cni0", "up")
            self.macs[ip] = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "eth0").stdout)[0]["address"]
        self.processes.append(subprocess.Popen(["ip", "netns", "exec", self.server, "iperf3", "-s", "-p", str(IPERF_PORT)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.processes.append(subprocess.Popen(["ip", "netns", "exec", self.server, sys.executable,
                                                str(ROOT / "bench" / "connrate.py"), "serve", "--port", str(CONN_PORT)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.executor = executor_in(self.node)
        self.kernel: Kernel = self.executor.submit(Kernel).result()
        time.sleep(0.5)

    def load(self, policies: int | str) -> str:
        """netfence rules with this many policies, or "bare" / "conntrack" (no netfence tables)."""
        k = lambda fn, *a: self.executor.submit(fn, *a).result()  # noqa: E731
        k(self.kernel.delete_tables)
        k(self.kernel.delete_tables, [CONNTRACK_TABLE])
        if policies == "bare":
            return "no tables, no connection tracking"
        if policies == "conntrack":
            # A rule using ct, in a chain nothing jumps to: conntrack on, no rule on the path.
            k(self.kernel.run, [
                {"add": {"table": {"family": "inet", "name": CONNTRACK_TABLE[1]}}},
                {"add": {"chain": {"family": "inet", "table": CONNTRACK_TABLE[1], "name": "unused"}}},
                {"add": {"rule": {"family": "inet", "table": CONNTRACK_TABLE[1], "chain": "unused", "expr": [
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new"]}}, {"accept": None}]}}},
            ])
            return "no netfence tables, connection tracking on"
        spec = spec_with(policies)
        ports = {CLIENT_IP: PodPort("vethclient", self.macs[CLIENT_IP]), SERVER_IP: PodPort("vethserver", self.macs[SERVER_IP])}
        result = render(spec, ports)
        started = time.perf_counter()
        k(self.kernel.apply, plan(result.ruleset, None, lambda: k(self.kernel.inventory)))
        chain = result.ruleset.table("inet", "netfence").chains
        server_rules = next(len(c.rules) for n, c in chain.items() if n.endswith("_ingress") and "server" in c.comment)
        return (f"{policies} policies over {len(spec.pods)} pods, server ingress chain {server_rules} rules "
                f"(loaded in {time.perf_counter() - started:.1f} s)")

    def throughput(self) -> float:
        out = sh("ip", "netns", "exec", self.client, "iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT),
                 "-t", str(self.seconds), "-J")
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]

    def conn_rate(self) -> float:
        out = sh("ip", "netns", "exec", self.client, sys.executable, str(ROOT / "bench" / "connrate.py"), "connect",
                 SERVER_IP, str(CONN_PORT), "--seconds", str(self.seconds), "--procs", "2")
        rate, failed = out.stdout.split()
        if float(rate) == 0:
            raise RuntimeError(f"no connection succeeded ({failed} failed): the rules block client -> server")
        self.failed += int(failed)
        return float(rate)

    def down(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        for p in self.processes:
            p.kill()
            p.wait(timeout=10)
        for ns in (self.node, self.client, self.server):
            sh("ip", "netns", "del", ns, check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="10,1000,10000")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--repeat", type=int, default=3, help="measurements per configuration")
    args = p.parse_args()
    if os.geteuid() != 0 or not shutil.which("iperf3"):
        print("bench/datapath.py needs root and iperf3", file=sys.stderr)
        return 2
    policy_counts = [int(x) for x in args.policies.split(",")]
    # Each configuration is loaded once (10,000 policies take minutes to load, see
    # docs/benchmarks.md) and measured --repeat times; a conntrack baseline runs before the first
    # and after every netfence configuration, and each is compared with the baselines on either
    # side of it, so that drift from other load on the machine cancels out as far as it can.
    sequence: list[int | str] = ["bare", "conntrack"]
    for count in policy_counts:
        sequence += [count, "conntrack"]
    bench = Bench(args.seconds)
    measured: list[tuple[int | str, str, float, float, list[float], list[float]]] = []
    try:
        bench.up()
        for config in sequence:
            what = bench.load(config)
            gbps = [bench.throughput() / 1e9 for _ in range(args.repeat)]
            rates = [bench.conn_rate() for _ in range(args.repeat)]
            measured.append((config, what, statistics.median(gbps), statistics.median(rates), gbps, rates))
            print(f"  {config}: {what}: Gbit/s {[round(g, 2) for g in gbps]}, conn/s {[round(r) for r in rates]}",
                  file=sys.stderr)
    finally:
        bench.down()

    print(f"machine: {machine()}")
    print(f"{args.repeat} measurements of {args.seconds:.0f} s per configuration, medians [min-max]; "
          f"ratios to the mean of the conntrack baselines just before and after")
    print(f"{'configuration':<16} {'Gbit/s':>20} {'ratio':>7} {'conn/s':>20} {'ratio':>7}  detail")
    for i, (config, what, gbps, rate, all_gbps, all_rates) in enumerate(measured):
        near = [m for m in (measured[i - 1] if i else None, measured[i + 1] if i + 1 < len(measured) else None)
                if m is not None and m[0] == "conntrack"] or [m for m in measured if m[0] == "conntrack"]
        base_g = statistics.mean(m[2] for m in near)
        base_r = statistics.mean(m[3] for m in near)
        label = f"netfence {config}" if isinstance(config, int) else config
        spread_g = f"{gbps:6.2f} [{min(all_gbps):.1f}-{max(all_gbps):.1f}]"
        spread_r = f"{rate:6.0f} [{min(all_rates):.0f}-{max(all_rates):.0f}]"
        print(f"{label:<16} {spread_g:>20} {gbps / base_g:7.1%} {spread_r:>20} {rate / base_r:7.1%}  {what}")
    print(f"failed connection attempts over the whole run: {bench.failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
