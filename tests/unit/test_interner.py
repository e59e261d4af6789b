"""Pods that share equal parts through the Interner stay equal to what was parsed."""

from __future__ import annotations

from netfence_operator.compile import parse_object
from netfence_operator.compile.objects import Interner


def pod(name: str, node: str = "n1", labels: dict | None = None, port: int = 8080) -> dict:
    return {"kind": "Pod", "metadata": {"namespace": "a", "name": name, "uid": f"u-{name}",
                                        "labels": {"app": "web"} if labels is None else labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"podIP": f"10.0.0.{len(name)}"}}


def test_replicas_share_spec_labels_and_field_sets_and_stay_equal():
    interner = Interner()
    a, b = (interner.pod(parse_object(pod(n))) for n in ("a", "bb"))
    assert a == parse_object(pod("a")) and b == parse_object(pod("bb"))
    assert a.spec is b.spec and a.metadata.labels is b.metadata.labels
    assert a.model_fields_set is b.model_fields_set and a.metadata.model_fields_set is b.metadata.model_fields_set
    assert a.model_dump() == parse_object(pod("a")).model_dump()


def test_different_parts_are_not_shared():
    interner = Interner()
    base = interner.pod(parse_object(pod("a")))
    other_node = interner.pod(parse_object(pod("b", node="n2")))
    other_port = interner.pod(parse_object(pod("c", port=9090)))
    other_labels = interner.pod(parse_object(pod("d", labels={"app": "db"})))
    assert other_node.spec.nodeName == "n2" and other_node.spec is not base.spec
    assert other_port.spec.containers[0].ports[0].containerPort == 9090 and other_port.spec is not base.spec
    assert other_labels.metadata.labels == {"app": "db"} and other_labels.metadata.labels is not base.metadata.labels
    # Unset fields stay unset: the shared field set is that of models that set the same fields.
    bare = interner.pod(parse_object({"kind": "Pod", "metadata": {"name": "e"}}))
    assert bare.model_fields_set == {"kind", "metadata"} and base.model_fields_set == {"kind", "metadata", "spec", "status"}


def test_tables_are_bounded():
    interner = Interner(limit=10)
    for i in range(100):
        interner.pod(parse_object(pod(f"p{i}", node=f"n{i}", labels={"i": str(i)})))
    assert len(interner._specs) + len(interner._labels) <= 12
