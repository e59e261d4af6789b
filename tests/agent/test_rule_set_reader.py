"""RuleSetReader: validating only what changed gives exactly what validating everything gives."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import netfence_api
from netfence_agent.source import RuleSetReader


def base() -> dict:
    return {
        "apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet",
        "metadata": {"name": "n1", "generation": 1},
        "spec": {
            "nodeName": "n1",
            "pods": [
                {"namespace": "x", "name": "a", "ips": ["10.244.0.2"], "isolation": {"ingress": True},
                 "ingressPolicies": ["x/p"],
                 "ingress": [{"origin": ["x/p ingress[0]"], "peers": "pg-1",
                              "ports": [{"protocol": "TCP", "port": 80}]}]},
                {"namespace": "x", "name": "b", "ips": ["10.244.0.3"]},
            ],
            "peerGroups": [{"name": "pg-1", "selector": "x app=web", "cidrs": ["10.244.0.3/32"]},
                           {"name": "pg-2", "selector": "y", "cidrs": []}],
            "peerPortGroups": [{"name": "pp-1", "selector": "named http", "entries": [
                {"address": "10.244.0.3", "protocol": "TCP", "port": 8080}]}],
        },
    }


# Changes an update can make, valid or not; each takes the data and a drawn value.
def _set(path, value):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


CHANGES = [
    _set(("metadata", "generation"), 2),
    _set(("spec", "peerGroups", 0, "cidrs"), ["10.244.0.3/32", "10.244.0.9/32"]),
    _set(("spec", "peerGroups", 1, "cidrs"), ["10.0.0.0/8"]),
    _set(("spec", "peerGroups", 0, "name"), "pg-9"),
    _set(("spec", "peerGroups", 1, "selector"), 7),  # invalid type
    _set(("spec", "peerGroups", 1, "extra"), True),  # unknown field
    _set(("spec", "peerPortGroups", 0, "entries"), [{"address": "10.244.0.4", "protocol": "TCP", "port": 80}]),
    _set(("spec", "peerPortGroups", 0, "entries"), [{"address": "10.244.0.4", "protocol": "TCP", "port": 0}]),
    _set(("spec", "pods", 1, "ips"), ["10.244.0.4"]),
    _set(("spec", "pods", 0, "ingress", 0, "ports", 0, "port"), 70000),  # invalid
    _set(("spec", "pods"), []),
    _set(("spec", "nodeName"), "n2"),
    _set(("spec", "surprise"), 1),  # unknown spec field
    _set(("spec", "peerGroups"), "not a list"),
    _set(("kind", ), "Other"),
    lambda data: data["spec"]["peerGroups"].reverse(),
    lambda data: data["spec"]["peerGroups"].append(copy.deepcopy(data["spec"]["peerGroups"][0])),  # a name twice
    lambda data: data["spec"].pop("peerPortGroups"),
    # Pods of the node born, deleted, relabelled (other rules), renamed, or one name in two namespaces.
    lambda data: data["spec"]["pods"].append({"namespace": "y", "name": "a", "ips": ["10.244.0.7"]}),
    lambda data: data["spec"]["pods"].pop(0),
    _set(("spec", "pods", 0, "isolation"), {"egress": True}),
    _set(("spec", "pods", 1, "name"), "c"),
    _set(("spec", "pods", 1, "isolation"), "closed"),  # invalid
    lambda data: data["spec"]["pods"].insert(0, {"namespace": "x", "name": "z", "ips": []}),  # invalid: no IP
]


def full(data: dict):
    try:
        return netfence_api.NodeRuleSet.model_validate(data)
    except ValidationError as e:
        return [(err["loc"], err["type"]) for err in e.errors()]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(range(len(CHANGES))), min_size=1, max_size=3), min_size=1, max_size=6))
def test_any_sequence_of_updates_reads_as_validating_each_whole(updates):
    reader = RuleSetReader()
    current = base()
    reader.read(copy.deepcopy(current))
    for update in updates:
        data = copy.deepcopy(current)
        for i in update:
            try:
                CHANGES[i](data)
            except (IndexError, KeyError, TypeError, AttributeError):
                pass  # the change does not apply to this shape
        expected = full(data)
        try:
            got = reader.read(copy.deepcopy(data))
        except ValidationError as e:
            got = [(err["loc"], err["type"]) for err in e.errors()]
        assert got == expected
        if not isinstance(expected, list):
            assert got.model_dump() == expected.model_dump()
            assert got.spec.model_fields_set == expected.spec.model_fields_set
            current = data  # only a valid update becomes what the next one is compared with


def test_a_group_change_reuses_the_validated_pods_and_other_groups():
    reader = RuleSetReader()
    first = reader.read(base())
    data = base()
    data["spec"]["peerGroups"][1]["cidrs"] = ["10.244.7.7/32"]
    second = reader.read(data)
    assert second.spec.pods is first.spec.pods  # what lets the daemon skip comparing pods
    assert second.spec.peerGroups[0] is first.spec.peerGroups[0]
    assert second.spec.peerGroups[1] is not first.spec.peerGroups[1]
    assert second.spec.peerGroups[1].cidrs == ["10.244.7.7/32"]
    assert second == netfence_api.NodeRuleSet.model_validate(data)


def test_a_pod_born_or_changed_validates_that_pod_and_reuses_the_others():
    reader = RuleSetReader()
    first = reader.read(base())
    data = base()
    data["spec"]["pods"].append({"namespace": "y", "name": "b", "ips": ["10.244.0.9"]})
    born = reader.read(data)
    assert born.spec.pods[0] is first.spec.pods[0] and born.spec.pods[1] is first.spec.pods[1]
    data = copy.deepcopy(data)
    data["spec"]["pods"][0]["isolation"] = {"egress": True}
    relabelled = reader.read(data)
    assert relabelled.spec.pods[0] is not born.spec.pods[0]
    assert relabelled.spec.pods[1:] == born.spec.pods[1:] and relabelled.spec.pods[2] is born.spec.pods[2]
    assert relabelled == netfence_api.NodeRuleSet.model_validate(data)


def test_an_invalid_update_is_refused_and_the_next_compares_with_the_last_good_one():
    reader = RuleSetReader()
    first = reader.read(base())
    bad = base()
    bad["spec"]["pods"][0]["ips"] = "10.244.0.2"  # not a list
    with pytest.raises(ValidationError) as info:
        reader.read(bad)
    assert info.value.errors()[0]["loc"][:4] == ("spec", "pods", 0, "ips")
    again = reader.read(base())
    assert again.spec.pods is first.spec.pods
