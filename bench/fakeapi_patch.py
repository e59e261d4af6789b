#!/usr/bin/env python3
"""Per-request cost of the project's test API server (tests/controller/fakeapi.py).

Cluster-scoped custom resources (NodeRuleSets) whose spec is 16, 32 or 64 KiB of JSON, watched
by 0, 2 or 10 watchers (in another process, reading every event); one client on a kept-alive
connection sends, per size and watcher count, `--requests` of each:

- merge:      merge patch of the whole spec with one pod changed (what the publisher sends);
- json-patch: JSON patch (RFC 6902) replacing one pod's uid;
- status:     strategic merge patch of /status (what the agent sends);
- put:        PUT of the whole object, with its resourceVersion;
- post:       POST of a new object of that size.

Bodies are encoded before the clock starts; the time is from sending the request to having read
the whole response. Prints the median and p90 in milliseconds.

    .venv/bin/python bench/fakeapi_patch.py [--sizes 16,32,64] [--watchers 0,2,10] [--requests 40]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from controller.fakeapi import FakeApiServer  # noqa: E402

PATH = "/apis/netfence.io/v1alpha1/noderulesets"
KINDS = ("merge", "json-patch", "status", "put", "post")
WATCHER = r"""
import http.client, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
ready = threading.Barrier(n + 1)
def watch():
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/apis/netfence.io/v1alpha1/noderulesets?watch=true&resourceVersion=" + sys.argv[3])
    response = conn.getresponse()
    ready.wait()
    while response.readline():
        pass
threads = [threading.Thread(target=watch, daemon=True) for _ in range(n)]
for t in threads:
    t.start()
ready.wait()
print("ready", flush=True)
sys.stdin.read()
"""


def spec(size_kib: int, salt: str) -> dict:
    """A NodeRuleSet spec of about size_kib KiB of JSON."""
    pods = []
    body = {"nodeName": "n", "pods": pods, "peerGroups": [], "peerPortGroups": []}
    i = 0
    while len(json.dumps(body)) < size_kib * 1024:
        pods.append({"namespace": f"ns-{i % 7}", "name": f"pod-{i}", "uid": f"{salt}-{i}", "ips": [f"10.1.{i // 250}.{i % 250}"],
                     "isolation": {"ingress": True, "egress": False}, "ingressPolicies": [f"ns-{i % 7}/deny"],
                     "egressPolicies": [], "ingress": [{"origin": [f"ns-{i % 7}/allow ingress[0]"], "peers": "pg-0123456789ab",
                                                        "ports": [{"protocol": "TCP", "port": 8080}]}], "egress": []})
        i += 1
    return body


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port)

    def send(self, method: str, path: str, body: bytes, ctype: str = "application/json") -> tuple[float, dict]:
        t0 = time.perf_counter()
        self.conn.request(method, path, body=body, headers={"Content-Type": ctype})
        response = self.conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - t0
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return elapsed, json.loads(data)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({cpu}), load {load}, Python {platform.python_version()}"


def run(server: FakeApiServer, size: int, watchers: int, requests: int) -> dict[str, list[float]]:
    client = Client(server.port)
    name = f"nrs-{size}-{watchers}"
    base = spec(size, "a")
    _, obj = client.send("POST", PATH, json.dumps({"apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet",
                                                   "metadata": {"name": name}, "spec": base}).encode())
    proc = None
    if watchers:
        proc = subprocess.Popen([sys.executable, "-c", WATCHER, str(server.port), str(watchers),
                                 obj["metadata"]["resourceVersion"]],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        for r in range(requests):
            for kind in KINDS:
                if kind == "merge":
                    changed = json.loads(json.dumps(base))
                    changed["pods"][r % len(changed["pods"])]["uid"] = f"m-{r}"
                    body = json.dumps({"metadata": {"annotations": {"netfence.io/hash": f"h{r}"}}, "spec": changed}).encode()
                    t, obj = client.send("PATCH", f"{PATH}/{name}", body, "application/merge-patch+json")
                elif kind == "json-patch":
                    body = json.dumps([{"op": "replace", "path": f"/spec/pods/{r % len(base['pods'])}/uid",
                                        "value": f"j-{r}"}]).encode()
                    t, obj = client.send("PATCH", f"{PATH}/{name}", body, "application/json-patch+json")
                elif kind == "status":
                    body = json.dumps({"status": {"observedGeneration": obj["metadata"]["generation"],
                                                  "appliedHash": f"s-{r}"}}).encode()
                    t, obj = client.send("PATCH", f"{PATH}/{name}/status", body, "application/strategic-merge-patch+json")
                elif kind == "put":
                    new = dict(obj, spec=spec(size, f"p{r}"))
                    t, obj = client.send("PUT", f"{PATH}/{name}", json.dumps(new).encode())
                else:
                    body = json.dumps({"apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet",
                                       "metadata": {"name": f"{name}-{r}"}, "spec": base}).encode()
                    t, _ = client.send("POST", PATH, body)
                times[kind].append(t * 1000)
    finally:
        if proc is not None:
            proc.stdin.close()
            proc.terminate()
            proc.wait(10)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,32,64", help="spec sizes in KiB")
    ap.add_argument("--watchers", default="0,2,10")
    ap.add_argument("--requests", type=int, default=40, help="requests of each kind per size and watcher count")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    server = FakeApiServer(bookmark_interval=60).start()
    try:
        print(f"{'size':>5} {'watchers':>8}  " + "  ".join(f"{k + ' p50/p90':>17}" for k in KINDS) + "   (ms per request)")
        for size in (int(s) for s in args.sizes.split(",")):
            for watchers in (int(w) for w in args.watchers.split(",")):
                times = run(server, size, watchers, args.requests)
                cells = [f"{statistics.median(xs):8.2f}/{sorted(xs)[int(.9 * len(xs))]:<8.2f}" for xs in times.values()]
                print(f"{size:>4}K {watchers:>8}  " + "  ".join(cells), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
