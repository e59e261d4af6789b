"""The NodeRuleSet contract: what the controller publishes and the agent applies.

One NodeRuleSet per node (cluster-scoped, name = node name). Its spec is complete on its own:
the agent renders nftables rules from it and its local veth map, and never reads any other
Kubernetes object. Peer address groups are content-addressed (named by a hash of the peer
definition, not of the members), so a pod joining a group changes elements only, and many
rules across policies share one group.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_GROUP = "netfence.io"
API_VERSION = "v1alpha1"
KIND = "NodeRuleSet"
PLURAL = "noderulesets"

Protocol = Literal["TCP", "UDP", "SCTP"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PortRange(_Model):
    """One protocol and a port or an inclusive range of ports."""

    protocol: Protocol = "TCP"
    port: int = Field(ge=1, le=65535)
    endPort: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _range_ordered(self) -> "PortRange":
        if self.endPort is not None and self.endPort < self.port:
            raise ValueError(f"endPort {self.endPort} is below port {self.port}")
        return self

    @property
    def last(self) -> int:
        return self.endPort if self.endPort is not None else self.port


class AllowRule(_Model):
    """One way traffic may pass in one direction of one pod.

    Matches when the peer address is in `peers` (None: any address) and the destination
    port is in `ports` (None: any protocol and port). A rule built from named ports that
    resolve per peer pod (egress) instead carries `peerPorts`: a group of
    (address, protocol, port) triples; then `peers` and `ports` are None.
    """

    origin: list[str] = Field(
        min_length=1,
        description='Policy rules this rule came from, "namespace/policy ingress[0]".',
    )
    peers: str | None = None
    ports: list[PortRange] | None = None
    peerPorts: str | None = None

    @model_validator(mode="after")
    def _peer_ports_alone(self) -> "AllowRule":
        if self.peerPorts is not None and (self.peers is not None or self.ports is not None):
            raise ValueError("peerPorts excludes peers and ports")
        return self


class TierRule(_Model):
    """One ClusterNetworkPolicy rule as it applies to one pod in one direction.

    A pod's rules of a tier are listed in evaluation order (policy priority, then policy name,
    then rule order); the first whose peers and ports match decides: Accept (allowed in this
    direction), Deny (dropped) or Pass (the rest of the tier is skipped). Peers and ports
    match like an AllowRule's; one policy rule may give two TierRules (numeric ports, and
    named ports resolved per peer pod) with the same action.
    """

    action: Literal["Accept", "Deny", "Pass"]
    policy: str = Field(description="ClusterNetworkPolicy name")
    tier: Literal["Admin", "Baseline"]
    priority: int = Field(ge=0, le=1000)
    rule: str = Field(description='"ingress[2]": where the rule is in the policy')
    name: str = Field(default="", description="the rule's own name, if it has one")
    peers: str | None = None
    ports: list[PortRange] | None = None
    peerPorts: str | None = None

    @model_validator(mode="after")
    def _peer_ports_alone(self) -> "TierRule":
        if self.peerPorts is not None and (self.peers is not None or self.ports is not None):
            raise ValueError("peerPorts excludes peers and ports")
        return self

    @property
    def origin(self) -> str:
        named = f" ({self.name})" if self.name else ""
        return f"ClusterNetworkPolicy {self.policy} tier {self.tier} priority {self.priority} {self.rule}{named}"

    @property
    def label(self) -> str:
        """The rule as metrics name it: its own name, else its place in the policy."""
        return self.name or self.rule


class Isolation(_Model):
    ingress: bool = False
    egress: bool = False


class PolicedPod(_Model):
    """A pod of this node on the pod network, with what its policies allow."""

    namespace: str
    name: str
    uid: str = ""
    ips: list[str] = Field(min_length=1)
    isolation: Isolation = Isolation()
    ingressPolicies: list[str] = Field(default_factory=list, description="namespace/name of policies isolating ingress")
    egressPolicies: list[str] = Field(default_factory=list, description="namespace/name of policies isolating egress")
    ingress: list[AllowRule] = Field(default_factory=list)
    egress: list[AllowRule] = Field(default_factory=list)
    # ClusterNetworkPolicy tiers (absent when none select the pod, so that specs without
    # them read and hash as before). Admin rules come before the NetworkPolicy rules above;
    # Baseline rules apply only in a direction no NetworkPolicy isolates.
    adminIngress: list[TierRule] | None = None
    adminEgress: list[TierRule] | None = None
    baselineIngress: list[TierRule] | None = None
    baselineEgress: list[TierRule] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def tier_rules(self, tier: str, direction: str) -> list[TierRule]:
        return getattr(self, f"{tier.lower()}{direction.capitalize()}") or []

    def all_rules(self) -> list[AllowRule | TierRule]:
        """Every rule of the pod, NetworkPolicy and ClusterNetworkPolicy: what names peer groups."""
        return [*self.ingress, *self.egress, *(self.adminIngress or ()), *(self.adminEgress or ()),
                *(self.baselineIngress or ()), *(self.baselineEgress or ())]


class PeerGroup(_Model):
    """Addresses matched by one peer definition: disjoint CIDRs, IPv4 and IPv6."""

    name: str
    selector: str = Field(description="Human-readable peer definition this group stands for.")
    cidrs: list[str] = Field(default_factory=list)


class PeerPort(_Model):
    address: str
    protocol: Protocol
    port: int = Field(ge=1, le=65535)


class PeerPortGroup(_Model):
    """(address, protocol, port) triples: a named port resolved on each peer pod."""

    name: str
    selector: str
    entries: list[PeerPort] = Field(default_factory=list)


class NodeRuleSetSpec(_Model):
    nodeName: str
    pods: list[PolicedPod] = Field(default_factory=list)
    peerGroups: list[PeerGroup] = Field(default_factory=list)
    peerPortGroups: list[PeerPortGroup] = Field(default_factory=list)

    def content_hash(self) -> str:
        """Stable hash of the spec; equal specs publish and apply as no-ops."""
        return spec_hash(self)


class Condition(_Model):
    type: Literal["Applied", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None


class NodeRuleSetStatus(_Model):
    observedGeneration: int | None = None
    appliedHash: str | None = None
    lastAppliedTime: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    generation: int | None = None
    resourceVersion: str | None = None
    uid: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class NodeRuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["netfence.io/v1alpha1"] = "netfence.io/v1alpha1"
    kind: Literal["NodeRuleSet"] = "NodeRuleSet"
    metadata: ObjectMeta
    spec: NodeRuleSetSpec
    status: NodeRuleSetStatus | None = None

    @classmethod
    def for_node(cls, spec: NodeRuleSetSpec, generation: int | None = None) -> "NodeRuleSet":
        return cls(metadata=ObjectMeta(name=spec.nodeName, generation=generation), spec=spec)


def canonical_json(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def spec_hash(spec: NodeRuleSetSpec) -> str:
    payload = canonical_json(spec.model_dump(mode="json", exclude_none=True))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def short_hash(data: object, length: int = 12) -> str:
    """Content address of a JSON-able value, used for group and object names."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:length]
