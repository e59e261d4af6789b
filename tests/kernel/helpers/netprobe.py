#!/usr/bin/env python3
"""Traffic for the kernel tests, run inside a pod's namespace with `ip netns exec` (stdlib only).

  serve --port P [--port P...]       TCP: accept, send "ok", close; UDP: answer every datagram "ok"
  connect HOST PORT [--udp] [--timeout S] [--source IP]
                                     exit 0 if the server answered, 1 if not
  loop --allow HOST:PORT[/udp] ... --deny HOST:PORT[/udp] ...
                                     probe all of them again and again until SIGTERM, then print
                                     a JSON summary: attempts, allowed failures, denied successes
  http URL                           print the status code, a newline, the body
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request


def serve(ports: list[int]) -> None:
    def tcp(port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(512)
        while True:
            conn, _ = s.accept()
            try:
                conn.sendall(b"ok")
            except OSError:
                pass
            conn.close()

    def udp(port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        while True:
            _data, peer = s.recvfrom(2048)
            s.sendto(b"ok", peer)

    threads = [threading.Thread(target=f, args=(p,), daemon=True) for p in ports for f in (tcp, udp)]
    for t in threads:
        t.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def connect(host: str, port: int, udp: bool, timeout: float, source: str | None = None) -> bool:
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        try:
            if udp:
                s.sendto(b"hi", (host, port))
                data, _ = s.recvfrom(16)
            else:
                s.connect((host, port))
                data = s.recv(16)
        except OSError:
            return False
        return data == b"ok"


def parse_target(text: str) -> tuple[str, int, bool]:
    address, _, proto = text.partition("/")
    host, _, port = address.rpartition(":")
    return host, int(port), proto == "udp"


def syn_retransmits() -> int:
    """TcpExt TCPSynRetrans of this network namespace: SYNs sent again because no answer came."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:]))["TCPSynRetrans"])
    return 0


def loop(allow: list[str], deny: list[str], allow_timeout: float, deny_timeout: float, slow: float) -> dict:
    """Allowed probes must connect. A SYN lost to a gap in the rules would still connect after
    the 1 s retransmission, so the namespace's SYN retransmissions are counted too (denied
    probes give up before their first retransmission); a slow connect alone is only noted."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()
    summary = {"allowed_attempts": 0, "allowed_failures": 0, "denied_attempts": 0, "denied_successes": 0,
               "slowest_allowed": 0.0, "slow_allowed": 0, "syn_retransmits": 0, "failures": []}
    retransmits_before = syn_retransmits()

    def worker(target: str, expect: bool) -> None:
        host, port, udp = parse_target(target)
        while not stop.is_set():
            started = time.monotonic()
            ok = connect(host, port, udp, allow_timeout if expect else deny_timeout)
            took = time.monotonic() - started
            with lock:
                if expect:
                    summary["allowed_attempts"] += 1
                    summary["slowest_allowed"] = max(summary["slowest_allowed"], took)
                    if not ok:
                        summary["allowed_failures"] += 1
                        summary["failures"].append({"target": target, "ok": ok, "seconds": round(took, 3), "at": time.time()})
                    elif took > slow:
                        summary["slow_allowed"] += 1
                else:
                    summary["denied_attempts"] += 1
                    if ok:
                        summary["denied_successes"] += 1
                        summary["failures"].append({"target": target, "ok": ok, "at": time.time()})

    threads = [threading.Thread(target=worker, args=(t, True)) for t in allow]
    threads += [threading.Thread(target=worker, args=(t, False)) for t in deny]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()
    summary["syn_retransmits"] = syn_retransmits() - retransmits_before
    return summary


def http(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, action="append", required=True)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--udp", action="store_true")
    c.add_argument("--timeout", type=float, default=1.0)
    c.add_argument("--source")
    lo = sub.add_parser("loop")
    lo.add_argument("--allow", action="append", default=[])
    lo.add_argument("--deny", action="append", default=[])
    lo.add_argument("--allow-timeout", type=float, default=3.0)
    lo.add_argument("--deny-timeout", type=float, default=0.3)
    lo.add_argument("--slow", type=float, default=0.5)
    h = sub.add_parser("http")
    h.add_argument("url")
    args = p.parse_args()
    if args.mode == "serve":
        serve(args.port)
        return 0
    if args.mode == "connect":
        return 0 if connect(args.host, args.port, args.udp, args.timeout, args.source) else 1
    if args.mode == "loop":
        print(json.dumps(loop(args.allow, args.deny, args.allow_timeout, args.deny_timeout, args.slow)), flush=True)
        return 0
    code, body = http(args.url)
    sys.stdout.write(f"{code}\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
