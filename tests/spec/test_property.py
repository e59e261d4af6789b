"""Property: netfence's matrix equals the reference evaluator's, cell for cell.

Random small clusters and policies come from reference.strategies. 200 examples by default;
set NETFENCE_HYPOTHESIS_EXAMPLES to run more (e.g. 5000 before a release).
"""
from __future__ import annotations

import os

import kubernetes_validate
from hypothesis import HealthCheck, given, settings

from reference.evaluator import allowed, reference_matrix
from reference.strategies import Scenario, scenarios

EXAMPLES = int(os.environ.get("NETFENCE_HYPOTHESIS_EXAMPLES", "200"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# the checks of the generator and of the reference alone need fewer examples
SELF_CHECK_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=min(EXAMPLES, 100))


def _differences(expected: dict, got: dict) -> list[str]:
    problems = []
    if set(got["matrix"]) != set(expected["matrix"]):
        problems.append(f"rows {sorted(got['matrix'])} != {sorted(expected['matrix'])}")
    for source, row in expected["matrix"].items():
        for destination, want in row.items():
            have = got["matrix"].get(source, {}).get(destination)
            if have is not want:
                problems.append(f"{source}->{destination}: reference {want}, netfence {have!r}")
    return problems


@PROPERTY_SETTINGS
@given(scenarios())
def test_netfence_matrix_equals_reference(scenario: Scenario):
    from netfence_cli.offline import matrix as netfence_matrix

    expected = reference_matrix(scenario.docs, scenario.port, scenario.protocol)
    got = netfence_matrix(scenario.docs, scenario.port, scenario.protocol)
    assert got["port"] == expected["port"]
    problems = _differences(expected, got)
    assert not problems, "\n".join(problems)


@PROPERTY_SETTINGS
@given(scenarios(cluster_policies=True))
def test_netfence_matrix_equals_reference_with_cluster_network_policies(scenario: Scenario):
    """Random clusters mixing NetworkPolicies and ClusterNetworkPolicies of both tiers."""
    from netfence_cli.offline import matrix as netfence_matrix

    expected = reference_matrix(scenario.docs, scenario.port, scenario.protocol)
    got = netfence_matrix(scenario.docs, scenario.port, scenario.protocol)
    assert got["port"] == expected["port"]
    problems = _differences(expected, got)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------- checks of the generator and the reference itself
@settings(max_examples=min(EXAMPLES, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_generated_manifests_are_valid_kubernetes_objects(scenario: Scenario):
    for doc in scenario.docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)


@SELF_CHECK_SETTINGS
@given(scenarios())
def test_reference_allow_all_rules_open_every_connection(scenario: Scenario):
    """Giving every policy an empty rule for each direction it isolates allows everything."""
    for doc in scenario.docs:
        if doc["kind"] == "NetworkPolicy":
            doc["spec"]["ingress"] = (doc["spec"].get("ingress") or []) + [{}]
            doc["spec"]["egress"] = (doc["spec"].get("egress") or []) + [{}]
    got = reference_matrix(scenario.docs, scenario.port, scenario.protocol)
    assert all(all(row.values()) for row in got["matrix"].values())


@SELF_CHECK_SETTINGS
@given(scenarios())
def test_reference_deny_all_everywhere_leaves_only_self_and_node_traffic(scenario: Scenario):
    """With every rule removed and a deny-all policy per namespace, only loopback, traffic
    between a pod and its own node, and hostNetwork-to-hostNetwork traffic stay open."""
    for doc in scenario.docs:
        if doc["kind"] == "NetworkPolicy":
            doc["spec"].pop("ingress", None)
            doc["spec"].pop("egress", None)
    pods = {f"{d['metadata']['namespace']}/{d['metadata']['name']}": d for d in scenario.docs if d["kind"] == "Pod"}
    namespaces = {key.split("/")[0] for key in pods}
    scenario.docs += [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": "zz-deny-all", "namespace": ns},
                       "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}} for ns in namespaces]
    got = reference_matrix(scenario.docs, scenario.port, scenario.protocol)
    for source, row in got["matrix"].items():
        for destination, cell in row.items():
            src, dst = pods[source]["spec"], pods[destination]["spec"]
            host_ends = bool(src.get("hostNetwork")) + bool(dst.get("hostNetwork"))
            open_path = (source == destination or host_ends == 2
                         or (host_ends == 1 and src["nodeName"] == dst["nodeName"]))
            assert cell is open_path, f"{source}->{destination}"


@settings(SELF_CHECK_SETTINGS, max_examples=min(EXAMPLES, 25))
@given(scenarios())
def test_reference_allowed_agrees_with_its_matrix(scenario: Scenario):
    got = reference_matrix(scenario.docs, scenario.port, scenario.protocol)
    for source, row in got["matrix"].items():
        for destination, cell in row.items():
            assert allowed(scenario.docs, source, destination, scenario.port, scenario.protocol) is cell
