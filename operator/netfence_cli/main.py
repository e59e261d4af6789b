"""The `netfence` command line.

compile, explain and matrix live here (offline, pure); controller, agent, cleanup and lab
are registered by their own packages so each role keeps its own options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable

from netfence_api.slices import DEFAULT_BOUNDS, Bounds, split
from netfence_api.manifests import dump_yaml_all
from netfence_api.runtime import tune_gc, tune_threads
from netfence_operator.compile import InputError
from netfence_cli import offline

EXIT_BAD_INPUT = 2

# Packages that add their own subcommands: module -> commands it provides.
_PLUGINS = {
    "netfence_operator.cli": ("controller",),
    "netfence_agent.cli": ("agent", "cleanup"),
    "netfence_lab.cli": ("lab",),
}


def _files_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", dest="files", action="append", required=True, metavar="FILE",
                   help="manifest file (multi-document YAML, JSON, or kind: List); '-' reads standard input; repeatable")


def inline_groups_argument(parser: argparse.ArgumentParser) -> None:
    """The layout switch the controller and `compile` share (so compile prints what it publishes)."""
    parser.add_argument("--inline-groups-bytes", type=int, default=DEFAULT_BOUNDS.inline_groups_bytes, metavar="BYTES",
                        help="peer groups ride inline in the NodeRuleSets while all nodes' rule data is at most "
                             f"this many bytes, else they live in PeerGroupSlices (default "
                             f"{DEFAULT_BOUNDS.inline_groups_bytes}; 0: always in PeerGroupSlices)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only the plugin that provides it is imported (the controller
    and agent pull in kopf and the kubernetes client: a second of start-up the offline commands
    don't need)."""
    parser = argparse.ArgumentParser(prog="netfence", description="Kubernetes NetworkPolicy enforcement with nftables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile manifests into per-node rule sets")
    _files_arg(p)
    p.add_argument("--node", help="only this node")
    p.add_argument("-o", "--output", choices=("yaml", "json", "nft"), default="yaml")
    inline_groups_argument(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("explain", help="trace one connection through the rendered rules")
    _files_arg(p)
    p.add_argument("--from", dest="src", required=True, metavar="NS/POD|IP")
    p.add_argument("--to", dest="dst", required=True, metavar="NS/POD|IP")
    p.add_argument("--port", required=True, metavar="PORT/PROTO")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("matrix", help="reachability of every pod pair under the rendered rules")
    _files_arg(p)
    p.add_argument("--port", required=True, metavar="PORT/PROTO")
    p.add_argument("-o", "--output", choices=("json", "table"), default="table")
    p.set_defaults(func=cmd_matrix)

    for module_name, commands in _PLUGINS.items():
        if command is not None and command not in commands:
            for name in commands:  # listed in --help, loaded when chosen
                sub.add_parser(name, help=f"see netfence {name} --help")
            continue
        try:
            module = importlib.import_module(module_name)
            module.register(sub)
        except ImportError as e:
            for command in commands:
                p = sub.add_parser(command, help=f"(unavailable: {e})")
                p.set_defaults(func=_unavailable(command, e))
    return parser


def _unavailable(command: str, error: Exception) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"netfence {command}: not available: {error}", file=sys.stderr)
        return 1

    return run


def _load(args: argparse.Namespace, rendered: bool = True) -> offline.OfflineCluster:
    notes: list[str] = []
    objects = offline.load_cluster(offline.read_manifests(args.files), notes)
    for note in notes:
        print(note, file=sys.stderr)
    cluster = offline.OfflineCluster.build(objects, rendered=rendered)
    for key, problems in cluster.problems.items():
        for problem in problems:
            print(f"warning: NetworkPolicy {key}: {problem}", file=sys.stderr)
    return cluster


def cmd_compile(args: argparse.Namespace) -> int:
    cluster = _load(args, rendered=args.output == "nft")
    nodes = sorted(cluster.specs)
    if args.node:
        if args.node not in cluster.specs:
            raise InputError([f"--node {args.node}: no such node in the input (nodes: {', '.join(nodes) or 'none'})"])
        nodes = [args.node]
    if args.output == "nft":
        from netfence_agent.nft.serialize import ruleset_text

        for node in nodes:
            print(f"# node {node}")
            print(ruleset_text(cluster.rendered[node].ruleset))
        return 0
    objects = split([cluster.specs[n] for n in sorted(cluster.specs)], Bounds(inline_groups_bytes=args.inline_groups_bytes),
                    nodes=nodes)
    if args.output == "json":
        print(readable_json({"apiVersion": "v1", "kind": "List", "items": objects}))
    else:
        print(dump_yaml_all(objects), end="")
    return 0


INDENTED_JSON_LIMIT = 1 << 20


def readable_json(data: object) -> str:
    """Indented JSON, except for output of a megabyte and more: json indents in pure Python,
    three times the cost of compiling a 10,000-pod cluster, and nobody reads that much by eye."""
    compact = json.dumps(data, separators=(",", ":"))
    return compact if len(compact) >= INDENTED_JSON_LIMIT else json.dumps(data, indent=2)


def cmd_explain(args: argparse.Namespace) -> int:
    port, protocol = offline.parse_port(args.port)
    cluster = _load(args)
    print(offline.explain_text(cluster, args.src, args.dst, port, protocol))
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    port, protocol = offline.parse_port(args.port)
    result = offline.matrix_for(_load(args), port, protocol)
    print(json.dumps(result, indent=1) if args.output == "json" else offline.matrix_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    tune_gc()
    tune_threads()
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
