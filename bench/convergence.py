#!/usr/bin/env python3
"""Policy convergence in the lab: how long from `lab apply` to every agent enforcing it.

Brings up a lab (root; real agents), then repeatedly toggles a default-deny-ingress policy on
namespace ns-0 and measures, per apply:
  ack_s      writing the NodeRuleSets -> every agent's status reports that generation
  enforced   whether a probe started right after the ack already sees the new state
             (it must: an agent reports a generation only once its rules are in the kernel)
and prints a JSON summary (p50/p90/max). The lab is always torn down.

    sudo bench/convergence.py [--nodes 2] [--namespaces 3] [--pods 3] [--iterations 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent")]

from netfence_lab.lab import Lab, probe_matrix  # noqa: E402


def cluster(namespaces: int, pods: int, nodes: int) -> list[dict]:
    docs: list[dict] = []
    i = 0
    for n in range(namespaces):
        ns = f"ns-{n}"
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for p in range(pods):
            docs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"p{p}", "namespace": ns, "labels": {"app": f"p{p}"}},
                "spec": {"nodeName": f"node-{i % nodes + 1}",
                         "containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "http"}]}]},
            })
            i += 1
    return docs


DENY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "ns-0"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--namespaces", type=int, default=3)
    ap.add_argument("--pods", type=int, default=3, help="pods per namespace")
    ap.add_argument("--iterations", type=int, default=10)
    a = ap.parse_args()

    lab = Lab()
    t0 = time.monotonic()
    res = lab.up(cluster(a.namespaces, a.pods, a.nodes), nodes=a.nodes, agents=True)
    up_s = time.monotonic() - t0
    try:
        plan = res.plan
        src = next(p for p in plan.pods if p.namespace != "ns-0")
        dst = next((p for p in plan.pods if p.namespace == "ns-0" and p.node != src.node), None) \
            or next(p for p in plan.pods if p.namespace == "ns-0")
        # A one-pair probe: a matrix restricted to src -> dst, with a short timeout.
        from dataclasses import replace

        pair = replace(plan, pods=[src, dst])
        acks: list[float] = []
        enforced = 0
        for i in range(a.iterations):
            deny = i % 2 == 0
            t = time.monotonic()
            lab.apply([DENY] if deny else [])
            acks.append(time.monotonic() - t)
            ok = probe_matrix(pair, 80, "TCP", connect_timeout=0.3)[src.key][dst.key]
            enforced += ok == (not deny)
        out = {
            "nodes": len(plan.nodes), "pods": len(plan.pods), "iterations": a.iterations,
            "lab_up_s": round(up_s, 2),
            "ack_s": {"p50": pct(acks, 0.5), "p90": pct(acks, 0.9), "max": round(max(acks), 4),
                      "mean": round(statistics.mean(acks), 4)},
            "enforced_at_ack": f"{enforced}/{a.iterations}",
            "pair": f"{src.key} ({src.node}) -> {dst.key} ({dst.node}) 80/TCP",
        }
        print(json.dumps(out, indent=1))
        return 0 if enforced == a.iterations else 1
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
