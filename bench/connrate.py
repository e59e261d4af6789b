#!/usr/bin/env python3
"""TCP connections per second between two network namespaces (stdlib; used by bench/datapath.py).

  serve --port P                          accept and close, as fast as it can
  connect HOST PORT --seconds S --procs N  N processes connect and close (RST, so no TIME_WAIT
                                          piles up) for S seconds; prints connections/second
                                          and how many attempts failed
Each connection is a full handshake, so every one is a new flow through the policy chains.
bench/datapath.py runs `connect_while` in worker processes of its own and reads their running
tallies while it changes the rules under them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import struct
import sys
import time
from typing import Callable, MutableSequence


def serve(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4096)
    while True:
        conn, _ = s.accept()
        conn.close()


def connect_while(host: str, port: int, keep_going: Callable[[], bool], tally: MutableSequence[int], index: int) -> None:
    """Connect and close while keep_going(); tally[2*index] counts connections made and
    tally[2*index+1] attempts that failed, updated after every attempt (one writer per slot)."""
    linger = struct.pack("ii", 1, 0)
    while keep_going():
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        c.settimeout(2)
        try:
            c.connect((host, port))
            tally[2 * index] += 1
        except OSError:
            tally[2 * index + 1] += 1
        finally:
            c.close()


def _client(host: str, port: int, seconds: float, out) -> None:
    tally = [0, 0]
    deadline = time.monotonic() + seconds
    connect_while(host, port, lambda: time.monotonic() < deadline, tally, 0)
    out.put((tally[0], tally[1]))


def connect(host: str, port: int, seconds: float, procs: int) -> tuple[float, int]:
    out: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_client, args=(host, port, seconds, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 30) for _ in workers]
    for w in workers:
        w.join()
    return sum(d for d, _ in results) / seconds, sum(f for _, f in results)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--seconds", type=float, default=5)
    c.add_argument("--procs", type=int, default=1)
    args = p.parse_args()
    if args.mode == "serve":
        serve(args.port)
        return 0
    rate, failed = connect(args.host, args.port, args.seconds, args.procs)
    print(f"{rate:.1f} {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
