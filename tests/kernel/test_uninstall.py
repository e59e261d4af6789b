"""The uninstall (manifests/uninstall/) in the kernel: its cleanup container's command, run the way
the kubelet runs it on a node - in the node's network namespace (hostNetwork), as uid 0 with only
the capabilities the manifest adds and no new privileges - removes netfence's two tables and
nothing else, and refuses while an agent still runs there.

The command and the capabilities are read from the manifest, so a change there is what is tested.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from netfence_agent.netns import call_in
from netfence_agent.nft.kernel import OWNED_TABLES
from netfence_agent.nft.transaction import plan
from netfence_agent.render import PodPort, render
from kernel.synthetic import pod_ip, synthetic_spec

from kernel.conftest import in_netns

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
UNINSTALL = REPO / "manifests" / "uninstall" / "cleanup.yaml"
# `netfence` as the image has it on PATH: the console script of the environment running the tests.
PATH = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Tables of others that share the node: same names in other families, other names in ours.
OTHERS = ("add table inet filter; add chain inet filter forward { type filter hook forward priority 0; }; "
          "add rule inet filter forward ip saddr 10.9.0.0/16 counter drop; "
          "add table ip netfence; add table bridge filter; add table netdev netfence; add table inet netfence_other")


def cleanup_container() -> dict:
    (ds,) = [d for d in yaml.safe_load_all(UNINSTALL.read_text()) if d and d["kind"] == "DaemonSet"]
    (container,) = ds["spec"]["template"]["spec"]["initContainers"]
    return container


def run_as_uninstall(netns: str, capabilities: list[str] | None = None) -> subprocess.CompletedProcess:
    container = cleanup_container()
    security = container["securityContext"]
    assert security["runAsUser"] == 0 and security["capabilities"]["drop"] == ["ALL"]
    caps = security["capabilities"]["add"] if capabilities is None else capabilities
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
    # As root, what a process may use after execve is its bounding set; no_new_privs is
    # allowPrivilegeEscalation: false.
    return in_netns(netns, "env", "-i", f"PATH={PATH}", "setpriv", f"--bounding-set={bounding}",
                    f"--inh-caps={bounding}", "--no-new-privs", *container["command"], check=False, timeout=60)


def tables(netns: str) -> set[tuple[str, str]]:
    listing = json.loads(in_netns(netns, "nft", "-j", "list", "tables").stdout)["nftables"]
    return {(t["table"]["family"], t["table"]["name"]) for t in listing if "table" in t}


def rules_of(netns: str, family: str, name: str) -> list[dict]:
    listing = json.loads(in_netns(netns, "nft", "-j", "list", "table", family, name).stdout)["nftables"]
    return [{k: v for k, v in item["rule"].items() if k not in ("handle",)} for item in listing if "rule" in item]


@pytest.fixture
def node_with_rules(kernel_in):
    """A node's netns holding what an agent loads (both tables) and tables of others."""
    k = kernel_in("uninst")
    spec = synthetic_spec(pods=4, policies=2, node="n1")
    ports = {pod_ip(i): PodPort(f"veth{i:08x}", f"02:00:00:00:00:{i:02x}", 100 + i) for i in range(4)}
    k.apply(plan(render(spec, ports).ruleset, None, k.inventory))
    k.nft(OTHERS)
    assert set(OWNED_TABLES) <= tables(k.netns)
    return k


def test_uninstall_removes_both_netfence_tables_and_nothing_else(node_with_rules):
    netns = node_with_rules.netns
    before = tables(netns)
    others_rules = rules_of(netns, "inet", "filter")
    out = run_as_uninstall(netns)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.splitlines()) == {"deleted table inet netfence", "deleted table bridge netfence"}
    assert tables(netns) == before - set(OWNED_TABLES)
    assert rules_of(netns, "inet", "filter") == others_rules
    again = run_as_uninstall(netns)
    assert (again.returncode, again.stdout.strip()) == (0, "no netfence tables"), "a second run is harmless"


def test_uninstall_needs_the_capability_the_manifest_gives_it(node_with_rules):
    """Without NET_ADMIN the kernel refuses: the manifest's capability is the one that matters."""
    out = run_as_uninstall(node_with_rules.netns, capabilities=[])
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.startswith("netfence cleanup: ") and "Traceback" not in out.stderr, out.stderr
    assert "Operation not permitted" in out.stderr and "needs root with CAP_NET_ADMIN" in out.stderr
    assert set(OWNED_TABLES) <= tables(node_with_rules.netns)


def test_uninstall_refuses_while_an_agent_listens_on_the_node(node_with_rules):
    netns = node_with_rules.netns
    # The agent's metrics port, held open in the node's netns as a running agent holds it.
    listener = call_in(f"/var/run/netns/{netns}", socket.create_server, ("0.0.0.0", 9469))
    try:
        out = run_as_uninstall(netns)
        assert out.returncode == 1
        assert "a netfence agent still runs on this node" in out.stderr
        assert set(OWNED_TABLES) <= tables(netns), "nothing deleted while the agent could load it again"
    finally:
        listener.close()
    out = run_as_uninstall(netns)
    assert out.returncode == 0, out.stderr
    assert not set(OWNED_TABLES) & tables(netns)
