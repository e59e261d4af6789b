#!/usr/bin/env python3
"""Agent apply benchmark: rule sets into the real kernel, in a network namespace of its own.

Default: 1,000 local pods (each with its veth, so the bridge anti-spoofing is loaded too) and
500 policies (tests/kernel/synthetic.py: ~1,000 peer groups, ~20,000 set elements). Measures,
each as median and worst of --repeat runs, split into render (pure), plan (pure) and apply (the
libnftables transaction):
  - full load into an empty kernel (agent start on a fresh node)
  - full sync over the same rules (agent restart: replace in place)
  - element-level sync: one pod joins a peer group          (target: <= 20 ms end to end)
  - partial sync: one new veth (a pod's anti-spoofing chain, counter, map entry)
  - partial sync: one pod gains a policy rule (its chain refilled)
  - a /metrics scrape's counter read
  - the anti-spoofing check (bridge table read back, every local pod checked)
Root only; creates netns nf-bench-apply-<hex> and deletes it by name at the end.

    .venv/bin/python bench/apply.py [--pods 1000 --policies 500 --repeat 10] [--host-sets]

--host-sets is an experiment on render's output, not what the agent loads today: peer sets whose
members are all single addresses become plain hash sets instead of interval sets (see
docs/benchmarks.md for why that matters to libnftables 1.0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("operator", "agent", "tests")]

import netfence_api  # noqa: E402
from bench_machine import machine  # noqa: E402
from kernel.synthetic import pod_ip, synthetic_spec, with_member  # noqa: E402
from netfence_api.runtime import tune_gc  # noqa: E402
from netfence_agent.coverage import anti_spoofing_gaps, loaded_from  # noqa: E402
from netfence_agent.netns import executor_in  # noqa: E402
from netfence_agent.source import RuleSetReader  # noqa: E402
from netfence_agent.nft.kernel import Kernel  # noqa: E402
from netfence_agent.nft.transaction import plan  # noqa: E402
from netfence_agent.render import PodPort, RenderResult, render, only_group_members_changed, render_group_members  # noqa: E402

ms = 1000.0


def host_sets(result: RenderResult) -> RenderResult:
    for table in result.ruleset.tables:
        for s in table.sets.values():
            if s.flags == ("interval",) and all(getattr(e, "prefixlen", None) == getattr(e, "max_prefixlen", 0) for e in s.elements):
                s.flags = ()
    return result


def row(label: str, runs: list[dict]) -> str:
    """Median and worst of render, plan, apply and their sum, in ms."""
    cells = []
    for key in ("render", "plan", "apply", "total"):
        values = [(sum(r[x] for x in ("render", "plan", "apply")) if key == "total" else r[key]) * ms for r in runs]
        cells.append(f"{statistics.median(values):8.1f} {max(values):8.1f}")
    kinds = "/".join(sorted({r["kind"] for r in runs}))
    return f"{label + ' [' + kinds + ']':<52} " + " ".join(cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=1000)
    p.add_argument("--policies", type=int, default=500)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--host-sets", action="store_true")
    args = p.parse_args()
    tune_gc()  # as the agent process does (netfence_cli.main)
    if os.geteuid() != 0:
        print("bench/apply.py needs root (it creates a network namespace)", file=sys.stderr)
        return 2

    spec = synthetic_spec(pods=args.pods, policies=args.policies)
    ports = {pod_ip(i): PodPort(f"veth{i:08x}", f"02:42:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01", 10 + i)
             for i in range(args.pods)}
    post = host_sets if args.host_sets else (lambda r: r)
    elements = sum(len(g.cidrs) for g in spec.peerGroups)
    name = f"nf-bench-apply-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    executor = executor_in(name)
    try:
        kernel: Kernel = executor.submit(Kernel).result()
        k = lambda fn, *a: executor.submit(fn, *a).result()  # noqa: E731 - every kernel call inside the netns

        def timed(build: Callable[[], RenderResult], applied: RenderResult | None) -> tuple[dict, RenderResult]:
            t0 = time.perf_counter()
            result = post(build())
            t1 = time.perf_counter()
            tx = plan(result.ruleset, applied.ruleset if applied else None, lambda: k(kernel.inventory))
            t2 = time.perf_counter()
            k(kernel.apply, tx)
            t3 = time.perf_counter()
            return {"render": t1 - t0, "plan": t2 - t1, "apply": t3 - t2, "kind": tx.kind, "commands": len(tx.commands)}, result

        rows: list[tuple[str, list[dict]]] = []
        first, base = [], None
        for _ in range(max(2, args.repeat // 3)):
            k(kernel.delete_tables)
            run, base = timed(lambda: render(spec, ports), None)
            first.append(run)
        rows.append(("full load, empty kernel", first))
        rows.append(("full sync over the same rules (restart)",
                     [timed(lambda: render(spec, ports), None)[0] for _ in range(max(2, args.repeat // 3))]))

        joins, applied, current = [], base, spec
        for i in range(args.repeat):
            previous, current = current, with_member(current, i % len(current.peerGroups), pod_ip(40000 + i))
            # What the agent does (daemon.sync_once): only the changed group's sets are rendered.
            assert only_group_members_changed(previous, current)
            run, applied = timed(lambda: render_group_members(applied, previous, current), applied)
            joins.append(run)
        rows.append(("elements: one pod joins a peer group", joins))

        # The same change as the agent meets it: a whole NodeRuleSet as JSON text (what the API
        # watch or the rules file delivers), decoded, validated (RuleSetReader: what changed
        # only), checked for a group-only change, rendered, planned and applied.
        reader, updates = RuleSetReader(), []
        object_of = lambda s, g: netfence_api.NodeRuleSet.for_node(s, g).model_dump_json()  # noqa: E731
        last = reader.read(json.loads(object_of(current, 1)))
        for i in range(args.repeat):
            text = object_of(with_member(last.spec, i % len(last.spec.peerGroups), pod_ip(50000 + i)), i + 2)
            t0 = time.perf_counter()
            data = json.loads(text)
            t1 = time.perf_counter()
            rule_set = reader.read(data)
            t2 = time.perf_counter()
            assert only_group_members_changed(last.spec, rule_set.spec)
            result = render_group_members(applied, last.spec, rule_set.spec)
            t3 = time.perf_counter()
            tx = plan(result.ruleset, applied.ruleset, lambda: k(kernel.inventory))
            t4 = time.perf_counter()
            k(kernel.apply, tx)
            t5 = time.perf_counter()
            assert tx.kind == "elements"
            updates.append({"decode": t1 - t0, "validate": t2 - t1, "render": t3 - t2, "plan": t4 - t3,
                            "apply": t5 - t4, "total": t5 - t0, "size": len(text)})
            applied, last = result, rule_set

        veths, more_ports = [], dict(ports)
        extra_pods = synthetic_spec(pods=args.repeat, policies=1, first_ip=args.pods)
        grown = current
        for i, pod in enumerate(extra_pods.pods):
            grown = grown.model_copy(update={"pods": [*grown.pods, pod.model_copy(update={"name": f"new-{i}"})]})
            applied = timed(lambda: render(grown, more_ports), applied)[1]  # the pod first (IP-keyed rules)
            more_ports[pod.ips[0]] = PodPort(f"vethnew{i:04x}", "02:42:00:00:ff:01", 100_000 + i)
            run, applied = timed(lambda: render(grown, more_ports), applied)
            veths.append(run)
        rows.append(("partial: a new veth (anti-spoofing chain)", veths))

        refills = []
        for i in range(args.repeat):
            target = grown.pods[i]
            rule = netfence_api.AllowRule(origin=[f"bench/extra-{i} ingress[0]"], peers=grown.peerGroups[0].name,
                                          ports=[netfence_api.PortRange(port=9000 + i)])
            pods = list(grown.pods)
            pods[i] = target.model_copy(update={"ingress": [*target.ingress, rule]})
            grown = grown.model_copy(update={"pods": pods})
            run, applied = timed(lambda: render(grown, more_ports), applied)
            refills.append(run)
        rows.append(("partial: a pod gains a policy rule", refills))

        scrape = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            counters = k(kernel.counters)
            scrape.append(time.perf_counter() - t0)
        # The agent's anti-spoofing check (issue 12): the bridge table read back, every pod checked.
        checks, sets = [], ["pod_ports", "pod_addresses_v4"]
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            gaps = anti_spoofing_gaps(grown.pods, more_ports, loaded_from(k(kernel.set_elements, "bridge", "netfence", sets)))
            checks.append(time.perf_counter() - t0)
        assert not gaps, gaps[:3]
        text = netfence_api.NodeRuleSet.for_node(grown, 1).model_dump_json()
        t0 = time.perf_counter()
        netfence_api.NodeRuleSet.model_validate_json(text)
        parse = time.perf_counter() - t0

        chains = sum(len(t.chains) for t in applied.ruleset.tables)
        rules = sum(len(c.rules) for t in applied.ruleset.tables for c in t.chains.values())
        print(f"machine: {machine()}")
        print(f"rule set: {args.pods} local pods with veths, {args.policies} policies, {len(spec.peerGroups)} peer groups, "
              f"{elements} group members; {chains} chains, {rules} rules"
              + ("; EXPERIMENT --host-sets" if args.host_sets else ""))
        print(f"{'ms (median, worst)':<52} {'render':>17} {'plan':>17} {'apply':>17} {'end to end':>17}")
        for label, runs in rows:
            print(row(label, runs))
        print(f"/metrics counter read ({len(counters)} counters): median {statistics.median(scrape) * ms:.1f} ms, "
              f"worst {max(scrape) * ms:.1f} ms")
        print(f"anti-spoofing check ({len(grown.pods)} pods: pod_ports + pod_addresses_v4 read back and checked): "
              f"first {checks[0] * ms:.1f} ms, then median {statistics.median(checks[1:] or checks) * ms:.1f} ms, "
              f"worst {max(checks[1:] or checks) * ms:.1f} ms")
        print(f"validating a whole NodeRuleSet JSON ({len(text) // 1024} KiB; what an update cost before RuleSetReader): "
              f"{parse * ms:.1f} ms")
        parts = " + ".join(f"{key} {statistics.median(u[key] for u in updates) * ms:.1f}"
                           for key in ("decode", "validate", "render", "plan", "apply"))
        print(f"elements, whole agent path from the {updates[0]['size'] // 1024} KiB JSON text: median "
              f"{statistics.median(u['total'] for u in updates) * ms:.1f} ms, worst {max(u['total'] for u in updates) * ms:.1f} ms "
              f"({parts} ms)")
        joins_total = statistics.median([sum(r[x] for x in ("render", "plan", "apply")) for r in joins]) * ms
        joins_apply = statistics.median([r["plan"] + r["apply"] for r in joins]) * ms
        print(f"target element-level <= 20 ms end to end: median {joins_total:.1f} ms "
              f"({'met' if joins_total <= 20 else 'NOT met'}); plan + apply alone {joins_apply:.1f} ms")
        return 0
    finally:
        executor.shutdown(wait=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    sys.exit(main())
