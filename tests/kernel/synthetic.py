"""Synthetic NodeRuleSets of a chosen size, shaped like the compiler's output.

Used by the agent tests and by bench/apply.py and bench/datapath.py. Pure and deterministic.

Shape: `pods` local pods in 10 namespaces, `policies` policies. Policy j selects the pods whose
index is j modulo the number of policies (so every pod is isolated by about one policy for
ingress, and every other policy also isolates egress); each policy allows ingress from one peer
group on two ports and egress to another group. Peer groups are content addressed like the
compiler's: a group per distinct peer definition, members are pod IPs (local and remote) and,
for every tenth group, an ipBlock CIDR.
"""

from __future__ import annotations

import ipaddress
import random

from netfence_api import AllowRule, Isolation, NodeRuleSetSpec, PeerGroup, PolicedPod, PortRange, short_hash

POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
REMOTE_CIDR = ipaddress.ip_network("10.245.0.0/16")


def pod_ip(index: int, network: ipaddress.IPv4Network = POD_CIDR) -> str:
    return str(network.network_address + 2 + index + index // 250 * 6)  # skip .0, .1 and the top of each /24


def group_name(definition: str) -> str:
    return "pg-" + short_hash(definition, 10)


def synthetic_spec(pods: int = 1000, policies: int = 500, node: str = "bench", members: int = 20,
                   seed: int = 1, first_ip: int = 0) -> NodeRuleSetSpec:
    rnd = random.Random(seed)
    local_ips = [pod_ip(first_ip + i) for i in range(pods)]
    groups: dict[str, PeerGroup] = {}

    def group(definition: str) -> str:
        if definition not in groups:
            peers = set(rnd.sample(local_ips, min(members // 2, len(local_ips))))
            peers |= {pod_ip(rnd.randrange(60000), REMOTE_CIDR) for _ in range(members - len(peers))}
            cidrs = [f"{ip}/32" for ip in sorted(peers, key=ipaddress.ip_address)]
            if len(groups) % 10 == 0:
                cidrs.append(f"192.168.{len(groups) % 250}.0/24")
            groups[definition] = PeerGroup(name=group_name(definition), selector=definition, cidrs=cidrs)
        return groups[definition].name

    policy_rules = []
    for j in range(max(policies, 1)):
        ns = f"ns-{j % 10}"
        ingress = AllowRule(origin=[f"{ns}/policy-{j} ingress[0]"], peers=group(f"{ns} app=client-{j % 97}"),
                            ports=[PortRange(protocol="TCP", port=80), PortRange(protocol="TCP", port=8000, endPort=8080)])
        egress = AllowRule(origin=[f"{ns}/policy-{j} egress[0]"], peers=group(f"{ns} app=backend-{j % 89}"),
                           ports=[PortRange(protocol="TCP", port=5432)])
        dns = AllowRule(origin=[f"{ns}/policy-{j} egress[1]"], peers=group("kube-system k8s-app=kube-dns"),
                        ports=[PortRange(protocol="UDP", port=53), PortRange(protocol="TCP", port=53)])
        policy_rules.append((f"{ns}/policy-{j}", ingress, [egress, dns] if j % 2 else None))

    spec_pods = []
    for i, ip in enumerate(local_ips):
        if policies:
            name, ingress, egress = policy_rules[i % policies]
        else:
            name, ingress, egress = "", None, None
        spec_pods.append(PolicedPod(
            namespace=f"ns-{i % 10}", name=f"pod-{i}", uid=f"uid-{i}", ips=[ip],
            isolation=Isolation(ingress=bool(policies), egress=egress is not None),
            ingressPolicies=[name] if policies else [],
            egressPolicies=[name] if egress else [],
            ingress=[ingress] if ingress else [],
            egress=egress or [],
        ))
    return NodeRuleSetSpec(nodeName=node, pods=spec_pods, peerGroups=sorted(groups.values(), key=lambda g: g.name))


def with_member(spec: NodeRuleSetSpec, group_index: int, ip: str) -> NodeRuleSetSpec:
    """The same spec with one more member in one peer group (a pod got a matching label)."""
    groups = list(spec.peerGroups)
    g = groups[group_index]
    groups[group_index] = g.model_copy(update={"cidrs": [*g.cidrs, f"{ip}/32"]})
    return spec.model_copy(update={"peerGroups": groups})
