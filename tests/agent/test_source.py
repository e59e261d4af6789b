"""The file rule-set source: JSON or YAML, reloads on change (also atomic renames), status file."""

from __future__ import annotations

import copy
import json
import os
import queue
import threading
from pathlib import Path

import pytest
import yaml

import netfence_api
from netfence_api.slices import Bounds, split
from netfence_agent.source import FileRuleSetSource, RuleSetFileError, RuleSetSource, parse_rule_set

SPEC = {"nodeName": "n1", "pods": [{"namespace": "x", "name": "a", "ips": ["10.244.0.2"]}]}


def rule_set(generation: int) -> dict:
    return {"apiVersion": "netfence.io/v1alpha1", "kind": "NodeRuleSet",
            "metadata": {"name": "n1", "generation": generation}, "spec": copy.deepcopy(SPEC)}


def test_parses_json_and_yaml():
    as_json = parse_rule_set(json.dumps(rule_set(3)))
    as_yaml = parse_rule_set(yaml.safe_dump(rule_set(3)))
    assert as_json == as_yaml and as_json.metadata.generation == 3 and as_json.spec.pods[0].ips == ["10.244.0.2"]


def test_errors_name_the_file_and_field():
    bad = rule_set(1)
    bad["spec"]["pods"][0]["ips"] = []
    with pytest.raises(RuleSetFileError, match=r"rules\.yaml: invalid NodeRuleSet: spec\.pods\.0\.ips"):
        parse_rule_set(yaml.safe_dump(bad), "rules.yaml")
    with pytest.raises(RuleSetFileError, match="not JSON or YAML"):
        parse_rule_set("{: nope", "rules.yaml")
    with pytest.raises(RuleSetFileError, match="expected a NodeRuleSet object"):
        parse_rule_set("[1, 2]")


SLICES = Bounds(inline_groups_bytes=0)


@pytest.mark.parametrize("bounds", [Bounds(), SLICES], ids=["inline", "slices"])
def test_a_list_of_one_nodes_published_objects_is_read_as_its_complete_rule_set(bounds):
    spec = netfence_api.NodeRuleSetSpec.model_validate(SPEC)
    listing = {"apiVersion": "v1", "kind": "List", "items": split([spec], bounds)}
    assert parse_rule_set(json.dumps(listing)).spec == spec
    two = {"apiVersion": "v1", "kind": "List", "items": split([spec, spec.model_copy(update={"nodeName": "n2"})], bounds)}
    with pytest.raises(RuleSetFileError, match="exactly one node's NodeRuleSet, found 2"):
        parse_rule_set(json.dumps(two), "rules.json")


def test_a_list_without_the_group_slices_its_rules_name_is_bad_input():
    group = {"name": "pg-00000000000a", "selector": "ns x pods{}", "cidrs": ["10.244.1.0/32"]}
    spec = netfence_api.NodeRuleSetSpec.model_validate({**SPEC, "peerGroups": [group], "pods": [{
        **SPEC["pods"][0], "isolation": {"ingress": True},
        "ingress": [{"origin": ["x/p ingress[0]"], "peers": group["name"]}]}]})
    missing = {"apiVersion": "v1", "kind": "List", "items": [o for o in split([spec], SLICES) if o["kind"] == "NodeRuleSet"]}
    with pytest.raises(RuleSetFileError, match=rf"rules\.json: peer group {spec.peerGroups[0].name} is missing"):
        parse_rule_set(json.dumps(missing), "rules.json")
    (alone,) = missing["items"]  # a NodeRuleSet copied from a large cluster without its group slices
    with pytest.raises(RuleSetFileError, match=rf"rules\.json: peer group {spec.peerGroups[0].name} is missing"):
        parse_rule_set(json.dumps(alone), "rules.json")


class Reader:
    """updates() on a thread, delivering into a queue."""

    def __init__(self, source: FileRuleSetSource):
        self.source = source
        self.got: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=lambda: [self.got.put(r) for r in source.updates()], daemon=True)
        self.thread.start()

    def next(self, timeout: float = 5.0) -> netfence_api.NodeRuleSet:
        return self.got.get(timeout=timeout)

    def nothing(self, wait: float = 0.3) -> bool:
        try:
            self.got.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.source.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def test_delivers_the_current_file_then_every_change(tmp_path: Path):
    path = tmp_path / "rules.json"
    write_atomic(path, rule_set(1))
    source: RuleSetSource = FileRuleSetSource(str(path))
    reader = Reader(source)
    try:
        assert reader.next().metadata.generation == 1
        write_atomic(path, rule_set(2))                     # renamed over the old file
        assert reader.next().metadata.generation == 2
        path.write_text(yaml.safe_dump(rule_set(3)))        # rewritten in place, as YAML
        assert reader.next().metadata.generation == 3
        os.utime(path)                                      # touched, same content: nothing new
        assert reader.nothing()
    finally:
        reader.close()


def test_an_invalid_file_is_reported_and_the_last_good_status_kept(tmp_path: Path):
    path = tmp_path / "rules.json"
    write_atomic(path, rule_set(1))
    source = FileRuleSetSource(str(path))
    reader = Reader(source)
    try:
        reader.next()
        source.report(netfence_api.NodeRuleSetStatus(observedGeneration=1, appliedHash="sha256:good", conditions=[
            netfence_api.Condition(type="Applied", status="True", reason="Applied")]))
        path.write_text("{ not json")
        assert reader.nothing(1.0)
        status = json.loads((tmp_path / "rules.json.status.json").read_text())
        assert status["appliedHash"] == "sha256:good"
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "InvalidRuleSet"
        assert "rules.json" in degraded["message"]
        assert next(c for c in status["conditions"] if c["type"] == "Applied")["status"] == "True"
        write_atomic(path, rule_set(2))
        assert reader.next().metadata.generation == 2
    finally:
        reader.close()


def test_status_file_is_written_atomically_where_asked(tmp_path: Path):
    path = tmp_path / "rules.json"
    write_atomic(path, rule_set(1))
    source = FileRuleSetSource(str(path), str(tmp_path / "s.json"))
    status = netfence_api.NodeRuleSetStatus(observedGeneration=4, appliedHash="sha256:x", lastAppliedTime="2026-01-01T00:00:00Z")
    source.report(status)
    assert netfence_api.NodeRuleSetStatus.model_validate_json((tmp_path / "s.json").read_text()) == status
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    source.close()


def test_close_ends_updates_even_when_idle(tmp_path: Path):
    path = tmp_path / "rules.json"
    write_atomic(path, rule_set(1))
    reader = Reader(FileRuleSetSource(str(path)))
    reader.next()
    reader.close()
