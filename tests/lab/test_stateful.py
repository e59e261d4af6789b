"""Stateful behaviour with real packets in the lab (DESIGN §3):

- a TCP connection opened while allowed keeps working after a policy that denies new
  connections is applied, while new connections are blocked (same-node and cross-node);
- UDP replies come back to an allowed client although the server is isolated both ways and the
  client is isolated for ingress;
- a pod isolated both ways is still reached by its own node, TCP and UDP.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from lab.scenarios.kit import cell_differences, format_matrix, module_lab, parse_table
from netfence_cli.offline import matrix as offline_matrix
from netfence_lab.lab import Lab, load_manifests

pytestmark = pytest.mark.lab

ECHO_PORT = 9000  # not a lab server port: our own echo server, started and stopped by the test

# Echoes everything on every connection until the peer closes (the lab's pod server closes after
# one byte, which cannot show a connection living across a policy change).
ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("ready", flush=True)
def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# One connection: echo, wait for a line on stdin (the test applies a policy meanwhile), echo
# more over the SAME socket, then try a NEW connection. One JSON line per phase.
LONG_CLIENT = r"""
import json, socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
def say(**kw):
    print(json.dumps(kw), flush=True)
def echo(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            break
        got += chunk
    return got == payload
conn = socket.create_connection((ip, port), timeout=3)
say(phase="before", echoed=echo(conn, b"opened while allowed"))
sys.stdin.readline()
try:
    say(phase="after", echoed=echo(conn, bytes(range(256)) * 256), error=None)  # 64 KiB, many segments
except OSError as e:
    say(phase="after", echoed=False, error=repr(e))
try:
    socket.create_connection((ip, port), timeout=1.0).close()
    say(phase="new", result="connected")
except socket.timeout:
    say(phase="new", result="timeout")
except OSError as e:
    say(phase="new", result=repr(e))
conn.close()
"""


def cluster() -> list[dict[str, Any]]:
    """Nodes st-1, st-2 (names of their own, so this lab can run beside others); pods without
    container ports serve 80 and 81, TCP and UDP."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "st-1"}, "spec": {"podCIDR": "10.244.1.0/24"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "st-2"}, "spec": {"podCIDR": "10.244.2.0/24"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
    ]
    for name, node in (("a", "st-1"), ("b", "st-2"), ("c", "st-1")):
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
                     "spec": {"nodeName": node, "containers": [{"name": "server"}]}})
    return docs


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory, cluster(), "stateful-lab") as lab:
        yield lab


def netpol(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x"}, "spec": spec}


DENY_ALL = netpol("deny-all", podSelector={}, policyTypes=["Ingress", "Egress"])


@contextlib.contextmanager
def in_netns(netns: str, script: str, *args: str) -> Iterator[subprocess.Popen]:
    """A stdlib script run inside a lab namespace; stopped (TERM, then KILL) when the block ends."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-c", script, *args]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One stdout line within `timeout` seconds, or fail with what the process said on stderr."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout}s from {proc.args[3:6]}")
        line = proc.stdout.readline()
    finally:
        sel.close()
    if not line:
        proc.wait(timeout=3)
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"process {proc.args[3:6]} ended (rc {proc.returncode}): {err.strip()[-500:]}")
    return line


def assert_matrix(lab: Lab, port: int, proto: str, table: str) -> None:
    expected = parse_table(table)
    seen = lab.probe(port, proto, connect_timeout=0.5)
    offline = offline_matrix(load_manifests([str(lab.cluster_file())]), port, proto)["matrix"]
    problems = cell_differences(expected, seen, f"{port}/{proto} lab probe") + \
        cell_differences(expected, offline, f"{port}/{proto} offline matrix")
    assert not problems, "\n".join(problems + [format_matrix(seen)])


# --------------------------------------------------------------------------- (a) TCP established
@pytest.mark.parametrize("server", ["x/b", "x/c"], ids=["cross-node", "same-node"])
def test_established_tcp_connection_survives_a_policy_that_denies_new_ones(lab, server):
    lab.apply([])
    plan = lab.store.load().lab_plan()
    client, target = plan.pod("x/a"), plan.pod(server)
    with in_netns(target.netns, ECHO_SERVER, str(ECHO_PORT)) as echo_server:
        assert read_line(echo_server, 10).strip() == "ready"
        with in_netns(client.netns, LONG_CLIENT, target.ip, str(ECHO_PORT)) as conn:
            before = json.loads(read_line(conn, 10))
            assert before == {"phase": "before", "echoed": True}

            # Every pod of x isolated both ways, nothing allowed: no NEW connection anywhere.
            lab.apply([DENY_ALL])
            assert lab.probe(80, "TCP", connect_timeout=0.5)["x/a"][server] is False

            assert conn.stdin is not None
            conn.stdin.write("go\n")
            conn.stdin.flush()
            after = json.loads(read_line(conn, 10))
            assert after == {"phase": "after", "echoed": True, "error": None}, \
                "the connection opened while allowed must keep working after the deny"
            new = json.loads(read_line(conn, 10))
            assert new == {"phase": "new", "result": "timeout"}, "a new connection must be dropped"
    lab.apply([])


# --------------------------------------------------------------------------- (b) UDP replies
def test_udp_replies_reach_the_allowed_client_through_both_isolations(lab):
    # x/b: ingress only from x/a on 80/UDP, no egress at all; x/a: no ingress at all.
    # x/a -> x/b works: the request is allowed, and the reply passes x/b's egress and x/a's
    # ingress isolation because it is a reply. x/a -> x/c too (x/c is not isolated).
    lab.apply([
        netpol("b-only-from-a", podSelector={"matchLabels": {"pod": "b"}}, policyTypes=["Ingress", "Egress"],
               ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"protocol": "UDP", "port": 80}]}]),
        netpol("a-no-ingress", podSelector={"matchLabels": {"pod": "a"}}, policyTypes=["Ingress"]),
    ])
    assert_matrix(lab, 80, "UDP", """
    -    x/a x/b x/c
    x/a  .   .   .
    x/b  X   .   X
    x/c  X   X   .
    """)
    assert_matrix(lab, 81, "UDP", """
    -    x/a x/b x/c
    x/a  .   X   .
    x/b  X   .   X
    x/c  X   X   .
    """)
    lab.apply([])


# --------------------------------------------------------------------------- (c) node to its pods
def test_pods_isolated_both_ways_are_still_reached_by_their_own_node(lab):
    lab.apply([DENY_ALL])
    plan = lab.store.load().lab_plan()
    by_node: dict[str, dict[str, bool]] = {}
    for p in plan.pods:
        by_node.setdefault(f"node/{p.node}", {})[p.key] = True
    assert by_node == {"node/st-1": {"x/a": True, "x/c": True}, "node/st-2": {"x/b": True}}
    for proto in ("TCP", "UDP"):
        assert lab.probe(80, proto, from_nodes=True, connect_timeout=0.5) == by_node, proto
        # ... while every pod-to-pod connection is dropped
        assert_matrix(lab, 80, proto, """
        -    x/a x/b x/c
        x/a  .   X   X
        x/b  X   .   X
        x/c  X   X   .
        """)
    lab.apply([])
