"""The lab's operations: up, apply, probe, status, down (what the CLI calls)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from netfence_api.manifests import ManifestSyntaxError, dump_yaml_all, load_documents
from netfence_lab import apilab, system
from netfence_lab.model import (
    LabPlan,
    ManifestError,
    flatten_documents,
    namespace_object,
    object_name,
    plan_lab,
    policy_label,
    pod_namespace,
    read_apply_documents,
    with_name_label,
)
from netfence_lab.state import LabState, ProcessRecord, StateStore, write_atomic
from netfence_lab.topology import Builder, cni_results_dir, env_with_source_roots, tail, teardown

HERE = Path(__file__).resolve().parent
PROBER = HERE / "prober.py"
APPLY_TIMEOUT = 30.0
AGENT_METRICS_ADDRESS = "127.0.0.1:9469"
NO_AGENT_ENV = "NETFENCE_LAB_NO_AGENT"
AGENT_ENV = "NETFENCE_LAB_AGENT"


def agent_command() -> list[str]:
    """The agent to run in each node: `netfence agent`, or $NETFENCE_LAB_AGENT (e.g. another build)."""
    custom = os.environ.get(AGENT_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "netfence_cli", "agent"]


def apply_timeout() -> float:
    return float(os.environ.get("NETFENCE_LAB_APPLY_TIMEOUT") or APPLY_TIMEOUT)


def agents_disabled() -> bool:
    return os.environ.get(NO_AGENT_ENV, "") not in ("", "0", "false", "no")


def load_manifests(paths: Iterable[str]) -> list[dict[str, Any]]:
    docs: list[Any] = []
    for p in paths:
        try:
            text = sys.stdin.read() if p == "-" else Path(p).read_text()
        except OSError as e:
            raise ManifestError(f"cannot read {p}: {e.strerror}") from None
        try:
            docs.extend(load_documents(text))
        except ManifestSyntaxError as e:
            raise ManifestError(f"{p}: {e}") from None
    return flatten_documents(docs)


@dataclass
class UpResult:
    plan: LabPlan
    seconds: float
    agents: bool


class Lab:
    def __init__(self, store: StateStore | None = None):
        self.store = store or StateStore()

    # ------------------------------------------------------------------ up
    def up(self, docs: Sequence[dict[str, Any]], nodes: int | None = None, agents: bool | None = None,
           kubeconfig: str | None = None, controller: bool = False) -> UpResult:
        """Build the lab for these manifests. On any failure (also Ctrl-C) remove what was made.

        kubeconfig: act as kubelet for the lab's nodes on that API server, agents in API mode
        (apilab.py); controller: also run `netfence controller` on it."""
        agents = (not agents_disabled()) if agents is None else agents
        if controller and not kubeconfig:
            raise ManifestError("--controller needs --kubeconfig: the controller runs on an API server")
        if kubeconfig and not Path(kubeconfig).is_file():
            raise ManifestError(f"--kubeconfig {kubeconfig}: no such file")
        plan = plan_lab(docs, node_count=nodes)
        t0 = time.monotonic()
        if agents:  # reject input the compiler refuses before building anything
            compile_rule_sets(plan.node_objects + plan.namespaces + plan.pod_objects + plan.policies, [n.name for n in plan.nodes])
        with self.store.locked():
            old = self.store.load()
            if old is not None:
                raise system.LabError(
                    f"a lab is already recorded in {self.store.root} (phase {old.phase}); run `netfence lab down` first"
                )
            state = LabState(agents=agents, plan=plan.to_dict(), policies=[] if kubeconfig else plan.policies,
                             kubeconfig=str(Path(kubeconfig).resolve()) if kubeconfig else None, controller=controller)
            self.store.save(state)
            try:
                self._build(plan, state)
                if state.on_api:
                    apilab.bring_up(self, state, plan)
                state.phase = "up"
                self.store.save(state)
                if agents and not state.on_api:
                    self._publish(state)  # generation 1: the cluster file's policies (often none)
            except BaseException:
                if os.environ.get("NETFENCE_LAB_KEEP_ON_FAILURE") != "1":
                    self._tear_down(state)
                raise
        return UpResult(plan, time.monotonic() - t0, agents)

    def _build(self, plan: LabPlan, state: LabState) -> None:
        b = Builder(self.store, state)
        self._write_cluster_yaml(plan, state)
        b.build_underlay(plan)
        for node in plan.nodes:
            b.build_node(plan, node)
        if state.on_api:
            return  # pods, agents: the lab's kubelet and apilab.bring_up
        for pod in plan.pods:
            b.build_pod(plan, pod)
            _crash_point("pod")
        b.wait_servers(plan.pods)
        for pod in plan.pods:
            for p in pod.skipped:
                state.notes.append(f"{pod.key}: {p.port}/SCTP not served (no SCTP sockets on this kernel)")
        if state.agents:
            for node in plan.nodes:
                self._start_agent(state, node.name)

    def _start_agent(self, state: LabState, node: str) -> None:
        plan = state.lab_plan()
        ndir = self.store.node_dir(node)
        if state.on_api:  # watching its NodeRuleSet through the API relay in its namespace
            source = ["--kubeconfig", state.agent_kubeconfig or state.kubeconfig or ""]
        else:
            source = ["--rules-file", str(ndir / "rules.json"), "--status-file", str(ndir / "status.json")]
        argv = [
            "ip", "netns", "exec", plan.node(node).netns,
            *agent_command(),
            "--node", node,
            *source,
            "--metrics-bind-address", AGENT_METRICS_ADDRESS,
            "--netns-dir", str(system.NETNS_DIR),
            "--cni-dir", str(cni_results_dir(self.store, node)),
        ]
        log = ndir / "agent.log"
        pid, start = system.spawn(argv, log, env=env_with_source_roots())
        state.processes.append(ProcessRecord(pid, start, "agent", node, plan.node(node).netns, str(log)))
        self.store.save(state)

    # ------------------------------------------------------------------ apply
    def apply(self, docs: Sequence[dict[str, Any]]) -> int:
        """Declarative: the files' NetworkPolicies are the whole desired set; Namespaces and Pods
        update the labels of the lab's objects of the same name. Returns the generation applied."""
        with self.store.locked():
            state = self._require_up()
            plan = state.lab_plan()
            node_names = [n.name for n in plan.nodes]
            request = read_apply_documents(docs, node_names)
            if request.ignored_kinds:
                print(f"note: ignoring kinds the lab does not model: {', '.join(sorted(request.ignored_kinds))}", file=sys.stderr)
            if state.on_api:
                if not state.agents:
                    raise system.LabError(f"the lab runs without agents ({NO_AGENT_ENV}=1 at `lab up`): nothing enforces policies")
                return apilab.apply(self, state, request)
            for name, labels in request.namespace_labels.items():
                _update_namespace(plan, name, labels)
            for (namespace, name), labels in request.pod_labels.items():
                _update_pod(plan, namespace, name, labels)
            policies = request.policies
            # Compile before recording: input the compiler rejects never becomes the lab's state.
            specs = compile_rule_sets(plan.node_objects + plan.namespaces + plan.pod_objects + policies, node_names)
            state.plan = plan.to_dict()
            state.policies = policies
            if not state.agents:
                self.store.save(state)
                self._write_cluster_yaml(plan, state)
                raise system.LabError(
                    f"the lab runs without agents ({NO_AGENT_ENV}=1 at `lab up`): the desired state is recorded "
                    "but nothing enforces it"
                )
            return self._publish(state, specs)

    def _write_cluster_yaml(self, plan: LabPlan, state: LabState) -> None:
        text = dump_yaml_all(self._cluster_docs(plan, state))  # libyaml: 5x faster at 500 policies
        write_atomic(self.store.root / "cluster.yaml", text)

    def _cluster_docs(self, plan: LabPlan, state: LabState) -> list[dict[str, Any]]:
        return plan.node_objects + plan.namespaces + plan.pod_objects + state.policies

    def _publish(self, state: LabState, specs: dict[str, Any] | None = None) -> int:
        """Hand each agent its rule set (compiled for the lab's current objects), wait for all."""
        plan = state.lab_plan()
        if specs is None:
            specs = compile_rule_sets(self._cluster_docs(plan, state), [n.name for n in plan.nodes])
        from netfence_api import NodeRuleSet

        state.generation += 1
        gen = state.generation
        self.store.save(state)
        for node, spec in specs.items():
            rs = NodeRuleSet.for_node(spec, generation=gen)
            write_atomic(self.store.node_dir(node) / "rules.json", rs.model_dump_json(indent=1))
        # The lab's own record of its objects comes after the rule sets: agents need not wait for it.
        self._write_cluster_yaml(plan, state)
        self.wait_applied(state, gen)
        return gen

    def wait_applied(self, state: LabState, generation: int, timeout: float | None = None) -> None:
        timeout = apply_timeout() if timeout is None else timeout
        plan = state.lab_plan()
        agents = {r.owner: r for r in state.processes if r.role == "agent"}
        pending = {n.name for n in plan.nodes}
        # Every node's answer is awaited, so the error names all the nodes that failed, not
        # whichever one happened to write its status first.
        failures: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while True:
            for node in sorted(pending):
                status = read_status(self.store.node_dir(node) / "status.json")
                if status.get("observedGeneration") == generation:
                    failed = [c for c in status.get("conditions") or [] if c.get("type") == "Applied" and c.get("status") == "False"]
                    if failed:
                        c = failed[0]
                        failures[node] = f"agent of node {node} failed to apply generation {generation}: {c.get('reason')}: {c.get('message')}"
                    pending.discard(node)
                    continue
                rec = agents.get(node)
                if rec is None or not system.is_alive(rec.pid, rec.starttime):
                    log = self.store.node_dir(node) / "agent.log"
                    failures[node] = f"agent of node {node} is not running: {tail(log)}"
                    pending.discard(node)
            if not pending and failures:
                raise system.LabError("; ".join(failures[n] for n in sorted(failures)))
            if not pending:
                return
            if time.monotonic() > deadline:
                detail = "; ".join(
                    f"{n}: observedGeneration {read_status(self.store.node_dir(n) / 'status.json').get('observedGeneration')}"
                    for n in sorted(pending)
                )
                raise system.LabError("; ".join([failures[n] for n in sorted(failures)]
                                                + [f"agents did not apply generation {generation} within {timeout:.0f}s ({detail})"]))
            time.sleep(0.05)

    # ------------------------------------------------------------------ probe
    def probe(self, port: int, protocol: str, from_nodes: bool = False, connect_timeout: float = 1.0) -> dict[str, dict[str, bool]]:
        state = self._require_up()
        plan = self.current_plan(state)
        return probe_matrix(plan, port, protocol, from_nodes=from_nodes, connect_timeout=connect_timeout)

    def current_plan(self, state: LabState) -> LabPlan:
        """Nodes and pods as they are now (on an API server, pods come and go through it)."""
        return apilab.current_plan(self, state) if state.on_api else state.lab_plan()

    # ------------------------------------------------------------------ status / down
    def status(self) -> dict[str, Any]:
        state = self.store.load()
        if state is None:
            return {"dir": str(self.store.root), "up": False}
        plan = self.current_plan(state) if state.plan else None
        procs = {(r.role, r.owner): r for r in state.processes}
        if state.on_api:
            from netfence_lab.kubelet import kubelet_store

            record = kubelet_store(self.store.root).load()
            procs.update({(r.role, r.owner): r for r in (record.processes if record else [])})

        def alive(role: str, owner: str) -> bool:
            r = procs.get((role, owner))
            return bool(r and system.is_alive(r.pid, r.starttime))

        out: dict[str, Any] = {
            "dir": str(self.store.root),
            "up": state.phase == "up",
            "phase": state.phase,
            "agents": state.agents,
            "generation": state.generation,
            "policies": [policy_label(p) for p in state.policies],
            "kubeconfig": state.kubeconfig,
            "controller": alive("controller", "lab") if state.controller else None,
            "kubelet": alive("kubelet", "lab") if state.on_api else None,
            "netns": [{"name": n, "exists": system.netns_exists(n)} for n in state.netns],
            "notes": state.notes,
        }
        if plan:
            # The agents report in their rule set's status: a file beside the rules, or the
            # NodeRuleSet's status on the API.
            reported = apilab.agent_statuses(state) if state.on_api else {
                n.name: read_status(self.store.node_dir(n.name) / "status.json") for n in plan.nodes}
            out["nodes"] = [
                {
                    "name": n.name,
                    "netns": n.netns,
                    "internalIP": n.underlay_ip,
                    "podCIDR": n.pod_cidr,
                    "agent": (alive("agent", n.name) if state.agents else None),
                    "observedGeneration": reported.get(n.name, {}).get("observedGeneration"),
                    "generation": reported.get(n.name, {}).get("generation"),
                }
                for n in plan.nodes
            ]
            if "" in reported:
                out["notes"] = [*out["notes"], f"cannot read the NodeRuleSets: {reported['']['error']}"]
            out["pods"] = [
                {
                    "pod": p.key,
                    "node": p.node,
                    "ip": p.ip,
                    "netns": p.netns,
                    "hostNetwork": p.host_network,
                    "ports": [f"{x.port}/{x.protocol}" for x in p.ports],
                    "server": alive("server", p.key),
                }
                for p in plan.pods
            ]
        return out

    def down(self) -> list[str]:
        if not self.store.root.is_dir():
            return []
        with self.store.locked():
            state = self.store.load()
            if state is None:
                return []
            state.phase = "down"
            self.store.save(state)
            return self._tear_down(state)

    def _tear_down(self, state: LabState) -> list[str]:
        return apilab.tear_down(self, state) if state.on_api else teardown(self.store, state)

    def _require_up(self) -> LabState:
        state = self.store.load()
        if state is None:
            raise system.LabError(f"no lab is up (nothing recorded in {self.store.root}); run `netfence lab up -f CLUSTER.yaml`")
        if state.phase != "up":
            raise system.LabError(f"the lab in {self.store.root} is {state.phase}, not up; run `netfence lab down` and up again")
        return state

    def wait_converged(self, timeout: float | None = None) -> int:
        """On an API server: until every NodeRuleSet is what compile gives for the API's objects
        and every agent applied it (after changes made through the API by others)."""
        state = self._require_up()
        if not state.on_api:
            raise system.LabError("the lab is not on an API server")
        api = apilab.LabApi(state.kubeconfig or "")
        try:
            return apilab.wait_applied(self, state, api, timeout)
        finally:
            api.close()

    def restart(self, role: str, owner: str = "lab") -> None:
        """Kill one of the lab's processes (SIGKILL, as a crash) and start it again:
        role "agent" with owner = node name; on an API server also "controller", "kubelet"."""
        with self.store.locked():
            state = self._require_up()
            rec = next((r for r in state.processes if r.role == role and r.owner == owner), None)
            if rec is None:
                raise system.LabError(f"the lab runs no {role} {owner}")
            system.kill([(rec.pid, rec.starttime)])
            state.processes.remove(rec)
            self.store.save(state)
            if role == "agent":
                self._start_agent(state, owner)
            elif role == "controller":
                apilab._spawn(self, state, "controller", apilab.controller_command(state.kubeconfig or ""))
            elif role == "kubelet":
                apilab._spawn(self, state, "kubelet", apilab.kubelet_command(self, state))
            else:
                raise system.LabError(f"the lab cannot restart its {role}")

    def cluster_file(self) -> Path:
        """A manifest of the lab's current objects (nodes, namespaces, pods with IPs, policies)."""
        return self.store.root / "cluster.yaml"

    def node_metrics(self, node: str, timeout: float = 5.0) -> str:
        state = self._require_up()
        return read_node_metrics(state.lab_plan().node(node).netns, timeout=timeout)


# ---------------------------------------------------------------------- apply helpers
def _update_namespace(plan: LabPlan, name: str, labels: dict[str, str]) -> None:
    for ns in plan.namespaces:
        if ns["metadata"]["name"] == name:
            ns["metadata"]["labels"] = dict(labels)
            ns.update(with_name_label(ns))
            return
    new = namespace_object(name)
    new["metadata"]["labels"] = dict(labels)
    plan.namespaces.append(with_name_label(new))


def _update_pod(plan: LabPlan, namespace: str, name: str, labels: dict[str, str]) -> None:
    for obj in plan.pod_objects:
        if (pod_namespace(obj), object_name(obj)) == (namespace, name):
            obj["metadata"]["labels"] = dict(labels)
            return
    raise ManifestError(f"Pod {namespace}/{name}: not in the lab; `lab apply` changes labels of the lab's pods, bring new pods up with `lab up`")


def read_status(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    # The file may hold a bare status or a whole NodeRuleSet with .status.
    if isinstance(data, dict) and isinstance(data.get("status"), dict):
        return data["status"]
    return data if isinstance(data, dict) else {}


def compile_rule_sets(objects: list[dict[str, Any]], nodes: list[str]) -> dict[str, Any]:
    """NodeRuleSetSpec per lab node, from the same compiler the controller runs."""
    try:
        from netfence_operator.compile import compile_cluster, parse_documents
    except ImportError as e:
        raise system.LabError(f"the compiler is not available ({e})") from None
    from netfence_api import NodeRuleSetSpec

    try:
        parsed = parse_documents([("lab", o) for o in objects])
        specs = dict(compile_cluster(parsed))
    except ValueError as e:  # the compiler's InputError: every problem names object and field
        raise ManifestError(str(e)) from None
    # Every node gets a rule set, also one without pods of its own.
    return {n: specs.get(n) or NodeRuleSetSpec(nodeName=n) for n in nodes}


# ---------------------------------------------------------------------- probing
def probe_matrix(
    plan: LabPlan,
    port: int,
    protocol: str,
    from_nodes: bool = False,
    connect_timeout: float = 1.0,
) -> dict[str, dict[str, bool]]:
    """Connect from every pod (or every node) to every pod (every local pod) in parallel.

    One prober process per source namespace, all at once; inside each, all targets at once.
    Rows are sources; a node's row key is `node/<name>` and holds its local pods only.
    """
    protocol = protocol.upper()
    if protocol == "SCTP":
        raise system.LabError("SCTP cannot be probed here: this kernel has no SCTP sockets")
    if protocol not in ("TCP", "UDP"):
        raise ManifestError(f"--port: unknown protocol {protocol!r}")
    jobs: list[tuple[str, str, list[tuple[str, str]]]] = []  # (row key, netns, targets)
    if from_nodes:
        for n in plan.nodes:
            local = [(p.key, p.ip) for p in plan.pods if p.node == n.name]
            jobs.append((f"node/{n.name}", n.netns, local))
    else:
        targets = [(p.key, p.ip) for p in plan.pods]
        jobs = [(p.key, p.netns, targets) for p in plan.pods]
    request = {"protocol": protocol, "port": port, "connect_timeout": connect_timeout, "udp_tries": 3, "udp_wait": 0.5}
    procs = []
    for key, netns, targets in jobs:
        argv = ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", str(PROBER)]
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((key, p, json.dumps({**request, "targets": targets}), [t for t, _ in targets]))
    # Feed every prober before reading any: they all run at once.
    for _, p, req, _ in procs:
        assert p.stdin is not None
        p.stdin.write(req)
        p.stdin.close()
        p.stdin = None  # so communicate() below only reads
    matrix: dict[str, dict[str, bool]] = {}
    deadline = time.monotonic() + 10 + 3 * connect_timeout
    errors: list[str] = []
    for key, p, _, order in procs:
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            errors.append(f"{key}: prober timed out")
            continue
        if p.returncode != 0:
            errors.append(f"{key}: prober exited {p.returncode}: {err.strip().splitlines()[-1:] or ''}")
            continue
        row = json.loads(out)
        matrix[key] = {t: bool(row[t]) for t in order}
    if errors:
        raise system.LabError("probe failed: " + "; ".join(errors))
    return matrix


def format_table(matrix: dict[str, dict[str, bool]]) -> str:
    rows = list(matrix)
    cols: list[str] = []
    for r in rows:
        for c in matrix[r]:
            if c not in cols:
                cols.append(c)
    w = max([len(x) for x in rows + cols] + [1]) + 1
    lines = ["-".ljust(w) + "".join(c.ljust(w) for c in cols).rstrip()]
    for r in rows:
        cells = [(("." if matrix[r][c] else "X") if c in matrix[r] else " ").ljust(w) for c in cols]
        lines.append(r.ljust(w) + "".join(cells).rstrip())
    return "\n".join(lines)


def matrix_json(port: int, protocol: str, matrix: dict[str, dict[str, bool]]) -> str:
    return json.dumps({"port": f"{port}/{protocol.upper()}", "matrix": matrix})


# ---------------------------------------------------------------------- metrics
_FETCH = (
    "import sys,urllib.request as u\n"
    "o=u.build_opener(u.ProxyHandler({}))\n"
    "sys.stdout.write(o.open(sys.argv[1],timeout=float(sys.argv[2])).read().decode())\n"
)


def read_node_metrics(netns: str, address: str = AGENT_METRICS_ADDRESS, timeout: float = 5.0) -> str:
    """The agent's /metrics, fetched from inside its node namespace (where it listens)."""
    return system.run(
        ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-c", _FETCH, f"http://{address}/metrics", str(timeout)],
        timeout=timeout + 5,
    )


def metric_lines(text: str, name: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith(name + "{") or l.startswith(name + " ")]


# ---------------------------------------------------------------------- test hook
def _crash_point(where: str) -> None:
    """NETFENCE_LAB_CRASH_AFTER_PODS=N: die hard after N pods, to test `lab down` after a crash."""
    limit = os.environ.get("NETFENCE_LAB_CRASH_AFTER_PODS")
    if not limit or where != "pod":
        return
    global _crash_count
    _crash_count += 1
    if _crash_count >= int(limit):
        os._exit(70)


_crash_count = 0
