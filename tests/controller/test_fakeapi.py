"""The fake API server behaves like a real apiserver on the points a controller can get wrong."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import kubernetes
import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi, NetworkingV1Api
from kubernetes.client.exceptions import ApiException

from controller.conftest import read_watch
from controller.fakeapi import FakeApiServer, field_selector_matches, label_selector_matches

GROUP, VERSION, PLURAL = "netfence.io", "v1alpha1", "noderulesets"


def nrs(name: str, pods: int = 0) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodeRuleSet", "metadata": {"name": name},
            "spec": {"nodeName": name, "pods": [], "peerGroups": [], "peerPortGroups": [], "x": pods}}


def pod(name: str, ns: str = "default", labels: dict | None = None, node: str = "n1") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}


def test_create_sets_uid_resource_version_and_generation(k8s, api_server):
    co = CustomObjectsApi(k8s)
    a = co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    b = co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("b"))
    assert a["metadata"]["uid"] and a["metadata"]["uid"] != b["metadata"]["uid"]
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert a["metadata"]["generation"] == 1 and a["metadata"]["creationTimestamp"]
    with pytest.raises(ApiException) as e:
        co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"


def test_generation_bumps_on_spec_change_only(k8s):
    co = CustomObjectsApi(k8s)
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    labelled = co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 1
    status = co.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, "a", {"status": {"observedGeneration": 1}})
    assert status["metadata"]["generation"] == 1
    assert int(status["metadata"]["resourceVersion"]) > int(labelled["metadata"]["resourceVersion"])
    changed = co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"x": 5}})
    assert changed["metadata"]["generation"] == 2


def test_status_subresource_is_separate(k8s):
    co = CustomObjectsApi(k8s)
    created = co.create_cluster_custom_object(GROUP, VERSION, PLURAL, {**nrs("a"), "status": {"appliedHash": "dropped"}})
    assert "status" not in created  # status is ignored on create
    after_status = co.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, "a", {"spec": {"x": 99}, "status": {"appliedHash": "h1"}})
    assert after_status["spec"]["x"] == 0 and after_status["status"]["appliedHash"] == "h1"
    after_main = co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"x": 1}, "status": {"appliedHash": "h2"}})
    assert after_main["spec"]["x"] == 1 and after_main["status"]["appliedHash"] == "h1"


def test_objects_and_bodies_over_the_size_limits_are_refused_with_413(k8s, api_server):
    """etcd's object limit (1.5 MiB) and the apiserver's 3 MiB body limit, scaled down here."""
    co = CustomObjectsApi(k8s)
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    api_server.max_object_bytes = 2000
    big = {"spec": {"x": "y" * 3000}}
    for write in (lambda: co.create_cluster_custom_object(GROUP, VERSION, PLURAL, {**nrs("b"), **big}),
                  lambda: co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", big)):
        with pytest.raises(ApiException) as refused:
            write()
        assert refused.value.status == 413 and "request is too large" in refused.value.body
    assert api_server.get(PLURAL, "b") is None and api_server.get(PLURAL, "a")["spec"]["x"] == 0
    api_server.max_request_bytes = 1000
    with pytest.raises(ApiException) as refused:
        co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"x": "y" * 1500}})
    assert refused.value.status == 413 and "limit is 1000" in refused.value.body


def test_noop_patch_changes_nothing_and_sends_no_event(k8s, api_server):
    co = CustomObjectsApi(k8s)
    created = co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    same = co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"x": 0}})
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"x": 7}})
    url = f"{api_server.url}/apis/{GROUP}/{VERSION}/{PLURAL}?watch=true&resourceVersion={created['metadata']['resourceVersion']}&timeoutSeconds=1"
    events = read_watch(url, count=5)
    assert [(e["type"], e["object"]["spec"]["x"]) for e in events] == [("MODIFIED", 7)]


def test_stale_resource_version_conflicts(k8s):
    co = CustomObjectsApi(k8s)
    created = co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"x": 1}})
    stale = {**created, "spec": {**created["spec"], "x": 2}}
    with pytest.raises(ApiException) as put:
        co.replace_cluster_custom_object(GROUP, VERSION, PLURAL, "a", stale)
    assert put.value.status == 409
    with pytest.raises(ApiException) as patch:
        co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a",
                                       {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "spec": {"x": 3}})
    assert patch.value.status == 409


def test_json_patch_and_merge_patch_null_removes(k8s):
    co = CustomObjectsApi(k8s)
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, {**nrs("a"), "metadata": {"name": "a", "annotations": {"k": "v"}}})
    out = co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", [{"op": "replace", "path": "/spec/x", "value": 4}],
                                         _content_type="application/json-patch+json")
    assert out["spec"]["x"] == 4
    out = co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"metadata": {"annotations": {"k": None}}})
    assert "k" not in (out["metadata"].get("annotations") or {})


def test_label_and_field_selectors_on_list(k8s, api_server):
    api_server.apply(pod("a", labels={"app": "web", "tier": "fe"}, node="n1"))
    api_server.apply(pod("b", labels={"app": "db"}, node="n2"))
    api_server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    api_server.apply(pod("c", ns="other", labels={"app": "web"}, node="n2"))
    core = CoreV1Api(k8s)
    names = lambda items: sorted(f"{p.metadata.namespace}/{p.metadata.name}" for p in items)  # noqa: E731
    assert names(core.list_pod_for_all_namespaces(label_selector="app=web").items) == ["default/a", "other/c"]
    assert names(core.list_pod_for_all_namespaces(label_selector="app in (db, x)").items) == ["default/b"]
    assert names(core.list_pod_for_all_namespaces(label_selector="app!=web").items) == ["default/b"]
    assert names(core.list_pod_for_all_namespaces(label_selector="tier").items) == ["default/a"]
    assert names(core.list_pod_for_all_namespaces(label_selector="!tier,app=web").items) == ["other/c"]
    assert names(core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n2").items) == ["default/b", "other/c"]
    assert names(core.list_namespaced_pod("other").items) == ["other/c"]
    assert names(core.list_pod_for_all_namespaces(field_selector="metadata.name=a,metadata.namespace!=other").items) == ["default/a"]


def test_selector_helpers():
    assert label_selector_matches("a notin (x,y)", {"a": "z"})
    assert not label_selector_matches("a notin (x,y)", {"a": "x"})
    assert label_selector_matches("a notin (x,y)", {})
    assert label_selector_matches("", {"a": "b"})
    assert field_selector_matches("status.phase==Running", {"status": {"phase": "Running"}})
    assert not field_selector_matches("spec.hostNetwork=true", {"spec": {}})


def test_namespace_urls(k8s, api_server):
    core = CoreV1Api(k8s)
    assert core.read_namespace("default").metadata.labels["kubernetes.io/metadata.name"] == "default"
    assert {n.metadata.name for n in core.list_namespace().items} >= {"default", "kube-system"}
    core.create_namespace({"metadata": {"name": "x", "labels": {"team": "a"}}})
    patched = core.patch_namespace("x", {"metadata": {"labels": {"team": "b"}}})
    assert patched.metadata.labels == {"team": "b", "kubernetes.io/metadata.name": "x"}


def test_generate_name_gives_distinct_events(k8s):
    core = CoreV1Api(k8s)
    body = {"metadata": {"generateName": "np-"}, "involvedObject": {"kind": "NetworkPolicy", "name": "np", "namespace": "default"},
            "reason": "R", "message": "m", "type": "Warning"}
    a = core.create_namespaced_event("default", body)
    b = core.create_namespaced_event("default", body)
    assert a.metadata.name.startswith("np-") and b.metadata.name.startswith("np-") and a.metadata.name != b.metadata.name


def test_watch_resumes_from_resource_version_and_gets_410_after_compaction(k8s, api_server):
    co = CustomObjectsApi(k8s)
    first = co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("b"))
    co.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "a")
    base = f"{api_server.url}/apis/{GROUP}/{VERSION}/{PLURAL}?watch=true&timeoutSeconds=1"
    replay = read_watch(f"{base}&resourceVersion={first['metadata']['resourceVersion']}", count=10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in replay] == [("ADDED", "b"), ("DELETED", "a")]
    fresh = read_watch(base, count=10)  # no resourceVersion: synthetic ADDED for what exists
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in fresh] == [("ADDED", "b")]
    api_server.compact()
    gone = read_watch(f"{base}&resourceVersion={first['metadata']['resourceVersion']}", count=10)
    assert gone[0]["type"] == "ERROR" and gone[0]["object"]["code"] == 410


def test_watch_with_selector_sends_deleted_when_object_stops_matching(api_server):
    api_server.apply(pod("a", labels={"app": "web"}))
    start = api_server.resource_version
    api_server.apply(pod("a", labels={"app": "db"}))
    api_server.apply(pod("a", labels={"app": "web"}))
    url = f"{api_server.url}/api/v1/pods?watch=1&labelSelector=app%3Dweb&resourceVersion={start}&timeoutSeconds=1"
    events = read_watch(url, count=10)
    assert [(e["type"], e["object"]["metadata"]["labels"]["app"]) for e in events] == [("DELETED", "db"), ("ADDED", "web")]


def test_field_selector_watch_sees_only_its_object(api_server):
    start = api_server.resource_version
    api_server.apply(nrs("n1"))
    api_server.apply(nrs("n2"))
    url = f"{api_server.url}/apis/{GROUP}/{VERSION}/{PLURAL}?watch=1&fieldSelector=metadata.name%3Dn2&resourceVersion={start}&timeoutSeconds=1"
    assert [e["object"]["metadata"]["name"] for e in read_watch(url, count=10)] == ["n2"]


def test_bookmarks_carry_the_current_resource_version(api_server):
    api_server.apply(nrs("n1"))
    url = f"{api_server.url}/apis/{GROUP}/{VERSION}/{PLURAL}?watch=1&allowWatchBookmarks=true&resourceVersion={api_server.resource_version}&timeoutSeconds=2"
    with urllib.request.urlopen(url, timeout=5) as response:
        event = json.loads(response.readline())
    assert event["type"] == "BOOKMARK" and event["object"]["metadata"]["resourceVersion"] == str(api_server.resource_version)


def test_finalizers_delay_deletion(k8s, api_server):
    co = CustomObjectsApi(k8s)
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, {**nrs("a"), "metadata": {"name": "a", "finalizers": ["x/y"]}})
    co.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "a")
    held = co.get_cluster_custom_object(GROUP, VERSION, PLURAL, "a")
    assert held["metadata"]["deletionTimestamp"]
    co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as e:
        co.get_cluster_custom_object(GROUP, VERSION, PLURAL, "a")
    assert e.value.status == 404


def test_restart_drops_watches_and_compacts(api_server):
    api_server.apply(nrs("n1"))
    since = api_server.resource_version
    url = f"{api_server.url}/apis/{GROUP}/{VERSION}/{PLURAL}?watch=1&resourceVersion={since}&timeoutSeconds=30"
    ended = threading.Event()

    def watch() -> None:
        read_watch(url, count=10, timeout=30)
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.3)
    api_server.apply(nrs("n2"))  # history moves past `since`; the restart forgets it
    api_server.restart(downtime=0.2)
    assert ended.wait(5), "the watch stream survived a restart"
    gone = read_watch(url.replace("timeoutSeconds=30", "timeoutSeconds=1"), count=1)
    assert gone[0]["type"] == "ERROR" and gone[0]["object"]["code"] == 410


def test_discovery_lists_resources_for_kopf(api_server):
    def get(path):
        with urllib.request.urlopen(api_server.url + path, timeout=5) as r:
            return json.loads(r.read())

    assert "v1" in get("/api")["versions"]
    groups = {g["name"] for g in get("/apis")["groups"]}
    assert {"networking.k8s.io", "netfence.io", "apiextensions.k8s.io"} <= groups
    names = {r["name"] for r in get(f"/apis/{GROUP}/{VERSION}")["resources"]}
    assert names == {"noderulesets", "noderulesets/status", "peergroupslices"}
    with pytest.raises(urllib.error.HTTPError) as e:
        get("/apis/nope.io/v1")
    assert e.value.code == 404


def test_networkpolicy_generation_via_typed_client(k8s):
    net = NetworkingV1Api(k8s)
    body = {"metadata": {"name": "np"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    created = net.create_namespaced_network_policy("default", body)
    assert created.metadata.generation == 1
    patched = net.patch_namespaced_network_policy("np", "default", {"spec": {"policyTypes": ["Ingress", "Egress"]}})
    assert patched.metadata.generation == 2


def test_watch_timeout_must_be_an_integer(api_server):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{api_server.url}/api/v1/pods?watch=true&timeoutSeconds=30.0", timeout=5)
    assert e.value.code == 400


def test_bound_pod_deletion_is_graceful_until_its_kubelet_deletes_with_grace_0(k8s, api_server):
    core = CoreV1Api(k8s)
    core.create_namespaced_pod("default", pod("bound"))
    core.create_namespaced_pod("default", {**pod("unbound"), "spec": {"containers": [{"name": "c", "image": "x"}]}})
    core.delete_namespaced_pod("unbound", "default")
    assert api_server.get("pods", "unbound", "default") is None  # no kubelet to wait for
    core.delete_namespaced_pod("bound", "default")
    terminating = core.read_namespaced_pod("bound", "default")
    assert terminating.metadata.deletion_timestamp is not None
    assert terminating.metadata.deletion_grace_period_seconds == 30
    core.delete_namespaced_pod("bound", "default", grace_period_seconds=5)  # shortened, still there
    assert core.read_namespaced_pod("bound", "default").metadata.deletion_grace_period_seconds == 5
    core.delete_namespaced_pod("bound", "default", body=kubernetes.client.V1DeleteOptions(grace_period_seconds=0))
    assert api_server.get("pods", "bound", "default") is None


def test_binding_sets_the_node_once(k8s, api_server):
    core = CoreV1Api(k8s)
    core.create_namespaced_pod("default", {**pod("p"), "spec": {"containers": [{"name": "c", "image": "x"}]}})
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n2"}}
    core.api_client.call_api(*core.api_client.param_serialize(
        "POST", "/api/v1/namespaces/default/pods/p/binding", body=binding, header_params={"Content-Type": "application/json"}))
    bound = api_server.get("pods", "p", "default")
    assert bound["spec"]["nodeName"] == "n2" and bound["metadata"]["generation"] == 1
    with pytest.raises(urllib.error.HTTPError) as e:
        request = urllib.request.Request(f"{api_server.url}/api/v1/namespaces/default/pods/p/binding", method="POST",
                                         data=json.dumps(binding).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5)
    assert e.value.code == 409


def test_runs_standalone_and_writes_a_kubeconfig(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    kubeconfig = tmp_path / "kubeconfig"
    tests_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "controller.fakeapi", "--kubeconfig", str(kubeconfig)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "serving on" in proc.stdout.readline()
        client = kubernetes.config.new_client_from_config(str(kubeconfig))
        names = {n.metadata.name for n in CoreV1Api(client).list_namespace().items}
        assert {"default", "kube-system", "kube-node-lease"} <= names
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "n1"},
                 "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40}}
        created = kubernetes.client.CoordinationV1Api(client).create_namespaced_lease("kube-node-lease", lease)
        assert created.metadata.resource_version
        client.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# ---------------------------------------------------------------- stored versions are never changed in place
def test_merge_patch_leaves_its_inputs_alone_and_shares_what_it_does_not_change():
    from controller.fakeapi import merge_patch

    target = {"spec": {"a": {"b": 1, "c": [1, 2]}, "keep": {"x": 1}}, "metadata": {"name": "n"}}
    patch = {"spec": {"a": {"b": 2, "d": None}, "gone": None}}
    before = json.loads(json.dumps(target)), json.loads(json.dumps(patch))
    result = merge_patch(target, patch)
    assert (target, patch) == before  # RFC 7386 result, inputs untouched
    assert result == {"spec": {"a": {"b": 2, "c": [1, 2]}, "keep": {"x": 1}}, "metadata": {"name": "n"}}
    assert result["spec"]["keep"] is target["spec"]["keep"] and result["metadata"] is target["metadata"]
    assert merge_patch({"a": 1}, [1]) == [1] and merge_patch("x", {"a": {"b": None}}) == {"a": {}}


def test_replayed_history_shows_each_version_as_it_was_written(k8s, api_server):
    """Writes share unchanged parts with the version before: a later write must never show
    through an earlier event, whether it is replayed from the recent events or from the
    encodings of older ones."""
    api_server.hot_events = 2  # most of the replay below comes from encodings only
    co = CustomObjectsApi(k8s)
    start = api_server.resource_version
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, {**nrs("a"), "spec": {**nrs("a")["spec"], "nested": {"v": 0}}})
    for v in range(1, 6):
        co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"nested": {"v": v}}})
    co.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, "a", {"status": {"appliedHash": "h"}})
    api_server.apply({**nrs("a"), "spec": {**nrs("a")["spec"], "nested": {"v": 9}}})  # test-side replace
    events = read_watch(f"{api_server.url}/apis/{GROUP}/{VERSION}/{PLURAL}?watch=1&resourceVersion={start}"
                        "&timeoutSeconds=1", count=20)
    assert [e["object"]["spec"]["nested"]["v"] for e in events] == [0, 1, 2, 3, 4, 5, 5, 9]
    assert [e["type"] for e in events] == ["ADDED"] + ["MODIFIED"] * 7
    assert [e["object"]["metadata"].get("generation") for e in events] == [1, 2, 3, 4, 5, 6, 6, 7]
    assert "status" not in events[5]["object"] and events[6]["object"]["status"] == {"appliedHash": "h"}
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


def test_test_side_reads_and_writes_are_copies(api_server):
    mine = nrs("a")
    api_server.apply(mine)
    mine["spec"]["x"] = 42  # the caller's dict, changed after the write
    got = api_server.get(PLURAL, "a")
    assert got["spec"]["x"] == 0
    got["spec"]["x"] = 7
    api_server.list(PLURAL)[0]["spec"]["x"] = 8
    assert api_server.get(PLURAL, "a")["spec"]["x"] == 0


def test_a_failed_json_patch_changes_nothing(k8s, api_server):
    co = CustomObjectsApi(k8s)
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    rv = api_server.resource_version
    patch = [{"op": "replace", "path": "/spec/x", "value": 5}, {"op": "test", "path": "/spec/nodeName", "value": "other"}]
    request = urllib.request.Request(f"{api_server.url}/apis/{GROUP}/{VERSION}/{PLURAL}/a", method="PATCH",
                                     data=json.dumps(patch).encode(),
                                     headers={"Content-Type": "application/json-patch+json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 422
    assert api_server.get(PLURAL, "a")["spec"]["x"] == 0 and api_server.resource_version == rv


def test_one_event_reaches_every_watcher_as_its_selectors_see_it(api_server):
    """The event is encoded once for all watchers; each still gets the type its selector
    makes of it (MODIFIED, or DELETED for the one the object stops matching)."""
    api_server.apply(pod("a", labels={"app": "web"}))
    start = api_server.resource_version
    base = f"{api_server.url}/api/v1/pods?watch=1&resourceVersion={start}&timeoutSeconds=2"
    urls = [base, base, f"{base}&labelSelector=app%3Dweb", f"{base}&labelSelector=app%3Ddb",
            f"{api_server.url}/api/v1/namespaces/other/pods?watch=1&resourceVersion={start}&timeoutSeconds=2"]
    results: list = [None] * len(urls)

    def read(i: int) -> None:
        results[i] = read_watch(urls[i], count=5)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the watches are open (and a replay from `start` would catch up anyway)
    api_server.apply(pod("a", labels={"app": "db"}))
    api_server.delete("pods", "a", "default")
    for t in threads:
        t.join(10)
    seen = [[(e["type"], e["object"]["metadata"]["labels"]["app"]) for e in events] for events in results]
    assert seen[0] == seen[1] == [("MODIFIED", "db"), ("DELETED", "db")]
    assert seen[2] == [("DELETED", "db")]
    assert seen[3] == [("ADDED", "db"), ("DELETED", "db")]
    assert seen[4] == []


def test_recorded_requests_keep_the_body_as_sent(k8s, api_server):
    co = CustomObjectsApi(k8s)
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, nrs("a"))
    co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a", {"spec": {"x": 3}})
    post, patch = api_server.writes(f"/apis/{GROUP}/{VERSION}/{PLURAL}")[-2:]
    assert post.method == "POST" and post.body["metadata"] == {"name": "a"}  # not what the server added
    assert patch.method == "PATCH" and patch.body == {"spec": {"x": 3}} and patch.status == 200


def test_get_and_list_over_128_kib_are_gzipped_for_clients_that_accept_it(api_server):
    """As the apiserver's APIResponseCompression: GET and LIST bodies over 128 KiB, only when asked."""
    import gzip

    pods = [{"namespace": "x", "name": f"p-{i}", "ips": [f"10.0.{i // 250}.{i % 250}"]} for i in range(3000)]
    api_server.apply({"apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet", "metadata": {"name": "big"},
                      "spec": {"nodeName": "big", "pods": pods}})
    api_server.apply({"apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet", "metadata": {"name": "small"},
                      "spec": {"nodeName": "small", "pods": pods[:3]}})
    base = f"{api_server.url}/apis/netfence.io/v1alpha1/noderulesets"
    for path, compressed in ((base + "/big", True), (base, True), (base + "/small", False)):
        request = urllib.request.Request(path, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=5) as r:
            raw, encoding = r.read(), r.headers.get("Content-Encoding")
        assert (encoding == "gzip") == compressed, path
        body = json.loads(gzip.decompress(raw) if compressed else raw)
        assert body["kind"] in ("NodeRuleSet", "NodeRuleSetList")
        with urllib.request.urlopen(path, timeout=5) as r:  # not asked: never compressed
            assert r.headers.get("Content-Encoding") is None and json.loads(r.read()) == body
