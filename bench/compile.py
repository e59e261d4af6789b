#!/usr/bin/env python3
"""Compile + render benchmark on a synthetic cluster.

Default: 10,000 pods, 2,000 policies, 200 namespaces, 20 nodes. Prints full compile time, full
render time, peak RSS, and the cost of recompiling after one pod's labels change (compile of
the affected nodes' specs, and their re-render), as median/p99 over repeated changes.

    .venv/bin/python bench/compile.py [--pods 10000 --policies 2000 --namespaces 200 --nodes 20]
Targets (issue 3): full compile + render < 2 s and < 500 MB; one pod change < 20 ms.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("operator", "agent")]

from netfence_agent.render import PodPort, RenderMemo, render  # noqa: E402
from netfence_api.runtime import tune_gc  # noqa: E402
from netfence_operator.compile import ClusterObjects, Compiler, parse_object  # noqa: E402

APPS = [f"app-{i}" for i in range(10)]
TEAMS = [f"team-{i}" for i in range(8)]


MAX_NODES = 156  # node n's pods are in 10.(100+n).0.0/16


def synthetic_documents(pods: int, policies: int, namespaces: int, nodes: int, seed: int = 1) -> Iterator[dict]:
    """The cluster's objects as manifests, in the shape `kubectl get -o yaml|json` prints them."""
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"the synthetic cluster has 1 to {MAX_NODES} nodes (a /16 of 10.100-255 each), not {nodes}")
    rnd = random.Random(seed)
    for n in range(nodes):
        yield {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{n}"},
               "spec": {"podCIDR": f"10.{100 + n}.0.0/16"}}
    for i in range(namespaces):
        yield {"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": f"ns-{i}", "labels": {"team": TEAMS[i % len(TEAMS)], "env": "prod" if i % 3 else "dev"}}}
    per_node: dict[int, int] = {}
    for p in range(pods):
        ns = p % namespaces
        node = rnd.randrange(nodes)
        slot = per_node[node] = per_node.get(node, 0) + 1
        yield {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"pod-{p}", "namespace": f"ns-{ns}", "uid": f"uid-{p}",
                         "labels": {"app": APPS[(p // namespaces) % len(APPS)], "tier": rnd.choice(["web", "api", "db"])}},
            "spec": {"nodeName": f"node-{node}", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}]}]},
            "status": {"podIP": f"10.{100 + node}.{slot // 250}.{slot % 250 + 2}"},
        }
    per_ns = max(1, policies // namespaces)
    count = 0
    for i in range(namespaces):
        for k in range(per_ns):
            if count >= policies:
                break
            count += 1
            app = APPS[(i + k) % len(APPS)]
            peer_app = APPS[(i + 2 * k + 1) % len(APPS)]
            kind = k % 5
            if kind == 0:
                spec = {"podSelector": {}, "policyTypes": ["Ingress"]}
            elif kind == 1:
                spec = {"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": peer_app}}}],
                                     "ports": [{"port": 8080}, {"port": "metrics"}]}]}
            elif kind == 2:
                spec = {"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": TEAMS[k % len(TEAMS)]}},
                                               "podSelector": {"matchLabels": {"tier": "web"}}}]}]}
            elif kind == 3:
                spec = {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": peer_app}}}],
                                    "ports": [{"port": "http"}]},
                                   {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-0"}}}],
                                    "ports": [{"port": 53, "protocol": "UDP"}]}]}
            else:
                spec = {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                                     "ports": [{"port": 443}, {"port": 30000, "endPort": 32767}]}]}
            yield {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": f"pol-{k}", "namespace": f"ns-{i}"}, "spec": spec}


def synthetic_cluster(pods: int, policies: int, namespaces: int, nodes: int, seed: int = 1) -> ClusterObjects:
    objects = ClusterObjects()
    for doc in synthetic_documents(pods, policies, namespaces, nodes, seed):
        objects.add(parse_object(doc))
    return objects


def render_node(spec, memo: RenderMemo | None = None):
    ports = {ip: PodPort(f"veth{j:08x}", f"02:42:0a:{j >> 16 & 255:02x}:{j >> 8 & 255:02x}:{j & 255:02x}", 10 + j)
             for j, pod in enumerate(spec.pods) for ip in pod.ips}
    return render(spec, ports, memo=memo)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_cluster_arguments(ap: argparse.ArgumentParser) -> None:
    """The synthetic cluster's size, as every benchmark built on it takes it."""
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=2_000)
    ap.add_argument("--namespaces", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=20)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_cluster_arguments(ap)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--default-gc", action="store_true", help="keep CPython's default GC thresholds")
    args = ap.parse_args()
    if not args.default_gc:
        tune_gc()  # as every netfence process does at start

    t0 = time.perf_counter()
    objects = synthetic_cluster(args.pods, args.policies, args.namespaces, args.nodes)
    t_parse = time.perf_counter() - t0
    rss_input = rss_mb()
    gc.collect()

    t0 = time.perf_counter()
    compiler = Compiler(objects)
    specs = compiler.all_specs()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    memo = RenderMemo()  # as `netfence matrix` renders every node of one compile
    rendered = {node: render_node(spec, memo) for node, spec in specs.items()}
    del memo
    t_render = time.perf_counter() - t0
    rss_full = rss_mb()
    rules = sum(len(c.rules) for r in rendered.values() for t in r.ruleset.tables for c in t.chains.values())
    groups = len({g.name for s in specs.values() for g in s.peerGroups})

    rnd = random.Random(7)
    compile_ms, render_ms, touched = [], [], []
    pod_keys = sorted(objects.pods)
    for _ in range(args.changes):
        pod = objects.pods[rnd.choice(pod_keys)]
        labels = dict(pod.metadata.labels, app=rnd.choice(APPS))
        changed = pod.model_copy(update={"metadata": pod.metadata.model_copy(update={"labels": labels})})
        t0 = time.perf_counter()
        affected = compiler.upsert(changed)
        new_specs = {n: compiler.node_spec(n) for n in affected}
        compile_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        for spec in new_specs.values():
            render_node(spec)
        render_ms.append((time.perf_counter() - t0) * 1000)
        touched.append(len(affected))
        objects.pods[changed.key] = changed

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    print(f"cluster: {args.pods} pods, {args.policies} policies, {args.namespaces} namespaces, {args.nodes} nodes "
          f"-> {groups} peer groups, {rules} nft rules")
    print(f"build input objects:      {t_parse:.2f} s (not counted)")
    print(f"full compile:             {t_compile:.2f} s")
    print(f"full render (all nodes):  {t_render:.2f} s")
    print(f"full compile + render:    {t_compile + t_render:.2f} s   (target < 2 s)")
    print(f"peak RSS:                 {rss_full:.0f} MB (after input objects: {rss_input:.0f} MB)   (target < 500 MB)")
    print(f"one pod relabel, compile: median {statistics.median(compile_ms):.1f} ms, p99 {pct(compile_ms, .99):.1f} ms, "
          f"nodes touched median {statistics.median(touched):.0f}   (target < 20 ms)")
    print(f"  + re-render touched:    median {statistics.median(render_ms):.1f} ms, p99 {pct(render_ms, .99):.1f} ms")


if __name__ == "__main__":
    main()
