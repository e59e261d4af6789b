"""The controller with ClusterNetworkPolicies: watched when their CRD is installed, Events on
invalid ones, and NetworkPolicies enforced as before when the CRD is missing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from controller.fakeapi import BUILTIN_TYPES, CLUSTER_NETWORK_POLICY_TYPE, FakeApiServer, kubeconfig_for
from controller.harness import metrics_text, running_controller, settle, wait_for, wait_synced
from controller.test_controller import events_for, expected, pod_spec, published, seed
from netfence_operator.compile import ClusterObjects, compile_cluster, parse_object

pytestmark = pytest.mark.slow

CNP_PATH = "clusternetworkpolicies"


def cnp(name: str, tier: str, priority: int, spec: dict) -> dict:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": {"tier": tier, "priority": priority, **spec}}


NO_TEAM_B_INTO_PROD = {
    "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
    "ingress": [{"name": "no-team-b", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}],
}


def expected_with_cnps(api: FakeApiServer):
    objects = ClusterObjects()
    for plural in ("namespaces", "nodes", "pods", "networkpolicies", CNP_PATH):
        for obj in api.list(plural):
            objects.add(parse_object(obj, "test"))
    return compile_cluster(objects)


def test_cluster_network_policies_are_watched_and_compiled(api_server, kubeconfig):
    seed(api_server)
    api_server.apply(cnp("no-team-b", "Admin", 10, NO_TEAM_B_INTO_PROD))
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        assert controller.cluster_network_policies
        assert "netfence_controller_cluster_network_policies_watched 1.0" in metrics_text(controller)
        specs = published(api_server)
        assert specs == expected_with_cnps(api_server)
        (deny,) = pod_spec(specs["n1"], "prod/web-1").adminIngress
        assert (deny.action, deny.policy, deny.rule, deny.name) == ("Deny", "no-team-b", "ingress[0]", "no-team-b")
        assert api_server.get("noderulesets", "n1")["metadata"]["annotations"]["netfence.io/rules"] == "2"

        # a change to the policy reaches the rule sets; deleting it takes its rules away
        changed = json.loads(json.dumps(NO_TEAM_B_INTO_PROD))
        changed["ingress"][0]["action"] = "Pass"
        api_server.apply(cnp("no-team-b", "Admin", 10, changed))
        wait_for(lambda: pod_spec(published(api_server)["n1"], "prod/web-1").adminIngress[0].action == "Pass",
                 what="the patched ClusterNetworkPolicy")
        api_server.delete(CNP_PATH, "no-team-b")
        wait_for(lambda: not pod_spec(published(api_server)["n1"], "prod/web-1").adminIngress,
                 what="the deleted ClusterNetworkPolicy's rules to go")
        settle(api_server)
        assert published(api_server) == expected_with_cnps(api_server)


def test_invalid_cluster_network_policy_gets_an_event_and_the_last_valid_version_stays(api_server, kubeconfig):
    seed(api_server)
    api_server.apply(cnp("no-team-b", "Admin", 10, NO_TEAM_B_INTO_PROD))
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        before = published(api_server)
        broken = json.loads(json.dumps(NO_TEAM_B_INTO_PROD))
        broken["ingress"][0]["from"] = [{"namespaces": {}, "pods": {"podSelector": {}}}]
        api_server.apply(cnp("no-team-b", "Admin", 10, broken))
        wait_for(lambda: events_for(api_server, "no-team-b"), what="an Event on the invalid ClusterNetworkPolicy")
        settle(api_server)
        (event,) = events_for(api_server, "no-team-b")
        assert event["metadata"]["namespace"] == "default"
        assert event["involvedObject"]["kind"] == "ClusterNetworkPolicy"
        assert event["involvedObject"]["uid"] == api_server.get(CNP_PATH, "no-team-b")["metadata"]["uid"]
        assert event["reason"] == "InvalidPolicy" and "spec.ingress[0].from[0]" in event["message"]
        assert "last valid version" in event["message"]
        assert published(api_server) == before

        # one that was never valid is reported and not enforced
        api_server.apply(cnp("never-valid", "Developer", 10, NO_TEAM_B_INTO_PROD))
        wait_for(lambda: events_for(api_server, "never-valid"), what="an Event on the never-valid policy")
        (event,) = events_for(api_server, "never-valid")
        assert "spec.tier" in event["message"] and "not enforced" in event["message"]


@pytest.fixture
def api_without_cnp_crd(tmp_path: Path):
    server = FakeApiServer(types=tuple(t for t in BUILTIN_TYPES if t != CLUSTER_NETWORK_POLICY_TYPE),
                           bookmark_interval=0.5).start()
    path = tmp_path / "kubeconfig.json"
    path.write_text(json.dumps(kubeconfig_for(server.url)))
    try:
        yield server, str(path)
    finally:
        server.stop()


def test_without_the_crd_network_policies_are_enforced_and_the_user_is_told(api_without_cnp_crd, caplog):
    api, kubeconfig = api_without_cnp_crd
    seed(api)
    with caplog.at_level(logging.WARNING, logger="netfence.controller"):
        with running_controller(kubeconfig) as controller:
            wait_synced(controller)
            settle(api)
            assert not controller.cluster_network_policies
            assert "netfence_controller_cluster_network_policies_watched 0.0" in metrics_text(controller)
            assert published(api) == expected(api)
    notices = [r.getMessage() for r in caplog.records if "ClusterNetworkPolicy" in r.getMessage()]
    assert len(notices) == 1 and "not enforced" in notices[0] and "Install the CRD" in notices[0]
