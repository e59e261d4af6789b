#!/usr/bin/env python3
"""One pod event on the agent's own node, applied (issue 14): spec handed to the sync -> kernel.

A synthetic cluster (bench/compile.py's generator; default 10,000 pods, 2,000 policies, 200
namespaces, 91 nodes) with exactly --local-pods pods (kubelet's default maximum, 110) on the
measured node node-0 and the others spread evenly over the other nodes (at most 110 each). The
controller's compiler turns each event into node-0's NodeRuleSet; it reaches the real agent
(daemon.Agent) as the agent's sources deliver it (JSON through RuleSetReader), and the agent's
sync loads it into real nftables in a network namespace this benchmark creates and deletes.
Local pods have host-side veth names, MACs and ifindexes (the rules only name them; no links are
made).

Events, --events of each kind, interleaved:
  birth    a pod of node-0 is born: its veth is discovered first (held closed), then the spec
           naming it arrives (the figure is the second sync)
  ip       a pod of node-0 comes back with a new IP (new sandbox: old veth gone and a new one
           discovered and held first), then the spec with its new IP
  relabel  a pod of node-0 gets another app label: its rules, isolation and groups change
  delete   a pod of node-0 is deleted: the spec without it and its veth gone, one sync
  peer     a pod elsewhere is born or deleted: only peer group members of node-0's spec change
Per event: SyncOutcome.seconds of the sync that takes the new spec (render + plan + the nft
transaction, what `netfence_rule_apply_duration_seconds` observes plus render), and the
transaction kind. A full sync of the same node (the periodic safety net) is the baseline.

    sudo .venv/bin/python bench/agent_events.py [--pods 10000 --policies 2000 --namespaces 200
                                                 --nodes 91 --local-pods 110 --events 100]

Root only; creates netns nf-bench-events-<hex> and deletes it by name at the end.
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("operator", "agent", "tests", "bench")]

import netfence_api  # noqa: E402
from bench_machine import machine  # noqa: E402
from compile import APPS, add_cluster_arguments, synthetic_documents  # noqa: E402
from kernel.conftest import NetnsKernel, driven_agent  # noqa: E402
from netfence_api.runtime import tune_gc  # noqa: E402
from netfence_agent import daemon  # noqa: E402
from netfence_agent.render import PodPort  # noqa: E402
from netfence_agent.source import RuleSetReader  # noqa: E402
from netfence_operator.compile import ClusterObjects, Compiler, parse_object  # noqa: E402

LOCAL = "node-0"
KINDS = ("birth", "ip", "relabel", "delete", "peer")


def placed_documents(args) -> list[dict]:
    """The synthetic cluster with --local-pods pods on node-0 (drawn at random from all pods, as
    a scheduler spreads workloads) and the rest round-robin over the other nodes; pod IPs
    numbered per node as the generator does."""
    docs = list(synthetic_documents(args.pods, args.policies, args.namespaces, args.nodes))
    pods = [d for d in docs if d["kind"] == "Pod"]
    local = set(random.Random(3).sample(range(len(pods)), args.local_pods))
    slots: collections.Counter = collections.Counter()
    others = 0
    for i, doc in enumerate(pods):
        if i in local:
            node = 0
        else:
            node = 1 + others % (args.nodes - 1)
            others += 1
        slots[node] += 1
        slot = slots[node]
        doc["spec"]["nodeName"] = f"node-{node}"
        doc["status"]["podIP"] = f"10.{100 + node}.{slot // 250}.{slot % 250 + 2}"
    assert slots[0] == args.local_pods and max(slots.values()) <= max(args.local_pods, 110), slots.most_common(2)
    return docs


class Stopwatch:
    """Seconds spent in the agent's render and plan during one sync (wrapping the daemon's own)."""

    def __init__(self) -> None:
        self.render = self.plan = 0.0
        for name, slot in (("render", "render"), ("render_update", "render"), ("render_group_members", "render"),
                           ("plan", "plan")):
            if hasattr(daemon, name):  # (render_group_members: the agent before render_update)
                setattr(daemon, name, self._timed(getattr(daemon, name), slot))

    def _timed(self, fn, slot: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, slot, getattr(self, slot) + time.perf_counter() - t0)
        return timed

    def reset(self) -> None:
        self.render = self.plan = 0.0


class TimedKernel(NetnsKernel):
    """The agent's kernel in the benchmark's namespace, noting how long each transaction took."""

    last_apply = 0.0

    def apply(self, transaction) -> None:
        t0 = time.perf_counter()
        self.call(self.kernel.apply, transaction)
        self.last_apply = time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bench:
    def __init__(self, args, kernel: TimedKernel, workdir: str):
        self.args = args
        self.rnd = random.Random(5)
        docs = placed_documents(args)
        objects = ClusterObjects()
        for doc in docs:
            objects.add(parse_object(doc))
        self.compiler = Compiler(objects)
        self.local = {d["metadata"]["namespace"] + "/" + d["metadata"]["name"]: d
                      for d in docs if d["kind"] == "Pod" and d["spec"]["nodeName"] == LOCAL}
        self.remote = [d for d in docs if d["kind"] == "Pod" and d["spec"]["nodeName"] != LOCAL]
        self.template = next(iter(self.local.values()))
        self.ports: dict[str, PodPort] = {}
        self.next_veth = 0
        self.next_ip = 0
        for doc in self.local.values():
            self.add_veth(doc["status"]["podIP"])
        self.kernel = kernel
        self.agent = driven_agent(LOCAL, kernel, Path(workdir))
        self.reader = RuleSetReader()
        self.generation = 0
        self.read_seconds = 0.0  # json.loads + RuleSetReader of the last rule set handed over
        self.reads: dict[str, list[float]] = collections.defaultdict(list)
        self.watch = Stopwatch()

    # ------------------------------------------------------------------ inputs
    def add_veth(self, ip: str) -> None:
        j = self.next_veth
        self.next_veth += 1
        self.ports[ip] = PodPort(f"veth{j:08x}", f"02:42:0a:{j >> 16 & 255:02x}:{j >> 8 & 255:02x}:{j & 255:02x}", 1000 + j)

    def new_ip(self, node: int) -> str:
        self.next_ip += 1
        n = self.next_ip
        return f"10.{100 + node}.{10 + n // 250}.{n % 250 + 2}"

    def hand_spec(self) -> None:
        """node-0's spec as the agent's source delivers it: JSON text, read by RuleSetReader."""
        self.generation += 1
        spec = self.compiler.node_spec(LOCAL)
        text = netfence_api.NodeRuleSet.for_node(spec, self.generation).model_dump_json()
        t0 = time.perf_counter()
        rule_set = self.reader.read(json.loads(text))
        self.read_seconds = time.perf_counter() - t0
        self.agent.set_rule_set(rule_set)

    def sync(self) -> tuple[str, float, float, float, float]:
        """One agent sync: (transaction kind, seconds in all, in render, in plan, in the kernel)."""
        # The benchmark's own heap (the controller's compiler of the whole cluster) is no agent's:
        # keep it out of the collector's walks, as if it lived in another process.
        gc.freeze()
        self.kernel.last_apply = 0.0
        self.watch.reset()
        outcome = self.agent.sync_once()
        if outcome.kind == "failed":
            raise RuntimeError(outcome.error)
        return outcome.kind, outcome.seconds, self.watch.render, self.watch.plan, self.kernel.last_apply

    def start(self) -> tuple[str, float, float, float, float]:
        self.agent.set_ports(self.ports)
        self.hand_spec()
        return self.sync()

    def full_sync(self) -> tuple[str, float, float, float, float]:
        with self.agent._cond:
            self.agent._full_sync_due = True  # what the periodic full sync does
        return self.sync()

    # ------------------------------------------------------------------ events
    def pod_doc(self, base: dict, node: int, name: str) -> dict:
        doc = copy.deepcopy(base)
        doc["metadata"].update(name=name, uid=f"uid-{name}")
        doc["metadata"]["labels"] = {"app": self.rnd.choice(APPS), "tier": self.rnd.choice(["web", "api", "db"])}
        doc["spec"]["nodeName"] = f"node-{node}"
        doc["status"]["podIP"] = self.new_ip(node)
        return doc

    def upsert(self, doc: dict) -> set[str]:
        return self.compiler.upsert(parse_object(doc))

    def event(self, kind: str, i: int) -> list[tuple[str, tuple[str, float, float, float, float]]]:
        """Make one event happen; the syncs it took, labelled (the kind's own label is the spec's)."""
        syncs = []
        if kind == "birth":
            doc = self.pod_doc(self.template, 0, f"born-{i}")
            doc["metadata"]["namespace"] = self.rnd.choice(self.local_docs())["metadata"]["namespace"]
            self.add_veth(doc["status"]["podIP"])  # the CNI plugin wires it: discovery sees the veth first
            self.agent.set_ports(self.ports)
            syncs.append(("veth", self.sync()))
            self.local[f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"] = doc
            assert LOCAL in self.upsert(doc)
        elif kind == "ip":
            key = self.rnd.choice(sorted(self.local))
            doc = copy.deepcopy(self.local[key])
            del self.ports[doc["status"]["podIP"]]
            doc["status"]["podIP"] = self.new_ip(0)
            self.add_veth(doc["status"]["podIP"])
            self.agent.set_ports(self.ports)
            syncs.append(("veth", self.sync()))
            self.local[key] = doc
            assert LOCAL in self.upsert(doc)
        elif kind == "relabel":  # until the pod's rules change (not every label is selected)
            while True:
                key = self.rnd.choice(sorted(self.local))
                before = self.policed(key)
                doc = copy.deepcopy(self.local[key])
                labels = doc["metadata"]["labels"]
                labels["app"] = self.rnd.choice([a for a in APPS if a != labels["app"]])
                self.local[key] = doc
                assert LOCAL in self.upsert(doc)
                if self.policed(key) != before:
                    break
        elif kind == "delete":
            key = self.rnd.choice(sorted(self.local))
            doc = self.local.pop(key)
            del self.ports[doc["status"]["podIP"]]
            self.agent.set_ports(self.ports)
            assert LOCAL in self.compiler.delete("Pod", key)
        else:  # a pod elsewhere is born or deleted, until one changes node-0's groups
            while True:
                if i % 2 == 0 or not self.remote:
                    node = 1 + self.rnd.randrange(self.args.nodes - 1)
                    doc = self.pod_doc(self.rnd.choice(self.remote), node, f"peer-{i}-{self.next_ip}")
                    self.remote.append(doc)
                    affected = self.upsert(doc)
                else:
                    doc = self.remote.pop(self.rnd.randrange(len(self.remote)))
                    affected = self.compiler.delete("Pod", f"{doc['metadata']['namespace']}/{doc['metadata']['name']}")
                if LOCAL in affected:
                    break
        self.hand_spec()
        syncs.append((kind, self.sync()))
        self.reads[kind].append(self.read_seconds)
        return syncs

    def policed(self, key: str):
        """The pod as node-0's spec has it (its isolation and rules)."""
        return next(p for p in self.compiler.node_spec(LOCAL).pods if p.key == key)

    def local_docs(self) -> list[dict]:
        return list(self.local.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_cluster_arguments(ap)
    ap.set_defaults(nodes=91)
    ap.add_argument("--local-pods", type=int, default=110)
    ap.add_argument("--events", type=int, default=100, help="events of each kind")
    ap.add_argument("--full-syncs", type=int, default=10, help="full syncs for the baseline")
    args = ap.parse_args()
    tune_gc()  # as the agent process does
    if os.geteuid() != 0:
        print("bench/agent_events.py needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    netns = f"nf-bench-events-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    kernel = None
    try:
        kernel = TimedKernel(netns)
        with tempfile.TemporaryDirectory(prefix="nf-bench-events-") as workdir:
            return run(args, kernel, workdir)
    finally:
        if kernel is not None:
            kernel.close()
        subprocess.run(["ip", "netns", "delete", netns], check=False)


def run(args, kernel: TimedKernel, workdir: str) -> int:
    t0 = time.perf_counter()
    bench = Bench(args, kernel, workdir)
    t_compile = time.perf_counter() - t0
    first = bench.start()
    spec = bench.agent.applied_object.spec
    table = bench.agent.applied.ruleset
    chains = sum(len(t.chains) for t in table.tables)
    rules = sum(len(c.rules) for t in table.tables for c in t.chains.values())
    elements = sum(len(s.elements) for t in table.tables for s in (*t.sets.values(), *t.maps.values()))
    print(f"machine: {machine()}")
    print(f"cluster: {args.pods} pods, {args.policies} policies, {args.namespaces} namespaces, {args.nodes} nodes "
          f"(built and compiled in {t_compile:.1f} s)")
    print(f"{LOCAL}: {len(spec.pods)} local pods, {len(spec.peerGroups)} peer groups "
          f"({sum(len(g.cidrs) for g in spec.peerGroups)} members), {len(spec.peerPortGroups)} port groups; "
          f"rendered {chains} chains, {rules} rules, {elements} set and map elements; first load "
          f"{first[1] * 1000:.0f} ms ({first[0]})")

    figures: dict[str, list[tuple[str, float, float, float, float]]] = collections.defaultdict(list)
    for _ in range(2):  # warm-up, not counted
        bench.full_sync()
    for i in range(args.events):
        for kind in KINDS:
            for label, outcome in bench.event(kind, i):
                figures[label].append(outcome)
        if i % max(1, args.events // args.full_syncs) == 0:
            figures["full"].append(bench.full_sync())
    print(f"\n{'ms, spec handed to the sync -> committed':<40} {'n':>4} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}"
          f"  {'render':>6} {'plan':>5} {'nft':>5} (p50)  transactions")
    rows = [("own pod born", "birth"), ("own pod new IP", "ip"), ("own pod relabelled (rules change)", "relabel"),
            ("own pod deleted (and its veth gone)", "delete"), ("peer elsewhere (group members only)", "peer"),
            ("  veth discovered first (born, new IP)", "veth"), ("full sync of the node (baseline)", "full")]
    for label, key in rows:
        runs = figures[key]
        ms = [r[1] * 1000 for r in runs]
        kinds = collections.Counter(r[0] for r in runs)
        parts = " ".join(f"{statistics.median(r[j] * 1000 for r in runs):{w}.1f}" for j, w in ((2, 6), (3, 5), (4, 5)))
        print(f"{label:<40} {len(ms):>4} {pct(ms, .5):6.1f} {pct(ms, .9):6.1f} {pct(ms, .99):6.1f} {max(ms):6.1f}  "
              f"{parts}        " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    size = len(netfence_api.NodeRuleSet.for_node(spec, 1).model_dump_json())
    print(f"\nbefore the sync: the rule set's JSON ({size // 1024} KiB) decoded and read (RuleSetReader), ms p50/p99: "
          + ", ".join(f"{k} {pct(bench.reads[k], .5) * 1000:.1f}/{pct(bench.reads[k], .99) * 1000:.1f}" for k in KINDS))
    full_p50 = pct([r[1] for r in figures["full"]], .5)
    for key in KINDS:
        p99 = pct([r[1] for r in figures[key]], .99)
        print(f"{key:>8}: p99 {p99 * 1000:6.1f} ms = {p99 / full_p50:.3f} x full sync p50 "
              f"({'meets' if p99 <= 0.020 else 'MISSES'} p99 <= 20 ms)")
    print(f"machine at the end: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
