"""The offline CLI contract: compile / explain / matrix, exit codes and error messages."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from netfence_api import NodeRuleSet
from netfence_api.slices import assemble_from_objects
from netfence_cli.main import main
from netfence_cli.offline import load_cluster, read_manifests
from netfence_operator.compile import compile_cluster

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CLUSTER = str(GOLDEN / "cluster.yaml")


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_compile_yaml_is_what_the_controller_publishes_one_noderuleset_per_node(capsys):
    rc, out, _ = run(capsys, "compile", "-f", CLUSTER, "-f", str(GOLDEN / "allow-frontend-to-backend.yaml"))
    assert rc == 0
    documents = list(yaml.safe_load_all(out))
    # a small cluster: one self-contained NodeRuleSet per node, its groups inline
    assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [("NodeRuleSet", "node-1"), ("NodeRuleSet", "node-2")]
    specs = assemble_from_objects(documents)
    assert [NodeRuleSet.model_validate(d).spec for d in documents] == list(specs.values())
    assert specs == compile_cluster(load_cluster(read_manifests(
        [CLUSTER, str(GOLDEN / "allow-frontend-to-backend.yaml")])))
    backend = next(p for p in specs["node-1"].pods if p.name == "backend")
    assert backend.isolation.ingress and not backend.isolation.egress
    origins = [o for r in backend.ingress for o in r.origin]
    assert "shop/allow-frontend-to-backend ingress[0]" in origins


def test_compile_json_is_a_list_and_node_filter_works(capsys):
    rc, out, _ = run(capsys, "compile", "-f", CLUSTER, "--node", "node-2", "-o", "json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["kind"] == "List"
    assert [i["metadata"]["name"] for i in doc["items"]] == ["node-2"]
    assert set(assemble_from_objects([doc])) == {"node-2"}


def test_compile_with_groups_in_slices_prints_the_slices_the_node_names(capsys):
    """What a large cluster's controller publishes (--inline-groups-bytes 0 forces it here)."""
    policies = str(GOLDEN / "allow-frontend-to-backend.yaml")
    rc, out, _ = run(capsys, "compile", "-f", CLUSTER, "-f", policies, "--inline-groups-bytes", "0", "-o", "json")
    assert rc == 0
    items = json.loads(out)["items"]
    rulesets = [i for i in items if i["kind"] == "NodeRuleSet"]
    slices = [i for i in items if i["kind"] == "PeerGroupSlice"]
    assert [r["metadata"]["name"] for r in rulesets] == ["node-1", "node-2"] and slices
    assert all(r["spec"]["peerGroups"] == [] and r["spec"]["pods"] for r in rulesets)
    assert assemble_from_objects(items) == compile_cluster(load_cluster(read_manifests([CLUSTER, policies])))
    rc, out, _ = run(capsys, "compile", "-f", CLUSTER, "-f", policies, "--inline-groups-bytes", "0",
                     "--node", "node-2", "-o", "json")
    items = json.loads(out)["items"]
    named = {r.peers for p in assemble_from_objects(items)["node-2"].pods for r in p.all_rules() if r.peers}
    assert {i["spec"]["peerGroup"]["name"] for i in items if i["kind"] == "PeerGroupSlice"} == named


def test_compile_unknown_node_is_bad_input(capsys):
    rc, _, err = run(capsys, "compile", "-f", CLUSTER, "--node", "nope")
    assert rc == 2 and "--node nope" in err


def test_bad_policy_exits_2_naming_file_object_and_field(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/40"}}]}]},
    }))
    rc, out, err = run(capsys, "matrix", "-f", CLUSTER, "-f", str(bad), "--port", "80/TCP", "-o", "json")
    assert rc == 2 and out == ""
    assert f"{bad}: NetworkPolicy shop/broken: spec.ingress[0].from[0].ipBlock.cidr" in err


def test_unreadable_and_non_yaml_files_are_bad_input(capsys, tmp_path):
    rc, _, err = run(capsys, "matrix", "-f", str(tmp_path / "missing.yaml"), "--port", "80/TCP")
    assert rc == 2 and "missing.yaml: cannot read" in err
    junk = tmp_path / "junk.yaml"
    junk.write_text("a: [unclosed\n")
    rc, _, err = run(capsys, "matrix", "-f", str(junk), "--port", "80/TCP")
    assert rc == 2 and "not valid YAML" in err


@pytest.mark.parametrize("port", ["80/ICMP", "http/TCP", "70000/TCP"])
def test_bad_port_argument_is_bad_input(capsys, port):
    rc, _, err = run(capsys, "matrix", "-f", CLUSTER, "--port", port)
    assert rc == 2 and f"--port {port}" in err


def test_kind_list_stdin_and_ignored_kinds(capsys, monkeypatch):
    docs = list(yaml.safe_load_all(open(CLUSTER)))
    listed = {"apiVersion": "v1", "kind": "List", "items": docs + [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "shop"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "shop"}},
    ]}
    monkeypatch.setattr(sys, "stdin", io.StringIO(yaml.safe_dump(listed)))
    rc, out, err = run(capsys, "matrix", "-f", "-", "--port", "80/TCP", "-o", "json")
    assert rc == 0
    assert "ignored 1 object(s) of kind Deployment" in err and "ignored 1 object(s) of kind Service" in err
    matrix = json.loads(out)["matrix"]
    pods = {"shop/frontend", "shop/backend", "shop/db", "monitoring/prometheus", "kube-system/coredns",
            "monitoring/node-exporter"}
    assert set(matrix) == pods and all(set(row) == pods for row in matrix.values())


def test_json_input_as_kubectl_prints_it_gives_what_the_yaml_gives(capsys, tmp_path):
    """`kubectl get -o json` prints one List, indented; separate calls print one after another."""
    docs = list(yaml.safe_load_all(open(CLUSTER)))
    as_list = tmp_path / "cluster.json"
    as_list.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=4))
    concatenated = tmp_path / "parts.json"
    concatenated.write_text("\n".join(json.dumps(d, indent=2) for d in docs))
    _, from_yaml, _ = run(capsys, "compile", "-f", CLUSTER, "-o", "json")
    for path in (as_list, concatenated):
        rc, out, err = run(capsys, "compile", "-f", str(path), "-o", "json")
        assert rc == 0, err
        assert out == from_yaml


def test_broken_json_is_bad_input_naming_the_file(capsys, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"apiVersion": "v1", "kind": "List", "items": [\n')
    rc, out, err = run(capsys, "matrix", "-f", str(broken), "--port", "80/TCP")
    assert rc == 2 and out == ""
    assert f"{broken}: not valid YAML or JSON" in err and "line 2" in err


def test_manifests_are_read_with_libyaml():
    """The pure-Python loader took 12 of 16 s on a 10,000-pod dump (issue 14)."""
    from netfence_api import manifests

    assert yaml.__with_libyaml__, "PyYAML without libyaml: pip install PyYAML from a wheel"
    assert manifests.SafeLoader is yaml.CSafeLoader and manifests.SafeDumper is yaml.CSafeDumper


def test_offline_commands_do_not_import_the_controller_or_the_agent_daemon(tmp_path):
    """kopf and the kubernetes client cost a second of start-up that compile/matrix don't need."""
    code = ("import sys; from netfence_cli.main import main; import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['compile', '-f', sys.argv[1]])\n"
            "print(sorted(m for m in ('kopf', 'kubernetes') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, CLUSTER], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_matrix_table_and_json_agree(capsys):
    args = ["-f", CLUSTER, "-f", str(GOLDEN / "allow-frontend-to-backend.yaml"), "--port", "80/TCP"]
    _, out, _ = run(capsys, "matrix", *args, "-o", "json")
    matrix = json.loads(out)["matrix"]
    _, table, _ = run(capsys, "matrix", *args, "-o", "table")
    lines = table.splitlines()[2:]
    cols = list(matrix)
    for line in lines:
        src, *cells = line.split()
        assert [c == "." for c in cells] == [matrix[src][c] for c in cols]
    assert matrix["shop/frontend"]["shop/backend"] is True
    assert matrix["shop/db"]["shop/backend"] is False


def test_explain_names_the_policy_rule_and_counter(capsys):
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", str(GOLDEN / "allow-frontend-to-backend.yaml"),
                     "--from", "shop/frontend", "--to", "shop/backend", "--port", "80/TCP")
    assert rc == 0
    assert out.startswith("shop/frontend (10.244.1.10) -> shop/backend (10.244.1.11) 80/TCP: ALLOWED")
    assert 'comment "shop/allow-frontend-to-backend ingress[0]"' in out
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", str(GOLDEN / "allow-frontend-to-backend.yaml"),
                     "--from", "shop/db", "--to", "shop/backend", "--port", "80/TCP")
    assert ": DENIED" in out.splitlines()[0]
    assert "isolated by shop/allow-frontend-to-backend, shop/allow-monitoring, shop/default-deny-ingress" in out
    assert "counted in pod_" in out


def test_explain_names_the_tier_policy_and_rule_that_decided(capsys):
    cnps = str(GOLDEN / "cluster-network-policies.yaml")
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", cnps,
                     "--from", "shop/frontend", "--to", "shop/backend", "--port", "80/TCP")
    assert rc == 0 and ": DENIED" in out.splitlines()[0]
    assert "Baseline tier namespace-isolation-default" in out
    assert ("decided by: Deny: ClusterNetworkPolicy namespace-isolation-default tier Baseline priority 100 "
            "ingress[0] (closed-until-a-networkpolicy-opens)") in out
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", cnps,
                     "--from", "monitoring/prometheus", "--to", "shop/db", "--port", "5432/TCP")
    assert ": ALLOWED" in out.splitlines()[0]
    assert ("decided by: Accept: ClusterNetworkPolicy always-allow-monitoring-and-dns tier Admin priority 20 "
            "ingress[0] (monitoring-scrapes)") in out
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", cnps,
                     "--from", "shop/backend", "--to", "shop/db", "--port", "5432/TCP")
    assert ": ALLOWED" in out.splitlines()[0]
    assert "decided by: NetworkPolicy tier: shop/db-from-backend ingress[0]" in out


def test_explain_accepts_ip_endpoints(capsys):
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", str(GOLDEN / "ipblock-except.yaml"),
                     "--from", "172.16.4.4", "--to", "shop/frontend", "--port", "8080/TCP")
    assert rc == 0 and ": ALLOWED" in out.splitlines()[0]
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", str(GOLDEN / "ipblock-except.yaml"),
                     "--from", "172.17.0.9", "--to", "shop/frontend", "--port", "8080/TCP")
    assert ": DENIED" in out.splitlines()[0]
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", str(GOLDEN / "ipblock-except.yaml"),
                     "--from", "shop/frontend", "--to", "10.1.2.3", "--port", "443/TCP")
    assert ": DENIED" in out.splitlines()[0]
    rc, out, _ = run(capsys, "explain", "-f", CLUSTER, "-f", str(GOLDEN / "ipblock-except.yaml"),
                     "--from", "shop/frontend", "--to", "192.0.2.1", "--port", "443/TCP")
    assert ": ALLOWED" in out.splitlines()[0]


def test_explain_unknown_pod_is_bad_input(capsys):
    rc, _, err = run(capsys, "explain", "-f", CLUSTER, "--from", "shop/nope", "--to", "shop/db", "--port", "80/TCP")
    assert rc == 2 and "no Pod shop/nope" in err


def test_console_script_and_module_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("netfence")
    for cmd in ([str(exe)], [sys.executable, "-m", "netfence_cli"]):
        r = subprocess.run(cmd + ["matrix", "-f", CLUSTER, "--port", "53/UDP", "-o", "json"],
                           capture_output=True, text=True, timeout=120, env={**os.environ})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["port"] == "53/UDP"
