#!/usr/bin/env python3
"""Control plane at scale (issue 14): what one pod event costs the API, the controller and an agent.

A synthetic cluster (bench/compile.py's shape) is fed into the controller's real ClusterState and
Publisher, which publish to the project's test API server (tests/controller/fakeapi.py, run in a
process of its own so that this process's memory is the controller's). Then two real agents
follow the API with their real source (ApiRuleSetSource: NodeRuleSet and PeerGroupSlices) and
sync loop: the *local* agent on node-0, where every event happens, loads its
rules into real nftables in a network namespace of its own (root); the *remote* agent on node-1
renders and plans against a kernel double. node-0 holds --local-pods pods (kubelet's default
maximum, 110); the rest of the cluster is spread over the other nodes (by default as many as
kubelet's maximum asks for: pods / 110 + 1).

Events on pods of node-0 and of node-1, --events of each kind on each:
  birth   a new pod (new IP, labels drawn like the others)
  ip      an existing pod gets a new IP (a restart elsewhere, same name)
  relabel an existing pod's app label changes
  delete  a pod goes (births and deletions keep each node at its kubelet's pod count)
Per event: bytes the controller wrote to the API (request bodies, compact JSON) and objects
written; controller time (ClusterState.observe + one publish round with its HTTP writes); bytes
each agent received (watch events and listings, as sent); the local agent's time from the event's
objects reaching it to its rules in the kernel (assemble + render + plan + nft transaction).

    sudo .venv/bin/python bench/scale.py [--pods 10000 --policies 2000 --namespaces 200 --nodes N]
                                         [--local-pods 110] [--events 100]

Creates netns nf-bench-scale-<hex> and removes it by name at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("operator", "agent", "tests", "bench")]

import kubernetes  # noqa: E402

from bench_machine import machine  # noqa: E402
from compile import APPS, MAX_NODES, add_cluster_arguments, synthetic_documents  # noqa: E402
from agent.test_periodic_full_sync import RecordingKernel  # noqa: E402 - the remote agent's kernel: takes everything
from controller.fakeapi import kubeconfig_for  # noqa: E402
from netfence_api.runtime import freeze_heap, tune_gc, tune_threads  # noqa: E402
from netfence_agent.apisource import ApiRuleSetSource  # noqa: E402
from netfence_agent.daemon import Agent, AgentConfig  # noqa: E402
from netfence_agent.netns import executor_in  # noqa: E402
from netfence_agent.nft.kernel import Kernel  # noqa: E402
from netfence_agent.render import PodPort  # noqa: E402
from netfence_operator.kube import KubeApi  # noqa: E402
from netfence_operator.metrics import ControllerMetrics  # noqa: E402
from netfence_operator.publish import Publisher  # noqa: E402
from netfence_operator.state import ClusterState  # noqa: E402

LOCAL, REMOTE = "node-0", "node-1"
SERVER_PROCESS: subprocess.Popen | None = None
# The test API server in a process of its own. "freeze" on its stdin moves what it holds out of
# its collector's sight, as the controller's own heap is after its first sync: a full collection
# over the whole cluster's objects is a pause of 100+ ms in the server that a Go apiserver does not
# have, and that would land on whichever event is being measured.
SERVER = """
import gc, sys
sys.path[:0] = [sys.argv[1]]
from controller.fakeapi import FakeApiServer
server = FakeApiServer(bookmark_interval=5.0, history_limit=20_000).start()
print(server.port, flush=True)
for line in sys.stdin:
    if line.strip() == "freeze":
        gc.collect()
        gc.freeze()
server.stop()
"""


def compact(data: Any) -> int:
    return len(json.dumps(data, separators=(",", ":")))


class CountingKubeApi(KubeApi):
    """The controller's API calls, counting the bytes of every write body it sends."""

    bytes_written = 0
    objects_written = 0

    def _count(self, body: Any) -> None:
        self.bytes_written += compact(body)
        self.objects_written += 1

    def create_object(self, plural, body):
        self._count(body)
        return super().create_object(plural, body)

    def patch_object(self, plural, name, patch):
        self._count(patch)
        return super().patch_object(plural, name, patch)

    def json_patch_object(self, plural, name, operations):
        self._count(operations)
        return super().json_patch_object(plural, name, operations)

    def delete_object(self, plural, name):
        self._count({})
        return super().delete_object(plural, name)

    def create_event(self, namespace, body):
        self._count(body)
        return super().create_event(namespace, body)


class KernelIn:
    """A Kernel living in a network namespace: every call runs on the namespace's thread, so the
    agent's own threads (and its HTTP to the API) stay in the host's namespace."""

    def __init__(self, executor):
        self.executor = executor
        self.kernel = executor.submit(Kernel).result()

    def __getattr__(self, name):
        method = getattr(self.kernel, name)
        return lambda *a, **kw: self.executor.submit(method, *a, **kw).result()


def cluster_documents(args, local: list[dict], remote: list[dict]):
    """Every object, one at a time as a watch delivers them (the controller never holds them
    all as JSON); node-0's and node-1's pods are also collected into `local` and `remote`.
    node-0 keeps its first --local-pods pods, the others move to the other nodes."""
    moved = 0
    for doc in synthetic_documents(args.pods, args.policies, args.namespaces, args.nodes):
        if doc["kind"] == "Pod" and doc["spec"]["nodeName"] == LOCAL:
            if len(local) < args.local_pods:
                local.append(doc)
            else:
                node = 1 + moved % (args.nodes - 1)
                doc["spec"]["nodeName"] = f"node-{node}"
                doc["status"]["podIP"] = f"10.{100 + node}.{200 + moved // 250 // (args.nodes - 1)}.{moved % 250 + 2}"
                moved += 1
        if doc["kind"] == "Pod" and doc["spec"]["nodeName"] == REMOTE:
            remote.append(doc)
        yield doc


def memory_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class TimedSource(ApiRuleSetSource):
    """The agent's source, noting when each delivery is assembled (for the apply figure)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.assembled_in: list[float] = []
        self.events_seen_at = 0.0

    def _take(self, item):
        if item is not None and not self.events_seen_at:
            self.events_seen_at = time.perf_counter()
        super()._take(item)

    def _assemble(self):
        found = super()._assemble()
        if found is not None and self.events_seen_at:
            self.assembled_in.append(time.perf_counter() - self.events_seen_at)
        self.events_seen_at = 0.0
        return found


def start_agent(node: str, kubeconfig: str, proc_sys: str, kernel, ports):
    sysctl = Path(proc_sys) / node / "net" / "bridge"
    sysctl.mkdir(parents=True, exist_ok=True)
    for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        (sysctl / name).write_text("1\n")
    # new_pods="open": the veths made up front for pods not born yet are not held meanwhile.
    config = AgentConfig(node=node, metrics_bind_address=None, proc_sys=str(Path(proc_sys) / node), full_sync_period=0,
                         new_pods="open")
    source = TimedSource(node, kubeconfig)
    agent = Agent(config, source, kernel)
    agent.set_ports(ports)
    outcomes: list = []
    original = agent.sync_once

    def recording_sync():
        outcome = original()
        outcomes.append(outcome)
        return outcome

    agent.sync_once = recording_sync  # type: ignore[method-assign]
    threading.Thread(target=agent._consume_source, daemon=True).start()
    threading.Thread(target=agent.loop, daemon=True).start()
    return agent, source, outcomes


def wait_applied(agent: Agent, digest: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        applied = agent.applied_object
        if applied is not None and agent.last_error is None and applied.spec.content_hash() == digest:
            return
        time.sleep(0.002)
    raise RuntimeError(f"agent {agent.config.node} did not apply {digest} (last error: {agent.last_error})")


def quiet(sources: list[ApiRuleSetSource], seconds: float = 0.05) -> None:
    """Until no agent has received anything for `seconds` (the status echo included)."""
    last, since = [s.bytes_received for s in sources], time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.01)
        now = [s.bytes_received for s in sources]
        if now != last:
            last, since = now, time.monotonic()


def event_bodies(local: list[dict], args, rnd: random.Random, node: int = 0):
    """(kind, pod body) events on the pods of node-<node>, interleaved kinds; new IPs from the
    node's pod CIDR, above the synthetic ones."""
    born = 0
    pods = list(local)
    net = f"10.{100 + node}"
    for i in range(args.events):
        for kind in ("birth", "ip", "relabel", "delete"):
            if kind == "delete":
                body = pods.pop(rnd.randrange(len(pods)))
                yield kind, body
                continue
            if kind == "birth":
                born += 1
                body = json.loads(json.dumps(rnd.choice(local)))
                body["metadata"].update(name=f"born-{node}-{born}", uid=f"born-uid-{node}-{born}")
                body["metadata"]["labels"] = {"app": rnd.choice(APPS), "tier": rnd.choice(["web", "api", "db"])}
                body["status"]["podIP"] = f"{net}.{250 + born // 250}.{born % 250 + 2}"
                pods.append(body)
            elif kind == "ip":
                body = json.loads(json.dumps(rnd.choice(pods)))
                body["status"]["podIP"] = f"{net}.{252 + i // 250}.{i % 250 + 2}"
            else:
                body = json.loads(json.dumps(rnd.choice(pods)))
                body["metadata"]["labels"]["app"] = rnd.choice([a for a in APPS if a != body["metadata"]["labels"]["app"]])
            for j, p in enumerate(pods):
                if p["metadata"]["name"] == body["metadata"]["name"]:
                    pods[j] = body
            yield kind, body


def agent_main(node: str, kubeconfig: str, netns: str, workdir: str) -> int:
    """One agent's process (each agent is a process of its own, as on a node): commands on
    stdin, one JSON answer per line on stdout.

    {"ips": [...], "want": hash}: start (veths for these addresses), answer once applied.
    {"want": hash}: wait until the agent applied this, then answer with the bytes it received
    and its assemble + apply seconds since the last answer."""
    tune_gc()
    tune_threads()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    executor = executor_in(netns) if netns != "-" else None
    agent = source = outcomes = None
    last = 0
    for line in sys.stdin:
        command = json.loads(line)
        if "ips" in command:
            ports = {ip: PodPort(f"veth{j:08x}", f"02:42:0a:{j >> 16 & 255:02x}:{j >> 8 & 255:02x}:{j & 255:02x}", 100 + j)
                     for j, ip in enumerate(command["ips"])}
            agent, source, outcomes = start_agent(node, kubeconfig, workdir,
                                                  KernelIn(executor) if executor else RecordingKernel(), ports)
        wait_applied(agent, command["want"], 600)
        quiet([source], 0.3 if "ips" in command else 0.05)
        assembling = sum(source.assembled_in)
        seconds = sum(o.seconds for o in outcomes if o.kind != "skipped") + assembling
        syncs = "+".join(o.kind for o in outcomes if o.kind not in ("skipped", "noop")) or "none"
        outcomes.clear()
        source.assembled_in.clear()
        answer = {"bytes": source.bytes_received - last, "seconds": seconds, "assembling": assembling, "syncs": syncs,
                  "pods": len(agent.applied_object.spec.pods), "rss": memory_mb()}
        last = source.bytes_received
        print(json.dumps(answer), flush=True)
    if agent is not None:
        agent.stop()
        source.close()
    if executor is not None:
        executor.shutdown(wait=True)
    return 0


class AgentProcess:
    def __init__(self, node: str, kubeconfig: str, netns: str, workdir: str):
        self.process = subprocess.Popen([sys.executable, __file__, "--agent", node, kubeconfig, netns, workdir],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("an agent's process ended")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def main() -> int:
    if sys.argv[1:2] == ["--agent"]:
        return agent_main(*sys.argv[2:6])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_cluster_arguments(ap)
    ap.add_argument("--local-pods", type=int, default=110)
    ap.add_argument("--events", type=int, default=100, help="events of each kind")
    ap.set_defaults(nodes=None)
    args = ap.parse_args()
    if args.nodes is None:
        args.nodes = -(-args.pods // 110) + 1
    if not 2 <= args.nodes <= MAX_NODES:
        ap.error(f"--nodes must be 2 to {MAX_NODES} (the synthetic pod CIDRs); "
                 f"{args.pods} pods at kubelet's 110 a node would need {args.nodes}: give --nodes")
    tune_gc()  # as every netfence process does at start
    tune_threads()
    if os.geteuid() != 0:
        print("bench/scale.py needs root (the local agent loads nftables in a network namespace)", file=sys.stderr)
        return 2

    global SERVER_PROCESS
    server = SERVER_PROCESS = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT / "tests")], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, text=True)
    netns = f"nf-bench-scale-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    workdir = tempfile.mkdtemp(prefix="nf-bench-scale-")
    try:
        port = int(server.stdout.readline())
        kubeconfig = Path(workdir) / "kubeconfig.json"
        kubeconfig.write_text(json.dumps(kubeconfig_for(f"http://127.0.0.1:{port}")))
        return asyncio.run(run(args, str(kubeconfig), netns, workdir))
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        server.stdin.close()
        server.wait(30)


async def run(args, kubeconfig: str, netns: str, workdir: str) -> int:
    rnd = random.Random(11)
    local: list[dict] = []
    remote: list[dict] = []
    t0 = time.perf_counter()
    state = ClusterState()
    for doc in cluster_documents(args, local, remote):
        state.observe(doc["kind"], doc)
    t_observe = time.perf_counter() - t0
    client = kubernetes.config.new_client_from_config_dict(json.loads(Path(kubeconfig).read_text()))
    client.configuration.connection_pool_maxsize = 16
    api = CountingKubeApi(client)
    publisher = Publisher(state, api, ControllerMetrics(), debounce=0.0)
    t0 = time.perf_counter()
    await publisher._load_published()
    state.mark_all_dirty(publisher.published)
    assert await publisher._round(), "the initial publish failed"
    t_publish = time.perf_counter() - t0
    freeze_heap()  # as Publisher.run does after its initial sync
    SERVER_PROCESS.stdin.write("freeze\n")
    SERVER_PROCESS.stdin.flush()
    rss_synced, peak_synced = memory_mb("VmRSS"), memory_mb()  # before this benchmark lists every object
    pauses: list[float] = []
    started_gc: list[float] = []

    def gc_timer(phase, info):
        if phase == "start":
            started_gc[:] = [time.perf_counter()]
        elif started_gc and info.get("generation") == 2:
            pauses.append(time.perf_counter() - started_gc[0])

    gc.callbacks.append(gc_timer)
    initial_bytes = api.bytes_written

    compiler = state.compiler
    agents = {LOCAL: AgentProcess(LOCAL, kubeconfig, netns, workdir), REMOTE: AgentProcess(REMOTE, kubeconfig, "-", workdir)}

    def ask_all(wants: dict[str, dict]) -> dict[str, dict]:
        answers: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda n=n: answers.__setitem__(n, agents[n].ask(wants[n]))) for n in wants]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return answers

    def hashes() -> dict[str, dict]:
        return {n: {"want": compiler.node_spec(n).content_hash()} for n in (LOCAL, REMOTE)}

    t0 = time.perf_counter()
    wants = hashes()
    # veths for the local pods and for the addresses events will give (births, new IPs), made up
    # front: the agents are stopped while the controller works, so none can be "discovered" just
    # before its pod is published (bench/agent_events.py measures that order, holds included).
    wants[LOCAL]["ips"] = [d["status"]["podIP"] for d in local] + \
        [f"10.100.{250 + b // 250}.{b % 250 + 2}" for b in range(1, args.events + 1)] + \
        [f"10.100.{252 + i // 250}.{i % 250 + 2}" for i in range(args.events)]
    wants[REMOTE]["ips"] = []
    started = await asyncio.to_thread(ask_all, wants)
    t_agents = time.perf_counter() - t0

    published_at: list[float] = []
    published_cpu: list[float] = []
    publish = publisher._publish

    async def timed_publish(dirty):
        try:
            return await publish(dirty)
        finally:
            published_at.append(time.perf_counter())
            published_cpu.append(time.process_time())

    publisher._publish = timed_publish  # type: ignore[method-assign]
    rows: dict[str, dict[str, list[float]]] = {}
    own, elsewhere = event_bodies(local, args, rnd, 0), event_bodies(remote, args, rnd, 1)
    # The two nodes' events interleaved at random, each node's in the order they were made (a pod
    # is born before it changes, and changes before it is deleted).
    queues = [[(f"{kind} of a pod of {LOCAL}", body) for kind, body in own][::-1],
              [(f"{kind} of a pod of {REMOTE}", body) for kind, body in elsewhere][::-1]]
    events = []
    while any(queues):
        events.append(rnd.choice([q for q in queues if q]).pop())
    for kind, body in events:
        w0, o0 = api.bytes_written, api.objects_written
        published_at.clear()
        published_cpu.clear()
        for process in agents.values():  # agents run on other machines: not on the controller's 2 CPUs
            process.process.send_signal(signal.SIGSTOP)
        cpu0, t0 = time.process_time(), time.perf_counter()
        if kind.startswith("delete"):
            state.forget("Pod", body)
        else:
            state.observe("Pod", body)
        assert await publisher._round(), "a publish round failed"
        controller_s = (published_at[0] if published_at else time.perf_counter()) - t0  # no node changed: nothing to write
        controller_cpu = (published_cpu[0] if published_cpu else time.process_time()) - cpu0
        # One agent at a time, each with the CPUs to itself as on its own node (the remote agent's
        # events wait in its socket meanwhile; only its bytes are counted).
        wants, measured = hashes(), {}
        for name, process in agents.items():
            process.process.send_signal(signal.SIGCONT)
            measured[name] = await asyncio.to_thread(process.ask, wants[name])
        row = rows.setdefault(kind, {k: [] for k in ("written", "objects", "controller", "cpu", "local", "remote",
                                                     "agent", "assembling", "syncing", "syncs")})
        mine = kind.endswith(LOCAL)
        row["written"].append(api.bytes_written - w0)
        row["objects"].append(api.objects_written - o0)
        row["controller"].append(controller_s)
        row["cpu"].append(controller_cpu)
        row["local"].append(measured[LOCAL if mine else REMOTE]["bytes"])  # the pod's own node's agent
        row["remote"].append(measured[REMOTE if mine else LOCAL]["bytes"])  # another node's agent
        row["agent"].append(measured[LOCAL]["seconds"])
        row["assembling"].append(measured[LOCAL]["assembling"])
        row["syncing"].append(measured[LOCAL]["seconds"] - measured[LOCAL]["assembling"])
        row["syncs"].append(measured[LOCAL]["syncs"])
    for process in agents.values():
        process.close()
    controller_rss = memory_mb()  # before the listing below, which is this benchmark's, not the controller's
    sizes: dict[str, list[int]] = {}
    for plural in ("noderulesets", "peergroupslices"):
        items = (await asyncio.to_thread(api.list_objects, plural)).values()
        sizes[plural] = [compact(o) for o in items]
    local_pods = started[LOCAL]["pods"]
    start_bytes = (started[LOCAL]["bytes"], started[REMOTE]["bytes"])
    agents_rss = (started[LOCAL]["rss"], started[REMOTE]["rss"])

    kb = 1024
    print(f"cluster: {args.pods} pods, {args.policies} policies, {args.namespaces} namespaces, {args.nodes} nodes; "
          f"{LOCAL} holds {local_pods} policed pods")
    print(f"machine: {machine()}")
    count = {p: len(v) for p, v in sizes.items()}
    print(f"objects: {count['noderulesets']} NodeRuleSets, {count['peergroupslices']} PeerGroupSlices "
          f"(groups {'inline' if publisher.inline else 'in slices'}); {sum(map(sum, sizes.values())) / kb / kb:.1f} MiB in all")
    largest = {p: max(v) / kb for p, v in sizes.items() if v}
    print("largest object: " + ", ".join(f"{p} {v:.1f} KiB" for p, v in largest.items())
          + "   (target <= 512 KiB)")
    print(f"controller: state fed in {t_observe:.1f} s, initial publish {t_publish:.1f} s "
          f"({initial_bytes / kb / kb:.1f} MiB written); controller process RSS {rss_synced:.0f} MB after it, "
          f"peak {peak_synced:.0f} MB; peak after the events {controller_rss:.0f} MB"
          f"   (target <= 1 GiB at 100k pods); full GC collections during the events: {len(pauses)}"
          f"{f', longest {max(pauses) * 1000:.0f} ms' if pauses else ''}")
    print(f"agents: both applied {t_agents:.1f} s after start; received at start: {LOCAL} "
          f"{start_bytes[0] / kb / kb:.1f} MiB, {REMOTE} {start_bytes[1] / kb / kb:.1f} MiB; peak RSS of their processes "
          f"{agents_rss[0]:.0f} MB, {agents_rss[1]:.0f} MB (peak, at start)")
    print()
    print(f"per pod event ({args.events} of each kind and place, interleaved)   median / p99 / max")
    for kind, row in sorted(rows.items(), key=lambda kv: (kv[0].split()[-1], kv[0])):
        print(f"  {kind}:")
        print(f"    bytes written to the API       {statistics.median(row['written']) / kb:7.1f} / "
              f"{pct(row['written'], .99) / kb:7.1f} / {max(row['written']) / kb:7.1f} KiB"
              f"   ({statistics.median(row['objects']):.0f} / {max(row['objects']):.0f} objects)")
        print(f"    bytes the pod's agent received {statistics.median(row['local']) / kb:7.1f} / "
              f"{pct(row['local'], .99) / kb:7.1f} / {max(row['local']) / kb:7.1f} KiB")
        print(f"    bytes another agent received   {statistics.median(row['remote']) / kb:7.1f} / "
              f"{pct(row['remote'], .99) / kb:7.1f} / {max(row['remote']) / kb:7.1f} KiB")
        print(f"    controller compile + publish   {statistics.median(row['controller']) * 1000:7.1f} / "
              f"{pct(row['controller'], .99) * 1000:7.1f} / {max(row['controller']) * 1000:7.1f} ms"
              f"   (CPU of the controller's process {statistics.median(row['cpu']) * 1000:.1f} / "
              f"{pct(row['cpu'], .99) * 1000:.1f} ms)")
        print(f"    {LOCAL}'s agent: assemble+apply {statistics.median(row['agent']) * 1000:7.1f} / "
              f"{pct(row['agent'], .99) * 1000:7.1f} / {max(row['agent']) * 1000:7.1f} ms"
              f"   (assembling {statistics.median(row['assembling']) * 1000:.1f} / {max(row['assembling']) * 1000:.1f}"
              f" ms; syncs: {', '.join(f'{n}x {k}' for k, n in collections.Counter(row['syncs']).most_common())})")
        print(f"      of which the syncs             {statistics.median(row['syncing']) * 1000:7.1f} / "
              f"{pct(row['syncing'], .99) * 1000:7.1f} / {max(row['syncing']) * 1000:7.1f} ms"
              "   (render + plan + nft transaction)")
    every = {k: [x for row in rows.values() for x in row[k]] for k in ("written", "local", "remote", "controller", "cpu")}
    agent = {where: [x for kind, row in rows.items() if kind.endswith(where) for x in row["agent"]] for where in (LOCAL, REMOTE)}
    own_syncs = [x for kind, row in rows.items() if kind.endswith(LOCAL) for x in row["syncing"]]
    print()
    print(f"all events, p99: written {pct(every['written'], .99) / kb:.1f} KiB (target <= 64 KiB); "
          f"one agent received {max(pct(every['local'], .99), pct(every['remote'], .99)) / kb:.1f} KiB (target <= 64 KiB); "
          f"controller {pct(every['controller'], .99) * 1000:.1f} ms (target <= 20 ms; its CPU "
          f"{pct(every['cpu'], .99) * 1000:.1f} ms, the rest is waiting for the test API server)")
    print(f"{LOCAL}'s agent ({local_pods} local pods), p99: {pct(agent[REMOTE], .99) * 1000:.1f} ms for a pod event on "
          f"another node, {pct(agent[LOCAL], .99) * 1000:.1f} ms for one of its own pods (target <= 20 ms), "
          f"{pct(own_syncs, .99) * 1000:.1f} ms of it syncing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
