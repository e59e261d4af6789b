"""The netfence CustomResourceDefinitions, generated from the pydantic contract models.

NodeRuleSet (one per node) and PeerGroupSlice, the bounded parts of the peer groups that
NodeRuleSets name when the cluster is too large for them to ride inline (netfence_api.slices).

`manifests/crd.yaml` is this module's output (`python -m netfence_api.crd > manifests/crd.yaml`);
a test keeps the two equal, so the schema the apiserver enforces never drifts from the models
the controller and the agent use.

pydantic's JSON Schema is turned into a Kubernetes *structural* schema: `$ref`s are inlined,
`X | None` becomes `nullable: true`, and what the apiserver would act on differently from
pydantic is dropped (`default`: the apiserver would write defaults into stored objects;
`additionalProperties: false`: not allowed next to `properties`; unknown fields are pruned
instead).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from netfence_api.models import API_GROUP, API_VERSION, KIND, PLURAL, NodeRuleSetSpec, NodeRuleSetStatus
from netfence_api.slices import (  # noqa: F401 - the annotations are named here too, beside the others
    GROUP_LABEL,
    GROUP_SLICE_KIND,
    GROUP_SLICE_PLURAL,
    HASH_ANNOTATION,
    PODS_ANNOTATION,
    RULES_ANNOTATION,
    PeerGroupSliceSpec,
)

SINGULAR = "noderuleset"
SHORT_NAMES = ["nrs"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

# When the change that led to this content was seen (kube-proxy's last-change-trigger-time):
# the agent measures network programming latency from it.
TRIGGER_ANNOTATION = f"{API_GROUP}/last-change-trigger-time"
# On the PeerGroupSlices and NodeRuleSets written in one publish round, each kind names the
# others: "name=hash ..." (hash: the start of each one's spec-hash). One pod event often changes
# a group and its node's rule set; that node's agent, receiving one before the other, waits for
# the other and applies the two in one sync instead of two.
COMPANIONS_ANNOTATION = f"{API_GROUP}/written-with"
COMPANIONS_MAX = 32  # objects named at most; a larger round (a policy change) names none
COMPANION_HASH_CHARS = 16


def companions_value(hashes: dict[str, str]) -> str | None:
    """The annotation naming these objects (name -> spec-hash "sha256:..."), or None for none or
    too many."""
    if not hashes or len(hashes) > COMPANIONS_MAX:
        return None
    return " ".join(f"{node}={_companion_hash(digest)}" for node, digest in sorted(hashes.items()))


def companions_of(annotations: dict[str, str] | None) -> dict[str, str]:
    """name -> hash start, of the objects an object's annotation names."""
    pairs = (pair.partition("=") for pair in ((annotations or {}).get(COMPANIONS_ANNOTATION) or "").split())
    return {name: digest for name, _, digest in pairs if name and digest}


def companion_of(annotations: dict[str, str] | None, name: str) -> str | None:
    """The hash start an object's annotation names for this one, if any."""
    return companions_of(annotations).get(name)


def is_companion(digest: str | None, wanted: str) -> bool:
    return bool(digest) and _companion_hash(digest) == wanted


def _companion_hash(digest: str) -> str:
    return digest.partition(":")[2][:COMPANION_HASH_CHARS] or digest[:COMPANION_HASH_CHARS]

_DROPPED_KEYS = {"title", "default", "additionalProperties"}


def _escape_jsonpath(key: str) -> str:
    return key.replace(".", "\\.")


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON Schema node as a structural OpenAPI v3 schema (recursive)."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in schema:
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1 or len(branches) == len(schema["anyOf"]):
            raise ValueError(f"only `X | None` unions map to a structural schema, got {schema['anyOf']}")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        out = structural({**branches[0], **rest}, defs)
        out["nullable"] = True
        return out
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "description":
            out[key] = " ".join(value.split())
        else:
            out[key] = value
    return out


def model_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(mode="serialization")
    return structural(raw, raw.get("$defs", {}))


def openapi_schema() -> dict[str, Any]:
    status = model_schema(NodeRuleSetStatus)
    # Conditions are keyed by type (one Applied, one Degraded), as Kubernetes conditions are.
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    spec = model_schema(NodeRuleSetSpec)
    spec["description"] = (
        "What the agent on the node enforces: the node's policed pods, their allow rules and the "
        "peer groups they refer to. A group the rules name that is not listed here is held by the "
        "PeerGroupSlices labelled with its name (large clusters). Written by the controller."
    )
    status["description"] = "What the agent on the node applied. Written by the agent."
    return {
        "type": "object",
        "description": "The NetworkPolicy rules of one node, compiled by the netfence controller.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }


def printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
        {"name": "Pods", "type": "string", "jsonPath": f".metadata.annotations.{_escape_jsonpath(PODS_ANNOTATION)}"},
        {"name": "Rules", "type": "string", "jsonPath": f".metadata.annotations.{_escape_jsonpath(RULES_ANNOTATION)}"},
        {
            "name": "Applied",
            "type": "integer",
            "jsonPath": ".status.observedGeneration",
            "description": "Generation the agent last applied; equal to Generation when the node is up to date.",
        },
        {"name": "Generation", "type": "integer", "jsonPath": ".metadata.generation", "priority": 1},
        {"name": "Hash", "type": "string", "jsonPath": ".status.appliedHash", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "netfence", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Cluster",
            "names": {
                "plural": PLURAL,
                "singular": SINGULAR,
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": SHORT_NAMES,
                "categories": ["netfence"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def _slice_crd(kind: str, plural: str, short: str, spec_model: type, description: str,
               columns: list[dict[str, Any]]) -> dict[str, Any]:
    spec = model_schema(spec_model)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "netfence", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Cluster",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List",
                      "shortNames": [short], "categories": ["netfence"]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "additionalPrinterColumns": [*columns, {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, "spec": spec},
                    "required": ["spec"],
                }},
            }],
        },
    }


def slice_crd_manifests() -> list[dict[str, Any]]:
    return [
        _slice_crd(GROUP_SLICE_KIND, GROUP_SLICE_PLURAL, "nrgs", PeerGroupSliceSpec,
                   "Part of one content-addressed peer group (the addresses one peer definition matches), "
                   "shared by every node whose rules name the group. Written by the netfence controller.",
                   [{"name": "Group", "type": "string", "jsonPath": f".metadata.labels.{_escape_jsonpath(GROUP_LABEL)}"},
                    {"name": "Prefix", "type": "string", "jsonPath": ".spec.prefix", "priority": 1}]),
    ]


def all_crd_manifests() -> list[dict[str, Any]]:
    return [crd_manifest(), *slice_crd_manifests()]


HEADER = "# Generated by `python -m netfence_api.crd` from operator/netfence_api/models.py. Do not edit.\n"


def render_yaml() -> str:
    return HEADER + "---\n".join(yaml.safe_dump(crd, sort_keys=False, width=100) for crd in all_crd_manifests())


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
