"""Probe many targets from one network namespace, concurrently (stdlib only, run by path).

Reads one JSON request on stdin and prints one JSON answer on stdout:
    {"protocol": "TCP", "port": 80, "targets": [["x/a", "10.244.1.11"], ...],
     "connect_timeout": 1.0, "udp_tries": 3, "udp_wait": 0.5}
 -> {"x/a": true, ...}
TCP succeeds when the connection opens and the one byte sent comes back; a connect that times
out is tried once more (a dropped SYN and a slow one look alike for one try), a refused one is
final. UDP succeeds when the datagram (a fresh nonce each try) comes back.
"""

import asyncio
import json
import os
import socket
import sys


async def probe_tcp(ip, port, timeout):
    for attempt in range(2):
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
            writer.write(b"n")
            await asyncio.wait_for(writer.drain(), timeout)
            data = await asyncio.wait_for(reader.read(1), timeout)
            return data == b"n"
        except asyncio.TimeoutError:
            continue
        except OSError:
            return False
        finally:
            if writer is not None:
                writer.close()
    return False


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.replies = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.replies.put_nowait(data)

    def error_received(self, exc):
        self.replies.put_nowait(None)  # ICMP unreachable: nobody answers there


async def probe_udp(ip, port, tries, wait):
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.create_datagram_endpoint(_UdpClient, remote_addr=(ip, port), family=socket.AF_INET)
    except OSError:
        return False
    try:
        for _ in range(tries):
            nonce = os.urandom(8)
            transport.sendto(nonce)
            deadline = loop.time() + wait
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    data = await asyncio.wait_for(proto.replies.get(), left)
                except asyncio.TimeoutError:
                    break
                if data is None:
                    return False
                if data == nonce:
                    return True
        return False
    finally:
        transport.close()


async def run(req):
    proto = req["protocol"].upper()
    port = int(req["port"])
    timeout = float(req.get("connect_timeout", 1.0))
    tries = int(req.get("udp_tries", 3))
    wait = float(req.get("udp_wait", 0.5))

    async def one(key, ip):
        if proto == "TCP":
            ok = await probe_tcp(ip, port, timeout)
        elif proto == "UDP":
            ok = await probe_udp(ip, port, tries, wait)
        else:
            raise ValueError(f"cannot probe {proto}")
        return key, ok

    results = await asyncio.gather(*(one(k, ip) for k, ip in req["targets"]))
    return dict(results)


def main():
    req = json.loads(sys.stdin.read())
    out = asyncio.run(run(req))
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
