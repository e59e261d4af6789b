"""Kubernetes objects the compiler reads, as validated pydantic models.

Only the fields NetworkPolicy enforcement needs are modelled. NetworkPolicy specs are strict
(an unknown or misspelt field is an error, as with `kubectl apply --validate=strict`); Pods,
Namespaces and Nodes ignore everything else they carry.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Protocol = Literal["TCP", "UDP", "SCTP"]
METADATA_NAME_LABEL = "kubernetes.io/metadata.name"

# IANA service name, as Kubernetes validates named ports (RFC 6335 §5.1).
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*(?<!-)$")


class InputError(ValueError):
    """Bad input, with every problem naming its source, object and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- selectors
class LabelSelectorRequirement(_Strict):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None

    @model_validator(mode="after")
    def _values_fit_operator(self) -> "LabelSelectorRequirement":
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs a non-empty values list")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Strict):
    matchLabels: dict[str, str] | None = None
    matchExpressions: list[LabelSelectorRequirement] | None = None

    def is_empty(self) -> bool:
        return not self.matchLabels and not self.matchExpressions

    def matches(self, labels: dict[str, str]) -> bool:
        for key, value in (self.matchLabels or {}).items():
            if labels.get(key) != value:
                return False
        for req in self.matchExpressions or ():
            present = req.key in labels
            if req.operator == "In":
                if not present or labels[req.key] not in req.values:
                    return False
            elif req.operator == "NotIn":
                if present and labels[req.key] in req.values:
                    return False
            elif req.operator == "Exists":
                if not present:
                    return False
            elif present:  # DoesNotExist
                return False
        return True

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted((self.matchLabels or {}).items())]
        for req in self.matchExpressions or ():
            if req.operator in ("In", "NotIn"):
                parts.append(f"{req.key} {req.operator.lower()} ({','.join(req.values or [])})")
            elif req.operator == "Exists":
                parts.append(req.key)
            else:
                parts.append(f"!{req.key}")
        return ",".join(parts) if parts else "<all>"


# --------------------------------------------------------------------------- NetworkPolicy
def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR as Kubernetes accepts it (host bits may be set; they are masked off)."""
    if "/" not in text:
        raise ValueError(f"{text!r} is not a CIDR (address/prefix-length)")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid CIDR") from None


class IPBlock(_Strict):
    cidr: str
    except_: list[str] | None = Field(default=None, alias="except")

    @field_validator("cidr")
    @classmethod
    def _valid_cidr(cls, value: str) -> str:
        parse_cidr(value)
        return value

    @model_validator(mode="after")
    def _excepts_inside(self) -> "IPBlock":
        outer = parse_cidr(self.cidr)
        for i, text in enumerate(self.except_ or ()):
            try:
                inner = parse_cidr(text)
            except ValueError as e:
                raise ValueError(f"except[{i}]: {e}") from None
            if inner.version != outer.version or not inner.subnet_of(outer) or inner.prefixlen <= outer.prefixlen:
                raise ValueError(f"except[{i}]: {text!r} is not a strict subset of cidr {self.cidr!r}")
        return self

    @property
    def network(self):
        return parse_cidr(self.cidr)

    @property
    def excepts(self):
        return [parse_cidr(t) for t in self.except_ or ()]


class NetworkPolicyPeer(_Strict):
    podSelector: LabelSelector | None = None
    namespaceSelector: LabelSelector | None = None
    ipBlock: IPBlock | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "NetworkPolicyPeer":
        if self.ipBlock is not None and (self.podSelector is not None or self.namespaceSelector is not None):
            raise ValueError("ipBlock may not be combined with podSelector or namespaceSelector")
        if self.ipBlock is None and self.podSelector is None and self.namespaceSelector is None:
            raise ValueError("a peer needs podSelector, namespaceSelector or ipBlock")
        return self


class NetworkPolicyPort(_Strict):
    protocol: str = "TCP"
    port: int | str | None = None
    endPort: int | None = None

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        if value not in ("TCP", "UDP", "SCTP"):
            raise ValueError(f"unknown protocol {value!r} (TCP, UDP or SCTP)")
        return value

    @field_validator("port")
    @classmethod
    def _valid_port(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int):
            if not 1 <= value <= 65535:
                raise ValueError(f"port {value} is outside 1-65535")
        elif value is not None and (len(value) > 15 or not _PORT_NAME.match(value)):
            raise ValueError(f"{value!r} is not a valid port name (IANA service name)")
        return value

    @model_validator(mode="after")
    def _valid_range(self) -> "NetworkPolicyPort":
        if self.endPort is None:
            return self
        if not isinstance(self.port, int):
            raise ValueError("endPort needs a numeric port")
        if not 1 <= self.endPort <= 65535:
            raise ValueError(f"endPort {self.endPort} is outside 1-65535")
        if self.endPort < self.port:
            raise ValueError(f"endPort {self.endPort} is below port {self.port}")
        return self


class NetworkPolicyIngressRule(_Strict):
    from_: list[NetworkPolicyPeer] | None = Field(default=None, alias="from")
    ports: list[NetworkPolicyPort] | None = None

    @property
    def peers(self) -> list[NetworkPolicyPeer] | None:
        return self.from_


class NetworkPolicyEgressRule(_Strict):
    to: list[NetworkPolicyPeer] | None = None
    ports: list[NetworkPolicyPort] | None = None

    @property
    def peers(self) -> list[NetworkPolicyPeer] | None:
        return self.to


class NetworkPolicySpec(_Strict):
    podSelector: LabelSelector
    policyTypes: list[Literal["Ingress", "Egress"]] | None = None
    ingress: list[NetworkPolicyIngressRule] | None = None
    egress: list[NetworkPolicyEgressRule] | None = None

    def effective_policy_types(self) -> frozenset[str]:
        """The apiserver's defaulting: [Ingress], plus Egress if egress rules are given."""
        if self.policyTypes:
            return frozenset(self.policyTypes)
        return frozenset({"Ingress", "Egress"} if self.egress else {"Ingress"})


class NamespaceMetadata(_Loose):
    """Metadata of cluster-scoped objects (Namespace, Node)."""

    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    uid: str = ""

    @field_validator("labels", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class Metadata(NamespaceMetadata):
    namespace: str = "default"
    resourceVersion: str | None = None
    deletionTimestamp: str | None = None


class NetworkPolicy(_Loose):
    kind: Literal["NetworkPolicy"] = "NetworkPolicy"
    metadata: Metadata
    spec: NetworkPolicySpec

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


# --------------------------------------------------------------------------- ClusterNetworkPolicy
# policy.networking.k8s.io/v1alpha2, read from the upstream types (apis/v1alpha2/
# clusternetworkpolicy_types.go in kubernetes-sigs/network-policy-api). Strict like
# NetworkPolicy; where upstream says "exactly one field must be set" so do we, so that a
# peer from a newer CRD version we do not know is an error, never a rule matching nothing.
CNP_GROUP = "policy.networking.k8s.io"
CNP_API_VERSION = f"{CNP_GROUP}/v1alpha2"
CNP_TIERS = ("Admin", "Baseline")
_MAX_RULES = 25  # per direction, and peers/protocols/networks per rule (upstream MaxItems)


def _exactly_one(model: BaseModel, fields: tuple[str, ...], what: str) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        names = ", ".join(fields)
        raise ValueError(f"{what} needs exactly one of {names}" + (f" (got {', '.join(given)})" if given else ""))


class CNPPortRange(_Strict):
    start: int = Field(ge=1, le=65535)
    end: int = Field(ge=1, le=65535)

    @model_validator(mode="after")
    def _ordered(self) -> "CNPPortRange":
        if not self.start < self.end:
            raise ValueError(f"start {self.start} must be less than end {self.end}")
        return self


class CNPPort(_Strict):
    number: int | None = Field(default=None, ge=1, le=65535)
    range: CNPPortRange | None = None

    @model_validator(mode="after")
    def _one(self) -> "CNPPort":
        _exactly_one(self, ("number", "range"), "destinationPort")
        return self


class CNPProtocolPort(_Strict):
    destinationPort: CNPPort


class CNPProtocol(_Strict):
    tcp: CNPProtocolPort | None = None
    udp: CNPProtocolPort | None = None
    sctp: CNPProtocolPort | None = None
    destinationNamedPort: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "CNPProtocol":
        _exactly_one(self, ("tcp", "udp", "sctp", "destinationNamedPort"), "a protocols entry")
        name = self.destinationNamedPort
        if name is not None and (len(name) > 15 or not _PORT_NAME.match(name)):
            raise ValueError(f"destinationNamedPort {name!r} is not a valid port name (IANA service name)")
        return self

    def port_range(self) -> tuple[str, int, int] | None:
        """(protocol, first, last) of a numeric entry; None for a named port."""
        for protocol in ("tcp", "udp", "sctp"):
            entry = getattr(self, protocol)
            if entry is not None:
                port = entry.destinationPort
                if port.range is not None:
                    return protocol.upper(), port.range.start, port.range.end
                return protocol.upper(), port.number, port.number
        return None


class NamespacedPod(_Strict):
    # Upstream: namespaceSelector empty (or left out) selects every namespace.
    namespaceSelector: LabelSelector = LabelSelector()
    podSelector: LabelSelector


class CNPSubject(_Strict):
    namespaces: LabelSelector | None = None
    pods: NamespacedPod | None = None

    @model_validator(mode="after")
    def _one(self) -> "CNPSubject":
        _exactly_one(self, ("namespaces", "pods"), "subject")
        return self

    def selects(self, namespace_labels: dict[str, str], pod_labels: dict[str, str]) -> bool:
        if self.namespaces is not None:
            return self.namespaces.matches(namespace_labels)
        return self.pods.namespaceSelector.matches(namespace_labels) and self.pods.podSelector.matches(pod_labels)


def _valid_cidrs(values: list[str] | None) -> list[str] | None:
    for i, text in enumerate(values or ()):
        try:
            parse_cidr(text)
        except ValueError as e:
            raise ValueError(f"networks[{i}]: {e}") from None
    return values


class CNPIngressPeer(_Strict):
    namespaces: LabelSelector | None = None
    pods: NamespacedPod | None = None

    @model_validator(mode="after")
    def _one(self) -> "CNPIngressPeer":
        _exactly_one(self, ("namespaces", "pods"), "an ingress peer")
        return self


class CNPEgressPeer(_Strict):
    namespaces: LabelSelector | None = None
    pods: NamespacedPod | None = None
    networks: list[str] | None = Field(default=None, min_length=1, max_length=_MAX_RULES)
    nodes: LabelSelector | None = None
    # Matching domain names needs the DNS answers the pod got; nftables sees addresses only.
    domainNames: list[str] | None = None

    _cidrs = field_validator("networks")(classmethod(lambda cls, v: _valid_cidrs(v)))

    @model_validator(mode="after")
    def _one(self) -> "CNPEgressPeer":
        if self.domainNames is not None:
            raise ValueError("domainNames peers are not supported by netfence: matching a domain needs the DNS "
                             "answers the pod received, which nftables cannot see (use networks CIDRs instead)")
        _exactly_one(self, ("namespaces", "pods", "networks", "nodes"), "an egress peer")
        return self


class _CNPRule(_Strict):
    name: str = Field(default="", max_length=100)
    action: Literal["Accept", "Deny", "Pass"]
    protocols: list[CNPProtocol] | None = Field(default=None, min_length=1, max_length=_MAX_RULES)


class CNPIngressRule(_CNPRule):
    from_: list[CNPIngressPeer] = Field(alias="from", min_length=1, max_length=_MAX_RULES)

    @property
    def peers(self) -> list[CNPIngressPeer]:
        return self.from_


class CNPEgressRule(_CNPRule):
    to: list[CNPEgressPeer] = Field(min_length=1, max_length=_MAX_RULES)

    @property
    def peers(self) -> list[CNPEgressPeer]:
        return self.to

    @model_validator(mode="after")
    def _named_ports_need_pods(self) -> "CNPEgressRule":
        if any(p.destinationNamedPort is not None for p in self.protocols or ()) and any(
                p.networks is not None or p.nodes is not None for p in self.to):
            raise ValueError("destinationNamedPort cannot be used with networks or nodes peers "
                             "(they have no named ports)")
        return self


class ClusterNetworkPolicySpec(_Strict):
    tier: Literal["Admin", "Baseline"]
    priority: int = Field(ge=0, le=1000)
    subject: CNPSubject
    ingress: list[CNPIngressRule] | None = Field(default=None, max_length=_MAX_RULES)
    egress: list[CNPEgressRule] | None = Field(default=None, max_length=_MAX_RULES)


class ClusterNetworkPolicy(_Loose):
    kind: Literal["ClusterNetworkPolicy"] = "ClusterNetworkPolicy"
    apiVersion: Literal["policy.networking.k8s.io/v1alpha2"] = CNP_API_VERSION
    metadata: NamespaceMetadata
    spec: ClusterNetworkPolicySpec

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> str:
        return self.metadata.name

    def order_key(self) -> tuple[int, int, str]:
        """Evaluation order: Admin before Baseline, lower priority first, then by name.

        Upstream leaves the order of equal priorities to the implementation; netfence takes
        the name so that it is deterministic and the same on every node and every run."""
        return CNP_TIERS.index(self.spec.tier), self.spec.priority, self.metadata.name


# --------------------------------------------------------------------------- Pod, Namespace, Node
class ContainerPort(_Loose):
    containerPort: int = Field(ge=1, le=65535)
    name: str | None = None
    protocol: Protocol = "TCP"


class Container(_Loose):
    name: str = ""
    ports: list[ContainerPort] | None = None


class PodSpec(_Loose):
    nodeName: str | None = None
    hostNetwork: bool = False
    containers: list[Container] = Field(default_factory=list)


def _normal_ip(text: str | None) -> str | None:
    """The address in its canonical spelling (IPv6 compressed), or a clear error."""
    if text is None:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


class PodIP(_Loose):
    ip: str

    _normal = field_validator("ip")(classmethod(lambda cls, v: _normal_ip(v)))


class PodStatus(_Loose):
    podIP: str | None = None
    podIPs: list[PodIP] | None = None
    phase: str | None = None

    _normal = field_validator("podIP")(classmethod(lambda cls, v: _normal_ip(v)))


class Pod(_Loose):
    kind: Literal["Pod"] = "Pod"
    metadata: Metadata
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @cached_property
    def ips(self) -> list[str]:
        """All pod IPs, primary first, normalised, without duplicates."""
        seen: list[str] = []
        for text in [self.status.podIP] + [p.ip for p in self.status.podIPs or ()]:
            if text and text not in seen:  # already canonical (validated)
                seen.append(text)
        return seen

    @property
    def on_pod_network(self) -> bool:
        return not self.spec.hostNetwork

    @property
    def terminated(self) -> bool:
        return self.status.phase in ("Succeeded", "Failed")

    def named_port(self, name: str, protocol: str) -> int | None:
        for container in self.spec.containers:
            for port in container.ports or ():
                if port.name == name and port.protocol == protocol:
                    return port.containerPort
        return None

    def named_port_numbers(self, name: str, protocol: str | None = None) -> list[tuple[str, int]]:
        """(protocol, number) of every container port called `name` (of `protocol` if given).

        A ClusterNetworkPolicy's destinationNamedPort names no protocol: it is the port's own."""
        return sorted({
            (port.protocol, port.containerPort)
            for container in self.spec.containers
            for port in container.ports or ()
            if port.name == name and (protocol is None or port.protocol == protocol)
        })

    def port_names(self) -> list[tuple[str, str, int]]:
        return [
            (p.name, p.protocol, p.containerPort)
            for c in self.spec.containers
            for p in c.ports or ()
            if p.name
        ]


class Namespace(_Loose):
    kind: Literal["Namespace"] = "Namespace"
    metadata: NamespaceMetadata

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def labels(self) -> dict[str, str]:
        # The apiserver always sets the name label; selectors rely on it.
        return {**self.metadata.labels, METADATA_NAME_LABEL: self.metadata.name}

    @classmethod
    def implicit(cls, name: str) -> "Namespace":
        return cls(metadata=NamespaceMetadata(name=name))


class NodeAddress(_Loose):
    type: str
    address: str


class NodeSpec(_Loose):
    podCIDR: str | None = None
    podCIDRs: list[str] | None = None


class NodeStatus(_Loose):
    addresses: list[NodeAddress] | None = None


class Node(_Loose):
    kind: Literal["Node"] = "Node"
    metadata: NamespaceMetadata
    spec: NodeSpec = NodeSpec()
    status: NodeStatus = NodeStatus()

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def pod_cidrs(self) -> list[str]:
        cidrs = list(self.spec.podCIDRs or ())
        if self.spec.podCIDR and self.spec.podCIDR not in cidrs:
            cidrs.insert(0, self.spec.podCIDR)
        return cidrs

    @property
    def internal_ips(self) -> list[str]:
        return [a.address for a in self.status.addresses or () if a.type == "InternalIP"]

    @property
    def ip_addresses(self) -> list[str]:
        """Every address in status.addresses that is an IP (InternalIP, ExternalIP), canonical:
        what a ClusterNetworkPolicy `nodes` peer matches."""
        out = []
        for a in self.status.addresses or ():
            try:
                text = str(ipaddress.ip_address(a.address))
            except ValueError:
                continue  # Hostname, InternalDNS: not addresses
            if text not in out:
                out.append(text)
        return out


# --------------------------------------------------------------------------- parsing
KINDS: dict[str, type[BaseModel]] = {
    "NetworkPolicy": NetworkPolicy,
    "ClusterNetworkPolicy": ClusterNetworkPolicy,
    "Pod": Pod,
    "Namespace": Namespace,
    "Node": Node,
}


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "union[")):
            continue
        else:
            name = "from" if part == "from_" else "except" if part == "except_" else str(part)
            # pydantic reports the branch of a union (`int`, `str`) as a location part
            if name in ("int", "str", "bool", "list[str]"):
                continue
            path += ("." if path else "") + name
    return path


def reads_api_version(doc: dict[str, Any]) -> bool:
    """False for a kind of the same name from another API group (Antrea and Calico have their
    own ClusterNetworkPolicy kinds): those are not ours to read. A version of our group other
    than v1alpha2 is read, and rejected by the model with a message naming apiVersion."""
    if doc.get("kind") != "ClusterNetworkPolicy":
        return True
    version = doc.get("apiVersion")
    return version is None or str(version).split("/")[0] == CNP_GROUP


def describe_object(doc: dict[str, Any]) -> str:
    kind = doc.get("kind", "<no kind>")
    md = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = md.get("name", "<no name>")
    if kind in ("Namespace", "Node", "ClusterNetworkPolicy"):
        return f"{kind} {name}"
    return f"{kind} {md.get('namespace') or 'default'}/{name}"


def parse_object(doc: dict[str, Any], source: str = "<input>") -> BaseModel:
    """One manifest dict into its model; InputError names source, object and field."""
    kind = doc.get("kind")
    model = KINDS.get(kind)
    if model is None:
        raise InputError([f"{source}: {describe_object(doc)}: kind {kind!r} is not one netfence reads"])
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            path = _field_path(err["loc"])
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.append(f"{source}: {describe_object(doc)}: {path or '<object>'}: {msg}")
        raise InputError(problems) from None


class Interner:
    """Makes pods that hold equal parts share them, for a process that keeps many pods.

    A Pod parsed from the API is ~3.8 KB of pydantic objects, most of them the same for every
    replica of a workload on a node: the spec (node, containers, ports) and the labels. Models
    are frozen and nothing changes a label dict in place, so pods may share equal ones; the
    field-set bookkeeping (`model_fields_set`, never changed on a frozen model) is shared by
    models that set the same fields. That leaves ~1 KB per pod. The tables are bounded: when
    they grow past `limit` entries they start again (what is shared stays shared).
    """

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._specs: dict[tuple, PodSpec] = {}
        self._labels: dict[tuple, dict[str, str]] = {}
        self._field_sets: dict[tuple, set[str]] = {}

    def pod(self, pod: "Pod") -> "Pod":
        if len(self._specs) + len(self._labels) > self.limit:
            self._specs.clear()
            self._labels.clear()
        spec = pod.spec
        key = (spec.nodeName, spec.hostNetwork, tuple(
            (c.name, None if c.ports is None else tuple((p.containerPort, p.name, p.protocol) for p in c.ports))
            for c in spec.containers))
        # Frozen models refuse setattr; their field values live in __dict__ like any other.
        pod.__dict__["spec"] = self._specs.setdefault(key, spec)
        metadata = pod.metadata
        labels = metadata.labels
        metadata.__dict__["labels"] = self._labels.setdefault(tuple(labels.items()), labels)
        for model in (pod, metadata, pod.status):
            self._share_field_set(model)
        return pod

    def _share_field_set(self, model: BaseModel) -> None:
        fields = model.__pydantic_fields_set__
        key = (type(model), *sorted(fields))
        shared = self._field_sets.get(key)
        if shared is None:
            shared = self._field_sets[key] = fields
        object.__setattr__(model, "__pydantic_fields_set__", shared)

    def field_set(self, model_type: type, fields) -> set[str]:
        """One set per model type and field names, for `model_construct(_fields_set=...)`."""
        key = (model_type, *sorted(fields))
        shared = self._field_sets.get(key)
        if shared is None:
            shared = self._field_sets[key] = set(fields)
        return shared


@dataclass
class ClusterObjects:
    """Everything the compiler reads, keyed the way the API keys it."""

    namespaces: dict[str, Namespace] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)  # "ns/name"
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)  # "ns/name"
    nodes: dict[str, Node] = field(default_factory=dict)
    cluster_policies: dict[str, ClusterNetworkPolicy] = field(default_factory=dict)  # name

    def add(self, obj: BaseModel) -> None:
        if isinstance(obj, Namespace):
            self.namespaces[obj.name] = obj
        elif isinstance(obj, Pod):
            self.pods[obj.key] = obj
        elif isinstance(obj, NetworkPolicy):
            self.policies[obj.key] = obj
        elif isinstance(obj, Node):
            self.nodes[obj.name] = obj
        elif isinstance(obj, ClusterNetworkPolicy):
            self.cluster_policies[obj.name] = obj
        else:  # pragma: no cover - parse_object returns only the kinds above
            raise TypeError(obj)

    def namespace(self, name: str) -> Namespace:
        return self.namespaces.get(name) or Namespace.implicit(name)


def flatten_documents(doc: Any) -> list[dict[str, Any]]:
    """A manifest document, with `kind: List` (and *List kinds) expanded into its items."""
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise InputError([f"document is a {type(doc).__name__}, not a Kubernetes object"])
    if doc.get("kind", "").endswith("List") and isinstance(doc.get("items"), list):
        return [d for item in doc["items"] for d in flatten_documents(item)]
    return [doc]


def parse_documents(
    sourced_docs: list[tuple[str, dict[str, Any]]],
    *,
    require_pod_ips: bool = True,
    notes: list[str] | None = None,
) -> ClusterObjects:
    """Validate every object and return them all, or raise one InputError listing every problem.

    Kinds netfence does not read are skipped with one note per kind (appended to `notes`).
    Pods without an IP are an error when `require_pod_ips` (offline input must be complete);
    the controller passes False and leaves such pods out until they get one.
    """
    objects = ClusterObjects()
    problems: list[str] = []
    skipped: dict[str, int] = {}
    for source, raw in sourced_docs:
        try:
            docs = flatten_documents(raw)
        except InputError as e:
            problems.extend(f"{source}: {p}" for p in e.problems)
            continue
        for doc in docs:
            kind = doc.get("kind")
            if kind not in KINDS or not reads_api_version(doc):
                label = str(kind) if kind not in KINDS else f"{kind} ({doc.get('apiVersion')})"
                skipped[label] = skipped.get(label, 0) + 1
                continue
            try:
                obj = parse_object(doc, source)
            except InputError as e:
                problems.extend(e.problems)
                continue
            if isinstance(obj, Pod) and require_pod_ips and obj.on_pod_network and not obj.ips:
                problems.append(f"{source}: {describe_object(doc)}: status.podIP: missing (the pod has no IP)")
                continue
            objects.add(obj)
    if problems:
        raise InputError(problems)
    if notes is not None:
        for kind, count in sorted(skipped.items()):
            notes.append(f"note: ignored {count} object(s) of kind {kind} (netfence reads Namespace, Pod, "
                         f"NetworkPolicy, Node, ClusterNetworkPolicy {CNP_API_VERSION})")
    return objects
