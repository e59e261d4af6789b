"""A lab pod's server: echo on its container ports (stdlib only, run by path inside the pod netns).

TCP: accept, read one byte, send it back, close. UDP: send every datagram back to its sender.
It binds every port first and only then writes the ready file, so `lab up` knows the pod
answers before it returns. SIGTERM ends it.

    python -I -S podserver.py --tcp 80,81 --udp 80,81 --ready-file PATH
"""

import argparse
import asyncio
import os
import signal
import sys


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)

    def error_received(self, exc):  # a probe's ICMP error must not end the server
        pass


async def _tcp_echo(reader, writer):
    try:
        data = await asyncio.wait_for(reader.read(1), timeout=5)
        if data:
            writer.write(data)
            await writer.drain()
    except (asyncio.TimeoutError, OSError):
        pass
    finally:
        writer.close()


def _ports(text):
    return [int(p) for p in text.split(",") if p.strip()] if text else []


async def serve(tcp_ports, udp_ports, ready_file, bind):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    servers, transports = [], []
    for port in tcp_ports:
        servers.append(await asyncio.start_server(_tcp_echo, bind, port, reuse_address=True, backlog=256))
    for port in udp_ports:
        t, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(bind, port))
        transports.append(t)
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, ready_file)
    print(f"serving tcp={tcp_ports} udp={udp_ports} pid={os.getpid()}", flush=True)
    await stop
    for s in servers:
        s.close()
    for t in transports:
        t.close()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tcp", default="")
    ap.add_argument("--udp", default="")
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--ready-file", default="")
    a = ap.parse_args(argv)
    asyncio.run(serve(_ports(a.tcp), _ports(a.udp), a.ready_file, a.bind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
