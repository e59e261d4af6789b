#!/usr/bin/env python3
"""The controller's compile share of one pod event, at 10,000 and 100,000 pods.

The synthetic cluster of bench/compile.py is fed to a ClusterState as a watch would (the dict
bodies through `observe`), then every node's spec is compiled once (the first publish round).
Then pod events of four kinds, `--events` of each, in random order:

- birth:   a new pod, with an IP, on a random node;
- ip:      an existing pod gets a new IP (same node);
- relabel: an existing pod's labels change (its group memberships change);
- delete:  an existing pod goes (watch DELETED: `forget`).

Per event it times what the controller does before publishing: `ClusterState.observe` (parse,
`Compiler.upsert`) and `Compiler.node_spec` of every node the event made dirty, and prints
p50/p90/p99/max per kind, the dirty nodes per event, and the groups whose members changed
(`Compiler.take_changed_groups`). Memory: RSS after load and peak RSS (VmHWM).

    .venv/bin/python bench/controller_events.py --shape 10k
    .venv/bin/python bench/controller_events.py --shape 100k
Targets (issue 14): compile + publish p99 <= 20 ms at 10k pods; controller <= 1 GiB at 100k.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import platform
import pstats
import random
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("operator", "agent", "bench")]

from compile import APPS, synthetic_documents  # noqa: E402
from netfence_api.runtime import tune_gc  # noqa: E402
from netfence_operator.state import ClusterState  # noqa: E402

SHAPES = {  # pods, policies, namespaces, nodes
    "10k": (10_000, 2_000, 200, 91),
    "100k": (100_000, 10_000, 2_000, 100),
}
KINDS = ("birth", "ip", "relabel", "delete")


def proc_status(field: str) -> float:
    """A VmXXX line of /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({cpu}), load {load}, Python {platform.python_version()}, {platform.release()}"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Events:
    """Pod events as the watch would send them: bodies made from the pods the controller holds
    (the benchmark keeps no bodies of its own, so that RSS is the controller's)."""

    def __init__(self, compiler, nodes: int, seed: int) -> None:
        self.compiler = compiler
        self.keys = list(compiler.pods)
        self.nodes = nodes
        self.rnd = random.Random(seed)
        self.serial = 0
        self.slot = 0

    def _ip(self, node: int) -> str:
        self.slot += 1  # beyond the generator's addresses in the node's /16
        return f"10.{100 + node}.{200 + self.slot // 250 % 50}.{self.slot % 250 + 2}"

    def _pick(self) -> tuple[str, dict]:
        while True:
            i = self.rnd.randrange(len(self.keys))
            pod = self.compiler.pods.get(self.keys[i])
            if pod is not None:
                return self.keys[i], pod.model_dump(mode="json", by_alias=True, exclude_none=True)
            self.keys[i] = self.keys[-1]
            self.keys.pop()

    def make(self, kind: str) -> tuple[str, dict]:
        """(what the controller calls: observe or forget, the body)"""
        if kind == "birth":
            self.serial += 1
            node = self.rnd.randrange(self.nodes)
            template = self._pick()[1]
            name = f"new-{self.serial}"
            body = {**template,
                    "metadata": {**template["metadata"], "name": name, "uid": f"uid-new-{self.serial}",
                                 "labels": {"app": self.rnd.choice(APPS), "tier": self.rnd.choice(["web", "api", "db"])}},
                    "spec": {**template["spec"], "nodeName": f"node-{node}"},
                    "status": {"podIP": self._ip(node)}}
            self.keys.append(f"{body['metadata']['namespace']}/{name}")
            return "observe", body
        key, old = self._pick()
        if kind == "delete":
            return "forget", old
        if kind == "ip":
            node = int(old["spec"]["nodeName"].split("-")[1])
            return "observe", {**old, "status": {"podIP": self._ip(node)}}
        labels = dict(old["metadata"]["labels"])
        labels["app"] = self.rnd.choice([a for a in APPS if a != labels.get("app")])
        return "observe", {**old, "metadata": {**old["metadata"], "labels": labels}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="10k")
    ap.add_argument("--events", type=int, default=200, help="events of each kind")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the events into FILE (and print the top)")
    ap.add_argument("--default-gc", action="store_true", help="keep CPython's default GC thresholds")
    ap.add_argument("--no-freeze", action="store_true", help="leave the loaded heap to the collector (no gc.freeze)")
    args = ap.parse_args()
    if not args.default_gc:
        tune_gc()  # as every netfence process does at start
    pods_n, policies_n, namespaces_n, nodes_n = SHAPES[args.shape]
    print(f"machine: {machine()}")
    print(f"cluster: {pods_n} pods, {policies_n} policies, {namespaces_n} namespaces, {nodes_n} nodes")

    state = ClusterState()
    t0 = time.perf_counter()
    for doc in synthetic_documents(pods_n, policies_n, namespaces_n, nodes_n):
        state.observe(doc["kind"], doc)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler = state.compiler
    for node in sorted(state.take_dirty()):
        compiler.node_spec(node)
    changed_groups = getattr(compiler, "take_changed_groups", set)  # set(): a compiler without it
    changed_groups()
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    gc.collect()
    t_full_gc = time.perf_counter() - t0
    if not args.no_freeze:
        gc.freeze()  # what freeze_heap() does once the controller has published everything
    rss_load = proc_status("VmRSS")
    print(f"load (observe every object): {t_load:.1f} s; first compile of every node: {t_first:.1f} s; "
          f"{len(compiler._groups)} peer groups; {len(gc.get_objects()) + gc.get_freeze_count()} objects tracked by GC")
    print(f"one full GC collection over that heap: {t_full_gc * 1000:.0f} ms"
          f" ({'frozen after it' if not args.no_freeze else 'not frozen: --no-freeze'})")
    print(f"RSS after load: {rss_load:.0f} MB")

    events = Events(compiler, nodes_n, args.seed)
    plan = [k for k in KINDS for _ in range(args.events)]
    random.Random(args.seed).shuffle(plan)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    observe_ms: dict[str, list[float]] = {k: [] for k in KINDS}
    dirty_n: dict[str, list[int]] = {k: [] for k in KINDS}
    groups_n: dict[str, list[int]] = {k: [] for k in KINDS}
    profiler = cProfile.Profile() if args.profile else None
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}  # generation -> ms of each collection
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses[info["generation"]].append((time.perf_counter() - started.pop()) * 1000)

    gc.callbacks.append(on_gc)
    for kind in plan:
        how, body = events.make(kind)
        if profiler:
            profiler.enable()
        t0 = time.perf_counter()
        if how == "observe":
            state.observe("Pod", body)
        else:
            state.forget("Pod", body)
        t1 = time.perf_counter()
        dirty = state.take_dirty()
        for node in dirty:
            compiler.node_spec(node)
        t2 = time.perf_counter()
        if profiler:
            profiler.disable()
        times[kind].append((t2 - t0) * 1000)
        observe_ms[kind].append((t1 - t0) * 1000)
        dirty_n[kind].append(len(dirty))
        groups_n[kind].append(len(changed_groups()))
    print(f"{'event':8} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}   {'observe p50/p99':>16}   "
          f"{'dirty nodes p50/max':>20}   groups changed p50/max   (ms; {args.events} events each)")
    everything = []
    for kind in KINDS:
        xs = times[kind]
        everything += xs
        print(f"{kind:8} {pct(xs, .5):7.2f} {pct(xs, .9):7.2f} {pct(xs, .99):7.2f} {max(xs):7.2f}   "
              f"{pct(observe_ms[kind], .5):7.2f}/{pct(observe_ms[kind], .99):<7.2f}  "
              f"{pct(dirty_n[kind], .5):>10}/{max(dirty_n[kind]):<9}   {pct(groups_n[kind], .5):>10}/{max(groups_n[kind])}")
    print(f"{'all':8} {pct(everything, .5):7.2f} {pct(everything, .9):7.2f} {pct(everything, .99):7.2f} {max(everything):7.2f}")
    gc.callbacks.remove(on_gc)
    print("GC during the events: " + ", ".join(
        f"gen {g}: {len(xs)} collections, max {max(xs, default=0):.1f} ms" for g, xs in pauses.items()))
    print(f"RSS at end: {proc_status('VmRSS'):.0f} MB; peak RSS (VmHWM): {proc_status('VmHWM'):.0f} MB")
    if profiler:
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
