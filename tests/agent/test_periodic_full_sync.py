"""The agent's sync loop and its periodic full sync, against a kernel double that records
what it is asked to apply (the kernel tests cover the real thing; a refused periodic sync is
hard to provoke there)."""

from __future__ import annotations

import threading
import time

from netfence_api import Isolation, NodeRuleSet, NodeRuleSetSpec, PolicedPod
from netfence_agent.daemon import Agent, AgentConfig
from netfence_agent.nft.kernel import OWNED_TABLES, NftError
from netfence_agent.nft.transaction import Transaction


class RecordingKernel:
    def __init__(self) -> None:
        self.kinds: list[tuple[float, str]] = []
        self.refuse_next = 0

    def tables(self):
        return set(OWNED_TABLES)

    def inventory(self, keys=OWNED_TABLES):
        return {}

    def counters(self):
        return {}

    def set_elements(self, family, table, names):
        return {}

    def apply(self, transaction: Transaction) -> None:
        if self.refuse_next:
            self.refuse_next -= 1
            self.kinds.append((time.monotonic(), "refused " + transaction.kind))
            raise NftError("Error: Could not process rule: Device or resource busy")
        self.kinds.append((time.monotonic(), transaction.kind))


class NullSource:
    def report(self, status) -> None:
        pass

    def close(self) -> None:
        pass


def agent_with(kernel: RecordingKernel, period: float, tmp_path) -> Agent:
    sysctl = tmp_path / "net" / "bridge"
    sysctl.mkdir(parents=True)
    for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        (sysctl / name).write_text("1\n")
    config = AgentConfig(node="n1", metrics_bind_address=None, proc_sys=str(tmp_path), full_sync_period=period)
    agent = Agent(config, NullSource(), kernel)
    pod = PolicedPod(namespace="x", name="a", uid="u", ips=["10.244.0.2"], isolation=Isolation(ingress=True))
    agent.set_rule_set(NodeRuleSet.for_node(NodeRuleSetSpec(nodeName="n1", pods=[pod]), generation=1))
    return agent


def run_loop(agent: Agent, seconds: float) -> None:
    thread = threading.Thread(target=agent.loop, daemon=True)
    thread.start()
    time.sleep(seconds)
    agent.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_the_whole_rule_set_is_loaded_again_every_period(tmp_path):
    kernel = RecordingKernel()
    run_loop(agent_with(kernel, 0.4, tmp_path), 1.5)
    kinds = [k for _, k in kernel.kinds]
    assert kinds[0] == "full", "the first sync"
    assert 3 <= kinds.count("full") <= 5, kinds  # at 0, 0.4, 0.8, 1.2 s


def test_no_periodic_sync_with_period_zero(tmp_path):
    kernel = RecordingKernel()
    run_loop(agent_with(kernel, 0, tmp_path), 1.0)
    assert [k for _, k in kernel.kinds] == ["full"]


def test_a_refused_periodic_sync_is_retried_as_a_full_sync_after_the_backoff(tmp_path):
    kernel = RecordingKernel()
    agent = agent_with(kernel, 1.0, tmp_path)
    thread = threading.Thread(target=agent.loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        kernel.refuse_next = 1  # the periodic sync at 1 s is refused
        time.sleep(1.0 + Agent.RETRY_BACKOFF[0] + 0.3)
    finally:
        agent.stop()
        thread.join(timeout=10)
    kinds = [k for _, k in kernel.kinds]
    assert kinds[:3] == ["full", "refused full", "full"], kinds
    refused_at, retried_at = kernel.kinds[1][0], kernel.kinds[2][0]
    # The retry comes after the backoff, not a whole period later.
    assert Agent.RETRY_BACKOFF[0] * 0.8 <= retried_at - refused_at < 0.9, kernel.kinds
