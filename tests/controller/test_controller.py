"""The real kopf controller against the fake API server: what users and agents would see."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import pytest

from controller.fakeapi import FakeApiServer
from controller.harness import (
    NRS_PATH,
    metrics_text,
    namespace,
    node,
    pod,
    policy,
    running_controller,
    settle,
    wait_for,
    wait_synced,
)
from netfence_api import NodeRuleSetSpec
from netfence_api.crd import COMPANIONS_ANNOTATION, HASH_ANNOTATION
from netfence_api.slices import Bounds, Incomplete, assemble_from_objects, ruleset_hash, split
from netfence_operator.compile import ClusterObjects, compile_cluster, parse_object

SLICES_PATH = "/apis/netfence.io/v1alpha1/peergroupslices"
# The two layouts of peer groups (netfence_api.slices): inline in the NodeRuleSets (what these
# small clusters get by default), or in PeerGroupSlices (what large clusters get).
LAYOUTS = {"inline": Bounds(), "slices": Bounds(inline_groups_bytes=0)}
layouts = pytest.mark.parametrize("layout", sorted(LAYOUTS))


def controller_in(kubeconfig: str, layout: str, **config):
    return running_controller(kubeconfig, inline_groups_bytes=LAYOUTS[layout].inline_groups_bytes, **config)

pytestmark = pytest.mark.slow

DB_FROM_WEB = {
    "podSelector": {"matchLabels": {"app": "db"}},
    "policyTypes": ["Ingress"],
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]}],
}
WEB_FROM_TEAM_B = {
    "podSelector": {"matchLabels": {"app": "web"}},
    "policyTypes": ["Ingress"],
    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}],
}


def seed(api: FakeApiServer) -> None:
    """Three nodes; web on n1 and n2, db on n2, a client in another namespace on n3."""
    api.apply(namespace("prod", team="a"))
    api.apply(namespace("dev", team="b"))
    for i in (1, 2, 3):
        api.apply(node(f"n{i}", f"10.244.{i}.0/24", f"172.18.0.{i + 1}"))
    api.apply(pod("prod", "web-1", "n1", "10.244.1.10", {"app": "web"}))
    api.apply(pod("prod", "web-2", "n2", "10.244.2.10", {"app": "web"}))
    api.apply(pod("prod", "db", "n2", "10.244.2.20", {"app": "db"}))
    api.apply(pod("dev", "client", "n3", "10.244.3.10", {"app": "client"}))
    api.apply(policy("prod", "db-from-web", DB_FROM_WEB))
    api.apply(policy("prod", "web-from-team-b", WEB_FROM_TEAM_B))


def published(api: FakeApiServer) -> dict[str, NodeRuleSetSpec]:
    """Every node's complete spec as an agent would assemble it from what the API holds (once
    the controller's writes in flight are through: a NodeRuleSet may be ahead of a group slice)."""
    for _ in range(40):
        try:
            return assemble_from_objects(api.list("noderulesets") + api.list("peergroupslices"))
        except Incomplete:
            time.sleep(0.05)
    return assemble_from_objects(api.list("noderulesets") + api.list("peergroupslices"))


def expected(api: FakeApiServer) -> dict[str, NodeRuleSetSpec]:
    """What the pure compiler makes of the API's current objects: the controller must publish exactly that."""
    objects = ClusterObjects()
    for plural in ("namespaces", "nodes", "pods", "networkpolicies"):
        for obj in api.list(plural):
            objects.add(parse_object(obj, "test"))
    return compile_cluster(objects)


def ruleset_writes(api: FakeApiServer, since: int = 0) -> list[tuple[str, str]]:
    return [(r.method, r.path.removeprefix(NRS_PATH).strip("/")) for r in api.writes(NRS_PATH)[since:]]


def api_objects(api: FakeApiServer) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o["spec"]
            for plural in ("noderulesets", "peergroupslices") for o in api.list(plural)}


def slice_writes(api: FakeApiServer, since: int = 0) -> list[tuple[str, str]]:
    """(method, name) of the controller's writes of PeerGroupSlices."""
    return [(r.method, r.path.removeprefix(SLICES_PATH).strip("/")) for r in api.writes(SLICES_PATH)[since:]]


def pod_spec(spec: NodeRuleSetSpec, key: str):
    return next(p for p in spec.pods if p.key == key)


def group_cidrs(spec: NodeRuleSetSpec, name: str) -> set[str]:
    return set(next(g for g in spec.peerGroups if g.name == name).cidrs)


@layouts
def test_policies_and_pods_become_node_rule_sets(api_server, kubeconfig, layout):
    seed(api_server)
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server)
        specs = published(api_server)
        assert specs == expected(api_server)
        assert set(specs) == {"n1", "n2", "n3"}
        db = pod_spec(specs["n2"], "prod/db")
        assert db.isolation.ingress and not db.isolation.egress
        (rule,) = db.ingress
        assert group_cidrs(specs["n2"], rule.peers) == {"10.244.1.10/32", "10.244.2.10/32"}
        assert [(p.protocol, p.port) for p in rule.ports] == [("TCP", 5432)]
        web1 = pod_spec(specs["n1"], "prod/web-1")
        assert group_cidrs(specs["n1"], web1.ingress[0].peers) == {"10.244.3.10/32"}
        # one create per node, nothing else
        assert sorted(ruleset_writes(api_server)) == [("POST", ""), ("POST", ""), ("POST", "")]
        stored = api_server.get("noderulesets", "n2")
        assert stored["metadata"]["generation"] == 1
        assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "netfence-controller"}
        assert stored["metadata"]["annotations"]["netfence.io/pods"] == str(len(specs["n2"].pods))
        assert stored["metadata"]["annotations"]["netfence.io/spec-hash"] == ruleset_hash(stored["spec"])
        if layout == "inline":  # what the agent reports as appliedHash once it applied it
            assert ruleset_hash(stored["spec"]) == specs["n2"].content_hash()
        # the node's pods and rules are in its NodeRuleSet; its groups too while the cluster is small
        assert [p["name"] for p in stored["spec"]["pods"]] == [p.name for p in specs["n2"].pods]
        groups = [g["name"] for g in stored["spec"]["peerGroups"]]
        assert groups == ([g.name for g in specs["n2"].peerGroups] if layout == "inline" else [])
        # exactly the objects `netfence compile -o json` prints for the same input
        assert api_objects(api_server) == {(o["kind"], o["metadata"]["name"]): o["spec"]
                                           for o in split(expected(api_server).values(), LAYOUTS[layout])}
        # each group slice written once (none inline)
        assert [m for m, _ in slice_writes(api_server)] == ["POST"] * len(api_server.list("peergroupslices"))
        assert (len(api_server.list("peergroupslices")) > 0) == (layout == "slices")


def test_pod_ip_change_patches_only_its_node(api_server, kubeconfig):
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        before = published(api_server)
        mark = len(api_server.writes(NRS_PATH))
        # db is policed on n2 and is nobody's peer: only n2's rule set may change
        api_server.apply(pod("prod", "db", "n2", "10.244.2.99", {"app": "db"}))
        wait_for(lambda: pod_spec(published(api_server)["n2"], "prod/db").ips == ["10.244.2.99"], what="db's new IP")
        settle(api_server)
        assert ruleset_writes(api_server, mark) == [("PATCH", "n2")]
        after = published(api_server)
        assert after["n1"] == before["n1"] and after["n3"] == before["n3"]
        assert after == expected(api_server)
        assert api_server.get("noderulesets", "n2")["metadata"]["generation"] == 2
        assert api_server.get("noderulesets", "n1")["metadata"]["generation"] == 1


@layouts
def test_peer_ip_change_patches_the_nodes_that_use_it(api_server, kubeconfig, layout):
    seed(api_server)
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server)
        mark, slice_mark = len(api_server.writes(NRS_PATH)), len(api_server.writes(SLICES_PATH))
        # web-1 is policed on n1 and a peer of db on n2; n3 does not care
        api_server.apply(pod("prod", "web-1", "n1", "10.244.1.77", {"app": "web"}))
        wait_for(lambda: published(api_server) == expected(api_server), what="web-1's new IP everywhere")
        settle(api_server)
        if layout == "inline":  # n2 holds the group web-1 is in
            assert sorted(ruleset_writes(api_server, mark)) == [("PATCH", "n1"), ("PATCH", "n2")]
            assert slice_writes(api_server, slice_mark) == []
            return
        # n1's own pods changed; n2 only sees the peer group's slice change, its NodeRuleSet stays
        assert ruleset_writes(api_server, mark) == [("PATCH", "n1")]
        (write,) = api_server.writes(NRS_PATH)[mark:]  # web-1's entry only, guarded by the hash last written
        assert write.content_type == "application/json-patch+json"
        assert [op["op"] for op in write.body] == ["test", "test", "test", "replace", "replace", "replace"]
        assert write.body[3]["path"] == "/spec/pods/0" and write.body[3]["value"]["ips"] == ["10.244.1.77"]
        assert [m for m, _ in slice_writes(api_server, slice_mark)] == ["PATCH"]
        # small objects only: the slice body within its bound (4 KiB of members) and its envelope
        bodies = [r.body for r in api_server.writes(SLICES_PATH)[slice_mark:]]
        assert bodies and all(len(json.dumps(b, separators=(",", ":"))) <= 5 * 1024 for b in bodies)
        # the slice and the NodeRuleSet written together name each other: n1's agent, whichever
        # it receives first, waits for the other and applies both in one sync
        n1 = api_server.get("noderulesets", "n1")["metadata"]["annotations"]
        (name,) = [n for _, n in slice_writes(api_server, slice_mark)]
        web = api_server.get("peergroupslices", name)["metadata"]["annotations"]
        assert web[COMPANIONS_ANNOTATION] == f"n1={n1[HASH_ANNOTATION].removeprefix('sha256:')[:16]}"
        assert n1[COMPANIONS_ANNOTATION] == f"{name}={web[HASH_ANNOTATION].removeprefix('sha256:')[:16]}"
        # the client in dev (team b) moves: web's peer group of team b and n3's NodeRuleSet change
        slice_mark = len(api_server.writes(SLICES_PATH))
        api_server.apply(pod("dev", "client", "n3", "10.244.3.77", {"app": "client"}))
        wait_for(lambda: published(api_server) == expected(api_server), what="the client's new IP everywhere")
        settle(api_server)
        (team_b,) = [n for _, n in slice_writes(api_server, slice_mark)]
        n3_hash = api_server.get("noderulesets", "n3")["metadata"]["annotations"][HASH_ANNOTATION]
        assert api_server.get("peergroupslices", team_b)["metadata"]["annotations"][COMPANIONS_ANNOTATION] == \
            f"n3={n3_hash.removeprefix('sha256:')[:16]}"
        # prod joins team b: that group's members change, no node's pods or rules do; the slice is
        # written alone, and the companions of the earlier round go
        mark, slice_mark = len(api_server.writes(NRS_PATH)), len(api_server.writes(SLICES_PATH))
        api_server.apply(namespace("prod", team="b"))
        wait_for(lambda: published(api_server) == expected(api_server), what="prod's pods as web's peers")
        settle(api_server)
        assert ruleset_writes(api_server, mark) == []
        assert [n for _, n in slice_writes(api_server, slice_mark)] == [team_b]
        assert COMPANIONS_ANNOTATION not in api_server.get("peergroupslices", team_b)["metadata"]["annotations"]
        # and a NodeRuleSet written alone (a pod on n3 that is nobody's peer) loses its companions
        assert COMPANIONS_ANNOTATION in api_server.get("noderulesets", "n3")["metadata"]["annotations"]
        api_server.apply(namespace("ops"))
        mark, slice_mark = len(api_server.writes(NRS_PATH)), len(api_server.writes(SLICES_PATH))
        api_server.apply(pod("ops", "cron", "n3", "10.244.3.30", {"app": "cron"}))
        wait_for(lambda: published(api_server) == expected(api_server), what="the new pod on n3")
        settle(api_server)
        assert ruleset_writes(api_server, mark) == [("PATCH", "n3")] and slice_writes(api_server, slice_mark) == []
        assert COMPANIONS_ANNOTATION not in api_server.get("noderulesets", "n3")["metadata"]["annotations"]


@layouts
def test_namespace_relabel_changes_affected_rule_sets(api_server, kubeconfig, layout):
    seed(api_server)
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server)
        mark, slice_mark = len(api_server.writes(NRS_PATH)), len(api_server.writes(SLICES_PATH))
        api_server.apply(namespace("dev", team="c"))  # dev no longer matches team=b
        wait_for(lambda: published(api_server) == expected(api_server), what="the relabel to be published")
        settle(api_server)
        specs = published(api_server)
        web1 = pod_spec(specs["n1"], "prod/web-1")
        assert group_cidrs(specs["n1"], web1.ingress[0].peers) == set()
        if layout == "inline":  # the NodeRuleSets holding the group that lost a member (web-1's, web-2's)
            assert sorted(ruleset_writes(api_server, mark)) == [("PATCH", "n1"), ("PATCH", "n2")]
            return
        # one shared group lost a member: one slice written, no node's own objects
        assert ruleset_writes(api_server, mark) == []
        assert [m for m, _ in slice_writes(api_server, slice_mark)] == ["PATCH"]


@layouts
def test_restart_patches_nothing(api_server, kubeconfig, layout):
    seed(api_server)
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server)
    before = published(api_server)
    mark, slice_mark = len(api_server.writes(NRS_PATH)), len(api_server.writes(SLICES_PATH))
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server, quiet=1.5)
        assert ruleset_writes(api_server, mark) == [] and slice_writes(api_server, slice_mark) == []
        assert published(api_server) == before
        # and it is live: a change after the restart is published
        api_server.apply(pod("prod", "db", "n2", "10.244.2.21", {"app": "db"}))
        wait_for(lambda: published(api_server) == expected(api_server), what="a change after the restart")
        assert ruleset_writes(api_server, mark) == [("PATCH", "n2")]


@layouts
def test_restart_repairs_what_changed_while_down(api_server, kubeconfig, layout):
    seed(api_server)
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server)
    api_server.delete("pods", "web-2", "prod")
    api_server.delete("nodes", "n3")
    api_server.delete("pods", "client", "dev")
    api_server.delete("noderulesets", "n1")  # someone deleted it by hand
    mark = len(api_server.writes(NRS_PATH))
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server)
        assert published(api_server) == expected(api_server)
        assert set(published(api_server)) == {"n1", "n2"}
        writes = sorted(ruleset_writes(api_server, mark))
        # inline, n1's groups changed too (n1 is re-created with them either way)
        assert writes == [("DELETE", "n3"), ("PATCH", "n2"), ("POST", "")]
        # the groups nobody names any more are gone; nothing else is left behind
        assert api_objects(api_server) == {(o["kind"], o["metadata"]["name"]): o["spec"]
                                           for o in split(expected(api_server).values(), LAYOUTS[layout])}


def test_a_rule_set_edited_by_hand_is_written_whole_again(api_server, kubeconfig):
    """JSON Patches assume the API holds what the controller wrote last: an edit behind its back
    (the spec-hash annotation left as it was) is noticed in the patched result and repaired."""
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        edited = api_server.get("noderulesets", "n2")
        edited["spec"]["pods"] = edited["spec"]["pods"][1:]  # kubectl edit: a pod gone, the annotation kept
        api_server.apply(edited)
        mark = len(api_server.writes(NRS_PATH))
        api_server.apply(pod("prod", "db", "n2", "10.244.2.99", {"app": "db"}))
        wait_for(lambda: published(api_server) == expected(api_server), what="n2 repaired and up to date")
        settle(api_server)
        writes = api_server.writes(NRS_PATH)[mark:]  # the patch finds another pod where db was: refused
        assert [(r.content_type, r.status) for r in writes] == [("application/json-patch+json", 422),
                                                                ("application/merge-patch+json", 200)]


def events_for(api: FakeApiServer, name: str) -> list[dict]:
    return [e for e in api.list("events") if e["involvedObject"]["name"] == name]


def test_invalid_policy_isolates_its_pods_reports_the_field_and_leaves_others_alone(api_server, kubeconfig):
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        before = published(api_server)
        mark = len(api_server.writes(NRS_PATH))
        bad = {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}
        api_server.apply(policy("dev", "broken", bad))
        wait_for(lambda: events_for(api_server, "broken"), what="an Event on the invalid policy")
        settle(api_server)
        (event,) = events_for(api_server, "broken")
        assert event["type"] == "Warning" and event["reason"] == "InvalidPolicy"
        assert "spec.ingress[0].from[0].ipBlock.cidr" in event["message"]
        assert event["involvedObject"]["uid"] == api_server.get("networkpolicies", "broken", "dev")["metadata"]["uid"]
        # never valid: the pods it selects are isolated with no allow rules; other nodes untouched
        after = published(api_server)
        client = pod_spec(after["n3"], "dev/client")
        assert client.isolation.ingress and client.ingress == []
        assert after["n1"] == before["n1"] and after["n2"] == before["n2"]
        assert ruleset_writes(api_server, mark) == [("PATCH", "n3")]
        assert 'netfence_controller_policy_problems{reason="InvalidPolicy"} 1.0' in metrics_text(controller)

        # a valid policy that turns invalid keeps its last valid version in force
        mark = len(api_server.writes(NRS_PATH))
        broken_db = json.loads(json.dumps(DB_FROM_WEB))
        broken_db["ingress"][0]["ports"] = [{"port": 5432, "endPort": 5000}]
        api_server.apply(policy("prod", "db-from-web", broken_db))
        wait_for(lambda: events_for(api_server, "db-from-web"), what="an Event on the broken policy")
        settle(api_server)
        (event,) = events_for(api_server, "db-from-web")
        assert "spec.ingress[0].ports[0]" in event["message"] and "last valid version" in event["message"]
        assert published(api_server)["n2"] == before["n2"]
        assert ruleset_writes(api_server, mark) == []

        # fixing it makes it count again, and the Event is not repeated
        api_server.apply(policy("dev", "broken", {**bad, "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.10.0/24"}}]}]}))
        wait_for(lambda: pod_spec(published(api_server)["n3"], "dev/client").ingress, what="the fixed policy's rules")
        settle(api_server)
        assert len(events_for(api_server, "broken")) == 1


def test_node_deleted_loses_its_rule_set(api_server, kubeconfig):
    seed(api_server)
    api_server.apply(node("n4", "10.244.4.0/24", "172.18.0.5"))
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        wait_for(lambda: api_server.get("noderulesets", "n4"), what="n4's rule set")
        mark = len(api_server.writes(NRS_PATH))
        api_server.delete("nodes", "n4")
        wait_for(lambda: api_server.get("noderulesets", "n4") is None, what="n4's rule set to go")
        settle(api_server)
        assert ruleset_writes(api_server, mark) == [("DELETE", "n4")]
        assert 'netfence_controller_rulesets_published_total{action="delete"} 1.0' in metrics_text(controller)


def test_terminating_pod_keeps_its_rules_until_it_is_gone(api_server, kubeconfig):
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        web2 = api_server.get("pods", "web-2", "prod")
        web2["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # what a graceful delete looks like
        api_server.apply(web2)
        time.sleep(0.5)
        settle(api_server)
        db = pod_spec(published(api_server)["n2"], "prod/db")
        assert "10.244.2.10/32" in group_cidrs(published(api_server)["n2"], db.ingress[0].peers)
        finished = api_server.get("pods", "web-2", "prod")
        finished["status"]["phase"] = "Succeeded"  # it gave its IP back
        api_server.apply(finished)
        wait_for(lambda: "10.244.2.10/32" not in group_cidrs(published(api_server)["n2"], db.ingress[0].peers),
                 what="the finished pod to leave the peer group")


def test_same_name_recreated_pod_replaces_the_old_one(api_server, kubeconfig):
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        api_server.delete("pods", "web-1", "prod")
        api_server.apply(pod("prod", "web-1", "n1", "10.244.1.11", {"app": "web"}))  # a StatefulSet would
        wait_for(lambda: published(api_server) == expected(api_server), what="the new web-1")
        assert pod_spec(published(api_server)["n1"], "prod/web-1").ips == ["10.244.1.11"]


def test_survives_api_restart_and_notices_deletions_behind_410(api_server, kubeconfig, caplog):
    caplog.set_level(logging.INFO, logger="netfence")
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        # while the API is down, web-2 is deleted; the history is compacted, so kopf's watch
        # resumes with 410 Gone, re-lists, and never sees a DELETED for web-2
        api_server.restart(downtime=0.5, during=lambda: api_server.delete("pods", "web-2", "prod"))
        wait_for(lambda: published(api_server) == expected(api_server), timeout=30, what="web-2 to be dropped")
        db = pod_spec(published(api_server)["n2"], "prod/db")
        assert "10.244.2.10/32" not in group_cidrs(published(api_server)["n2"], db.ingress[0].peers)
        assert "dropped 1 Pod(s) deleted while the watch was down: prod/web-2" in caplog.text
        # still live afterwards
        api_server.apply(pod("prod", "web-3", "n3", "10.244.3.30", {"app": "web"}))
        wait_for(lambda: published(api_server) == expected(api_server), what="a change after the restart")


def test_metrics_and_readiness(api_server, kubeconfig):
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        text = metrics_text(controller)
        assert 'netfence_controller_rulesets_published_total{action="create"} 3.0' in text
        assert 'netfence_controller_objects_watched{kind="Pod"} 4.0' in text
        assert 'netfence_controller_objects_watched{kind="Namespace"} 4.0' in text  # default, kube-system, prod, dev
        assert 'netfence_controller_compile_duration_seconds_count{phase="publish"} 3.0' in text
        port = controller.metrics_server.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert r.status == 200


def test_namespace_restriction_watches_pods_and_policies_only_there(api_server, kubeconfig):
    seed(api_server)
    with running_controller(kubeconfig, namespaces=("dev",)) as controller:
        wait_synced(controller)
        settle(api_server)
        specs = published(api_server)
        assert set(specs) == {"n1", "n2", "n3"}  # nodes are cluster-scoped: all of them
        assert all(not p.isolation.ingress for s in specs.values() for p in s.pods)  # prod's policies unseen
        assert controller.state.counts()["Pod"] == 1 and controller.state.counts()["NetworkPolicy"] == 0
        api_server.apply(policy("dev", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
        wait_for(lambda: any(p.isolation.ingress for p in published(api_server)["n3"].pods), what="dev's policy")


def test_a_rule_set_the_api_refuses_is_a_metric_an_event_and_a_degraded_condition(api_server, kubeconfig):
    """Issue 14: an object over etcd's size limit must never be a node that quietly stops updating."""
    seed(api_server)
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        # n2's rules grow past the limit in one step (db becomes a pod with 300 allowed ports);
        # n1's change too and must still be published
        many_ports = {**DB_FROM_WEB, "podSelector": {"matchLabels": {"app": "db-2"}},
                      "ingress": [{**DB_FROM_WEB["ingress"][0], "ports": [{"port": 10000 + i} for i in range(300)]}]}
        api_server.apply(policy("prod", "db-many-ports", many_ports))
        settle(api_server)
        before = published(api_server)
        largest = max(len(json.dumps(o)) for plural in ("noderulesets", "peergroupslices")
                      for o in api_server.list(plural))
        api_server.max_object_bytes = largest + 1000  # room for n1's change and for Events
        api_server.apply(pod("prod", "db", "n2", "10.244.2.20", {"app": "db-2"}))
        api_server.apply(pod("prod", "web-3", "n1", "10.244.1.11", {"app": "web"}))
        wait_for(lambda: 'netfence_controller_rulesets_refused{node="n2"} 1.0' in metrics_text(controller),
                 what="the refusal metric")
        wait_for(lambda: events_for(api_server, "n2"), what="an Event on Node n2")
        (event,) = events_for(api_server, "n2")
        assert event["involvedObject"]["kind"] == "Node" and event["reason"] == "RuleSetRefused"
        assert event["metadata"]["namespace"] == "default" and "too large" in event["message"]
        conditions = wait_for(lambda: [c for c in (api_server.get("noderulesets", "n2").get("status") or {})
                                       .get("conditions", []) if c["type"] == "Degraded"],
                              what="a Degraded condition on NodeRuleSet n2")
        assert conditions[0]["status"] == "True" and conditions[0]["reason"] == "RuleSetTooLarge"
        assert "keeps enforcing" in conditions[0]["message"]
        # n2's own part stays as last accepted (the shared groups it names still follow the cluster:
        # web-3 joined one of them)
        assert published(api_server)["n2"].pods == before["n2"].pods
        wait_for(lambda: published(api_server)["n1"] == expected(api_server)["n1"], what="n1 still published")
        settle(api_server)
        refused_writes = len(ruleset_writes(api_server))
        time.sleep(1.5)  # the same refused spec is not sent again and again
        assert len(ruleset_writes(api_server)) == refused_writes
        # room again: the next change gets through and the refusal is cleared
        api_server.max_object_bytes = 1536 * 1024
        api_server.apply(pod("prod", "db-last", "n2", "10.244.2.200", {"app": "db"}))
        wait_for(lambda: published(api_server)["n2"] == expected(api_server)["n2"], what="n2 published again")
        wait_for(lambda: "netfence_controller_rulesets_refused{" not in metrics_text(controller),
                 what="the refusal metric cleared")


def test_a_refused_peer_group_slice_is_loud_on_the_node_that_needs_it(api_server, kubeconfig):
    """A shared group's slice the API refuses: the node whose rules name the group is Degraded
    (metric, Event, condition naming the slice) and keeps its own rules as they were."""
    seed(api_server)
    excepts = [f"10.{i}.{i}.{i}/32" for i in range(1, 200)]
    wide = {"podSelector": {"matchLabels": {"app": "db-2"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": excepts}}]}]}
    api_server.apply(policy("prod", "wide", wide))  # selects no pod yet: its group is not published
    with controller_in(kubeconfig, "slices") as controller:
        wait_synced(controller)
        settle(api_server)
        before = published(api_server)
        largest = max(len(json.dumps(o)) for plural in ("noderulesets", "peergroupslices")
                      for o in api_server.list(plural))
        api_server.max_object_bytes = max(largest, 2048) + 200  # the wide group's 4 KiB slices do not fit
        api_server.apply(pod("prod", "db", "n2", "10.244.2.20", {"app": "db-2"}))
        wait_for(lambda: 'netfence_controller_rulesets_refused{node="n2"} 1.0' in metrics_text(controller),
                 what="the refusal metric")
        (event,) = wait_for(lambda: events_for(api_server, "n2"), what="an Event on Node n2")
        assert "PeerGroupSlice pg-" in event["message"] and "too large" in event["message"]
        conditions = wait_for(lambda: [c for c in (api_server.get("noderulesets", "n2").get("status") or {})
                                       .get("conditions", []) if c["type"] == "Degraded"], what="Degraded on n2")
        assert conditions[0]["reason"] == "RuleSetTooLarge" and "PeerGroupSlice" in conditions[0]["message"]
        settle(api_server)
        assert published(api_server)["n2"] == before["n2"]  # n2's NodeRuleSet was not moved onto the group
        assert 'netfence_controller_rulesets_refused{node="n1"}' not in metrics_text(controller)
