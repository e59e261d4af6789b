"""Discovery against real namespaces and veths: which pod is behind which of *our* veths."""

from __future__ import annotations

import queue
import subprocess

import pytest

from kernel.conftest import Node, run_ip, write_cni_record
from netfence_agent.discovery import Discovery
from netfence_agent.netns import executor_in

pytestmark = pytest.mark.kernel


def ifindex(netns: str, ifname: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show", ifname], capture_output=True, text=True, check=True)
    return int(out.stdout.split(":", 1)[0])


class DiscoveryIn:
    """A Discovery living in a node's namespace (built and scanned on a thread there)."""

    def __init__(self, node: Node, shared_netns_dir: str | None = None):
        self.executor = executor_in(node.netns)
        self.changes: queue.Queue = queue.Queue()
        self.discovery: Discovery = self.executor.submit(
            Discovery, shared_netns_dir or str(node.netns_dir), str(node.cni_dir), self.changes.put).result(30)

    def scan(self):
        return self.executor.submit(self.discovery.scan).result(30)

    def start(self):
        self.executor.submit(self.discovery.start).result(30)

    def close(self):
        self.executor.submit(self.discovery.stop).result(30)
        self.executor.shutdown()


@pytest.fixture
def discovery_in():
    made: list[DiscoveryIn] = []

    def make(node: Node, shared_netns_dir: str | None = None) -> DiscoveryIn:
        made.append(DiscoveryIn(node, shared_netns_dir))
        return made[-1]

    yield make
    for d in made:
        d.close()


def test_equal_ifindexes_on_two_nodes_do_not_confuse_it(node_factory, discovery_in, tmp_path):
    one, two = node_factory("one"), node_factory("two", prefix="10.244.1")
    mine, theirs = one.add_pod("x", "mine", serve=False), two.add_pod("x", "theirs", serve=False)
    # Both nodes gave their first veth the same ifindex; the pods' eth0 too.
    assert ifindex(one.netns, mine.veth) == ifindex(two.netns, theirs.veth)
    assert ifindex(mine.netns, "eth0") == ifindex(theirs.netns, "eth0")
    # One directory with every pod namespace of the machine, as the lab shares /var/run/netns.
    shared = tmp_path / "all-netns"
    shared.mkdir()
    for pod in (mine, theirs):
        (shared / pod.netns).symlink_to(f"/var/run/netns/{pod.netns}")
    snapshot = discovery_in(one, str(shared)).scan()
    assert set(snapshot.pods) == {mine.ip}
    found = snapshot.pods[mine.ip]
    assert (found.ifname, found.ifindex, found.mac, found.source) == (
        mine.veth, ifindex(one.netns, mine.veth), mine.mac, "netns")


def test_the_namespace_wins_over_a_stale_cache_record(node, discovery_in):
    pod = node.add_pod("x", "a", serve=False)
    record = write_cni_record(node.cni_dir, pod)
    other = node.add_pod("x", "b", serve=False)
    # A stale record claiming a's IP on b's veth (e.g. a DEL that never ran): the walk knows better.
    stale = record.read_text().replace(pod.veth, other.veth)
    (node.cni_dir / "cbr0-stale-eth0").write_text(stale)
    snapshot = discovery_in(node).scan()
    assert snapshot.pods[pod.ip].ifname == pod.veth
    assert snapshot.pods[pod.ip].name == "a", "the cache still names the pod"


def test_a_deleted_veth_takes_its_pod_out(node, discovery_in):
    a, b = node.add_pod("x", "a", serve=False), node.add_pod("x", "b", serve=False)
    d = discovery_in(node)
    assert set(d.scan().pods) == {a.ip, b.ip}
    run_ip("link", "del", b.veth, netns=node.netns)
    assert set(d.scan().pods) == {a.ip}


def test_changes_arrive_as_events(node, discovery_in):
    d = discovery_in(node)
    d.scan()
    d.start()
    pod = node.add_pod("x", "late", serve=False)
    seen = d.changes.get(timeout=5)
    while pod.ip not in seen.pods:
        seen = d.changes.get(timeout=5)
    assert seen.pods[pod.ip].ifname == pod.veth
    run_ip("link", "del", pod.veth, netns=node.netns)
    gone = d.changes.get(timeout=5)
    assert pod.ip not in gone.pods
