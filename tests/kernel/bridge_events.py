"""What a Linux bridge tells RTMGRP_LINK about a pod's veth, recorded from the real kernel.

A pod is wired by the real CNI `bridge` plugin with flannel's delegate config (DESIGN.md §4) into
a node namespace's `cni0`, whose forward_delay is cut from 15 s to 2 s. Then the veth goes through
what happens to bridge ports on a node (STEPS): the end of forward_delay, carrier down and up
(the pod's eth0), an MTU change, port cost and hairpin changes, a move to another bridge and
back, and finally CNI DEL. For each step we keep every raw link message the node namespace got,
and a fresh RTM_GETLINK dump afterwards: the truth that a link table kept by events must equal.

Run as a script (root) to record tests/agent/data/bridge_link_messages.json again:

    .venv/bin/python tests/kernel/bridge_events.py
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "agent" / "data" / "bridge_link_messages.json"
CNI_PATH = "/usr/lib/cni"
FORWARD_DELAY_CS = 200  # the bridge's minimum with STP on; 15 s (1500) is the default
SETTLE = 0.3  # seconds: the kernel sends a step's messages within microseconds of the change


def flannel_delegate_config(subnet: str, ipam_dir: str) -> dict:
    """What flannel's CNI plugin hands the bridge plugin (DESIGN.md §4), IPAM leases kept in ipam_dir."""
    return {
        "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge", "hairpinMode": True, "isDefaultGateway": True,
        "isGateway": True, "ipMasq": False, "mtu": 1450,
        "ipam": {"type": "host-local", "dataDir": ipam_dir, "ranges": [[{"subnet": subnet}]],
                 "routes": [{"dst": "10.244.0.0/16"}]},
    }


def cni(command: str, node_netns: str, pod_netns: str, container_id: str, config: dict) -> dict:
    """Run the bridge plugin in the node namespace as containerd would; its result for ADD."""
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=f"/var/run/netns/{pod_netns}",
               CNI_IFNAME="eth0", CNI_PATH=CNI_PATH)
    out = subprocess.run(["ip", "netns", "exec", node_netns, f"{CNI_PATH}/bridge"], input=json.dumps(config),
                         env=env, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"CNI {command}: {out.stdout} {out.stderr}")
    return json.loads(out.stdout) if command == "ADD" and out.stdout.strip() else {}


def ip(*args: str, netns: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Wiring:
    """A node namespace with cni0 and one pod wired by the CNI bridge plugin."""

    node_netns: str
    pod_netns: str
    container_id: str
    config: dict
    veth: str = ""
    pod_ip: str = ""
    pod_mac: str = ""

    def add(self) -> None:
        result = cni("ADD", self.node_netns, self.pod_netns, self.container_id, self.config)
        interfaces = result["interfaces"]
        self.veth = next(i["name"] for i in interfaces if not i.get("sandbox") and i["name"] != "cni0")
        pod = next(i for i in interfaces if i.get("sandbox"))
        self.pod_mac = pod["mac"]
        self.pod_ip = result["ips"][0]["address"].split("/")[0]

    def delete(self) -> None:
        cni("DEL", self.node_netns, self.pod_netns, self.container_id, self.config)


def wire(node_netns: str, pod_netns: str, ipam_dir: str, subnet: str = "10.244.0.0/24") -> Wiring:
    """cni0 given a short forward_delay first (the plugin takes a bridge that exists as it is)."""
    verb = "set" if subprocess.run(["ip", "-n", node_netns, "link", "show", "cni0"], capture_output=True).returncode == 0 \
        else "add"
    ip("link", verb, "cni0", "type", "bridge", "forward_delay", str(FORWARD_DELAY_CS), netns=node_netns)
    return Wiring(node_netns, pod_netns, uuid.uuid4().hex, flannel_delegate_config(subnet, ipam_dir))


def _forward_delay_passes(w: Wiring) -> None:
    time.sleep(FORWARD_DELAY_CS / 100 + 0.5)


# (name, action, a description of what a real node does there). Every step leaves the veth a
# pod's veth, except the last.
STEPS: list[tuple[str, Callable[[Wiring], None], str]] = [
    ("cni add", Wiring.add, "the CNI bridge plugin's ADD: veth made, enslaved, hairpin on, up"),
    ("forwarding state reached", _forward_delay_passes, "forward_delay ends: AF_BRIDGE NEWLINK, the issue 12 trigger"),
    ("carrier down", lambda w: ip("link", "set", "eth0", "down", netns=w.pod_netns), "the pod's eth0 goes down"),
    ("carrier up", lambda w: ip("link", "set", "eth0", "up", netns=w.pod_netns), "and up again"),
    ("forwarding again", _forward_delay_passes, "the port ran through forward_delay again"),
    ("mtu change", lambda w: ip("link", "set", w.veth, "mtu", "1400", netns=w.node_netns), "MTU of the host veth"),
    ("port cost", lambda w: subprocess.run(["bridge", "-n", w.node_netns, "link", "set", "dev", w.veth, "cost", "7"],
                                           check=True, timeout=30), "bridge link set cost"),
    ("hairpin off", lambda w: subprocess.run(["bridge", "-n", w.node_netns, "link", "set", "dev", w.veth,
                                              "hairpin", "off"], check=True, timeout=30), "bridge link set hairpin"),
    ("another bridge", lambda w: (ip("link", "add", "br-other", "type", "bridge", netns=w.node_netns),
                                  ip("link", "set", w.veth, "master", "br-other", netns=w.node_netns)),
     "master change: AF_BRIDGE DELLINK from cni0 while the link lives on"),
    ("nomaster", lambda w: ip("link", "set", w.veth, "nomaster", netns=w.node_netns), "out of every bridge"),
    ("back to cni0", lambda w: ip("link", "set", w.veth, "master", "cni0", netns=w.node_netns), "enslaved again"),
    ("forwarding once more", _forward_delay_passes, "forward_delay after the re-enslaving"),
    ("cni del", Wiring.delete, "the CNI bridge plugin's DEL: the veth goes"),
]


# --------------------------------------------------------------------------- recording
class LinkMonitor:
    """An RTMGRP_LINK socket and a dump socket, opened in the thread's (node) namespace."""

    def __init__(self) -> None:
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.events.bind((0, 1))  # RTMGRP_LINK
        self.dumps = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.dumps.bind((0, 0))

    def messages(self) -> list[bytes]:
        """Every link message received so far, one netlink message each."""
        from netfence_agent.discovery import _split

        out = []
        while True:
            try:
                data = self.events.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            out += [chunk for _type, _seq, chunk in _split(data)]

    def dump(self) -> list[bytes]:
        """RTM_GETLINK dump (AF_UNSPEC): the links as the kernel describes them now."""
        from pyroute2.netlink.rtnl import RTM_GETLINK
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

        from netfence_agent.discovery import Rtnl

        rtnl = Rtnl(self.dumps)
        return rtnl.request(ifinfmsg(), RTM_GETLINK, 0x1 | 0x300)  # NLM_F_REQUEST | NLM_F_DUMP

    def close(self) -> None:
        self.events.close()
        self.dumps.close()


def settled(monitor: LinkMonitor) -> tuple[list[bytes], list[bytes]]:
    """The messages of a step and the dump after them, with no message after the dump."""
    time.sleep(SETTLE)
    messages = monitor.messages()
    while True:
        dump = monitor.dump()
        late = monitor.messages()
        if not late:
            return messages, dump
        messages += late


def record(node_netns: str, pod_netns: str, ipam_dir: str) -> dict:
    """Run STEPS in the given (empty, existing) namespaces; messages and dumps per step."""
    from netfence_agent.netns import executor_in

    with executor_in(node_netns) as executor:
        monitor = executor.submit(LinkMonitor).result(30)
        try:
            wiring = wire(node_netns, pod_netns, ipam_dir)
            initial = settled(monitor)[1]
            steps = []
            for name, action, about in STEPS:
                action(wiring)
                messages, dump = settled(monitor)
                steps.append({"name": name, "about": about, "messages": [m.hex() for m in messages],
                              "dump": [m.hex() for m in dump]})
        finally:
            executor.submit(monitor.close).result(30)
    return {"kernel": platform.release(), "forward_delay_cs": FORWARD_DELAY_CS, "veth": wiring.veth,
            "initial_dump": [m.hex() for m in initial], "steps": steps}


def main() -> int:
    sys.path[:0] = [str(REPO / "agent"), str(REPO / "operator")]
    made = [f"nf-test-rec-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    ipam = tempfile.mkdtemp(prefix="nf-test-ipam-")
    try:
        for name in made:
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        recording = record(made[0], made[1], ipam)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)
        subprocess.run(["rm", "-rf", ipam], check=False)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(recording, indent=1) + "\n")
    print(f"{FIXTURE}: {sum(len(s['messages']) for s in recording['steps'])} messages in "
          f"{len(recording['steps'])} steps, kernel {recording['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
