"""Issue 12.4: an agent whose /var/run/netns mount does not receive the node's new mounts (no
`mountPropagation: HostToContainer`, or a node whose mount is private) would not see pods created
after it started; it must say so, not ready, with what to do.

A pod's mount namespace is made with `unshare --mount`: `--propagation slave` is what the kubelet
gives a HostToContainer volume (rslave), `--propagation private` what it gives without one.
/var/run/netns is a shared mount point here (`ip netns add` makes it one), as on a node.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from kernel.conftest import PYTHON, REPO, Node, _condition
from netfence_api import NodeRuleSet, NodeRuleSetSpec

pytestmark = pytest.mark.kernel


def test_premise_a_private_mount_misses_namespaces_made_later(netns_factory):
    """What the message claims: under a private mount, a namespace created after the process
    started is a plain file there, not a namespace; under a slave mount it is one."""
    seen = {}
    for propagation in ("private", "slave"):
        name = f"nf-test-late-{uuid.uuid4().hex[:6]}"
        watcher = subprocess.Popen(["unshare", "--mount", "--propagation", propagation, "sh", "-c",
                                    'echo unshared && read _ && stat -f -c %T "/var/run/netns/$0"', name],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            # The namespace must be made after the watcher's mount namespace exists, not while
            # unshare is still starting (on a loaded machine it would see the mount as it was).
            assert watcher.stdout.readline().strip() == "unshared"
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
            seen[propagation] = watcher.communicate("go\n", timeout=30)[0].strip()
        finally:
            watcher.kill()
            watcher.wait(timeout=10)
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)
    assert seen["slave"] == "nsfs"
    assert seen["private"] != "nsfs", seen


def agent_in_mount_namespace(node: Node, propagation: str) -> subprocess.Popen:
    rules = NodeRuleSet.for_node(NodeRuleSetSpec(nodeName=node.name), generation=1)
    node.write_rules(rules)
    cmd = ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation", propagation,
           PYTHON, "-m", "netfence_agent", "agent", "--node", node.name, "--rules-file", str(node.rules_file),
           "--netns-dir", "/var/run/netns", "--cni-dir", str(node.cni_dir),
           "--metrics-bind-address", "127.0.0.1:9469"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("agent", "operator")))
    log = open(node.workdir / f"agent-{len(node.agents)}.log", "w")
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    node.agents.append(agent)
    return agent


def test_agent_without_propagation_is_not_ready_and_says_what_to_do(node: Node):
    agent_in_mount_namespace(node, "private")
    status = node.wait_status(lambda s: _condition(s, "Degraded") is not None)
    (degraded,) = [c for c in status["conditions"] if c["type"] == "Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "PodNetnsNotPropagated")
    for words in ("/var/run/netns is mounted without propagation from the node",
                  "mountPropagation: HostToContainer", "mount --make-rshared /"):
        assert words in degraded["message"]
    code, body = node.http("/readyz")
    assert code == 503 and "mount --make-rshared /" in body
    assert "mount --make-rshared /" in node.agent_log()


def test_agent_with_a_hosttocontainer_mount_is_ready(node: Node):
    agent_in_mount_namespace(node, "slave")
    status = node.wait_status(lambda s: _condition(s, "Degraded") is not None)
    assert _condition(status, "Degraded") == "False", status
    assert node.http("/readyz")[0] == 200
    assert "propagation" not in node.agent_log()
