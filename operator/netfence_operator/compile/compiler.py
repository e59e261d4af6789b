"""Incremental NetworkPolicy compiler (being written; the interface below is fixed)."""

from __future__ import annotations

from pydantic import BaseModel

from netfence_api import NodeRuleSetSpec
from netfence_operator.compile.objects import ClusterObjects


class Compiler:
    """Holds the cluster state and compiles NodeRuleSetSpecs, recomputing only what a change touches.

    upsert/delete return the names of the nodes whose spec may have changed.
    """

    def __init__(self, objects: ClusterObjects | None = None) -> None:
        raise NotImplementedError

    def upsert(self, obj: BaseModel) -> set[str]:  # Namespace | Pod | NetworkPolicy | Node
        raise NotImplementedError

    def delete(self, kind: str, key: str) -> set[str]:  # key: "ns/name" for Pod/NetworkPolicy, "name" otherwise
        raise NotImplementedError

    def node_names(self) -> set[str]:
        raise NotImplementedError

    def node_spec(self, node: str) -> NodeRuleSetSpec:
        raise NotImplementedError

    def all_specs(self) -> dict[str, NodeRuleSetSpec]:
        raise NotImplementedError

    def problems(self) -> dict[str, list[str]]:
        """Per policy key ("ns/name"): things a user should know (unresolvable named port, ...)."""
        raise NotImplementedError


def compile_cluster(objects: ClusterObjects) -> dict[str, NodeRuleSetSpec]:
    return Compiler(objects).all_specs()
