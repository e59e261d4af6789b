"""Pods wired the way flannel wires them: the real CNI `bridge` + `host-local` plugins.

flannel's own CNI plugin only reads /run/flannel/subnet.env and delegates to `bridge` with a
fixed configuration (DESIGN.md §4); the lab runs that delegate directly, with exactly that
configuration, inside the node's network namespace (which is the plugin's "host" side). One
deviation: host-local's `dataDir` puts its leases under the lab dir instead of the host's
/var/lib/cni/networks. The plugin's result is then cached the way libcni caches it
(`cbr0-<containerID>-eth0`, kind cniCacheV1), which is what the agent's discovery reads.

`delegate_config`, `cni_args` and `cache_entry` are pure; `add`/`delete` run the plugins.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from netfence_lab import system

NETWORK_NAME = "cbr0"  # the name of flannel's conflist, which its delegate inherits
CNI_VERSION = "0.3.1"  # kube-flannel.yml's conflist
IFNAME = "eth0"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")  # Debian's containernetworking-plugins, upstream's default
CNI_PATH_ENV = "NETFENCE_LAB_CNI_PATH"
PLUGIN_TIMEOUT = 30.0
LOOPBACK_CONFIG = {"cniVersion": CNI_VERSION, "name": "cni-loopback", "type": "loopback"}


class CniError(system.LabError):
    """A CNI plugin failed; the message carries the plugin's own error."""


def plugin_dir() -> str:
    """Where the plugins are: $NETFENCE_LAB_CNI_PATH, else the first of CNI_BIN_DIRS holding `bridge`."""
    custom = os.environ.get(CNI_PATH_ENV)
    if custom:
        return custom
    for d in CNI_BIN_DIRS:
        if (Path(d) / "bridge").exists() and (Path(d) / "host-local").exists():
            return d
    raise CniError(f"the CNI bridge and host-local plugins are not installed (looked in {', '.join(CNI_BIN_DIRS)}); "
                   f"install Debian's containernetworking-plugins or set {CNI_PATH_ENV}")


def delegate_config(pod_cidr: str, cluster_cidr: str, mtu: int, data_dir: str) -> dict[str, Any]:
    """What flannel's plugin hands `bridge` (flannel.go: delegate defaults + subnet.env), plus
    host-local's dataDir so that no lease is written to the host's /var/lib/cni."""
    return {
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "type": "bridge",
        "hairpinMode": True,
        "isDefaultGateway": True,
        "isGateway": True,
        "ipMasq": False,
        "mtu": mtu,
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": pod_cidr}]],
            "routes": [{"dst": cluster_cidr}],
        },
    }


def cni_args(namespace: str, name: str, uid: str, sandbox_id: str, ip: str | None) -> list[tuple[str, str]]:
    """CNI_ARGS as the kubelet's runtime (containerd) passes them; IP asks host-local for that address."""
    args = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
        ("K8S_POD_UID", uid),
    ]
    if ip:
        args.append(("IP", ip))
    return args


def cache_entry(container_id: str, config: bytes, netns_path: str, args: list[tuple[str, str]],
                result: dict[str, Any]) -> dict[str, Any]:
    """libcni's result cache record (cachedInfo in libcni/api.go), written after a successful ADD."""
    return {
        "kind": "cniCacheV1",
        "containerId": container_id,
        "config": base64.b64encode(config).decode(),
        "ifName": IFNAME,
        "networkName": NETWORK_NAME,
        "netns": netns_path,
        "cniArgs": [list(a) for a in args],
        "result": result,
    }


def cache_filename(container_id: str) -> str:
    return f"{NETWORK_NAME}-{container_id}-{IFNAME}"


def _run_plugin(node_netns: str, plugin: str, command: str, container_id: str, pod_netns_path: str,
                ifname: str, args: list[tuple[str, str]], config: bytes) -> str:
    bin_dir = plugin_dir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": pod_netns_path,
        "CNI_IFNAME": ifname,
        "CNI_PATH": bin_dir,
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in args),
    }
    argv = ["ip", "netns", "exec", node_netns, os.path.join(bin_dir, plugin)]
    try:
        r = subprocess.run(argv, input=config, capture_output=True, env=env, timeout=PLUGIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CniError(f"CNI {plugin} {command} for {container_id[:12]} timed out after {PLUGIN_TIMEOUT:.0f}s") from None
    if r.returncode != 0:
        # Plugins report errors as a JSON object on stdout ({"code", "msg", "details"}).
        detail = r.stdout.decode(errors="replace").strip() or r.stderr.decode(errors="replace").strip()
        try:
            err = json.loads(detail)
            detail = f"{err.get('msg')}{': ' + err['details'] if err.get('details') else ''}"
        except (ValueError, AttributeError):
            pass
        raise CniError(f"CNI {plugin} {command} for {container_id[:12]} in {node_netns} failed: {detail}")
    return r.stdout.decode()


def add(node_netns: str, pod_netns_path: str, container_id: str, config: dict[str, Any],
        args: list[tuple[str, str]]) -> tuple[dict[str, Any], bytes]:
    """loopback then bridge ADD, as a runtime does; returns (the bridge plugin's result, the config bytes)."""
    _run_plugin(node_netns, "loopback", "ADD", container_id, pod_netns_path, "lo", args,
                json.dumps(LOOPBACK_CONFIG).encode())
    raw = json.dumps(config).encode()
    out = _run_plugin(node_netns, "bridge", "ADD", container_id, pod_netns_path, IFNAME, args, raw)
    try:
        return json.loads(out), raw
    except ValueError:
        raise CniError(f"CNI bridge ADD for {container_id[:12]} printed no JSON result: {out[:200]!r}") from None


def delete(node_netns: str, pod_netns_path: str, container_id: str, config: dict[str, Any],
           args: list[tuple[str, str]]) -> None:
    """bridge DEL: releases the host-local lease and removes the veth (idempotent, as CNI requires)."""
    _run_plugin(node_netns, "bridge", "DEL", container_id, pod_netns_path, IFNAME, args, json.dumps(config).encode())


def wired_interfaces(result: dict[str, Any]) -> tuple[str, str, str, str]:
    """(host veth name, host veth MAC, pod eth0 MAC, pod IPv4) from a bridge ADD result."""
    interfaces = result.get("interfaces") or []
    host = [i for i in interfaces if not i.get("sandbox") and i.get("name") != "cni0"]
    pod = [i for i in interfaces if i.get("sandbox")]
    ips = [ip for ip in result.get("ips") or [] if ip.get("version", "4") == "4" and "." in ip.get("address", "")]
    if not host or not pod or not ips:
        raise CniError(f"CNI bridge result lacks the host veth, the pod interface or an IPv4 address: {result}")
    return host[0]["name"], host[0].get("mac", ""), pod[0].get("mac", ""), ips[0]["address"].split("/")[0]
