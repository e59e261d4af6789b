"""Random histories of one cluster as the agents of its nodes meet them: pods of a node born,
deleted, relabelled, given a new IP or a second (IPv6) address, policies added or removed,
veths found, lost or renamed, new pods held or released, drop logging switched.

Built on reference.strategies' clusters; used by the partial-render property test
(tests/unit/test_render_update.py) and its real-kernel twin (tests/kernel/test_render_update_kernel.py).
"""

from __future__ import annotations

import copy

from hypothesis import strategies as st

import netfence_api
from netfence_agent.render import HeldPort, Holds, PodPort, RenderOptions
from netfence_cli.offline import synthetic_port
from netfence_operator.compile import ClusterObjects, Compiler, parse_object
from reference.builders import pod
from reference.strategies import POD_LABEL_KEYS, labels, policy_spec, scenarios

EVENTS = ("born", "deleted", "relabelled", "new_ip", "dual_stack", "policy", "veth", "hold", "options", "nothing")
Step = tuple  # (event, documents after it, veth change or None, Holds, RenderOptions)


@st.composite
def histories(draw) -> tuple[list[dict], list[Step]]:
    """A cluster's documents, and steps: (event, the documents after it, a veth change
    (namespace, name, "lost"|"renamed"|"no_mac"|"back") or None, the holds, the options).
    A veth change applies from its step on; the first render uses the first step's options."""
    scenario = draw(scenarios(cluster_policies=draw(st.booleans())))
    docs = copy.deepcopy(scenario.docs)
    steps = []
    born = 0
    options = RenderOptions(log_drops=draw(st.booleans()))
    for _ in range(draw(st.integers(1, 6))):
        event = draw(st.sampled_from(EVENTS))
        pods = [d for d in docs if d["kind"] == "Pod" and not d["spec"].get("hostNetwork")]
        namespaces = sorted({d["metadata"]["namespace"] for d in docs if d["kind"] == "Pod"})
        target = draw(st.sampled_from(pods)) if pods else None
        veth_change = None
        if event == "born" or (target is None and event in ("deleted", "relabelled", "new_ip", "dual_stack")):
            born += 1
            node = draw(st.sampled_from([d["metadata"]["name"] for d in docs if d["kind"] == "Node"]))
            index = int(node.rsplit("-", 1)[1])
            all_pods = [d for d in docs if d["kind"] == "Pod"]
            base = copy.deepcopy(draw(st.sampled_from(all_pods))) if all_pods else pod("alpha/x", "10.244.1.99")
            base["metadata"].update(name=f"born{born}", namespace=draw(st.sampled_from(namespaces or ["alpha"])),
                                    labels=draw(labels(POD_LABEL_KEYS)))
            base["spec"]["nodeName"] = node
            base["spec"].pop("hostNetwork", None)
            base["status"]["podIP"] = f"10.244.{index}.{100 + born}"
            base["status"]["podIPs"] = [{"ip": base["status"]["podIP"]}]
            docs.append(base)
        elif event == "deleted":
            docs.remove(target)
        elif event == "relabelled":
            target["metadata"]["labels"] = draw(labels(POD_LABEL_KEYS))
        elif event in ("new_ip", "dual_stack"):
            index = int(target["spec"]["nodeName"].rsplit("-", 1)[1])
            born += 1
            ips = [f"10.244.{index}.{150 + born}"] + ([f"fd00:{index}::{born:x}"] if event == "dual_stack" else [])
            target["status"]["podIP"] = ips[0]
            target["status"]["podIPs"] = [{"ip": ip} for ip in ips]
        elif event == "policy":
            policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
            if policies and draw(st.booleans()):
                docs.remove(draw(st.sampled_from(policies)))
            else:
                anchors = sorted({d["status"]["podIP"] for d in docs if d["kind"] == "Pod"}) or ["10.244.1.10"]
                namespaces = namespaces or ["alpha"]
                docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                             "metadata": {"name": f"new{born}", "namespace": draw(st.sampled_from(namespaces))},
                             "spec": draw(policy_spec(anchors, namespaces))})
                born += 1
        elif event == "veth" and target is not None:
            # A veth found later, lost, or replaced (new name and ifindex), or known without its MAC.
            veth_change = (target["metadata"]["namespace"], target["metadata"]["name"],
                           draw(st.sampled_from(["lost", "renamed", "no_mac", "back"])))
        held = tuple(
            HeldPort(PodPort(f"vethheld{i}", draw(st.sampled_from([None, f"02:00:00:00:ff:0{i}"])), 900 + i),
                     tuple(draw(st.lists(st.sampled_from(["10.244.1.240", "10.244.2.241", "10.244.3.242", "fd00:9::1"]),
                                         unique=True, max_size=2))))
            for i in range(draw(st.integers(0, 2))))
        holds = Holds(draw(st.booleans()), held, tuple(PodPort(f"vethpass{i}") for i in range(draw(st.integers(0, 1)))))
        if event == "options":
            options = RenderOptions(log_drops=not options.log_drops)
        steps.append((event, copy.deepcopy(docs), veth_change, holds, options))
    return scenario.docs, steps


def node_specs(docs: list[dict]) -> dict[str, netfence_api.NodeRuleSetSpec]:
    objects = ClusterObjects()
    for doc in docs:
        objects.add(parse_object(doc))
    return Compiler(objects).all_specs()


def ports_of(spec: netfence_api.NodeRuleSetSpec, veths: dict[tuple[str, str], str]) -> dict[str, PodPort]:
    """The node's veths as discovery reports them: pod IP -> host side veth."""
    ports = {}
    for pod in spec.pods:
        state = veths.get((pod.namespace, pod.name), "back")
        if state == "lost":
            continue
        port = synthetic_port(pod.namespace, pod.name)
        if state == "renamed":
            port = PodPort(port.ifname[:-1] + "r", port.mac, port.ifindex + 1)
        elif state == "no_mac":
            port = PodPort(port.ifname, None, port.ifindex)
        ports.update({ip: port for ip in pod.ips})
    return ports


def steps_of(history) -> list[tuple[list[dict], dict[tuple[str, str], str], Holds, RenderOptions]]:
    """(documents, veth states so far, holds, options) of the first render and after each step."""
    first_docs, steps = history
    veths: dict[tuple[str, str], str] = {}
    out = [(first_docs, {}, Holds(), steps[0][4])]
    for _event, docs, veth_change, holds, options in steps:
        if veth_change is not None:
            veths[veth_change[:2]] = veth_change[2]
        out.append((docs, dict(veths), holds, options))
    return out
