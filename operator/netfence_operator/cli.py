"""The `netfence controller` subcommand (wired into netfence_cli.main)."""

from __future__ import annotations

import argparse

import kopf

from netfence_cli.main import inline_groups_argument

from netfence_operator.controller import DEFAULT_HEALTH_BIND, DEFAULT_METRICS_BIND, Controller, ControllerConfig


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "controller",
        help="run the controller: watch policies, pods, namespaces and nodes; publish NodeRuleSets",
        description="Watch NetworkPolicies, Pods, Namespaces and Nodes and publish one NodeRuleSet per node "
                    "(patched only when its content changes). Logs are JSON lines on stderr.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--namespace", "-n", action="append", default=[], metavar="N",
                        help="watch pods and policies only in this namespace (repeatable, globs allowed); "
                             "default: all namespaces")
    parser.add_argument("--metrics-bind-address", default=DEFAULT_METRICS_BIND, metavar="[HOST]:PORT",
                        help=f"serve /metrics, /healthz and /readyz here (default {DEFAULT_METRICS_BIND}; '' disables)")
    parser.add_argument("--health-bind-address", default=DEFAULT_HEALTH_BIND, metavar="[HOST]:PORT",
                        help=f"kopf's liveness endpoint /healthz (default {DEFAULT_HEALTH_BIND}; '' disables)")
    parser.add_argument("--resync-interval", type=float, default=600.0, metavar="SECONDS",
                        help="re-read published NodeRuleSets and repair drift this often (default 600)")
    inline_groups_argument(parser)
    parser.add_argument("--debug", action="store_true", help="debug logging (kopf's too)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    kopf.configure(debug=args.debug, verbose=args.debug, log_format=kopf.LogFormat.JSON, log_prefix=False)
    config = ControllerConfig(
        kubeconfig=args.kubeconfig,
        namespaces=tuple(args.namespace),
        metrics_bind_address=args.metrics_bind_address or None,
        health_bind_address=args.health_bind_address or None,
        resync_interval=args.resync_interval,
        inline_groups_bytes=args.inline_groups_bytes,
    )
    Controller(config).run()
    return 0
