"""The real controller and the real agent sync loop over the fake API server (issue 14): what the
agent applies is what `netfence compile` gives, and a peer joining a group reaches the kernel as
set elements only. The kernel is a double that records transactions (tests/kernel covers nft)."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest

from agent.test_periodic_full_sync import RecordingKernel
from controller.harness import pod, settle, wait_for, wait_synced
from controller.test_controller import controller_in, expected, layouts, seed
from netfence_agent.apisource import ApiRuleSetSource
from netfence_agent.daemon import Agent, AgentConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def agent_on(kubeconfig, tmp_path) -> Iterator:
    started: list[tuple[Agent, list[threading.Thread]]] = []

    def start(node: str) -> tuple[Agent, RecordingKernel]:
        sysctl = tmp_path / node / "net" / "bridge"
        sysctl.mkdir(parents=True)
        for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
            (sysctl / name).write_text("1\n")
        kernel = RecordingKernel()
        config = AgentConfig(node=node, metrics_bind_address=None, proc_sys=str(tmp_path / node), full_sync_period=0)
        agent = Agent(config, ApiRuleSetSource(node, kubeconfig), kernel)
        threads = [threading.Thread(target=agent._consume_source, daemon=True),
                   threading.Thread(target=agent.loop, daemon=True)]
        for t in threads:
            t.start()
        started.append((agent, threads))
        return agent, kernel

    yield start
    for agent, threads in started:
        agent.stop()
        agent.source.close()
        for t in threads:
            t.join(10)
            assert not t.is_alive()


def applied(api, node: str) -> str | None:
    status = (api.get("noderulesets", node) or {}).get("status") or {}
    ok = any(c["type"] == "Applied" and c["status"] == "True" for c in status.get("conditions") or [])
    return status.get("appliedHash") if ok else None


@layouts
def test_agent_applies_what_compile_gives_and_a_peer_change_as_elements(api_server, kubeconfig, agent_on, layout):
    seed(api_server)
    with controller_in(kubeconfig, layout) as controller:
        wait_synced(controller)
        settle(api_server)
        agent, kernel = agent_on("n2")
        wait_for(lambda: applied(api_server, "n2") == expected(api_server)["n2"].content_hash(),
                 what="n2's agent to apply what compile gives")
        assert [k for _, k in kernel.kinds] == ["full"]
        # web-1 (on n1) is a peer of db on n2: only members of a group change for n2 (in its
        # NodeRuleSet, or in a group slice without touching the NodeRuleSet)
        api_server.apply(pod("prod", "web-1", "n1", "10.244.1.77", {"app": "web"}))
        wait_for(lambda: applied(api_server, "n2") == expected(api_server)["n2"].content_hash(),
                 what="n2's agent to apply the new member")
        assert [k for _, k in kernel.kinds] == ["full", "elements"]
        stored = api_server.get("noderulesets", "n2")
        generation = 2 if layout == "inline" else 1
        assert stored["metadata"]["generation"] == generation and stored["status"]["observedGeneration"] == generation
        assert any("10.244.1.77/32" in g.cidrs for g in agent.applied_object.spec.peerGroups)
