"""Which local pod (by IP) sits behind which host-side veth, and with which MAC.

Two sources, as kind and k3s nodes (containerd + flannel's bridge plugin) provide them:

1. **Pod network namespaces** in a directory (default /var/run/netns, `cni-<hex>` files). For
   each, the pod's side says which interface is its veth end (`eth0`), its MAC and IPs, and
   IFLA_LINK / IFLA_LINK_NETNSID name the peer: an ifindex *in another namespace*, identified by
   an id that only means something to the pod's namespace. Ifindexes are per namespace (every
   node's netns has its own ifindex 3), so a peer ifindex only counts when that id is the id the
   pod's namespace gives to *ours* (asked with RTM_GETNSID naming our namespace by fd). The host
   side is checked too: our veth with that ifindex must name the pod's eth0 ifindex and the id
   we give the pod's namespace.
2. **The CNI result cache** (default /var/lib/cni/results, `cbr0-<sandbox>-eth0` JSON written by
   libcni after ADD): pod namespace and name (cniArgs), the host veth name, the pod's MAC, IPs.

Which wins: the namespace walk is ground truth for ifname, MAC and IPs - it reads the live
interfaces. The cache is cheap (no namespace to enter) and the only source of pod names, but
can be stale (a file outlives its pod when DEL is missed, a veth name can go away), so a cache
record counts only if its veth exists now, and where both speak about one IP the walk wins
(a disagreement is logged). The cache alone still serves pods whose namespace file is not
visible (e.g. the agent's mount of /var/run/netns missed it).

Changes are event-driven, without polling: RTM_NEWLINK/RTM_DELLINK on an RTMGRP_LINK netlink
socket keep the host link table current (apply_link_message: only AF_UNSPEC messages describe a
link; the bridge's AF_BRIDGE ones describe the port), inotify on both directories reports new and removed
namespaces and cache records. A new veth is usually announced before its pod's IP is set (the
CNI plugin configures the address afterwards, inside the pod's namespace), so while a pod
namespace is peered with one of our veths but has no address yet, an address-event socket
opened in that namespace wakes the loop the moment the address appears. A few retries with
a short backoff after each event cover what no event announces; then the loop sleeps.

Netlink messages are built and parsed with pyroute2's rtnl codecs on plain sockets: a pyroute2
IPRoute per pod namespace costs 4-18 ms (an asyncio loop, or a forked child for `netns=`), the
plain socket under 1 ms, which matters at a thousand pods.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Literal

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNSID,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg

from netfence_agent import inotify, netns
from netfence_agent.render import PodPort

log = logging.getLogger("netfence.discovery")

DEFAULT_NETNS_DIR = "/var/run/netns"
DEFAULT_CNI_DIR = "/var/lib/cni/results"
_NLMSG_HEADER = struct.Struct("=IHHII")
_NSID_NOT_ASSIGNED = {-1, 0xFFFFFFFF}


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class HostLink:
    """One interface of our (the node's) namespace."""

    index: int
    ifname: str
    kind: str | None
    peer_index: int | None  # IFLA_LINK: for a veth, the peer's ifindex in the peer's namespace
    peer_nsid: int | None  # IFLA_LINK_NETNSID: our id for the peer's namespace
    master: int | None = None  # IFLA_MASTER: the bridge (e.g. cni0) it is a port of


@dataclass(frozen=True)
class PodSide:
    """The pod's end of its veth, as the pod's namespace reports it."""

    index: int
    ifname: str
    mac: str | None
    ips: tuple[str, ...]
    host_index: int  # our ifindex of the peer


@dataclass(frozen=True)
class CniRecord:
    file: str
    namespace: str | None
    name: str | None
    host_ifnames: tuple[str, ...]  # interfaces without a sandbox: the bridge and the host veth
    mac: str | None  # the pod interface's MAC
    ips: tuple[str, ...]
    sandbox: str | None


@dataclass(frozen=True)
class DiscoveredPod:
    ip: str
    ifname: str
    ifindex: int
    mac: str | None
    source: Literal["netns", "cni-cache"]
    namespace: str | None = None
    name: str | None = None


@dataclass
class Snapshot:
    pods: dict[str, DiscoveredPod] = field(default_factory=dict)
    # Things that will probably become pods within milliseconds: a pod namespace peered with
    # one of our veths but without an IP yet, a veth peered into a namespace we cannot place.
    incomplete: list[str] = field(default_factory=list)
    # Bridge-port veths (by our ifindex) of pods without a known IP: leading into a pod
    # namespace whose pod has no IP yet, or on a bridge of pods without a pod we can place.
    # The agent holds them closed (with a time limit), as it holds pods the rule set lacks.
    unaddressed: dict[int, PodPort] = field(default_factory=dict)
    # Veths on bridges without pods (e.g. docker0 beside cni0): no pod's, let through.
    other_ports: dict[int, PodPort] = field(default_factory=dict)

    @property
    def ports(self) -> dict[str, PodPort]:
        return {ip: PodPort(p.ifname, p.mac, p.ifindex) for ip, p in self.pods.items()}


# --------------------------------------------------------------------------- netlink
class NetlinkError(OSError):
    pass


class Rtnl:
    """A NETLINK_ROUTE socket bound to the namespace it was opened in."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._seq = 0

    @classmethod
    def here(cls, groups: int = 0) -> "Rtnl":
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, groups))
        return cls(sock)

    @classmethod
    def in_netns(cls, path: str) -> "Rtnl":
        return netns.call_in(path, cls.here)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def request(self, msg, msg_type: int, flags: int) -> list:
        self._seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self.sock.send(msg.data)
        replies = []
        while True:
            data = self.sock.recv(1 << 20)
            for msg_type_in, seq, chunk in _split(data):
                if seq != self._seq:
                    continue
                if msg_type_in == NLMSG_DONE:
                    return replies
                if msg_type_in == NLMSG_ERROR:
                    code = struct.unpack_from("=i", chunk, _NLMSG_HEADER.size)[0]
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return replies  # ACK
                replies.append(chunk)
            if not flags & (NLM_F_DUMP | NLM_F_ACK) and replies:
                return replies

    def dump(self, cls, msg_type: int) -> list:
        out = []
        for chunk in self.request(cls(), msg_type, NLM_F_REQUEST | NLM_F_DUMP):
            msg = cls(chunk)
            msg.decode()
            out.append(msg)
        return out

    def nsid_of(self, fd: int) -> int | None:
        """This namespace's id for the namespace open at fd (None: it has none)."""
        msg = nsidmsg()
        msg["attrs"] = [("NETNSA_FD", fd)]
        for chunk in self.request(msg, RTM_GETNSID, NLM_F_REQUEST):
            reply = nsidmsg(chunk)
            reply.decode()
            nsid = reply.get_attr("NETNSA_NSID")
            return None if nsid is None or nsid in _NSID_NOT_ASSIGNED else nsid
        return None


def _split(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(data):
        length, msg_type, _flags, seq, _pid = _NLMSG_HEADER.unpack_from(data, offset)
        if length < _NLMSG_HEADER.size:
            return
        yield msg_type, seq, data[offset: offset + length]
        offset += (length + 3) & ~3


def _drain(rtnl: Rtnl) -> None:
    while True:
        try:
            rtnl.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ENOBUFS: there was something; the rescan reads the truth anyway
            continue


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _host_link(msg, known: HostLink | None = None) -> HostLink:
    """The link as an AF_UNSPEC message describes it; where the message is silent, as known.

    A message that carries IFLA_LINKINFO is a whole description (the kernel's rtnl_fill_ifinfo):
    there, no IFLA_LINK_NETNSID means the peer is in our namespace. One without it says only
    what it carries and leaves the rest as we knew it.
    """
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    if known is None or linkinfo is not None:
        kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
        return HostLink(msg["index"], msg.get_attr("IFLA_IFNAME"), kind,
                        msg.get_attr("IFLA_LINK"), msg.get_attr("IFLA_LINK_NETNSID"), msg.get_attr("IFLA_MASTER"))
    carried = {"ifname": msg.get_attr("IFLA_IFNAME"), "peer_index": msg.get_attr("IFLA_LINK"),
               "peer_nsid": msg.get_attr("IFLA_LINK_NETNSID"), "master": msg.get_attr("IFLA_MASTER")}
    return replace(known, **{k: v for k, v in carried.items() if v is not None})


def link_table(dump: Iterable) -> dict[int, HostLink]:
    """ifindex -> link, from the decoded messages of an RTM_GETLINK dump (AF_UNSPEC: whole descriptions)."""
    return {link.index: link for link in map(_host_link, dump)}


def apply_link_message(links: dict[int, HostLink], msg_type: int, msg) -> bool:
    """Update the link table with one RTM_NEWLINK/RTM_DELLINK; True if it changed.

    Only AF_UNSPEC messages describe the link. A Linux bridge also sends AF_BRIDGE ones for its
    ports (enslaved, STP state, the end of forward_delay - 15 s after a CNI ADD -, cost,
    hairpin): they carry the port's name, master and state but no IFLA_LINKINFO kind and no
    IFLA_LINK_NETNSID, and an AF_BRIDGE RTM_DELLINK says the port left the bridge while the
    link lives on. Taken for the link, they made a pod's veth stop being one (issue 12).
    """
    if msg["family"] != socket.AF_UNSPEC:
        return False
    index = msg["index"]
    if msg_type == RTM_DELLINK:
        return links.pop(index, None) is not None
    known = links.get(index)
    link = _host_link(msg, known)
    if link == known:
        return False
    links[index] = link
    return True


def read_pod_side(rtnl: Rtnl, our_netns_fd: int) -> PodSide | None:
    """The pod's veth end whose peer is in our namespace, from a socket in the pod's namespace."""
    ours = rtnl.nsid_of(our_netns_fd)
    if ours is None:
        return None  # the pod's namespace has no id for ours: none of its links peer into it
    candidates = [
        link for link in rtnl.dump(ifinfmsg, RTM_GETLINK)
        if link.get_attr("IFLA_LINK_NETNSID") == ours and link.get_attr("IFLA_LINK")
    ]
    if not candidates:
        return None
    # A pod has one interface on the pod network; prefer the CNI's name for it.
    link = next((c for c in candidates if c.get_attr("IFLA_IFNAME") == "eth0"), candidates[0])
    ips = tuple(
        a.get_attr("IFA_ADDRESS") for a in rtnl.dump(ifaddrmsg, RTM_GETADDR)
        if a["index"] == link["index"] and a["scope"] == 0 and a.get_attr("IFA_ADDRESS")
    )
    return PodSide(link["index"], link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS"),
                   tuple(str(ipaddress.ip_address(ip)) for ip in ips), link.get_attr("IFLA_LINK"))


def _note_unaddressed(snapshot: Snapshot, link: HostLink, mac: str | None) -> None:
    """Our veth into a pod namespace without a pod IP yet. Only bridge ports: the bridge hook
    is where such a veth is held, and a veth that is no bridge port (e.g. a node's uplink in a
    lab whose underlay namespace shares the netns directory) carries no pod traffic."""
    if link.master is not None and link.index not in snapshot.unaddressed:
        snapshot.unaddressed[link.index] = PodPort(link.ifname, mac, link.index)


# --------------------------------------------------------------------------- CNI cache
def parse_cni_record(path: str, text: str) -> CniRecord | None:
    """A libcni cache file (kind cniCacheV1). None if it is not one or has no pod interface."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
        return None
    raw_args = data.get("cniArgs") or []
    # libcni writes [["K8S_POD_NAMESPACE", "x"], ...]; accept a plain object too.
    args = dict(raw_args) if isinstance(raw_args, list) else dict(raw_args) if isinstance(raw_args, dict) else {}
    result = data["result"]
    interfaces = [i for i in result.get("interfaces") or [] if isinstance(i, dict)]
    ips: list[str] = []
    pod_ifaces: set[int] = set()
    for entry in result.get("ips") or []:
        try:
            ips.append(str(ipaddress.ip_interface(entry["address"]).ip))
        except (KeyError, TypeError, ValueError):
            continue
        if isinstance(entry.get("interface"), int):
            pod_ifaces.add(entry["interface"])
    pod = next((interfaces[i] for i in sorted(pod_ifaces) if 0 <= i < len(interfaces)), None)
    pod = pod or next((i for i in interfaces if i.get("sandbox")), None)
    if not ips:
        return None
    host = tuple(i["name"] for i in interfaces if not i.get("sandbox") and i.get("name"))
    return CniRecord(
        file=path,
        namespace=args.get("K8S_POD_NAMESPACE"),
        name=args.get("K8S_POD_NAME"),
        host_ifnames=host,
        mac=(pod or {}).get("mac"),
        ips=tuple(ips),
        sandbox=(pod or {}).get("sandbox") or data.get("netns"),
    )


# --------------------------------------------------------------------------- discovery
class Discovery:
    """Keeps the pod -> veth map of this node current and reports every change."""

    RETRY_DELAYS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
    RESYNC_SECONDS = 300.0  # a belt under the events (e.g. an overflowed netlink queue)

    def __init__(self, netns_dir: str = DEFAULT_NETNS_DIR, cni_dir: str = DEFAULT_CNI_DIR,
                 on_change: Callable[[Snapshot], None] | None = None):
        self.netns_dir = netns_dir
        self.cni_dir = cni_dir
        self.on_change = on_change
        # Our namespace, named by fd in RTM_GETNSID questions to pod namespaces.
        self._own_netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._events = Rtnl.here(groups=RTMGRP_LINK)  # subscribe before the first dump: no gap
        self._host = Rtnl.here()
        self._links: dict[int, HostLink] = {}
        self._pod_bridges: set[int] = set()  # ifindexes of bridges that have had pods as ports
        self._pod_sides: dict[tuple[str, int], PodSide] = {}  # (file name, inode) -> complete pod side
        self._cni: dict[str, tuple[tuple[int, int], CniRecord | None]] = {}  # file -> ((mtime, size), record)
        self._inotify = inotify.Inotify()
        self._watched: set[str] = set()
        # Pod namespaces wired to one of our veths but without an IP yet: address events there.
        self._address_watch: dict[tuple[str, int], Rtnl] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._rescan_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: Snapshot = Snapshot()
        self._watch_dirs()
        self._reload_links()

    # ------------------------------------------------------------------ scanning
    def _watch_dirs(self) -> None:
        for path in (self.netns_dir, self.cni_dir):
            if path not in self._watched and self._inotify.watch(path) is not None:
                self._watched.add(path)

    def _reload_links(self) -> None:
        self._links = link_table(self._host.dump(ifinfmsg, RTM_GETLINK))

    def _apply_link_events(self) -> bool:
        """Drain RTMGRP_LINK; True if any link changed."""
        changed = False
        while True:
            try:
                data = self._events.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                log.warning("link event queue overflowed; re-reading all links")
                self._reload_links()
                changed = True
                continue
            for msg_type, _seq, chunk in _split(data):
                if msg_type not in (RTM_NEWLINK, RTM_DELLINK):
                    continue
                msg = ifinfmsg(chunk)
                msg.decode()
                changed |= apply_link_message(self._links, msg_type, msg)

    def scan(self) -> Snapshot:
        """The pod -> veth map now. One thread at a time: the caller before start(), then only
        the discovery thread."""
        self._apply_link_events()
        snapshot = Snapshot()
        walked = self._walk_netns(snapshot)
        by_name = {link.ifname: link for link in self._links.values()}
        for record in self._cni_records():
            veths = [n for n in record.host_ifnames if n in by_name and by_name[n].kind == "veth"]
            if not veths:
                continue  # stale record: its veth is gone (or not created yet)
            for ip in record.ips:
                known = snapshot.pods.get(ip)
                if known is None:
                    snapshot.pods[ip] = DiscoveredPod(ip, veths[0], by_name[veths[0]].index, record.mac, "cni-cache",
                                                      record.namespace, record.name)
                elif known.ifname in veths:
                    snapshot.pods[ip] = DiscoveredPod(ip, known.ifname, known.ifindex, known.mac, "netns",
                                                      record.namespace, record.name)
                else:
                    log.debug("CNI cache %s says %s is on %s, its namespace says %s; the namespace wins",
                              record.file, ip, veths[0], known.ifname)
        # A veth peered into some namespace that gave no pod: probably one being set up.
        placed = {p.ifname for p in snapshot.pods.values()}
        snapshot.incomplete += [
            f"veth {link.ifname}" for link in self._links.values()
            if link.kind == "veth" and link.peer_nsid is not None and link.ifname not in placed
            and link.index not in walked
        ]
        self._sort_other_bridge_ports(snapshot, placed)
        self.last = snapshot
        return snapshot

    def _sort_other_bridge_ports(self, snapshot: Snapshot, placed: set[str]) -> None:
        """Every other bridge port: a veth on a bridge of pods is a pod we cannot place (held
        like a new one, then released: say, its namespace is not visible to us); the rest is no
        pod's. A port of unknown kind is let through rather than held without end (the kernel
        holds every veth it is not told about): a physical port, or a veth whose last link
        message came from the bridge and named no kind."""
        # A bridge that had pods stays one for as long as it exists: the next pod's veth may
        # reach it before anything tells that veth is a pod's (its namespace file, say).
        self._pod_bridges |= {self._links[p.ifindex].master for p in snapshot.pods.values() if p.ifindex in self._links}
        self._pod_bridges |= {self._links[i].master for i in snapshot.unaddressed if i in self._links}
        self._pod_bridges &= self._links.keys()
        for link in self._links.values():
            if link.master is None or link.ifname in placed or link.index in snapshot.unaddressed:
                continue
            held = link.kind == "veth" and link.master in self._pod_bridges
            (snapshot.unaddressed if held else snapshot.other_ports)[link.index] = PodPort(link.ifname, None, link.index)

    def _walk_netns(self, snapshot: Snapshot) -> set[int]:
        """Pods found through their namespace files; returns our veth ifindexes accounted for."""
        accounted: set[int] = set()
        try:
            names = sorted(os.listdir(self.netns_dir))
        except OSError:
            return accounted
        veth_by_nsid: dict[int, list[HostLink]] = {}
        for link in self._links.values():
            if link.kind == "veth" and link.peer_nsid is not None:
                veth_by_nsid.setdefault(link.peer_nsid, []).append(link)
        live: set[tuple[str, int]] = set()
        for name in names:
            path = os.path.join(self.netns_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                key = (name, os.fstat(fd).st_ino)
                try:
                    nsid = self._host.nsid_of(fd)  # our id for the pod's namespace
                except NetlinkError:
                    continue  # not a namespace (yet): `ip netns add` mounts after creating the file
            finally:
                os.close(fd)
            peers = veth_by_nsid.get(nsid, []) if nsid is not None else []
            if not peers:
                continue  # none of our veths leads there: another node's pod, or not wired yet
            live.add(key)
            side = self._pod_sides.get(key)
            if side is None or not self._peers_match(side, nsid):
                self._watch_addresses(key, path)  # before reading: an address set now is not missed
                side = self._read_pod_side(path)
                if side is None or not self._peers_match(side, nsid):
                    snapshot.incomplete.append(f"netns {name}")
                    for link in peers:  # being wired (or unreadable): its pod has no known IP
                        _note_unaddressed(snapshot, link, None)
                    continue
                if side.ips:
                    self._pod_sides[key] = side
            host = self._links[side.host_index]
            accounted.add(host.index)
            if not side.ips:
                snapshot.incomplete.append(f"netns {name} (no IP yet)")
                _note_unaddressed(snapshot, host, side.mac)
            for ip in side.ips:
                snapshot.pods[ip] = DiscoveredPod(ip, host.ifname, host.index, side.mac, "netns")
        for key in set(self._pod_sides) - live:
            del self._pod_sides[key]
        for key in set(self._address_watch) - (live - set(self._pod_sides)):
            self._address_watch.pop(key).close()  # complete, or gone
        return accounted

    MAX_ADDRESS_WATCHES = 256

    def _watch_addresses(self, key: tuple[str, int], path: str) -> None:
        if key in self._address_watch or len(self._address_watch) >= self.MAX_ADDRESS_WATCHES:
            return
        try:
            self._address_watch[key] = netns.call_in(path, Rtnl.here, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        except OSError as exc:
            log.debug("cannot watch addresses in %s: %s", path, exc)

    def _peers_match(self, side: PodSide, nsid: int) -> bool:
        """Our veth at the pod's peer ifindex names the pod's interface back, in the pod's netns."""
        host = self._links.get(side.host_index)
        return host is not None and host.kind == "veth" and host.peer_index == side.index and host.peer_nsid == nsid

    def _read_pod_side(self, path: str) -> PodSide | None:
        try:
            rtnl = Rtnl.in_netns(path)
        except OSError as exc:
            log.debug("cannot enter %s: %s", path, exc)
            return None
        try:
            return read_pod_side(rtnl, self._own_netns_fd)
        except OSError as exc:
            log.debug("cannot read %s: %s", path, exc)
            return None
        finally:
            rtnl.close()

    def _cni_records(self) -> list[CniRecord]:
        try:
            names = os.listdir(self.cni_dir)
        except OSError:
            self._cni.clear()
            return []
        records = []
        for name in names:
            path = os.path.join(self.cni_dir, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._cni.get(name)
            if cached is None or cached[0] != stamp:
                try:
                    with open(path, encoding="utf-8") as f:
                        record = parse_cni_record(path, f.read())
                except OSError:
                    continue
                cached = (stamp, record)
                self._cni[name] = cached
            if cached[1] is not None:
                records.append(cached[1])
        for name in set(self._cni) - set(names):
            del self._cni[name]
        return records

    # ------------------------------------------------------------------ watching
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        for closer in (self._events.close, self._host.close, self._inotify.close,
                       *(w.close for w in self._address_watch.values())):
            closer()
        for fd in (self._wake_r, self._wake_w, self._own_netns_fd):
            os.close(fd)

    def request_rescan(self) -> None:
        """Read every link and namespace again soon, as the periodic resync does (thread-safe).
        For when someone finds a pod discovery should know but does not."""
        self._rescan_requested.set()
        try:
            os.write(self._wake_w, b"r")
        except OSError:  # the pipe is full: a wake-up is pending anyway
            pass

    def _publish(self, snapshot: Snapshot, previous: Snapshot) -> None:
        changed = (snapshot.pods != previous.pods or snapshot.unaddressed != previous.unaddressed
                   or snapshot.other_ports != previous.other_ports)
        if changed and self.on_change is not None:
            self.on_change(snapshot)

    def _run(self) -> None:
        retries: list[float] = []
        next_resync = time.monotonic() + self.RESYNC_SECONDS
        while not self._stop.is_set():
            now = time.monotonic()
            deadline = min([next_resync, *retries])
            watches = list(self._address_watch.values())
            readable, _, _ = select.select([self._events, self._inotify, self._wake_r, *watches], [], [],
                                           max(0.0, deadline - now))
            if self._stop.is_set():
                return
            evented = False
            for watch in watches:
                if watch in readable:
                    _drain(watch)
                    evented = True
            if self._events in readable:
                evented |= self._apply_link_events()
            if self._inotify in readable:
                evented |= bool(self._inotify.read())
            if self._wake_r in readable:
                _drain_pipe(self._wake_r)
            now = time.monotonic()
            if now >= next_resync or self._rescan_requested.is_set():
                self._rescan_requested.clear()
                self._watch_dirs()
                self._reload_links()
                next_resync = now + self.RESYNC_SECONDS
                evented = True
            due = [t for t in retries if t <= now]
            if not evented and not due:
                continue
            retries = [t for t in retries if t > now]
            previous = self.last
            try:
                snapshot = self.scan()
            except Exception:  # keep watching; the next event rescans
                log.exception("discovery scan failed")
                continue
            self._publish(snapshot, previous)
            if evented and snapshot.incomplete:
                # Something is being wired up: look again shortly, with backoff, then stop.
                retries = [now + d for d in self.RETRY_DELAYS]
            elif not snapshot.incomplete:
                retries = []
