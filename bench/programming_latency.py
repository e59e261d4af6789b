#!/usr/bin/env python3
"""Network programming latency on the API lab: `kubectl apply` -> enforced, as packets see it.

The product path, as kube-proxy's SLI measures it: a NetworkPolicy is created (deleted) through
the API with the kubernetes client, the real controller (`netfence controller`, run by the lab)
compiles and publishes NodeRuleSets, the agents (API mode) load them, and a prober inside the
source pod sees the connection blocked (allowed). Same cluster, policies, prober and figures as
bench/convergence.py (which measures the file-mode `lab apply`): the toggled policy allows
80/TCP from ns-1/p0 to ns-0/p0 on another node; ns-0 is default-deny-ingress.

Per toggle:
  enforced_s  from just before the API call to the first probe attempt that sees the new state
              and after which no attempt sees the old one (resolution: --interval)
  agent_reported_s  the agents' own netfence_network_programming_duration_seconds (from the
              controller's trigger time, i.e. when it saw the watch event, to rules in the kernel):
              mean per toggle over both nodes

The API server is the project's test API server (tests/controller/fakeapi.py) in this process,
unless --kubeconfig names another one. Target: p99 < 1 s at 100 and 500 policies.

    sudo .venv/bin/python bench/programming_latency.py --policies 100,500 --iterations 20
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent"), str(REPO / "tests"), str(REPO / "bench")]

import kubernetes  # noqa: E402
from kubernetes.client import NetworkingV1Api  # noqa: E402

from convergence import TOGGLED, add_cluster_and_probe_arguments, ProbeStream, cluster, machine, static_policies, summary, wait_enforced  # noqa: E402
from netfence_lab.lab import Lab, read_node_metrics  # noqa: E402
from netfence_lab.state import StateStore  # noqa: E402


def programming_histogram(netns: str) -> tuple[float, float]:
    text = read_node_metrics(netns)
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return (get("netfence_network_programming_duration_seconds_sum"),
            get("netfence_network_programming_duration_seconds_count"))


def create_missing(net: NetworkingV1Api, policies: list[dict[str, Any]]) -> None:
    existing = {(p.metadata.namespace, p.metadata.name) for p in net.list_network_policy_for_all_namespaces().items}
    for p in policies:
        if (p["metadata"]["namespace"], p["metadata"]["name"]) not in existing:
            net.create_namespaced_network_policy(p["metadata"]["namespace"], p)


def run_size(lab: Lab, net: NetworkingV1Api, size: int, a: argparse.Namespace, stream: ProbeStream,
             node_netns: dict[str, str]) -> dict[str, Any]:
    create_missing(net, static_policies(size - 1, a.namespaces, a.pods))  # not measured
    lab.wait_converged(timeout=120)
    if wait_enforced(stream, time.monotonic(), False, a.settle, time.monotonic() + 10) is None:
        raise SystemExit(f"{size} policies: src -> dst is not blocked without the toggled policy")
    before = {n: programming_histogram(ns) for n, ns in node_netns.items()}
    enforced: list[float] = []
    failures = 0
    present = False
    for _ in range(a.iterations):
        present = not present
        t0 = time.monotonic()
        if present:
            net.create_namespaced_network_policy("ns-0", TOGGLED)
        else:
            net.delete_namespaced_network_policy(TOGGLED["metadata"]["name"], "ns-0")
        t_new = wait_enforced(stream, t0, present, a.settle, t0 + a.max_wait)
        if t_new is None:
            failures += 1
            continue
        enforced.append(t_new - t0)
        lab.wait_converged(timeout=60)  # every node done before the next toggle
    after = {n: programming_histogram(ns) for n, ns in node_netns.items()}
    reported = sum(after[n][0] - before[n][0] for n in node_netns) / max(1.0, sum(after[n][1] - before[n][1] for n in node_netns))
    return {"policies": size, "toggles": a.iterations, "enforced_s": summary(enforced) if enforced else None,
            "agent_reported_mean_s": round(reported, 4),
            "not_enforced_within_s": {"limit": a.max_wait, "count": failures}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", help="an API server to use (default: the test API server, in this process)")
    add_cluster_and_probe_arguments(ap, "toggle", "toggles", 20)
    a = ap.parse_args()
    sizes = [int(s) for s in a.policies.split(",")]
    nodes = [f"pl-{i + 1}" for i in range(a.nodes)]
    docs = cluster(a.namespaces, a.pods, nodes)
    facts_before = machine()
    server = None
    with tempfile.TemporaryDirectory(prefix="nflab-bench-") as tmp:
        kubeconfig = a.kubeconfig
        if kubeconfig is None:
            from controller.fakeapi import CLUSTER_NAMESPACES, FakeApiServer, kubeconfig_for

            server = FakeApiServer(bookmark_interval=1.0, seed_namespaces=CLUSTER_NAMESPACES).start()
            kubeconfig = str(Path(tmp) / "kubeconfig")
            Path(kubeconfig).write_text(json.dumps(kubeconfig_for(server.url)))
        client = kubernetes.config.new_client_from_config(kubeconfig)
        net = NetworkingV1Api(client)
        lab = Lab(StateStore(Path(tmp) / "lab"))
        t = time.monotonic()
        lab.up(docs + [static_policies(1, a.namespaces, a.pods)[0]], kubeconfig=kubeconfig, controller=True)
        up_s = time.monotonic() - t
        stream = None
        try:
            plan = lab.current_plan(lab.store.load())
            src, dst = plan.pod("ns-1/p0"), plan.pod("ns-0/p0")
            stream = ProbeStream(src.netns, dst.ip, 80, a.interval, a.attempt_timeout)
            node_netns = {n.name: n.netns for n in plan.nodes}
            results = [run_size(lab, net, size, a, stream, node_netns) for size in sizes]
            print(json.dumps({
                "command": "bench/programming_latency.py " + " ".join(sys.argv[1:]),
                "api_server": "test API server (tests/controller/fakeapi.py), in process" if server else kubeconfig,
                "machine": {**facts_before, "loadavg_after": machine()["loadavg"]},
                "lab": {"nodes": len(plan.nodes), "pods": len(plan.pods), "up_s": round(up_s, 2),
                        "pair": f"{src.key} ({src.node}) -> {dst.key} ({dst.node}) 80/TCP"},
                "probe": {"interval_s": a.interval, "attempt_timeout_s": a.attempt_timeout, "settle_s": a.settle,
                          "attempts": len(stream.results), "errors": stream.errors},
                "results": results,
            }, indent=1))
            return 1 if any(r["not_enforced_within_s"]["count"] for r in results) else 0
        finally:
            if stream is not None:
                stream.close()
            lab.down()
            client.close()
            if server is not None:
                server.stop()


if __name__ == "__main__":
    sys.exit(main())
