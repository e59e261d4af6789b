"""Thin edge to the kernel: `ip`/`bridge` commands in named namespaces, and processes.

Nothing here runs a command in the host's own network namespace except `ip netns add/del`
of names the caller gives (all prefixed nflab-): every link command carries `-n <netns>`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 15


class LabError(RuntimeError):
    """The lab could not do what was asked (exit code 1)."""


def run(cmd: Sequence[str], timeout: float = COMMAND_TIMEOUT, input: str | None = None) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise LabError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    except FileNotFoundError:
        raise LabError(f"command not found: {cmd[0]} (install iproute2)") from None
    if r.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def ip(netns: str, *args: str) -> str:
    return run(["ip", "-n", netns, *args])


def bridge(netns: str, *args: str) -> str:
    return run(["bridge", "-n", netns, *args])


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_list() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_add(name: str) -> None:
    run(["ip", "netns", "add", name])


def netns_delete(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "delete", name])


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    try:
        out = run(["ip", "netns", "pids", name])
    except LabError:
        return []
    return [int(x) for x in out.split() if x.isdigit()]


def sysctl(netns: str, settings: dict[str, str]) -> None:
    run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


# ------------------------------------------------------------------------------ processes
def process_starttime(pid: int) -> int | None:
    """Start time in clock ticks, or None when the pid is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parens: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int, starttime: int) -> bool:
    return process_starttime(pid) == starttime


def spawn(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Start a detached process (own session, output to its log); returns (pid, starttime)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    # The child's stat exists as soon as fork returned; read it before anything can recycle the pid.
    start = process_starttime(proc.pid)
    if start is None:
        _reap(proc.pid)
        raise LabError(f"{argv[0]} exited at once; see {log_path}")
    return proc.pid, start


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def terminate(pids: list[tuple[int, int]], grace: float = 2.0) -> list[int]:
    """SIGTERM each (pid, starttime) still ours, SIGKILL what is left after `grace`; returns pids signalled."""
    ours = [(p, s) for p, s in pids if is_alive(p, s)]
    for p, _ in ours:
        _signal(p, signal.SIGTERM)
    _wait_gone(ours, grace)
    for p, s in ours:
        if is_alive(p, s):
            _signal(p, signal.SIGKILL)
    _wait_gone(ours, grace)
    return [p for p, _ in ours]


def kill(pids: list[tuple[int, int]], timeout: float = 5.0) -> None:
    """SIGKILL each (pid, starttime) still ours (a crash, not a stop) and wait until it is gone."""
    ours = [(p, s) for p, s in pids if is_alive(p, s)]
    for p, _ in ours:
        _signal(p, signal.SIGKILL)
    _wait_gone(ours, timeout, interval=0.02)


def _wait_gone(ours: list[tuple[int, int]], timeout: float, interval: float = 0.05) -> None:
    """Reap and wait until none of `ours` lives, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, _ in ours:
            _reap(p)
        if not any(is_alive(p, s) for p, s in ours):
            return
        time.sleep(interval)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
