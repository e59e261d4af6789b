#!/usr/bin/env python3
"""Per-packet work vs the number of ClusterNetworkPolicies: a structural figure.

A synthetic cluster (20 nodes, 200 namespaces, 2,000 pods, 400 NetworkPolicies) gets N
ClusterNetworkPolicies: every one selects the pods of one namespace by name (Admin and
Baseline alternating, 3 rules each: Deny to a CIDR, Accept from a namespace, Pass to every
pod; by default namespace i for policy i, so at most one selects a given pod; --stack: N/200
per namespace), plus 3 cluster-wide ones (deny the metadata service, accept monitoring and
DNS, a Baseline deny). Prints, for one pod, what a packet walks:

  - an established packet: the rules before the `ct state established` accept (always 1);
  - a new connection: the length of the pod's egress and ingress chains (every rule a new
    connection can walk there, Pass chains included): the upper bound of rules walked;
  - and the whole node's rule count, compile and render time, for scale.

The pod's chains hold only the rules of the policies that select it, so the per-packet
figures stay flat while N grows; the node's totals grow with N. Lookups per rule are one
set lookup (peers) plus at most one port set lookup, whatever the set sizes.

    .venv/bin/python bench/cnp_chains.py [--counts 0,10,100,1000,10000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / d) for d in ("operator", "agent")] + [str(HERE)]

from compile import synthetic_cluster  # noqa: E402  (bench/compile.py's cluster)
from netfence_agent.render import FORWARD_CHAIN, PodPort, RenderMemo, counter_name, render  # noqa: E402
from netfence_operator.compile import Compiler, parse_object  # noqa: E402


def cluster_policies(count: int, namespaces: int, stack: bool = False) -> list[dict]:
    def cnp(name, tier, priority, subject, ingress=(), egress=()):
        spec = {"tier": tier, "priority": priority, "subject": subject}
        if ingress:
            spec["ingress"] = list(ingress)
        if egress:
            spec["egress"] = list(egress)
        return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                "metadata": {"name": name}, "spec": spec}

    everyone = {"namespaces": {}}
    out = [
        cnp("deny-metadata", "Admin", 0, everyone,
            egress=[{"action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}]),
        cnp("monitoring-and-dns", "Admin", 1, everyone,
            ingress=[{"action": "Accept", "from": [{"namespaces": {"matchLabels": {"team": "team-0"}}}]}],
            egress=[{"action": "Accept", "to": [{"pods": {"namespaceSelector": {"matchLabels": {"team": "team-1"}},
                                                         "podSelector": {"matchLabels": {"app": "app-0"}}}}],
                     "protocols": [{"udp": {"destinationPort": {"number": 53}}}]}]),
        cnp("baseline-deny", "Baseline", 1000, everyone, ingress=[{"action": "Deny", "from": [everyone]}]),
    ]
    for i in range(count):
        # one policy per namespace name: the cluster has 200 namespaces, so beyond 200 the
        # policies are for namespaces that do not exist (yet): the node carries them, no pod
        # chain does. --stack puts them all on the 200 namespaces instead.
        ns = f"ns-{i % namespaces if stack else i}"
        subject = {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
        out.append(cnp(f"cnp-{i}", "Admin" if i % 2 == 0 else "Baseline", 10 + i % 900, subject,
                       ingress=[{"action": "Accept", "from": [{"namespaces": {"matchLabels": {"team": f"team-{i % 8}"}}}],
                                 "protocols": [{"tcp": {"destinationPort": {"number": 8000 + i % 100}}}]}],
                       egress=[{"action": "Deny", "to": [{"networks": [f"192.0.{i % 256}.0/24"]}]},
                               {"action": "Pass", "to": [{"namespaces": {}}]}]))
    return out


def measure(count: int, stack: bool = False) -> dict:
    objects = synthetic_cluster(pods=2000, policies=400, namespaces=200, nodes=20)
    for doc in cluster_policies(count, 200, stack):
        objects.add(parse_object(doc))
    started = time.perf_counter()
    compiler = Compiler(objects)
    specs = compiler.all_specs()
    compiled = time.perf_counter() - started
    node = sorted(specs)[0]
    spec = specs[node]
    started = time.perf_counter()
    result = render(spec, {p.ips[0]: PodPort(f"veth{i}") for i, p in enumerate(spec.pods)}, memo=RenderMemo())
    rendered = time.perf_counter() - started
    inet = result.ruleset.tables[0]
    pod = next(p for p in spec.pods if p.adminEgress or p.baselineEgress)

    def chain_rules(direction: str) -> int:
        name = counter_name(pod.namespace, pod.name, direction)
        return sum(len(c.rules) for n, c in inet.chains.items() if n == name or n.startswith(name + "_"))

    established = next(i for i, r in enumerate(inet.chains[FORWARD_CHAIN].rules) if "replies" in r.comment) + 1
    return {
        "cnps": count + 3,
        "selecting pod": sum(1 for _ in {r.policy for t in ("Admin", "Baseline") for d in ("ingress", "egress")
                                         for r in pod.tier_rules(t, d)}),
        "established": established,
        "egress chain": chain_rules("egress"),
        "ingress chain": chain_rules("ingress"),
        "node rules": sum(len(c.rules) for c in inet.chains.values()),
        "compile s": compiled,
        "render s": rendered,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="0,10,100,1000,10000")
    ap.add_argument("--stack", action="store_true",
                    help="spread the policies over the 200 existing namespaces (count/200 select each pod)")
    args = ap.parse_args()
    print(f"{'CNPs':>6} {'select pod':>10} {'est. pkt':>8} {'egress chain':>12} {'ingress chain':>13} "
          f"{'node rules':>10} {'compile':>8} {'render':>7}")
    for count in (int(c) for c in args.counts.split(",")):
        m = measure(count, args.stack)
        print(f"{m['cnps']:>6} {m['selecting pod']:>10} {m['established']:>8} {m['egress chain']:>12} "
              f"{m['ingress chain']:>13} {m['node rules']:>10} {m['compile s']:>7.2f}s {m['render s']:>6.2f}s")


if __name__ == "__main__":
    main()
