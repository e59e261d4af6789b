#!/usr/bin/env python3
"""Policy convergence in the lab: from `lab apply` to the change enforced, as real packets see it.

Brings up a lab (root; the real agent on every node) with NAMESPACES x PODS pods, loads a set of
many small NetworkPolicies across the namespaces, then toggles ONE policy ITERATIONS times: an
allow of 80/TCP from src (ns-1/p0) to dst (ns-0/p0, another node; ns-0 is default-deny-ingress).
Present: src -> dst connects; absent: its SYN is dropped.

Meanwhile a prober inside src's network namespace starts a TCP connect to dst every
--interval seconds (each with a --attempt-timeout), and reports when each attempt STARTED and
whether it connected. Per apply:
  enforced_s  from just before `Lab.apply()` to the start of the first attempt that sees the new
              state and after which no attempt sees the old one (resolution: --interval)
  ack_s       from just before `Lab.apply()` to its return (compile + write every NodeRuleSet +
              every agent reports that generation; an agent reports only once its rules are in
              the kernel, so enforced_s <= ack_s (+ one interval) is expected: enforced_by_ack)
  until_rules_written_s / written_to_enforced_s
              the lab's share (compile, its record, cluster.yaml) and the agents' share (read and
              parse rules.json, render, nft transaction) of enforced_s
Runs once per --policies size (the toggled policy counts as one of them) and prints p50/p90/p99/max
as JSON (p99 of 50 samples is their 50th by nearest rank, i.e. the max). The lab is always torn
down. The state lives in a private directory (nothing of a lab in $NETFENCE_LAB_DIR is touched).

    sudo .venv/bin/python bench/convergence.py --policies 100,500 --iterations 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent")]

import netfence_lab.lab as lab_module  # noqa: E402
from netfence_lab.lab import Lab, read_node_metrics  # noqa: E402
from netfence_lab.state import StateStore  # noqa: E402

NAME_LABEL = "kubernetes.io/metadata.name"

# Started inside src's netns. Prints "<monotonic start> <1 connected | 0 timed out | 2 error>"
# per attempt; exits when its stdin closes (the bench ended or died).
PROBER = r"""
import asyncio, socket, sys, time
ip, port, interval, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
async def attempt(loop, started):
    s = socket.socket()
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, (ip, port)), timeout)
        result = 1
    except asyncio.TimeoutError:
        result = 0
    except OSError:
        result = 2
    finally:
        s.close()
    sys.stdout.write(f"{started:.6f} {result}\n")
    sys.stdout.flush()
async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(0, lambda: sys.stdin.buffer.raw.read(4096) or done.done() or done.set_result(None))
    tasks = set()
    tick = time.monotonic()
    while not done.done():
        t = loop.create_task(attempt(loop, time.monotonic()))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        tick += interval
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
asyncio.run(main())
"""


# --------------------------------------------------------------------------- the cluster and its policies
def cluster(namespaces: int, pods: int, nodes: list[str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for n in range(namespaces):
        ns = f"ns-{n}"
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"tier": f"t{n % 3}"}}})
        for p in range(pods):
            docs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"p{p}", "namespace": ns, "labels": {"app": f"p{p}"}},
                # (namespace + pod) spreads the pods and puts ns-0/p0 and ns-1/p0 on different nodes
                "spec": {"nodeName": nodes[(n + p) % len(nodes)],
                         "containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "http"},
                                                                {"containerPort": 9100, "name": "metrics"}]}]},
            })
    return docs


def netpol(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def static_policies(count: int, namespaces: int, pods: int) -> list[dict[str, Any]]:
    """`count` small policies across the namespaces; none opens 80/TCP from src to dst and none
    isolates src for egress (egress policies select app=p1 only)."""
    out = [netpol("ns-0", "default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    i = 0
    while len(out) < count:
        ns, target = f"ns-{i % namespaces}", {"matchLabels": {"app": f"p{i % pods}"}}
        other = f"ns-{(i + 1) % namespaces}"
        kind = i % 4
        if kind == 0:  # pods of another namespace, on a numbered port
            spec = {"podSelector": target, "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: other}},
                          "podSelector": {"matchLabels": {"app": f"p{(i + 1) % pods}"}}}],
                "ports": [{"port": 1000 + i % 4000}]}]}
        elif kind == 1:  # an ipBlock with an exception, UDP range
            spec = {"podSelector": target, "ingress": [{
                "from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"10.244.{i % 2 + 1}.{i % 200 + 2}/32"]}}],
                "ports": [{"protocol": "UDP", "port": 2000 + i % 1000, "endPort": 2010 + i % 1000}]}]}
        elif kind == 2:  # a named port, from namespaces by label
            spec = {"podSelector": target, "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"tier": f"t{i % 3}"}}}],
                "ports": [{"port": "metrics"}]}]}
        else:  # egress of app=p1 pods (never src) to DNS-like ports
            spec = {"podSelector": {"matchLabels": {"app": "p1"}}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: other}}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}
        out.append(netpol(ns, f"np-{i:04d}", spec))
        i += 1
    return out


TOGGLED = netpol("ns-0", "allow-src-80", {
    "podSelector": {"matchLabels": {"app": "p0"}},
    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: "ns-1"}},
                           "podSelector": {"matchLabels": {"app": "p0"}}}],
                 "ports": [{"protocol": "TCP", "port": 80}]}]})


class WriteClock:
    """When `Lab.apply` last wrote a node's rules.json: splits the lab's share (compile, record,
    cluster.yaml) from the agents' share (read, render, nft, report). Wraps the lab module's
    write_atomic, for this process only."""

    def __init__(self) -> None:
        self.last = 0.0
        original = lab_module.write_atomic

        def timed(path: Path, *args: Any, **kwargs: Any) -> Any:
            out = original(path, *args, **kwargs)
            if Path(path).name == "rules.json":
                self.last = time.monotonic()
            return out

        lab_module.write_atomic = timed


# --------------------------------------------------------------------------- the continuous prober
class ProbeStream:
    """The prober's reports, collected by a reader thread: (start, connected) in arrival order."""

    def __init__(self, netns: str, ip: str, port: int, interval: float, attempt_timeout: float):
        self.attempt_timeout = attempt_timeout
        argv = ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-c", PROBER,
                ip, str(port), str(interval), str(attempt_timeout)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.results: list[tuple[float, bool]] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            started, result = line.split()
            with self._lock:
                self.results.append((float(started), result == "1"))
                self.errors += result == "2"

    def complete_since(self, t0: float) -> list[tuple[float, bool]]:
        """Attempts started at or after t0 that must have reported by now, by start time."""
        horizon = time.monotonic() - self.attempt_timeout - 0.1
        with self._lock:
            return sorted(r for r in self.results if t0 <= r[0] <= horizon)

    def cpu_seconds(self) -> float:
        """CPU time the prober used so far (it shares the 2 cores with the lab)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)
        self._reader.join(timeout=3)


def wait_enforced(stream: ProbeStream, t0: float, want: bool, settle: float, deadline: float) -> float | None:
    """Start time of the first attempt showing `want` after which every attempt (for `settle`
    seconds) shows it too; None when that is not seen before the deadline."""
    while time.monotonic() < deadline:
        time.sleep(0.02)
        seen = stream.complete_since(t0)
        last_old = max((i for i, (_, ok) in enumerate(seen) if ok != want), default=-1)
        if last_old + 1 < len(seen):
            first_new = seen[last_old + 1][0]
            if seen[-1][0] >= first_new + settle:
                return first_new
    return None


# --------------------------------------------------------------------------- figures
def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 0.50), 4), "p90": round(pct(values, 0.90), 4),
            "p99": round(pct(values, 0.99), 4), "max": round(max(values), 4)}


def apply_histogram(netns: str) -> tuple[float, float]:
    """(sum, count) of the agent's netfence_rule_apply_duration_seconds."""
    text = read_node_metrics(netns)
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return get("netfence_rule_apply_duration_seconds_sum"), get("netfence_rule_apply_duration_seconds_count")


def machine() -> dict[str, Any]:
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def run_size(lab: Lab, docs: list[dict[str, Any]], size: int, a: argparse.Namespace, stream: ProbeStream,
             node_netns: dict[str, str], clock: WriteClock) -> dict[str, Any]:
    statics = static_policies(size - 1, a.namespaces, a.pods)
    lab.apply(docs + statics)  # not measured: the static set, toggle absent (blocked)
    if wait_enforced(stream, time.monotonic(), False, a.settle, time.monotonic() + 10) is None:
        raise SystemExit(f"{size} policies: src -> dst is not blocked without the toggled policy")
    hist_before = {n: apply_histogram(ns) for n, ns in node_netns.items()}
    enforced: list[float] = []
    acks: list[float] = []
    lab_side: list[float] = []
    agent_side: list[float] = []
    at_ack = 0
    failures = 0
    present = False
    for _ in range(a.iterations):
        present = not present
        policies = statics + ([TOGGLED] if present else [])
        t0 = time.monotonic()
        lab.apply(docs + policies)
        ack = time.monotonic() - t0
        written = clock.last - t0
        t_new = wait_enforced(stream, t0, present, a.settle, t0 + a.max_wait)
        acks.append(ack)
        if t_new is None:
            failures += 1
            enforced.append(float("inf"))
            continue
        enforced.append(t_new - t0)
        lab_side.append(written)
        agent_side.append(t_new - t0 - written)
        at_ack += t_new - t0 <= ack + a.interval  # the first new attempt may start up to one interval late
    hist_after = {n: apply_histogram(ns) for n, ns in node_netns.items()}
    agent_apply = {n: round((hist_after[n][0] - hist_before[n][0]) / max(1.0, hist_after[n][1] - hist_before[n][1]), 4)
                   for n in node_netns}
    ok = [e for e in enforced if e != float("inf")]
    return {
        "policies": size, "applies": a.iterations,
        "enforced_s": summary(ok) if ok else None,
        "ack_s": summary(acks),
        "until_rules_written_s": summary(lab_side) if lab_side else None,
        "written_to_enforced_s": summary(agent_side) if agent_side else None,
        "enforced_by_ack": f"{at_ack}/{a.iterations}",
        "not_enforced_within_s": {"limit": a.max_wait, "count": failures},
        "agent_apply_mean_s": agent_apply,
    }


def add_cluster_and_probe_arguments(ap: argparse.ArgumentParser, step: str, steps: str, iterations: int) -> None:
    """The lab's shape and the prober's timing, shared by the benchmarks that toggle a policy."""
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--pods", type=int, default=2, help="pods per namespace")
    ap.add_argument("--policies", default="100,500", help="comma-separated policy counts (default 100,500)")
    ap.add_argument("--iterations", type=int, default=iterations, help=f"{steps} per size (default {iterations})")
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between probe attempts (the resolution)")
    ap.add_argument("--attempt-timeout", type=float, default=0.15, help="a connect not done by then is blocked")
    ap.add_argument("--settle", type=float, default=0.25, help="the new state must hold this long")
    ap.add_argument("--max-wait", type=float, default=10.0, help=f"give up on one {step} after this long")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_and_probe_arguments(ap, "apply", "applies", 50)
    a = ap.parse_args()
    if a.namespaces < 2 or a.pods < 2:
        ap.error("--namespaces and --pods must be at least 2")
    sizes = [int(s) for s in a.policies.split(",")]

    nodes = [f"cv-{i + 1}" for i in range(a.nodes)]  # names of its own: runs beside other labs
    docs = cluster(a.namespaces, a.pods, nodes)
    clock = WriteClock()
    facts_before = machine()
    with tempfile.TemporaryDirectory(prefix="nflab-bench-") as tmp:
        lab = Lab(StateStore(Path(tmp) / "lab"))
        t = time.monotonic()
        res = lab.up(docs, agents=True)
        up_s = time.monotonic() - t
        stream = None
        try:
            plan = res.plan
            src, dst = plan.pod("ns-1/p0"), plan.pod("ns-0/p0")
            stream = ProbeStream(src.netns, dst.ip, 80, a.interval, a.attempt_timeout)
            probe_t0 = time.monotonic()
            node_netns = {n.name: n.netns for n in plan.nodes}
            results = [run_size(lab, docs, size, a, stream, node_netns, clock) for size in sizes]
            out = {
                "command": "bench/convergence.py " + " ".join(sys.argv[1:]),
                "machine": {**facts_before, "loadavg_after": machine()["loadavg"]},
                "lab": {"nodes": len(plan.nodes), "pods": len(plan.pods), "up_s": round(up_s, 2),
                        "pair": f"{src.key} ({src.node}) -> {dst.key} ({dst.node}) 80/TCP"},
                "probe": {"interval_s": a.interval, "attempt_timeout_s": a.attempt_timeout, "settle_s": a.settle,
                          "attempts": len(stream.results), "errors": stream.errors,
                          "cpu_share": round(stream.cpu_seconds() / (time.monotonic() - probe_t0), 3)},
                "results": results,
            }
            print(json.dumps(out, indent=1))
            bad = [r for r in results if r["not_enforced_within_s"]["count"]]
            return 1 if bad else 0
        finally:
            if stream is not None:
                stream.close()
            lab.down()


if __name__ == "__main__":
    sys.exit(main())
