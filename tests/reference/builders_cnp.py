"""Builders for ClusterNetworkPolicy manifests (policy.networking.k8s.io/v1alpha2) in tests."""
from __future__ import annotations

CNP_API_VERSION = "policy.networking.k8s.io/v1alpha2"


def cnp(name: str, tier: str, priority: int, subject: dict, *, ingress=None, egress=None) -> dict:
    spec: dict = {"tier": tier, "priority": priority, "subject": subject}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec}


def namespaces(**labels: str) -> dict:
    """A `namespaces` selector (subject or peer); no labels: every namespace."""
    return {"namespaces": {"matchLabels": labels} if labels else {}}


def rule(action: str, peers: list[dict], *, direction: str = "ingress", protocols=None, name: str | None = None) -> dict:
    out: dict = {"action": action, "from" if direction == "ingress" else "to": peers}
    if name:
        out["name"] = name
    if protocols is not None:
        out["protocols"] = protocols
    return out


def tcp(port: int) -> dict:
    return {"tcp": {"destinationPort": {"number": port}}}
