"""Each NodeRuleSet write carries the time the controller saw the change behind it
(netfence.io/last-change-trigger-time, as kube-proxy's endpoints trigger time): the agents
measure network programming latency from it."""

from __future__ import annotations

import datetime
import time

import pytest

from controller.harness import namespace, node, pod, policy, running_controller, settle, wait_for, wait_synced

pytestmark = pytest.mark.slow

TRIGGER = "netfence.io/last-change-trigger-time"


def trigger_of(api_server, name: str) -> float:
    text = api_server.get("noderulesets", name)["metadata"]["annotations"][TRIGGER]
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_trigger_time_is_when_the_change_was_seen(api_server, kubeconfig):
    api_server.apply(namespace("prod"))
    for i in (1, 2):
        api_server.apply(node(f"n{i}", f"10.244.{i}.0/24", f"172.18.0.{i + 1}"))
        api_server.apply(pod("prod", f"web-{i}", f"n{i}", f"10.244.{i}.10", {"app": "web"}))
    with running_controller(kubeconfig) as controller:
        wait_synced(controller)
        settle(api_server)
        first = {n: trigger_of(api_server, n) for n in ("n1", "n2")}
        time.sleep(1.0)
        changed_at = time.time()
        api_server.apply(policy("prod", "deny-web-1", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}))
        wait_for(lambda: trigger_of(api_server, "n1") != first["n1"] and trigger_of(api_server, "n2") != first["n2"],
                 what="new trigger times")
        published_at = time.time()
        for n in ("n1", "n2"):
            # between the change and the write, with the controller's debounce inside
            assert changed_at - 0.01 <= trigger_of(api_server, n) <= published_at, n
        settle(api_server)
        # a content-free event (a label nobody selects) writes nothing: the trigger stays
        before = trigger_of(api_server, "n1")
        api_server.apply(namespace("prod", unrelated="yes"))
        settle(api_server)
        assert trigger_of(api_server, "n1") == before
