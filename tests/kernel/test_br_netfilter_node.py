"""br_netfilter on a node, as the agent's pod meets it: the init container's script from
manifests/agent.yaml, and the agent's own check where /proc/sys is read-only (as in an unprivileged
container) or the module is not loaded.

A missing module is made by mounting an empty read-only tmpfs over /proc/sys/net/bridge in a private mount
namespace of the process under test (the module is built into this kernel); a read-only /proc/sys
by a read-only bind mount there. Both vanish with the process; the test netns goes afterwards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from kernel.conftest import in_netns

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
# read-only: like /proc/sys/net without the module, no file can be made there
HIDE_MODULE = "mount -t tmpfs -o ro none /proc/sys/net/bridge"
READ_ONLY_PROC_SYS = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys"
ENSURE = ("import json; from netfence_agent import br_netfilter; "
          "s = br_netfilter.ensure(load_module=lambda: None); print(json.dumps([s.ok, s.message]))")


def init_script() -> str:
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "agent.yaml").read_text()) if d]
    (init,) = docs[0]["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    return init["command"][2]


def sysctls(netns: str) -> list[str]:
    return [in_netns(netns, "sysctl", "-n", key).stdout.strip() for key in SYSCTLS]


def turned_off(netns: str) -> str:
    in_netns(netns, "sysctl", "-qw", *(f"{key}=0" for key in SYSCTLS))
    assert sysctls(netns) == ["0", "0"]
    return netns


def in_private_mounts(netns: str, setup: str, *cmd: str):
    return in_netns(netns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f'{setup} && exec "$@"', "sh", *cmd, check=False)


def agent_check(netns: str, setup: str) -> tuple[bool, str]:
    out = in_private_mounts(netns, setup, "env", f"PYTHONPATH={REPO}/agent:{REPO}/operator", sys.executable,
                            "-c", ENSURE)
    assert out.returncode == 0, out.stderr
    ok, message = json.loads(out.stdout)
    return ok, message


def test_init_container_turns_both_sysctls_on(netns):
    turned_off(netns)
    out = in_netns(netns, "sh", "-c", init_script(), check=False)
    assert out.returncode == 0, out.stderr
    assert sysctls(netns) == ["1", "1"]


def test_init_container_lets_the_pod_start_without_br_netfilter_and_says_what_to_do(netns):
    out = in_private_mounts(netns, HIDE_MODULE, "sh", "-c", init_script())
    assert out.returncode == 0, out.stderr
    assert "br_netfilter is not loaded on this node" in out.stderr and "modprobe br_netfilter" in out.stderr


def test_agent_without_br_netfilter_is_not_ready_and_says_how_to_load_it(netns):
    ok, message = agent_check(netns, HIDE_MODULE)
    assert not ok
    assert message.startswith("the br_netfilter module is not loaded (net.bridge.bridge-nf-call-iptables does not exist")
    assert "`modprobe br_netfilter`" in message and "/etc/modules-load.d/" in message


def test_agent_with_read_only_proc_sys_names_the_sysctl_to_set(netns):
    """In a pod /proc/sys is read-only: the agent cannot repair a sysctl turned off after its
    init container ran, and says which command does it on the node."""
    turned_off(netns)
    ok, message = agent_check(netns, READ_ONLY_PROC_SYS)
    assert not ok
    for key in SYSCTLS:
        assert f"{key} is 0 and cannot be set from here (Read-only file system): set it on the node: " \
               f"`sysctl -w {key}=1`" in message
    assert sysctls(netns) == ["0", "0"]
    ok, message = agent_check(netns, "true")
    assert ok and sysctls(netns) == ["1", "1"], "where it can, the agent turns them on itself"
