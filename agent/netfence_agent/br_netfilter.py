"""br_netfilter: bridged pod-to-pod traffic must reach the inet hooks (DESIGN.md §4).

With net.bridge.bridge-nf-call-iptables / -ip6tables = 1 in the node's network namespace, frames
bridged by cni0 between two local pods also pass the inet `forward` hook, where the policy is.
At 0 (kind does not turn it on), same-node traffic would never be policed. The sysctls are per
network namespace; /proc/sys/net shows those of the namespace of the thread that opens it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger("netfence.br_netfilter")

SYSCTLS = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


@dataclass(frozen=True)
class BrNetfilterState:
    ok: bool
    message: str


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def ensure(proc_sys: str = "/proc/sys") -> BrNetfilterState:
    """Make both sysctls 1 where they are not; report whether they are 1 now."""
    paths = [os.path.join(proc_sys, s) for s in SYSCTLS]
    if not all(os.path.exists(p) for p in paths):
        _modprobe()
    problems = []
    for path in paths:
        name = os.path.relpath(path, proc_sys).replace("/", ".")
        value = _read(path)
        if value is None:
            problems.append(f"{name} does not exist (br_netfilter not loaded)")
            continue
        if value != "1":
            try:
                with open(path, "w") as f:
                    f.write("1\n")
                log.warning("%s was %s; set it to 1 so that bridged pod traffic is policed", name, value)
            except OSError as exc:
                problems.append(f"{name} is {value} and cannot be set: {exc.strerror}")
                continue
            if _read(path) != "1":
                problems.append(f"{name} is {_read(path)} after writing 1")
    if problems:
        return BrNetfilterState(False, "; ".join(problems))
    return BrNetfilterState(True, "bridge-nf-call-iptables and -ip6tables are 1")


def _modprobe() -> None:
    modprobe = shutil.which("modprobe")
    if modprobe is None:
        return
    try:
        subprocess.run([modprobe, "br_netfilter"], check=False, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("modprobe br_netfilter: %s", exc)
