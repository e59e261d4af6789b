"""Golden files of the rendered nftables text, and proof that the kernel accepts every one.

Regenerate after an intended change with NETFENCE_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from netfence_cli.main import main

HERE = Path(__file__).parent
SCENARIOS = sorted(p.stem for p in HERE.glob("*.yaml") if p.stem != "cluster")
UPDATE = os.environ.get("NETFENCE_UPDATE_GOLDEN") == "1"


def compiled_nft(scenario: str, capsys) -> str:
    rc = main(["compile", "-f", str(HERE / "cluster.yaml"), "-f", str(HERE / f"{scenario}.yaml"), "-o", "nft"])
    out = capsys.readouterr().out
    assert rc == 0
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_rules_match_golden(scenario, capsys):
    text = compiled_nft(scenario, capsys)
    golden = HERE / f"{scenario}.nft"
    if UPDATE:
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden.name}; run with NETFENCE_UPDATE_GOLDEN=1"
    assert text == golden.read_text()


def _split_nodes(text: str) -> dict[str, str]:
    nodes, current = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("# node "):
            current = line.split()[2]
            nodes[current] = ""
        elif current:
            nodes[current] += line
    return nodes


@pytest.mark.kernel
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kernel_accepts_golden_text(scenario, netns):
    """`nft -c -f` in a fresh network namespace: every rule we render is one the kernel takes."""
    for node, text in _split_nodes((HERE / f"{scenario}.nft").read_text()).items():
        r = subprocess.run(["ip", "netns", "exec", netns, "nft", "-c", "-f", "-"], input=text,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{scenario} {node}: kernel rejected the rules:\n{r.stderr}"


LOAD_JSON = """
import json, sys
import nftables
from netfence_cli import offline
from netfence_agent.nft.serialize import table_add_commands
files = sys.argv[1:]
cluster = offline.OfflineCluster.build(offline.load_cluster(offline.read_manifests(files)))
nft = nftables.Nftables()
report = {}
for node, rendered in cluster.rendered.items():
    cmds = [c for t in rendered.ruleset.tables for c in table_add_commands(t)]
    rc, out, err = nft.json_cmd({"nftables": cmds})
    report[node] = [rc, err]
    nft.cmd("flush ruleset")
print(json.dumps(report))
"""


@pytest.mark.kernel
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kernel_loads_golden_as_json(scenario, netns):
    """The same model as libnftables JSON, really loaded (not only checked) in a fresh namespace."""
    r = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", LOAD_JSON,
         str(HERE / "cluster.yaml"), str(HERE / f"{scenario}.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report, "no node was rendered"
    for node, (rc, err) in report.items():
        assert rc == 0, f"{scenario} {node}: {err}"
