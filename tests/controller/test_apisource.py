"""The agent's ApiRuleSetSource against the fake API server (and with the real controller)."""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
from typing import Iterator

import pytest

import netfence_api
from controller.fakeapi import FakeApiServer
from controller.harness import NRS_PATH, node, pod, policy, running_controller, settle, wait_for, wait_synced
from controller.test_controller import expected
from netfence_agent.apisource import ApiRuleSetSource
from netfence_api.crd import COMPANIONS_ANNOTATION, HASH_ANNOTATION, companions_value
from netfence_api.slices import DEFAULT_BOUNDS, Bounds, cidr_key, split

pytestmark = pytest.mark.slow


def ruleset(name: str, pods: list | None = None) -> dict:
    return {"apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet", "metadata": {"name": name},
            "spec": {"nodeName": name, "pods": pods or [], "peerGroups": [], "peerPortGroups": []}}


def a_pod(ip: str) -> dict:
    return {"namespace": "x", "name": "a", "ips": [ip], "isolation": {"ingress": True, "egress": False}}


class Consumer:
    """Runs source.updates() in a thread, like the agent daemon does."""

    def __init__(self, source: ApiRuleSetSource):
        self.source = source
        self.received: queue.Queue[netfence_api.NodeRuleSet] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for rule_set in self.source.updates():
            self.received.put(rule_set)

    def next(self, timeout: float = 10.0) -> netfence_api.NodeRuleSet:
        return self.received.get(timeout=timeout)

    def nothing_for(self, seconds: float) -> bool:
        try:
            got = self.received.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected delivery: generation {got.metadata.generation}")


@pytest.fixture
def consumer(kubeconfig) -> Iterator:
    made: list[Consumer] = []

    def make(node_name: str) -> Consumer:
        c = Consumer(ApiRuleSetSource(node_name, kubeconfig))
        made.append(c)
        return c

    yield make
    for c in made:
        c.source.close()
        c.thread.join(5)
        assert not c.thread.is_alive(), "updates() did not end after close()"


def status(generation: int, digest: str) -> netfence_api.NodeRuleSetStatus:
    return netfence_api.NodeRuleSetStatus(
        observedGeneration=generation, appliedHash=digest, lastAppliedTime="2026-01-01T00:00:00Z",
        conditions=[netfence_api.Condition(type="Applied", status="True", reason="Applied", message="ok"),
                    netfence_api.Condition(type="Degraded", status="False", reason="AsExpected")])


def test_sees_only_its_own_rule_set_and_spec_changes(api_server: FakeApiServer, consumer):
    api_server.apply(ruleset("n1"))
    api_server.apply(ruleset("n2"))
    c = consumer("n1")
    first = c.next()
    assert first.metadata.name == "n1" and first.metadata.generation == 1
    api_server.apply(ruleset("n2", [a_pod("10.0.0.1")]))
    assert c.nothing_for(1.0)
    stored = api_server.get("noderulesets", "n1")
    stored["metadata"]["annotations"] = {"note": "metadata only"}
    api_server.apply(stored)
    assert c.nothing_for(1.0)
    api_server.apply(ruleset("n1", [a_pod("10.0.0.2")]))
    second = c.next()
    assert second.metadata.generation == 2 and second.spec.pods[0].ips == ["10.0.0.2"]
    watches = [r for r in api_server.requests if r.path == NRS_PATH and r.query.get("watch")]
    assert watches and all(r.query.get("fieldSelector") == "metadata.name=n1" for r in watches)


def test_report_writes_status_only(api_server: FakeApiServer, consumer):
    api_server.apply(ruleset("n1", [a_pod("10.0.0.2")]))
    c = consumer("n1")
    rule_set = c.next()
    before = api_server.get("noderulesets", "n1")
    c.source.report(status(rule_set.metadata.generation, rule_set.spec.content_hash()))
    after = api_server.get("noderulesets", "n1")
    assert after["status"]["observedGeneration"] == 1
    assert after["status"]["appliedHash"] == rule_set.spec.content_hash()
    assert [cond["type"] for cond in after["status"]["conditions"]] == ["Applied", "Degraded"]
    assert after["spec"] == before["spec"] and after["metadata"]["generation"] == before["metadata"]["generation"]
    assert c.nothing_for(1.0)  # its own status write is no change to apply
    # a later status that says less removes what it no longer says
    c.source.report(netfence_api.NodeRuleSetStatus(observedGeneration=1, conditions=[]))
    assert "appliedHash" not in api_server.get("noderulesets", "n1")["status"]
    status_writes = [r for r in api_server.writes(NRS_PATH) if r.path.endswith("/status")]
    assert len(status_writes) == 2 and all(r.method == "PATCH" for r in status_writes)


def test_relists_after_410_without_redelivering(api_server: FakeApiServer, consumer):
    api_server.apply(ruleset("n1"))
    c = consumer("n1")
    c.next()
    api_server.apply(ruleset("n2"))  # history moves on
    api_server.compact()
    api_server.drop_watches()  # the reconnect from the old resourceVersion gets 410
    wait_for(lambda: sum(1 for r in api_server.requests if r.path == NRS_PATH and not r.query.get("watch")) >= 2,
             what="a re-list")
    assert c.nothing_for(0.5)
    api_server.apply(ruleset("n1", [a_pod("10.0.0.3")]))
    assert c.next().metadata.generation == 2


def test_survives_api_restart(api_server: FakeApiServer, consumer):
    api_server.apply(ruleset("n1"))
    c = consumer("n1")
    c.next()
    api_server.restart(downtime=1.0, during=lambda: api_server.apply(ruleset("n1", [a_pod("10.0.0.4")])))
    got = c.next(timeout=20)
    assert got.metadata.generation == 2 and got.spec.pods[0].ips == ["10.0.0.4"]


def test_deleted_rule_set_is_not_delivered_and_a_new_one_is(api_server: FakeApiServer, consumer):
    api_server.apply(ruleset("n1", [a_pod("10.0.0.5")]))
    c = consumer("n1")
    c.next()
    api_server.delete("noderulesets", "n1")
    assert c.nothing_for(1.0)
    api_server.apply(ruleset("n1"))  # recreated: generation 1 again, new uid
    assert c.next().metadata.generation == 1


def test_invalid_rule_set_is_reported_not_delivered(api_server: FakeApiServer, consumer):
    api_server.apply(ruleset("n1"))
    c = consumer("n1")
    c.next()
    bad = ruleset("n1", [{"namespace": "x", "name": "a", "ips": []}])  # ips needs at least one
    api_server.apply(bad)
    wait_for(lambda: (api_server.get("noderulesets", "n1").get("status") or {}).get("conditions"), what="a Degraded status")
    (cond,) = api_server.get("noderulesets", "n1")["status"]["conditions"]
    assert cond["type"] == "Degraded" and cond["reason"] == "InvalidRuleSet" and "ips" in cond["message"]
    assert c.nothing_for(0.5)


def test_with_the_controller_status_is_visible_and_nothing_is_republished(api_server: FakeApiServer, kubeconfig, consumer):
    api_server.apply(node("n1", "10.244.1.0/24", "172.18.0.2"))
    api_server.apply(pod("default", "web", "n1", "10.244.1.10", {"app": "web"}))
    api_server.apply(policy("default", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        c = consumer("n1")
        rule_set = c.next()
        assert [p.key for p in rule_set.spec.pods] == ["default/web"]
        mark = len(api_server.writes(NRS_PATH))
        c.source.report(status(rule_set.metadata.generation, rule_set.spec.content_hash()))
        settle(api_server)
        stored = api_server.get("noderulesets", "n1")
        assert stored["status"]["observedGeneration"] == 1 and stored["metadata"]["generation"] == 1
        assert rule_set.spec == expected(api_server)["n1"]
        assert [(r.method, r.path) for r in api_server.writes(NRS_PATH)[mark:]] == [("PATCH", f"{NRS_PATH}/n1/status")]


# --------------------------------------------------------------------------- groups in PeerGroupSlices (issue 14)
def publish(api: FakeApiServer, specs: list[netfence_api.NodeRuleSetSpec], bounds: Bounds = DEFAULT_BOUNDS) -> list[dict]:
    """Write the objects the way the controller does: referenced objects first."""
    objects = split(specs, bounds)  # referenced objects first
    for obj in objects:
        api.apply(obj)
    return objects


GROUP = netfence_api.PeerGroup(name="pg-00000000000a", selector="ns a pods{app=web}",
                               cidrs=[f"10.1.0.{i}/32" for i in range(1, 41)])


def db_spec(group: netfence_api.PeerGroup = GROUP, pods: int = 3) -> netfence_api.NodeRuleSetSpec:
    rule = netfence_api.AllowRule(origin=["a/db ingress[0]"], peers=group.name, ports=[netfence_api.PortRange(port=5432)])
    return netfence_api.NodeRuleSetSpec(nodeName="n1", peerGroups=[group], pods=[
        netfence_api.PolicedPod(namespace="a", name=f"db-{i}", ips=[f"10.2.0.{i}"],
                                isolation=netfence_api.Isolation(ingress=True), ingress=[rule]) for i in range(pods)])


SMALL = Bounds(group_slice_bytes=200, inline_groups_bytes=0)  # groups in several slices each


def degraded(api: FakeApiServer) -> dict | None:
    conditions = (api.get("noderulesets", "n1").get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Degraded" and c["status"] == "True"), None)


def test_assembles_the_group_slices_and_follows_a_group_member_change(api_server: FakeApiServer, consumer):
    publish(api_server, [db_spec()], SMALL)
    assert len(api_server.list("peergroupslices")) > 1
    assert api_server.get("noderulesets", "n1")["spec"]["peerGroups"] == []
    c = consumer("n1")
    first = c.next()
    assert first.spec == db_spec() and first.spec.content_hash() == db_spec().content_hash()
    assert first.metadata.generation == 1
    grown = GROUP.model_copy(update={"cidrs": [*GROUP.cidrs, "10.1.0.99/32"]})
    publish(api_server, [db_spec(grown)], SMALL)  # one group slice changes, nothing else
    second = c.next()
    assert second.spec == db_spec(grown)
    assert second.spec.pods is first.spec.pods  # render sees at once that only members moved
    assert second.metadata.generation == 1  # the NodeRuleSet itself did not change
    assert c.nothing_for(0.5)


def test_a_rule_set_ahead_of_a_new_group_waits_for_it(api_server: FakeApiServer, consumer):
    publish(api_server, [db_spec()], SMALL)
    c = consumer("n1")
    c.next()
    c.source.INCOMPLETE_GRACE = 30.0
    other = netfence_api.PeerGroup(name="pg-00000000000b", selector="ns b pods{}", cidrs=["10.3.0.1/32"])
    spec = db_spec()
    spec = spec.model_copy(update={"peerGroups": [GROUP, other], "pods": [*spec.pods, netfence_api.PolicedPod(
        namespace="b", name="api", ips=["10.2.0.9"], isolation=netfence_api.Isolation(ingress=True),
        ingress=[netfence_api.AllowRule(origin=["b/api ingress[0]"], peers=other.name)])]})
    objects = split([spec], SMALL)
    api_server.apply(next(o for o in objects if o["kind"] == "NodeRuleSet"))  # names a group not there yet
    assert c.nothing_for(1.0)
    for obj in objects:
        if obj["kind"] == "PeerGroupSlice" and obj["metadata"]["name"].startswith(other.name):
            api_server.apply(obj)
    assert c.next().spec == spec


def test_a_missing_group_keeps_the_rules_and_is_reported(api_server: FakeApiServer, consumer):
    objects = publish(api_server, [db_spec()], SMALL)
    c = consumer("n1")
    c.source.INCOMPLETE_GRACE = 0.5
    rule_set = c.next()
    c.source.report(status(rule_set.metadata.generation, rule_set.spec.content_hash()))
    victim = next(o for o in objects if o["kind"] == "PeerGroupSlice")
    api_server.delete("peergroupslices", victim["metadata"]["name"])
    cond = wait_for(lambda: degraded(api_server), what="a Degraded condition")
    assert cond["reason"] == "IncompleteRuleSet" and GROUP.name in cond["message"]
    assert "the rules in force stay" in cond["message"]
    assert api_server.get("noderulesets", "n1")["status"]["appliedHash"] == rule_set.spec.content_hash()
    assert c.nothing_for(0.5)
    api_server.apply(victim)  # back: the same rules, nothing to apply; the status is the agent's again
    wait_for(lambda: degraded(api_server) is None, what="the Degraded condition to clear")
    assert c.nothing_for(0.5)


def test_an_invalid_slice_is_reported_at_once(api_server: FakeApiServer, consumer):
    objects = publish(api_server, [db_spec()], SMALL)
    c = consumer("n1")
    c.source.INCOMPLETE_GRACE = 60.0
    c.next()
    bad = copy.deepcopy(next(o for o in objects if o["kind"] == "PeerGroupSlice"))
    bad["spec"]["peerPortGroup"] = {"name": GROUP.name, "selector": "x"}  # both kinds: invalid
    api_server.apply(bad)
    cond = wait_for(lambda: degraded(api_server), timeout=5, what="a Degraded condition")
    assert cond["reason"] == "InvalidRuleSet" and bad["metadata"]["name"] in cond["message"]
    assert c.nothing_for(0.5)


def test_only_its_own_rule_set_is_watched(api_server: FakeApiServer, consumer):
    publish(api_server, [db_spec(), db_spec().model_copy(update={"nodeName": "n2"})], SMALL)
    c = consumer("n1")
    assert c.next().spec == db_spec()
    watches = wait_for(lambda: [r for r in api_server.requests if r.path.endswith("/noderulesets") and r.query.get("watch")],
                       what="the NodeRuleSet watch")
    assert all(r.query.get("fieldSelector") == "metadata.name=n1" for r in watches)
    api_server.apply(next(o for o in split([db_spec(pods=5).model_copy(update={"nodeName": "n2"})], SMALL)
                          if o["kind"] == "NodeRuleSet"))
    assert c.nothing_for(1.0)



def test_status_changes_cost_a_metadata_event_not_the_whole_object(api_server: FakeApiServer, consumer):
    """The agent's own status report comes back on its watch: as metadata only (the NodeRuleSet is
    fetched whole only when its generation moves), so a pod event costs the object once, not twice."""
    pods = [{**a_pod(f"10.0.{i // 250}.{i % 250 + 1}"), "name": f"pod-{i}"} for i in range(200)]
    api_server.apply(ruleset("n1", pods))
    size = len(json.dumps(api_server.get("noderulesets", "n1"), separators=(",", ":")))
    c = consumer("n1")
    first = c.next()
    wait_for(lambda: [r for r in api_server.requests if r.path == NRS_PATH and r.query.get("watch")], what="the watch")
    before = c.source.bytes_received
    c.source.report(status(first.metadata.generation, first.spec.content_hash()))
    wait_for(lambda: c.source.bytes_received > before, what="the status echo")
    assert c.nothing_for(0.5)
    assert c.source.bytes_received - before < 2000 < size
    before = c.source.bytes_received
    api_server.apply(ruleset("n1", [*pods, {**a_pod("10.9.9.9"), "name": "newcomer"}]))
    assert len(c.next().spec.pods) == 201
    assert size < c.source.bytes_received - before < size + 3000  # the metadata event and one GET


def test_a_large_rule_set_comes_gzipped(api_server: FakeApiServer, consumer):
    """A node of ~1,000 pods has a NodeRuleSet of ~430 KiB: its GET travels gzipped, as the
    apiserver sends responses over 128 KiB to clients that accept it."""
    pods = [{**a_pod(f"10.0.{i // 250}.{i % 250 + 1}"), "name": f"pod-{i}"} for i in range(2000)]
    api_server.apply(ruleset("n1", pods[:10]))
    c = consumer("n1")
    c.next()
    wait_for(lambda: [r for r in api_server.requests if r.path == NRS_PATH and r.query.get("watch")], what="the watch")
    api_server.apply(ruleset("n1", pods))
    size = len(json.dumps(api_server.get("noderulesets", "n1"), separators=(",", ":")))
    before = c.source.bytes_received
    assert len(c.next().spec.pods) == 2000
    assert size > 128 * 1024 and c.source.bytes_received - before < size / 4


def test_changes_wait_for_an_announced_rule_set_and_are_synced_once(api_server: FakeApiServer, consumer):
    """One pod event may change a group slice and the NodeRuleSet; the NodeRuleSet's watch says a
    new generation is coming before its GET is back: the slice waits for it (one delivery, one
    sync), and not longer than COMING_WAIT if the GET never comes."""
    publish(api_server, [db_spec()], SMALL)
    c = consumer("n1")
    c.next()
    source = c.source
    source.COMING_WAIT = 30.0
    grown = GROUP.model_copy(update={"cidrs": [*GROUP.cidrs, "10.1.0.99/32"]})
    before = {o["metadata"]["name"] for o in split([db_spec()], SMALL) if o["kind"] == "PeerGroupSlice"}
    after = split([db_spec(grown, pods=4)], SMALL)
    slices = [o for o in after if o["kind"] == "PeerGroupSlice"]
    ruleset_obj = next(o for o in after if o["kind"] == "NodeRuleSet")
    ruleset_obj["metadata"].update(generation=2, uid="u")
    source._events.put(("noderulesets", "COMING", None))  # as the follower does before its GET
    for name in before - {o["metadata"]["name"] for o in slices}:
        source._events.put(("peergroupslices", "DELETED", {"metadata": {"name": name}}))
    for obj in slices:
        source._events.put(("peergroupslices", "MODIFIED", obj))
    assert c.nothing_for(0.5)
    source._events.put(("noderulesets", "MODIFIED", ruleset_obj))
    assert c.next().spec == db_spec(grown, pods=4)
    assert c.nothing_for(0.3)
    # announced, never fetched: the group change goes through after COMING_WAIT
    source.COMING_WAIT = 0.5
    source._events.put(("noderulesets", "COMING", None))
    regrown = grown.model_copy(update={"cidrs": sorted([*grown.cidrs, "10.1.0.98/32"], key=cidr_key)})
    for obj in split([db_spec(regrown, pods=4)], SMALL):
        if obj["kind"] == "PeerGroupSlice":
            source._events.put(("peergroupslices", "MODIFIED", obj))
    started = time.monotonic()
    assert c.next(timeout=5).spec == db_spec(regrown, pods=4)
    assert 0.4 <= time.monotonic() - started


def one_round_change(api_server: FakeApiServer, consumer):
    """n1's agent has its rule set; then one round's objects: a member more in GROUP, a pod more.
    Returns the consumer, the grown group, the new NodeRuleSet, its changed and unchanged slices."""
    publish(api_server, [db_spec()], SMALL)
    c = consumer("n1")
    c.next()
    c.source.COMING_WAIT = 30.0
    grown = GROUP.model_copy(update={"cidrs": [*GROUP.cidrs, "10.1.0.99/32"]})
    after = split([db_spec(grown, pods=4)], SMALL)
    ruleset_obj = copy.deepcopy(next(o for o in after if o["kind"] == "NodeRuleSet"))
    ruleset_obj["metadata"].update(generation=2, uid="u")
    slices = [o for o in after if o["kind"] == "PeerGroupSlice"]
    changed = [o for o in slices if (api_server.get("peergroupslices", o["metadata"]["name"]) or {}).get("spec") != o["spec"]]
    return c, grown, ruleset_obj, changed, [o for o in slices if o not in changed]


def test_a_slice_written_with_its_rule_set_waits_for_it(api_server: FakeApiServer, consumer):
    """A slice written in the same round as this node's NodeRuleSet names it (and its spec-hash):
    seen first, it waits for the rule set, so both are applied in one sync; a slice naming another
    node, a rule set already here, or one in a listing does not wait."""
    c, grown, ruleset_obj, changed, _ = one_round_change(api_server, consumer)
    source = c.source
    digest = ruleset_obj["metadata"]["annotations"][HASH_ANNOTATION]

    def stamped(obj: dict, companions: dict[str, str]) -> dict:
        obj = copy.deepcopy(obj)
        obj["metadata"]["annotations"][COMPANIONS_ANNOTATION] = companions_value(companions)
        return obj

    for obj in changed:
        source._events.put(("peergroupslices", "MODIFIED", stamped(obj, {"n0": "sha256:00", "n1": digest})))
    assert c.nothing_for(0.5)  # no announcement from the NodeRuleSet's watch: the slice said it
    source._events.put(("noderulesets", "MODIFIED", ruleset_obj))
    assert c.next().spec == db_spec(grown, pods=4)
    assert c.nothing_for(0.3)

    regrown = grown.model_copy(update={"cidrs": sorted([*grown.cidrs, "10.1.0.98/32"], key=cidr_key)})
    slices = [o for o in split([db_spec(regrown, pods=4)], SMALL) if o["kind"] == "PeerGroupSlice"]
    for companions in ({"n1": digest}, {"n2": "sha256:1234"}):  # a rule set already here; another node's
        for obj in slices:
            source._events.put(("peergroupslices", "MODIFIED", stamped(obj, companions)))
        assert c.next(timeout=0.3).spec == db_spec(regrown, pods=4)
        slices = [o for o in split([db_spec(grown, pods=4)], SMALL) if o["kind"] == "PeerGroupSlice"]
        regrown = grown
    # a listing: the companions are of some earlier round
    source._events.put(("peergroupslices", "LIST", [stamped(o, {"n1": "sha256:feed"}) for o in split(
        [db_spec(GROUP, pods=4)], SMALL) if o["kind"] == "PeerGroupSlice"]))
    assert c.next(timeout=0.3).spec == db_spec(GROUP, pods=4)


def test_a_rule_set_written_with_slices_waits_for_them(api_server: FakeApiServer, consumer):
    """The other order: the NodeRuleSet is here first and names the slices written with it; it
    waits for them (one delivery), but not for slices already here, nor longer than COMING_WAIT."""
    c, grown, ruleset_obj, changed, unchanged = one_round_change(api_server, consumer)
    source = c.source
    assert changed and unchanged
    ruleset_obj["metadata"]["annotations"][COMPANIONS_ANNOTATION] = companions_value(
        {o["metadata"]["name"]: o["metadata"]["annotations"][HASH_ANNOTATION] for o in changed + unchanged})
    source._events.put(("noderulesets", "MODIFIED", ruleset_obj))
    assert c.nothing_for(0.5)
    for obj in changed:
        source._events.put(("peergroupslices", "MODIFIED", obj))
    assert c.next().spec == db_spec(grown, pods=4)
    assert c.nothing_for(0.3)
    # written with a slice that never comes: delivered after COMING_WAIT with what is here
    source.COMING_WAIT = 0.5
    ruleset_obj = copy.deepcopy(next(o for o in split([db_spec(grown, pods=5)], SMALL) if o["kind"] == "NodeRuleSet"))
    ruleset_obj["metadata"].update(generation=3, uid="u")
    ruleset_obj["metadata"]["annotations"][COMPANIONS_ANNOTATION] = companions_value({"pg-lost-0": "sha256:0123"})
    started = time.monotonic()
    source._events.put(("noderulesets", "MODIFIED", ruleset_obj))
    assert c.next(timeout=5).spec == db_spec(grown, pods=5)
    assert 0.4 <= time.monotonic() - started
