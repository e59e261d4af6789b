"""`netfence agent` and `netfence cleanup`: register(subparsers) adds them to the netfence CLI.

Each subcommand sets `func` (called with the parsed args, returns the exit code).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from netfence_agent.discovery import DEFAULT_CNI_DIR, DEFAULT_NETNS_DIR
from netfence_agent.hold import DEFAULT_HOLD_TIMEOUT


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of seconds")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser(
        "agent", help="enforce this node's NodeRuleSet with nftables",
        description="Load this node's NodeRuleSet (from the API or a file) into nftables and keep it current.",
    )
    agent.add_argument("--node", required=True, help="this node's name (= NodeRuleSet name)")
    source = agent.add_mutually_exclusive_group()
    source.add_argument("--kubeconfig", help="watch the NodeRuleSet through this kubeconfig "
                                             "(default without --rules-file: in-cluster config)")
    source.add_argument("--rules-file", help="read the NodeRuleSet from this JSON or YAML file, reloading on change")
    agent.add_argument("--metrics-bind-address", default=":9469",
                       help="/metrics, /healthz and /readyz on [HOST]:PORT (default :9469; empty: off)")
    agent.add_argument("--status-file", help="with --rules-file: where to write the status (default FILE.status.json)")
    agent.add_argument("--netns-dir", default=DEFAULT_NETNS_DIR, help=f"pod network namespaces (default {DEFAULT_NETNS_DIR})")
    agent.add_argument("--cni-dir", default=DEFAULT_CNI_DIR, help=f"CNI result cache (default {DEFAULT_CNI_DIR})")
    agent.add_argument("--log-drops", action="store_true",
                       help="log dropped packets (a rate-limited sample) as JSON lines on stdout")
    agent.add_argument("--nflog-group", type=int, default=100, help="NFLOG group for --log-drops (default 100)")
    agent.add_argument("--full-sync-period", type=float, default=3600.0, metavar="SECONDS",
                       help="reload the whole rule set this often, repairing edits others made to netfence's "
                            "tables (default 3600; 0: never)")
    agent.add_argument("--anti-spoofing-check-period", type=float, default=30.0, metavar="SECONDS",
                       help="read the bridge table's anti-spoofing back this often and check it covers every "
                            "local pod (also after syncs that change it; default 30; 0: only after syncs)")
    agent.add_argument("--unprotected-grace", type=float, default=10.0, metavar="SECONDS",
                       help="how long a local pod of the rule set may have no veth before it counts as "
                            "unprotected (default 10)")
    agent.add_argument("--new-pods", choices=("hold", "open"), default="hold",
                       help="a local pod the rule set does not cover yet (new: the controller has not named it): "
                            "hold it closed until its rules are in the kernel (default), or leave it open (unpoliced)")
    agent.add_argument("--hold-new-pods-timeout", type=_positive_seconds, default=DEFAULT_HOLD_TIMEOUT, metavar="SECONDS",
                       help="with --new-pods=hold: release a pod held this long unpoliced, with a warning and a "
                            f"Degraded condition (default {DEFAULT_HOLD_TIMEOUT:g})")
    agent.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    agent.set_defaults(func=run_agent)

    cleanup = subparsers.add_parser(
        "cleanup", help="remove all netfence nftables tables from this network namespace",
        description="Delete the nftables tables inet netfence and bridge netfence (and nothing else).",
    )
    cleanup.set_defaults(func=run_cleanup)


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_agent(args: argparse.Namespace) -> int:
    _logging(getattr(args, "log_level", "info"))
    from netfence_agent.daemon import Agent, AgentConfig
    from netfence_agent.source import FileRuleSetSource

    if args.rules_file:
        source = FileRuleSetSource(args.rules_file, args.status_file)
    else:
        if args.status_file:
            print("netfence agent: --status-file only goes with --rules-file", file=sys.stderr)
            return 2
        from netfence_agent.apisource import ApiRuleSetSource

        source = ApiRuleSetSource(args.node, args.kubeconfig)
    config = AgentConfig(
        node=args.node,
        metrics_bind_address=args.metrics_bind_address or None,
        netns_dir=args.netns_dir,
        cni_dir=args.cni_dir,
        log_drops=args.log_drops,
        nflog_group=args.nflog_group,
        full_sync_period=args.full_sync_period,
        anti_spoofing_check_period=args.anti_spoofing_check_period,
        unprotected_grace=args.unprotected_grace,
        new_pods=args.new_pods,
        hold_new_pods_timeout=args.hold_new_pods_timeout,
    )
    agent = Agent(config, source)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop())
    agent.run()
    return 0


def run_cleanup(args: argparse.Namespace) -> int:
    from netfence_agent.nft.kernel import OWNED_TABLES, Kernel, NftError

    try:
        deleted = Kernel().delete_tables(OWNED_TABLES)
    except PermissionError as exc:
        print(f"netfence cleanup: {exc.strerror}: deleting nftables tables needs root with CAP_NET_ADMIN "
              "in the network namespace that holds them", file=sys.stderr)
        return 1
    except (NftError, OSError) as exc:
        print(f"netfence cleanup: {exc}", file=sys.stderr)
        return 1
    for family, name in deleted:
        print(f"deleted table {family} {name}")
    if not deleted:
        print("no netfence tables")
    return 0
