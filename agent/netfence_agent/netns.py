"""Doing things inside another network namespace without moving the whole process.

A network namespace is a per-thread property on Linux: a thread that calls setns(2) changes
only itself, and a socket keeps the namespace it was created in for its whole life. So the
agent (and its tests) open sockets in a pod's namespace from a short-lived thread, or run a
worker thread that lives in a test namespace, and the rest of the process stays where it is.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def netns_path(name_or_path: str) -> str:
    """`ip netns` names live in /var/run/netns; anything with a slash is a path already."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_RUN_DIR, name_or_path)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextmanager
def entered(path: str) -> Iterator[None]:
    """The calling thread in the namespace at `path` for the block, then back where it was."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            # Failing to return would leave this thread policing the wrong namespace: fatal.
            _setns(own)
    finally:
        os.close(own)


def call_in(path: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run fn in a fresh thread that has entered `path`; the caller's thread never moves."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            with entered(path):
                box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=work, name=f"netns:{os.path.basename(path)}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def executor_in(path: str) -> ThreadPoolExecutor:
    """One worker thread that lives in `path` until the executor shuts down.

    Everything submitted runs in that namespace, so a library that opens (or re-opens) its
    netlink socket lazily still opens it there and never in the caller's namespace.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{os.path.basename(path)}",
                              initializer=_enter_for_good, initargs=(netns_path(path),))


def _enter_for_good(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def inode(path: str) -> int:
    """Identity of a namespace: two paths name the same namespace iff their inodes match."""
    return os.stat(netns_path(path)).st_ino


# --------------------------------------------------------------------------- mount propagation
# On a node, containerd bind-mounts each new pod namespace onto a file under /var/run/netns. The
# agent sees those mounts only if its own mount of that directory receives the host's new mounts
# (mountPropagation: HostToContainer = an rslave mount, "master:N" in mountinfo). Without it, a
# namespace created after the agent started is an empty file to the agent.
PROPAGATION_HINT = (
    "keep `mountPropagation: HostToContainer` on the agent's netns volume (manifests/agent.yaml); the node's "
    "mount must be shared for it (systemd makes / shared; elsewhere run `mount --make-rshared /` on the node), "
    "then restart the agent pod")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def receives_host_mounts(directory: str, mountinfo: str) -> bool | None:
    """Whether mounts made later on the host appear in `directory`; None: not a mount point here.

    Pure: `mountinfo` is the text of /proc/self/mountinfo, `directory` a resolved path. Only a
    directory that is a mount point of its own (a hostPath volume in a pod) is judged; anywhere
    else the process shares the mounts of whoever creates the namespaces (the lab, tests, an
    agent run on the host).
    """
    target = os.path.normpath(directory)
    own = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) >= 7 and _unescape(fields[4]) == target:
            own = fields  # the last one listed is the one on top
    if own is None:
        return None
    optional = own[6:own.index("-")] if "-" in own else []
    return any(tag.startswith(("master:", "shared:")) for tag in optional)


def mount_propagation_problem(netns_dir: str) -> str | None:
    """What is wrong with this process's view of netns_dir, and what to do; None if nothing."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mountinfo = f.read()
    except OSError:
        return None
    if receives_host_mounts(os.path.realpath(netns_dir), mountinfo) is not False:
        return None
    return (f"{netns_dir} is mounted without propagation from the node: pod network namespaces created after "
            f"the agent started do not appear there (only the CNI result cache still names their veths); "
            + PROPAGATION_HINT)
