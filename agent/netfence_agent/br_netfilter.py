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
from typing import Callable

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


# What to do, for the readiness and Degraded messages: in a pod the agent can neither load a
# module (no CAP_SYS_MODULE, no /lib/modules) nor write /proc/sys (read-only); the node can.
LOAD_HINT = ("load it on the node: `modprobe br_netfilter`, and list it in /etc/modules-load.d/ to keep it "
             "after a reboot")
SET_HINT = ("set it on the node: `sysctl -w {name}=1` (the agent's init container does this when the pod "
            "starts; something on the node turned it off since)")


def ensure(proc_sys: str = "/proc/sys", load_module: Callable[[], None] | None = None) -> BrNetfilterState:
    """Make both sysctls 1 where they are not; report whether they are 1 now, and if not, what to do."""
    paths = [os.path.join(proc_sys, s) for s in SYSCTLS]
    if not all(os.path.exists(p) for p in paths):
        (load_module or _modprobe)()
    problems = []
    for path in paths:
        name = os.path.relpath(path, proc_sys).replace("/", ".")
        value = _read(path)
        if value is None:
            problems.append(f"{name} does not exist")
            continue
        if value != "1":
            try:
                with open(path, "w") as f:
                    f.write("1\n")
                log.warning("%s was %s; set it to 1 so that bridged pod traffic is policed", name, value)
            except OSError as exc:
                problems.append(f"{name} is {value} and cannot be set from here ({exc.strerror}): "
                                + SET_HINT.format(name=name))
                continue
            if _read(path) != "1":
                problems.append(f"{name} is {_read(path)} after writing 1")
    if any(p.endswith("does not exist") for p in problems):
        return BrNetfilterState(False, f"the br_netfilter module is not loaded ({'; '.join(problems)}): {LOAD_HINT}")
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
