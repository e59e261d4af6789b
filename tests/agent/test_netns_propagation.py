"""Reading /proc/self/mountinfo: does the agent's pod-netns directory receive the host's new mounts?"""

from __future__ import annotations

from netfence_agent.netns import receives_host_mounts

ROOT = "465 440 0:52 / / rw,relatime master:200 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w"
RUN = "470 465 0:60 / /run rw,nosuid,nodev - tmpfs tmpfs rw"


def netns_mount(tags: str, mount_point: str = "/run/netns") -> str:
    return f"539 470 254:0 /run/netns {mount_point} ro,relatime {tags} - ext4 /dev/vda rw".replace("  ", " ")


def test_hosttocontainer_mount_is_a_slave_and_receives_mounts():
    assert receives_host_mounts("/run/netns", "\n".join([ROOT, RUN, netns_mount("master:1")])) is True


def test_a_shared_mount_receives_mounts():
    assert receives_host_mounts("/run/netns", "\n".join([ROOT, netns_mount("shared:7 master:1")])) is True


def test_a_private_mount_does_not():
    """mountPropagation None (or left out): no optional fields at all."""
    assert receives_host_mounts("/run/netns", "\n".join([ROOT, RUN, netns_mount("")])) is False


def test_the_topmost_mount_of_a_stack_counts():
    mounts = [ROOT, netns_mount("master:1"), netns_mount("").replace("539 470", "600 539")]
    assert receives_host_mounts("/run/netns", "\n".join(mounts)) is False


def test_not_a_mount_point_is_not_judged():
    """The lab, the tests and an agent on the host share the creator's mounts: no verdict."""
    assert receives_host_mounts("/run/netns", "\n".join([ROOT, RUN])) is None
    assert receives_host_mounts("/run/netns", "\n".join([ROOT, netns_mount("", "/run/netns2")])) is None


def test_escaped_mount_points():
    line = netns_mount("", r"/var/lib/my\040netns")
    assert receives_host_mounts("/var/lib/my netns", line) is False
