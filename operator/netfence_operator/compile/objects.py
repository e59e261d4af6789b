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


# --------------------------------------------------------------------------- parsing
KINDS: dict[str, type[BaseModel]] = {
    "NetworkPolicy": NetworkPolicy,
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


def describe_object(doc: dict[str, Any]) -> str:
    kind = doc.get("kind", "<no kind>")
    md = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = md.get("name", "<no name>")
    if kind in ("Namespace", "Node"):
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


@dataclass
class ClusterObjects:
    """Everything the compiler reads, keyed the way the API keys it."""

    namespaces: dict[str, Namespace] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)  # "ns/name"
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)  # "ns/name"
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, obj: BaseModel) -> None:
        if isinstance(obj, Namespace):
            self.namespaces[obj.name] = obj
        elif isinstance(obj, Pod):
            self.pods[obj.key] = obj
        elif isinstance(obj, NetworkPolicy):
            self.policies[obj.key] = obj
        elif isinstance(obj, Node):
            self.nodes[obj.name] = obj
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
            if kind not in KINDS:
                skipped[str(kind)] = skipped.get(str(kind), 0) + 1
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
            notes.append(f"note: ignored {count} object(s) of kind {kind} (netfence reads Namespace, Pod, NetworkPolicy, Node)")
    return objects
