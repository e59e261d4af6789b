"""The API server, reachable from inside the node namespaces (for the agents in API mode).

A node namespace has its own loopback: an API server listening on the host's 127.0.0.1 is not
there. This process opens one listening socket *inside* each node namespace (a socket keeps
the namespace it was made in) on the API's own address and port, and relays each connection
to the API from the host's namespace. Nothing is added to the host's namespace, TLS passes
through untouched (the address the client dials is the one in the certificate), and the
agents use the user's kubeconfig as it is.

    python -m netfence_lab.apiproxy --listen 127.0.0.1:6443 --to 127.0.0.1:6443 /run/netns/nflab-node-1 ...
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from netfence_agent.netns import call_in

log = logging.getLogger("netfence.lab.apiproxy")
BUFFER = 64 * 1024


def listen_in(netns_path: str, host: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    return call_in(netns_path, make)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()


async def serve(sockets: list[socket.socket], upstream: tuple[str, int]) -> None:
    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            api_r, api_w = await asyncio.open_connection(*upstream)
        except OSError as e:
            log.warning("cannot reach the API at %s:%d: %s", *upstream, e)
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, api_w), _pipe(api_r, client_w))
        for w in (api_w, client_w):
            w.close()

    servers = [await asyncio.start_server(relay, sock=s) for s in sockets]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"relaying {len(sockets)} node namespaces to {upstream[0]}:{upstream[1]}", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netfence_lab.apiproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address inside each namespace")
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="the API server, from this namespace")
    parser.add_argument("netns", nargs="+", help="node namespace paths")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    lhost, _, lport = args.listen.rpartition(":")
    uhost, _, uport = args.to.rpartition(":")
    sockets = [listen_in(path, lhost, int(lport)) for path in args.netns]
    asyncio.run(serve(sockets, (uhost, int(uport))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
