#!/usr/bin/env python3
"""Datapath benchmark: what netfence's rules cost traffic between two pods on one node.

A node netns with bridge cni0 (br_netfilter on, as flannel needs it) and two pods on veths, a
client and a server. Two kinds of traffic, client -> server:
  - one iperf3 TCP stream: throughput (bytes the bridge hands to the server's veth);
  - TCP connections per second (bench/connrate.py, 2 processes: full handshake, then RST),
    every one a new flow through the policy chains.
The baseline is connection tracking on and nothing of netfence on the packet path (every
Kubernetes node has conntrack on, for kube-proxy and flannel's NAT; stateful policy needs it).

Paired, interleaved A/B measurement. Separate short runs on this kind of machine differ by tens
of percent (where the scheduler puts client and server, other jobs on the two CPUs), more than
the effect sought; consecutive seconds of one stream differ far less. So for each policy count
the rule set is rendered and loaded once, the agent's own way (Kernel().apply(plan(...)) in the
node netns; the load time is reported), then one long stream runs while the rules are switched
on and off under it: --pairs pairs of --seconds slots, one with netfence's rules on the packet
path and one without, in ABBA order (pair i starts with netfence when i is even) so that every
state is first as often as second and drift within a pair cancels. "Without" deletes the
tables' two base chains (inet forward, bridge prerouting): nftables reaches every other chain,
set and map only from a rule of a base chain, so the rest of the tables costs packets nothing,
and switching takes milliseconds at any policy count instead of a full load. A short gap after
each switch is not measured. Each pair gives the ratio netfence / baseline; reported per policy
count: the median ratio with a 95 % bootstrap confidence interval (pairs resampled), the
medians of the raw values, and the same for kernel CPU time (system + irq + softirq of the
machine, /proc/stat) per GB and per 1,000 connections. Two more rows, for information: "A/A"
switches something off the packet path (a chain no hook reaches), so it shows what the method
reads when there is no effect; "bare" switches connection tracking off and on (what conntrack
itself costs). With --floor-pairs, "empty hooks" switches an empty base chain at each of
netfence's two hooks: the cost of the hooks alone, which no rule set of this shape can avoid,
so that each netfence row can be read as the floor plus what its rules add.

Policies select IP-keyed synthetic pods of the node plus the two real ones; every pod, the
client and the server included, is selected by its share of them (policies / pods), so the
server's ingress chain and the client's egress chain grow with the policy count, and the rule
allowing client -> server is the last one in each.

Root only; creates netns nf-bench-dp-<hex>-{node,client,server} and deletes them by name.
Needs iperf3 (Debian package iperf3).

    .venv/bin/python bench/datapath.py [--policies 10,1000,10000] [--pairs 60] [--seconds 1]
        [--traffic both|throughput|connections] [--raw FILE]
    .venv/bin/python bench/datapath.py --from-raw FILE...   (table and verdicts again, runs pooled)
Target: >= 97% of baseline throughput, flat in the number of policies. Throughput is also judged
by kernel CPU per GB: the single stream is CPU-bound, so >= 97% of the throughput means at most
1/0.97 = 103.1% of the CPU per byte (a second reading of the same cost, not an independent one:
the two ratios of a pair correlate strongly; it counts other jobs' kernel time too).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("operator", "agent", "tests")]

from bench_machine import machine  # noqa: E402
from connrate import connect_while  # noqa: E402
from netfence_api import AllowRule, Isolation, NodeRuleSetSpec, PeerGroup, PolicedPod, PortRange  # noqa: E402
from netfence_agent.netns import entered, executor_in  # noqa: E402
from netfence_agent.nft.kernel import Kernel  # noqa: E402
from netfence_agent.nft.model import Ruleset  # noqa: E402
from netfence_agent.nft.transaction import plan  # noqa: E402
from netfence_agent.render import PodPort, render  # noqa: E402

CLIENT_IP, SERVER_IP = "10.244.0.2", "10.244.0.3"
IPERF_PORT, CONN_PORT = 5201, 5001
CONN_PROCS = 2
SYNTHETIC_PODS = 1000
CONNTRACK_TABLE = ("inet", "nf_bench_conntrack")
FLANNEL_TABLE = ("ip", "nf_bench_flannel")
FLOOR_TABLE = "nf_bench_floor"  # in the inet and the bridge family
FLOOR_LABEL = "empty hooks"
# The hooks netfence's base chains sit at (render.py): the floor row puts empty chains there.
NETFENCE_HOOKS = (("bridge", "prerouting", -200), ("inet", "forward", 0))
WARMUP = 1.0           # seconds of traffic before the first slot
GAP = 0.1              # seconds after each switch (or between two slots of one state) not measured
TARGET = 0.97          # netfence / baseline throughput
FLAT_TOLERANCE = 0.03  # "flat": the largest and smallest policy counts within 3 points of each other
RESAMPLES = 2000
MIN_PAIRS_FOR_VERDICT = 8


def sh(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


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


def kernel_jiffies() -> int:
    """System + irq + softirq time of all CPUs so far, in USER_HZ ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # cpu user nice system idle iowait irq softirq ...
    return int(fields[3]) + int(fields[6]) + int(fields[7])


@dataclass
class Slot:
    units: float     # bytes (throughput) or connections moved in the slot
    seconds: float
    jiffies: int     # kernel CPU time of the machine in the slot

    @property
    def rate(self) -> float:
        return self.units / self.seconds

    @property
    def cpu_per_unit(self) -> float:
        return self.jiffies / self.units if self.units else math.inf


@dataclass
class Pair:
    first: str  # "test" or "base": which slot ran first
    test: Slot
    base: Slot

    @property
    def ratio(self) -> float:
        return self.test.rate / self.base.rate

    @property
    def cpu_ratio(self) -> float:
        return self.test.cpu_per_unit / self.base.cpu_per_unit


@dataclass
class Config:
    label: str
    detail: str
    policies: int | None = None  # None: the bare row
    server_rules: str = "-"      # rules in the server's ingress chain
    load_seconds: float | None = None
    switch_seconds: list[float] = field(default_factory=list)
    throughput: list[Pair] = field(default_factory=list)
    connections: list[Pair] = field(default_factory=list)
    failed: int = 0
    # perf: share of the sampled CPU's busy time inside netfence's chains while the stream runs
    perf: dict[str, float] | None = None


class Bench:
    def __init__(self, slot: float, traffic: tuple[str, ...] = ("throughput", "connections"),
                 pin: int | None = None, perf_seconds: float = 0.0, gap: float = GAP,
                 flannel_forward: bool = False):
        tag = os.urandom(3).hex()
        self.flannel_forward = flannel_forward
        self.gap = gap
        self.pin = pin
        self.perf_seconds = perf_seconds
        self.node, self.client, self.server = (f"nf-bench-dp-{tag}-{r}" for r in ("node", "client", "server"))
        self.slot = slot
        self.traffic = traffic
        self.processes: list[subprocess.Popen] = []
        self.executor = None
        self.conntrack = False
        self.hooks_on = False
        self.hook_chains: list[dict] = []  # the netfence base chains as listed, with their rules

    def up(self) -> None:
        for ns in (self.node, self.client, self.server):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.node, "link", "add", "cni0", "type", "bridge")
        sh("ip", "-n", self.node, "addr", "add", "10.244.0.1/24", "dev", "cni0")
        sh("ip", "-n", self.node, "link", "set", "cni0", "up")
        sh("ip", "netns", "exec", self.node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1",
           "net.bridge.bridge-nf-call-ip6tables=1")
        self.macs, self.ifindexes = {}, {}
        for ns, ip, veth in ((self.client, CLIENT_IP, "vethclient"), (self.server, SERVER_IP, "vethserver")):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", veth, "netns", self.node)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.node, "link", "set", veth, "master", "cni0", "up")
            self.macs[ip] = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "eth0").stdout)[0]["address"]
            self.ifindexes[ip] = json.loads(sh("ip", "-n", self.node, "-j", "link", "show", veth).stdout)[0]["ifindex"]
        self.processes.append(subprocess.Popen(["ip", "netns", "exec", self.server, *self.pinned(),
                                                "iperf3", "-s", "-p", str(IPERF_PORT)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.processes.append(subprocess.Popen(["ip", "netns", "exec", self.server, *self.pinned(), sys.executable,
                                                str(ROOT / "bench" / "connrate.py"), "serve", "--port", str(CONN_PORT)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.executor = executor_in(self.node)
        self.kernel: Kernel = self.executor.submit(Kernel).result()
        self.set_conntrack(True)
        if self.flannel_forward:
            # What flannel's nftables mode keeps in the forward hook of every node (its iptables
            # mode has the same two accepts in FORWARD): then the hook is never empty, with or
            # without netfence.
            table = {"family": FLANNEL_TABLE[0], "table": FLANNEL_TABLE[1]}
            self._k(self.kernel.run, [
                {"add": {"table": {"family": FLANNEL_TABLE[0], "name": FLANNEL_TABLE[1]}}},
                {"add": {"chain": {**table, "name": "forward", "type": "filter", "hook": "forward", "prio": 0,
                                   "policy": "accept"}}},
                *({"add": {"rule": {**table, "chain": "forward", "expr": [
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": field}},
                               "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"accept": None}]}}}
                  for field in ("saddr", "daddr")),
            ])
        time.sleep(0.5)

    def pinned(self) -> list[str]:
        """Command prefix putting traffic on the --pin CPU, if any."""
        return [] if self.pin is None else ["taskset", "-c", str(self.pin)]

    def _k(self, fn, *args):
        return self.executor.submit(fn, *args).result()

    # ------------------------------------------------------------------ states
    def set_conntrack(self, on: bool) -> None:
        """Connection tracking on or off, through a table of its own that no hook reaches."""
        if on == self.conntrack:
            return
        if on:
            # A rule using ct, in a chain nothing jumps to: conntrack on, no rule on the path.
            self._k(self.kernel.run, [
                {"add": {"table": {"family": "inet", "name": CONNTRACK_TABLE[1]}}},
                {"add": {"chain": {"family": "inet", "table": CONNTRACK_TABLE[1], "name": "unused"}}},
                {"add": {"rule": {"family": "inet", "table": CONNTRACK_TABLE[1], "chain": "unused", "expr": [
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new"]}}, {"accept": None}]}}},
            ])
        else:
            self._k(self.kernel.delete_tables, [CONNTRACK_TABLE])
        self.conntrack = on

    def load_netfence(self, ruleset: Ruleset) -> float:
        """Loads the rule set as the agent does after a restart (full sync); returns seconds taken.
        Then keeps a copy of its base chains, to take them off the packet path and back."""
        started = time.perf_counter()
        self._k(self.kernel.apply, plan(ruleset, None, lambda: self._k(self.kernel.inventory)))
        seconds = time.perf_counter() - started
        self.hook_chains = []
        for table in ruleset.tables:
            for name, chain in table.chains.items():
                if chain.is_base:
                    listed = self._k(self.kernel.run, [{"list": {"chain": {"family": table.family, "table": table.name,
                                                                           "name": name}}}])
                    self.hook_chains.append({"chain": next(i["chain"] for i in listed if "chain" in i),
                                             "rules": [i["rule"] for i in listed if "rule" in i]})
        if not self.hook_chains:
            raise RuntimeError("the rendered rule set has no base chain: nothing to switch")
        self.hooks_on = True
        return seconds

    def set_hooks(self, on: bool) -> float:
        """netfence's base chains on or off the packet path; returns seconds taken (0 if no change)."""
        if on == self.hooks_on:
            return 0.0
        commands: list[dict] = []
        for listed in self.hook_chains:
            chain = {k: v for k, v in listed["chain"].items() if k != "handle"}
            key = {k: chain[k] for k in ("family", "table", "name")}
            if on:
                commands.append({"add": {"chain": chain}})
                commands += [{"add": {"rule": {k: v for k, v in rule.items() if k != "handle"}}}
                             for rule in listed["rules"]]
            else:
                commands += [{"flush": {"chain": key}}, {"delete": {"chain": key}}]
        started = time.perf_counter()
        self._k(self.kernel.run, commands)
        self.hooks_on = on
        return time.perf_counter() - started

    def unload_netfence(self) -> None:
        self._k(self.kernel.delete_tables)
        self.hooks_on = False
        self.hook_chains = []

    # ------------------------------------------------------------------ traffic
    def bytes_to_server(self) -> int:
        """Bytes the bridge has handed to the server's veth (node netns, read from its thread)."""
        def read() -> int:
            with open("/proc/thread-self/net/dev") as f:
                for line in f:
                    name, _, counters = line.partition(":")
                    if name.strip() == "vethserver":
                        return int(counters.split()[8])  # transmit bytes
            raise RuntimeError("vethserver not found in the node netns")
        return self._k(read)

    @contextmanager
    def iperf_stream(self, seconds: float) -> Iterator[Callable[[], float]]:
        """One iperf3 stream client -> server, running at least `seconds`; yields a byte counter."""
        client = subprocess.Popen(["ip", "netns", "exec", self.client, *self.pinned(),
                                   "iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT),
                                   "-t", str(math.ceil(seconds) + 5)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def counter() -> float:
            if client.poll() is not None:
                raise RuntimeError(f"iperf3 ended early: {client.stderr.read().strip()}")
            return float(self.bytes_to_server())
        try:
            yield counter
        finally:
            if client.poll() is None:
                client.terminate()
            client.wait(timeout=30)
            time.sleep(0.5)  # the server notices the end before the next test connects

    @contextmanager
    def connection_stream(self) -> Iterator[tuple[Callable[[], float], Callable[[], int]]]:
        """CONN_PROCS processes in the client netns connecting to the server until the block
        ends; yields counters of connections made and attempts failed."""
        ctx = multiprocessing.get_context("fork")
        tally = ctx.Array("q", 2 * CONN_PROCS, lock=False)
        stop = ctx.Value("b", 0, lock=False)
        workers = [ctx.Process(target=_connect_in, args=(self.client, tally, stop, i, self.pin), daemon=True)
                   for i in range(CONN_PROCS)]
        for w in workers:
            w.start()
        try:
            yield (lambda: float(sum(tally[0::2]))), (lambda: sum(tally[1::2]))
        finally:
            stop.value = 1
            for w in workers:
                w.join(timeout=10)
                if w.is_alive():
                    w.kill()
                    w.join(timeout=10)

    def down(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        for p in self.processes:
            p.kill()
            p.wait(timeout=10)
        for ns in (self.node, self.client, self.server):
            sh("ip", "netns", "del", ns, check=False)


def _connect_in(netns: str, tally, stop, index: int, pin: int | None) -> None:
    if pin is not None:
        os.sched_setaffinity(0, {pin})
    with entered(netns):
        connect_while(SERVER_IP, CONN_PORT, lambda: not stop.value, tally, index)


# ---------------------------------------------------------------------- the schedule
def alternate(pairs: int, slot: float, switch: Callable[[bool], float], counter: Callable[[], float],
              config: Config, what: str, gap: float = GAP) -> list[Pair]:
    """`pairs` pairs of slots with the test state on (switch(True)) and off, in ABBA order,
    while traffic runs; `counter` reads the units moved so far."""
    result: list[Pair] = []
    time.sleep(WARMUP)
    for i in range(pairs):
        order = ("test", "base") if i % 2 == 0 else ("base", "test")
        slots: dict[str, Slot] = {}
        for state in order:
            took = switch(state == "test")
            if took:
                config.switch_seconds.append(took)
            time.sleep(gap)
            units, jiffies, started = counter(), kernel_jiffies(), time.monotonic()
            time.sleep(slot)
            units, jiffies, seconds = counter() - units, kernel_jiffies() - jiffies, time.monotonic() - started
            slots[state] = Slot(units, seconds, jiffies)
        if slots["test"].units == 0 or slots["base"].units == 0:
            raise RuntimeError(f"{config.label} {what}: no traffic in a slot (test {slots['test'].units:.0f}, "
                               f"base {slots['base'].units:.0f}): the rules block client -> server")
        pair = Pair(order[0], slots["test"], slots["base"])
        result.append(pair)
        if i % 10 == 9 or i + 1 == pairs:
            recent = result[-10:]
            print(f"  {config.label} {what} pairs {len(result) - len(recent) + 1}-{len(result)}/{pairs}: ratios "
                  f"{' '.join(f'{p.ratio:.0%}' for p in recent)}; load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
    return result


def measure(bench: Bench, config: Config, pairs: int, switch: Callable[[bool], float], profile: bool = False) -> None:
    """The config's pairs for each kind of traffic; with `profile` (and --perf), a perf recording
    with the test state on after the throughput pairs."""
    if "throughput" in bench.traffic:
        seconds = WARMUP + pairs * 2 * (bench.slot + bench.gap + 0.05) + 2 + (bench.perf_seconds + 5 if bench.perf_seconds else 0)
        with bench.iperf_stream(seconds) as counter:
            config.throughput = alternate(pairs, bench.slot, switch, counter, config, "throughput", bench.gap)
            switch(True)
            if bench.perf_seconds and profile:
                config.perf = perf_shares(bench.pin, bench.perf_seconds)
    if "connections" in bench.traffic:
        with bench.connection_stream() as (made, failed):
            config.connections = alternate(pairs, bench.slot, switch, made, config, "conn/s", bench.gap)
            config.failed = failed()
        switch(True)


def measure_netfence(bench: Bench, policies: int, pairs: int) -> Config:
    spec = spec_with(policies)
    ports = {ip: PodPort(veth, bench.macs[ip], bench.ifindexes[ip])
             for ip, veth in ((CLIENT_IP, "vethclient"), (SERVER_IP, "vethserver"))}
    ruleset = render(spec, ports).ruleset
    chains = ruleset.table("inet", "netfence").chains
    server_rules = next((str(len(c.rules)) for n, c in chains.items()
                         if n.endswith("_ingress") and "server" in (c.comment or "")), "?")
    config = Config(f"netfence {policies}", f"{policies} policies over {len(spec.pods)} pods, "
                                            f"server ingress chain {server_rules} rules", policies, server_rules)
    config.load_seconds = bench.load_netfence(ruleset)
    try:
        measure(bench, config, pairs, bench.set_hooks, profile=True)
    finally:
        bench.unload_netfence()
    return config


def nft_switch(bench: Bench, commands: Callable[[bool], list[dict]]) -> Callable[[bool], float]:
    """A test state switched by one nft transaction each way (`commands(on)`); the switch returns
    the seconds it took, 0 when the state is already as asked."""
    state = {"on": False}

    def switch(on: bool) -> float:
        if on == state["on"]:
            return 0.0
        started = time.perf_counter()
        bench._k(bench.kernel.run, commands(on))
        state["on"] = on
        return time.perf_counter() - started
    return switch


def measure_null(bench: Bench, pairs: int) -> Config:
    """A/A calibration: the switch changes nothing on the packet path (a chain no hook reaches is
    added and deleted), so the ratios show what the method reads when there is no effect."""
    config = Config("A/A (null)", "an unreachable chain added (test) / deleted (baseline), no netfence tables")
    chain = {"family": "inet", "table": CONNTRACK_TABLE[1], "name": "aa"}
    switch = nft_switch(bench, lambda on: [{"add" if on else "delete": {"chain": chain}}])
    measure(bench, config, pairs, switch)
    switch(False)
    return config


def measure_floor(bench: Bench, pairs: int) -> Config:
    """What any enforcer of this shape pays before its first rule: an empty base chain at each of
    netfence's two hooks (a veth-keyed check needs the bridge family, a stateful one the inet
    family; DESIGN.md §4). netfence's rows minus this one is what its rules cost."""
    config = Config(FLOOR_LABEL, "an empty base chain at bridge prerouting and at inet forward "
                                   "added (test) / deleted (baseline)")
    def commands(on: bool) -> list[dict]:
        if not on:
            return [{"delete": {"table": {"family": family, "name": FLOOR_TABLE}}} for family, _, _ in NETFENCE_HOOKS]
        return [command for family, hook, priority in NETFENCE_HOOKS for command in (
            {"add": {"table": {"family": family, "name": FLOOR_TABLE}}},
            {"add": {"chain": {"family": family, "table": FLOOR_TABLE, "name": hook, "type": "filter",
                               "hook": hook, "prio": priority, "policy": "accept"}}})]
    switch = nft_switch(bench, commands)
    try:
        measure(bench, config, pairs, switch, profile=True)
    finally:
        switch(False)
    return config


def measure_bare(bench: Bench, pairs: int) -> Config:
    config = Config("bare", "conntrack off (test) vs on (baseline), no netfence tables")
    measure(bench, config, pairs, lambda bare: bench.set_conntrack(not bare) or 0.0)
    bench.set_conntrack(True)
    return config


def perf_shares(cpu: int | None, seconds: float) -> dict[str, float]:
    """Where the CPU goes while netfence is on the path: perf samples (cpu-clock, call graphs) of
    the --pin CPU (else all), as shares of the busy samples inside netfence's two hook chains.

    On a CPU that the stream saturates, a share s of its time in the chains means the same
    bytes would take 1 - s of the time without them: throughput ratio about 1 - s, read from
    one recording instead of from the difference of two noisy ones. A lower bound of the cost:
    calling the hooks (nf_hook_slow) and what the rules do to caches are not counted."""
    with tempfile.TemporaryDirectory(prefix="nf-bench-perf-") as tmp:
        data = os.path.join(tmp, "perf.data")
        where = ["-a"] if cpu is None else ["-C", str(cpu)]
        sh("perf", "record", "-q", *where, "-e", "cpu-clock", "-F", "2000", "-g", "-o", data,
           "sleep", str(seconds), timeout=seconds + 120)
        report = sh("perf", "report", "-i", data, "--children", "--sort", "sym", "-g", "none", "-q",
                    "--percent-limit", "0", timeout=600).stdout
    inclusive: dict[str, float] = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and parts[2] == "[k]":
            inclusive.setdefault(parts[3], float(parts[0].rstrip("%")))
    busy = 100.0 - inclusive.get("do_idle", 0.0)
    bridge, inet = inclusive.get("nft_do_chain_bridge", 0.0), inclusive.get("nft_do_chain_inet", 0.0)
    return {"bridge": bridge / busy, "inet": inet / busy, "total": (bridge + inet) / busy, "busy": busy / 100,
            "recordings": 1}


# ---------------------------------------------------------------------- statistics
def median_ci(values: list[float], rng: random.Random) -> tuple[float, float]:
    """95 % percentile-bootstrap confidence interval of the median (values resampled)."""
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(RESAMPLES))
    return medians[int(RESAMPLES * 0.025)], medians[int(RESAMPLES * 0.975) - 1]


def difference_ci(a: list[float], b: list[float], rng: random.Random) -> tuple[float, float]:
    """95 % bootstrap confidence interval of median(b) - median(a), each resampled on its own."""
    diffs = sorted(statistics.median(rng.choices(b, k=len(b))) - statistics.median(rng.choices(a, k=len(a)))
                   for _ in range(RESAMPLES))
    return diffs[int(RESAMPLES * 0.025)], diffs[int(RESAMPLES * 0.975) - 1]


def ratio_cell(values: list[float], rng: random.Random) -> str:
    if not values:
        return "-"
    low, high = median_ci(values, rng)
    return f"{statistics.median(values):.1%} [{low:.1%}, {high:.1%}]"


def verdict(values: list[float], rng: random.Random, at_least: float = TARGET, higher_is_better: bool = True) -> str:
    """Whether the median ratio is on the good side of `at_least`, judged by its CI."""
    if not values:
        return "not measured"
    if len(values) < MIN_PAIRS_FOR_VERDICT:
        return f"not judged ({len(values)} pairs; a bootstrap CI needs at least {MIN_PAIRS_FOR_VERDICT})"
    low, high = median_ci(values, rng)
    good, bad = (low >= at_least, high < at_least) if higher_is_better else (high <= at_least, low > at_least)
    if good:
        return "confirmed"
    if bad:
        return "refuted"
    return f"undecided (CI spans {at_least:.1%})"


def flatness(a: list[float], b: list[float], rng: random.Random) -> str:
    a_ci, b_ci = median_ci(a, rng), median_ci(b, rng)
    overlap = a_ci[0] <= b_ci[1] and b_ci[0] <= a_ci[1]
    low, high = difference_ci(a, b, rng)
    band = f"+-{FLAT_TOLERANCE * 100:.0f} points"
    if min(len(a), len(b)) < MIN_PAIRS_FOR_VERDICT:
        judged = "not judged (too few pairs)"
    elif -FLAT_TOLERANCE <= low and high <= FLAT_TOLERANCE:
        judged = f"confirmed (CI of the difference within {band})"
    elif low > FLAT_TOLERANCE or high < -FLAT_TOLERANCE:
        judged = f"refuted (CI of the difference beyond {band})"
    else:
        judged = f"undecided (CI of the difference reaches beyond {band})"
    return (f"{judged}; difference of median ratios {(statistics.median(b) - statistics.median(a)) * 100:+.1f} points, "
            f"95 % CI [{low * 100:+.1f}, {high * 100:+.1f}]; CIs {'overlap' if overlap else 'do not overlap'}")


def summary(configs: list[Config]) -> None:
    """The table and the verdicts (printed again by --from-raw from saved slots)."""
    rng = random.Random(4)  # fixed: the same data print the same intervals
    pairs = sorted({len(c.throughput) for c in configs} | {len(c.connections) for c in configs} - {0})
    slot = statistics.median(s.seconds for c in configs for p in c.throughput + c.connections for s in (p.test, p.base))
    traffic = ", ".join(what for what, n in (("throughput", any(c.throughput for c in configs)),
                                             ("connections", any(c.connections for c in configs))) if n)
    print(f"{'/'.join(map(str, pairs))} pairs of {slot:.2g} s slots per configuration and traffic ({traffic}), ABBA, "
          f"within one stream; "
          f"ratio test / baseline per pair; median [95 % bootstrap CI of the median, {RESAMPLES} resamples]")
    print(f"{'configuration':<15} {'Gbit/s ratio':>24} {'conn/s ratio':>24} {'CPU/GB ratio':>24} "
          f"{'CPU/conn ratio':>24} {'Gbit/s t/b':>11} {'conn/s t/b':>13} {'load s':>6} {'switch ms':>9} {'rules':>5}")
    for c in configs:
        raw_g = (f"{statistics.median(p.test.rate for p in c.throughput) * 8e-9:.2f}/"
                 f"{statistics.median(p.base.rate for p in c.throughput) * 8e-9:.2f}") if c.throughput else "-"
        raw_c = (f"{statistics.median(p.test.rate for p in c.connections):.0f}/"
                 f"{statistics.median(p.base.rate for p in c.connections):.0f}") if c.connections else "-"
        load = f"{c.load_seconds:.2f}" if c.load_seconds is not None else "-"
        switch = f"{statistics.median(c.switch_seconds) * 1000:.0f}" if c.switch_seconds else "-"
        print(f"{c.label:<15} {ratio_cell([p.ratio for p in c.throughput], rng):>24} "
              f"{ratio_cell([p.ratio for p in c.connections], rng):>24} "
              f"{ratio_cell([p.cpu_ratio for p in c.throughput], rng):>24} "
              f"{ratio_cell([p.cpu_ratio for p in c.connections], rng):>24} "
              f"{raw_g:>11} {raw_c:>13} {load:>6} {switch:>9} {c.server_rules:>5}")
    for c in configs:
        print(f"  {c.label}: {c.detail}")
    for c in configs:
        if c.perf:
            n = c.perf.get("recordings", 1)
            recordings = f"; mean of {n} recordings" if n > 1 else ""
            whose = "the empty chains" if c.label == FLOOR_LABEL else "netfence's chains"
            print(f"  {c.label}, perf: {whose} take {c.perf['total']:.2%} of the sampled CPU's busy time "
                  f"(bridge prerouting {c.perf['bridge']:.2%}, inet forward {c.perf['inet']:.2%}; CPU "
                  f"{c.perf['busy']:.0%} busy{recordings}): throughput ratio about {1 - c.perf['total']:.1%} "
                  f"if the CPU is the limit")
    netfence = [c for c in configs if c.policies is not None]
    print("verdicts:")
    for c in netfence:
        print(f"  {c.label}: >= {TARGET:.0%} of baseline throughput: {verdict([p.ratio for p in c.throughput], rng)}; "
              f"by CPU per GB (<= {1 / TARGET:.1%}): "
              f"{verdict([p.cpu_ratio for p in c.throughput], rng, 1 / TARGET, higher_is_better=False)}; "
              f"conn/s (information): {verdict([p.ratio for p in c.connections], rng)}")
    if len(netfence) >= 2:
        first, last = netfence[0], netfence[-1]
        for what, a, b, key in (("throughput", first.throughput, last.throughput, "ratio"),
                                ("CPU per GB", first.throughput, last.throughput, "cpu_ratio"),
                                ("conn/s", first.connections, last.connections, "ratio")):
            if a and b:
                print(f"  flat in the number of policies, {what} ({first.label} vs {last.label}): "
                      f"{flatness([getattr(p, key) for p in a], [getattr(p, key) for p in b], rng)}")
    floor = next((c for c in configs if c.label == FLOOR_LABEL and c.throughput), None)
    for c in netfence if floor else ():
        if c.throughput:
            low, high = difference_ci([p.ratio for p in floor.throughput], [p.ratio for p in c.throughput], rng)
            below = statistics.median(p.ratio for p in floor.throughput) - statistics.median(p.ratio for p in c.throughput)
            print(f"  {c.label}: throughput ratio below the {FLOOR_LABEL} row (what the rules add to two empty hook "
                  f"chains): {below * 100:.1f} points, 95 % CI [{-high * 100:.1f}, {-low * 100:.1f}]")
    print(f"failed connection attempts over the whole run: {sum(c.failed for c in configs)}")


def load_raw(paths: list[Path]) -> list[Config]:
    """Configurations of --raw files; the pairs of rows with the same label are pooled."""
    def pairs(items: list[dict]) -> list[Pair]:
        return [Pair(i["first"], Slot(**i["test"]), Slot(**i["base"])) for i in items]
    pooled: dict[str, Config] = {}
    for path in paths:
        for c in json.loads(path.read_text()):
            config = Config(**{**c, "throughput": pairs(c["throughput"]), "connections": pairs(c["connections"])})
            if config.label in pooled:
                into = pooled[config.label]
                into.throughput += config.throughput
                into.connections += config.connections
                into.switch_seconds += config.switch_seconds
                into.failed += config.failed
                if into.perf and config.perf:  # the mean share of all recordings
                    n, m = into.perf.get("recordings", 1), config.perf.get("recordings", 1)
                    into.perf = {k: (into.perf[k] * n + config.perf[k] * m) / (n + m) for k in ("bridge", "inet", "total", "busy")}
                    into.perf["recordings"] = n + m
                else:
                    into.perf = into.perf or config.perf
            else:
                pooled[config.label] = config
    # Controls first as they came, then netfence by policy count (files may hold different counts).
    return sorted(pooled.values(), key=lambda c: (c.policies is not None, c.policies or 0))


def report(configs: list[Config], started_load: tuple[float, float, float], started: float) -> None:
    summary(configs)
    end_load = os.getloadavg()
    print(f"load average (1, 5, 15 min): at start {started_load[0]:.2f} {started_load[1]:.2f} {started_load[2]:.2f}, "
          f"at end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    print(f"duration: {time.monotonic() - started:.0f} s")
    print(f"machine: {machine()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Paired ABBA slots within one stream, ratios with bootstrap CIs; see the "
                                       "module docstring and docs/benchmarks.md. Root and iperf3 needed.")
    p.add_argument("--policies", default="10,1000,10000", help="policy counts, comma-separated")
    p.add_argument("--pairs", type=int, default=60, help="netfence/baseline pairs of slots per policy count and traffic")
    p.add_argument("--seconds", type=float, default=1.0, help="length of one slot")
    p.add_argument("--bare-pairs", type=int, default=None,
                   help="pairs for the informational no-conntrack row (default: --pairs; 0: skip)")
    p.add_argument("--null-pairs", type=int, default=None,
                   help="pairs for the A/A calibration row, a switch that changes nothing (default: --pairs; 0: skip)")
    p.add_argument("--floor-pairs", type=int, default=0,
                   help="pairs for the 'empty hooks' row: empty base chains at netfence's two hooks, what any "
                        "enforcer of this shape pays before its first rule (default 0: skip)")
    p.add_argument("--traffic", choices=("both", "throughput", "connections"), default="both",
                   help="measure iperf3 throughput, connections per second, or both")
    p.add_argument("--gap", type=float, default=GAP, metavar="SECONDS",
                   help=f"left out after each switch, before a slot is measured (default {GAP})")
    p.add_argument("--flannel-forward", action="store_true",
                   help="baseline as on a flannel node: flannel's forward chain (two accepts for the cluster "
                        "CIDR) stays loaded in every state")
    p.add_argument("--pin", type=int, metavar="CPU",
                   help="run client and server on this one CPU: the stream is then limited by that CPU alone, "
                        "and slots vary far less (other jobs keep to the other CPUs)")
    p.add_argument("--perf", type=float, default=0.0, metavar="SECONDS",
                   help="after each policy count's throughput pairs, record perf this long with netfence on and "
                        "report the share of CPU time in its chains (needs perf, Debian package linux-perf)")
    p.add_argument("--raw", type=Path, help="write every slot as JSON to this file")
    p.add_argument("--from-raw", type=Path, nargs="+",
                   help="measure nothing: print the table and verdicts of --raw files (rows of one label pooled)")
    args = p.parse_args()
    if args.from_raw:
        summary(load_raw(args.from_raw))
        return 0
    if os.geteuid() != 0 or not shutil.which("iperf3"):
        print("bench/datapath.py needs root and iperf3", file=sys.stderr)
        return 2
    if args.pairs < 2 or args.seconds <= 0:
        p.error("--pairs must be at least 2 and --seconds positive")
    policy_counts = [int(x) for x in args.policies.split(",")]
    bare_pairs = args.pairs if args.bare_pairs is None else args.bare_pairs
    null_pairs = args.pairs if args.null_pairs is None else args.null_pairs
    started, started_load = time.monotonic(), os.getloadavg()
    print(f"load average at start (1, 5, 15 min): {started_load[0]:.2f} {started_load[1]:.2f} {started_load[2]:.2f}",
          file=sys.stderr, flush=True)
    if args.perf and not shutil.which("perf"):
        p.error("--perf needs perf (Debian package linux-perf)")
    bench = Bench(args.seconds, ("throughput", "connections") if args.traffic == "both" else (args.traffic,),
                  pin=args.pin, perf_seconds=args.perf, gap=args.gap, flannel_forward=args.flannel_forward)
    configs: list[Config] = []
    # Stopped with SIGTERM (kill, a timeout): leave through `finally`, which deletes the netns.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bench.up()
        if null_pairs:
            configs.append(measure_null(bench, null_pairs))
        if bare_pairs:
            configs.append(measure_bare(bench, bare_pairs))
        if args.floor_pairs:
            configs.append(measure_floor(bench, args.floor_pairs))
        for count in policy_counts:
            configs.append(measure_netfence(bench, count, args.pairs))
    finally:
        bench.down()
    if args.raw:
        args.raw.write_text(json.dumps([asdict(c) for c in configs], indent=1))
    if args.flannel_forward:
        print("every state, the baseline included, had flannel's forward chain loaded (--flannel-forward)")
    report(configs, started_load, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
