"""`netfence lab ...`: argparse wiring for the lab (register into the main CLI, or run alone)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from netfence_lab.model import ManifestError
from netfence_lab.system import LabError


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `lab` with its sub-commands to an argparse subparsers object."""
    lab = subparsers.add_parser(
        "lab",
        help="a flannel-shaped cluster in network namespaces, with real packets (root)",
        description="A flannel-shaped cluster in network namespaces: nodes, pods, VXLAN, the netfence "
        "agent per node, and real TCP/UDP probes. State lives in $NETFENCE_LAB_DIR (default /run/netfence-lab).",
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    sub.required = True

    up = sub.add_parser("up", help="build the lab from a cluster manifest")
    up.add_argument("-f", "--filename", dest="files", action="extend", nargs="+", default=[], metavar="FILE",
                    help="manifests: Nodes, Namespaces, Pods (and NetworkPolicies to start with)")
    up.add_argument("--nodes", type=int, default=None, help="number of nodes when the manifest names none (default 2)")
    up.add_argument("--no-agent", action="store_true",
                    help="topology only, no agents: nothing is enforced (also NETFENCE_LAB_NO_AGENT=1)")
    up.add_argument("--kubeconfig", metavar="K",
                    help="run the lab on this API server: the lab registers its nodes, namespaces and pods there "
                         "and acts as their kubelet; agents watch their NodeRuleSets through the API")
    up.add_argument("--controller", action="store_true",
                    help="with --kubeconfig: also run `netfence controller` on that API server")

    ap = sub.add_parser("apply", help="make the files' NetworkPolicies the lab's complete policy set")
    ap.add_argument("-f", "--filename", dest="files", action="extend", nargs="+", required=True, metavar="FILE",
                    help="NetworkPolicies (the whole desired set); Namespaces/Pods update labels")

    pr = sub.add_parser("probe", help="connect from every pod to every pod and print the matrix")
    pr.add_argument("--port", required=True, help="PORT/PROTO, e.g. 80/TCP or 81/UDP")
    pr.add_argument("-o", "--output", choices=("json", "table"), default="table")
    pr.add_argument("--from-nodes", action="store_true", help="probe from every node to its local pods instead")
    pr.add_argument("--timeout", type=float, default=1.0, help="TCP connect timeout in seconds (default 1)")

    sub.add_parser("down", help="remove everything the lab made (by its record); idempotent")

    st = sub.add_parser("status", help="show what is up")
    st.add_argument("-o", "--output", choices=("json", "table"), default="table")

    sub.add_parser("demo", help="a two-minute tour: policies applied to a live lab, matrices, explain, drop counters")

    lab.set_defaults(func=run)
    return lab


def parse_port(text: str) -> tuple[int, str]:
    port_s, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    try:
        port = int(port_s)
    except ValueError:
        raise ManifestError(f"--port {text!r}: expected PORT/PROTO, e.g. 80/TCP") from None
    if not 1 <= port <= 65535:
        raise ManifestError(f"--port {text!r}: port out of range")
    if proto not in ("TCP", "UDP", "SCTP"):
        raise ManifestError(f"--port {text!r}: protocol must be TCP, UDP or SCTP")
    return port, proto


def run(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from netfence_lab import lab as labmod

    lab = labmod.Lab()
    cmd = args.lab_command
    if cmd == "up":
        docs = labmod.load_manifests(args.files)
        agents = False if args.no_agent else None
        res = lab.up(docs, nodes=args.nodes, agents=agents, kubeconfig=args.kubeconfig, controller=args.controller)
        plan = res.plan
        if plan.ignored_kinds:
            print(f"note: ignored kinds: {', '.join(plan.ignored_kinds)}", file=sys.stderr)
        skipped = sorted({f"{p.port}/SCTP" for pod in plan.pods for p in pod.skipped})
        if skipped:
            print(f"note: {', '.join(skipped)} not served: no SCTP sockets on this kernel", file=sys.stderr)
        mode = "with agents" if res.agents else "WITHOUT agents (nothing enforced)"
        if args.kubeconfig:
            mode += f" on the API server of {args.kubeconfig}" + (" with the controller" if args.controller else "")
        print(f"lab up in {res.seconds:.1f}s: {len(plan.nodes)} nodes, {len(plan.pods)} pods, {mode}; "
              f"state in {lab.store.root}")
        return 0
    if cmd == "apply":
        docs = labmod.load_manifests(args.files)
        gen = lab.apply(docs)
        n = len(lab.store.load().policies)  # type: ignore[union-attr]
        print(f"applied generation {gen}: {n} NetworkPolicies on every node")
        return 0
    if cmd == "probe":
        port, proto = parse_port(args.port)
        matrix = lab.probe(port, proto, from_nodes=args.from_nodes, connect_timeout=args.timeout)
        if args.output == "json":
            print(labmod.matrix_json(port, proto, matrix))
        else:
            print(f"{port}/{proto}  (rows: from, columns: to; . allowed, X blocked)")
            print(labmod.format_table(matrix))
        return 0
    if cmd == "down":
        removed = lab.down()
        print(f"lab down: removed {sum(1 for r in removed if r.startswith('netns'))} namespaces, "
              f"{sum(1 for r in removed if r.startswith('process'))} processes" if removed else "lab down: nothing was up")
        return 0
    if cmd == "status":
        st = lab.status()
        if args.output == "json":
            print(json.dumps(st, indent=1))
        else:
            print(format_status(st))
        return 0
    if cmd == "demo":
        from netfence_lab.demo import run_demo

        return run_demo()
    raise ManifestError(f"unknown lab command {cmd!r}")


def format_status(st: dict[str, Any]) -> str:
    if not st.get("phase"):
        return f"no lab is up (state dir {st['dir']})"
    lines = [f"lab {st['phase']} (state {st['dir']}), generation {st['generation']}, "
             f"agents {'on' if st['agents'] else 'off'}, {len(st['policies'])} NetworkPolicies"]
    for n in st.get("nodes", []):
        agent = "-" if n["agent"] is None else ("running" if n["agent"] else "NOT RUNNING")
        lines.append(f"  node {n['name']:<12} netns {n['netns']:<20} {n['internalIP']:<15} podCIDR {n['podCIDR']:<18} "
                     f"agent {agent} observedGeneration {n['observedGeneration']}"
                     + (f" of {n['generation']}" if n.get("generation") is not None else ""))
    for p in st.get("pods", []):
        lines.append(f"  pod  {p['pod']:<20} {p['node']:<10} {p['ip']:<15} {p['netns']:<22} "
                     f"{','.join(p['ports'])} server {'up' if p['server'] else 'DOWN'}")
    missing = [n["name"] for n in st.get("netns", []) if not n["exists"]]
    if missing:
        lines.append(f"  recorded but missing namespaces: {', '.join(missing)}")
    for note in st.get("notes", [])[:5]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netfence")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run(args)
