"""`netfence lab demo`: the tutorial on a live lab, in under two minutes, always torn down."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netfence_lab.lab import Lab, format_table, load_manifests, metric_lines
from netfence_lab.model import ManifestError
from netfence_lab.system import LabError

DATA = Path(__file__).resolve().parent / "data"
DEMO_CLUSTER = DATA / "demo-cluster.yaml"
PORT, PROTO = 80, "TCP"


def _policy(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


DENY_INGRESS_X = _policy("x", "default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})
ALLOW_B_TO_A = _policy("x", "allow-b-to-a-80", {
    "podSelector": {"matchLabels": {"pod": "a"}},
    "policyTypes": ["Ingress"],
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80, "protocol": "TCP"}]}],
})
ALLOW_NS_Y_TO_A = _policy("x", "allow-ns-y-to-a", {
    "podSelector": {"matchLabels": {"pod": "a"}},
    "policyTypes": ["Ingress"],
    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
})
EGRESS_DNS_ONLY_X = _policy("x", "egress-dns-only", {
    "podSelector": {},
    "policyTypes": ["Egress"],
    "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}],
})

SCENARIOS: list[tuple[str, list[dict[str, Any]]]] = [
    ("1. default-deny ingress in namespace x: nothing reaches x's pods", [DENY_INGRESS_X]),
    ("2. + allow pods labelled pod=b (in x) to reach x/a on 80/TCP", [DENY_INGRESS_X, ALLOW_B_TO_A]),
    ("3. + allow every pod of namespaces labelled ns=y to reach x/a", [DENY_INGRESS_X, ALLOW_B_TO_A, ALLOW_NS_Y_TO_A]),
    ("4. + x's pods may only send DNS (53/UDP, 53/TCP): x reaches nothing on 80",
     [DENY_INGRESS_X, ALLOW_B_TO_A, ALLOW_NS_Y_TO_A, EGRESS_DNS_ONLY_X]),
]
EXPLAIN_PAIR = ("z/b", "x/a")  # denied from scenario 1 on: z is neither pod=b in x nor ns=y


def _say(text: str = "") -> None:
    print(text, flush=True)


def _matrix(lab: Lab, title: str) -> dict[str, dict[str, bool]]:
    t0 = time.monotonic()
    m = lab.probe(PORT, PROTO)
    _say(f"\n== {title}   [{PORT}/{PROTO}, probed in {time.monotonic() - t0:.1f}s; rows from, columns to]")
    _say(format_table(m))
    return m


def _explain(lab: Lab, src: str, dst: str) -> None:
    cmd = [sys.executable, "-m", "netfence_cli", "explain", "-f", str(lab.cluster_file()),
           "--from", src, "--to", dst, "--port", f"{PORT}/{PROTO}"]
    _say(f"\n$ netfence explain -f <lab cluster> --from {src} --to {dst} --port {PORT}/{PROTO}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    _say((r.stdout or r.stderr).rstrip() or f"(explain exited {r.returncode} without output)")


def _drops(lab: Lab) -> None:
    plan = lab.store.load().lab_plan()  # type: ignore[union-attr]
    _say("\n== drop counters from each agent's /metrics (netfence_dropped_packets_total)")
    for n in plan.nodes:
        try:
            text = lab.node_metrics(n.name)
        except LabError as e:
            _say(f"  {n.name}: cannot read metrics: {e}")
            continue
        lines = [l for l in metric_lines(text, "netfence_dropped_packets_total") if not l.rstrip().endswith(" 0.0")]
        _say(f"  {n.name}:" + ("" if lines else " no drops counted"))
        for l in lines:
            _say(f"    {l}")


def run_demo(lab: Lab | None = None) -> int:
    lab = lab or Lab()
    if lab.store.load() is not None:
        print(f"error: a lab is already up in {lab.store.root}; the demo brings up its own (run `netfence lab down`)",
              file=sys.stderr)
        return 1

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    built = False
    try:
        _say("netfence lab demo: 2 nodes in network namespaces, flannel-style VXLAN, namespaces x y z, pods a b c")
        res = lab.up(load_manifests([str(DEMO_CLUSTER)]))
        built = True
        _say(f"lab up in {res.seconds:.1f}s; agents running on {', '.join(n.name for n in res.plan.nodes)}")
        for p in res.plan.pods:
            _say(f"  {p.key:<4} {p.ip:<12} on {p.node}")
        _matrix(lab, "0. no NetworkPolicy: every pod reaches every pod")
        for title, policies in SCENARIOS:
            t0 = time.monotonic()
            gen = lab.apply(policies)
            _say(f"\n(applied generation {gen} to every agent in {time.monotonic() - t0:.2f}s)")
            _matrix(lab, title)
            if title.startswith("3."):
                _explain(lab, *EXPLAIN_PAIR)
        _drops(lab)
        return 0
    except (LabError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        if built or lab.store.load() is not None:
            lab.down()
            _say(f"\nlab down; demo took {time.monotonic() - t_start:.0f}s")
