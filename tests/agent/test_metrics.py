"""Metrics: names and labels exactly as DESIGN.md §5, totals monotonic whatever the kernel does."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netfence_agent.metrics import AgentMetrics, CounterLedger, parse_bind_address
from netfence_agent.nft.kernel import CounterValue
from netfence_agent.render import CounterLabels

C_IN = CounterLabels("x", "c", "ingress")
A_OUT = CounterLabels("x", "a", "egress")
A_SPOOF = CounterLabels("x", "a", "spoof")
LABELS = {"pod_c_ingress": C_IN, "pod_a_egress": A_OUT, "pod_a_spoof": A_SPOOF}


def key(name: str) -> tuple[str, str, str]:
    return ("bridge" if name.endswith("spoof") else "inet", "netfence", name)


def test_ledger_adds_increases_and_survives_recreation_and_deletion():
    ledger = CounterLedger()
    ledger.observe({key("pod_c_ingress"): CounterValue(5, 500)}, LABELS)
    ledger.observe({key("pod_c_ingress"): CounterValue(7, 700)}, LABELS)
    assert (ledger.totals[C_IN].packets, ledger.totals[C_IN].bytes) == (7, 700)
    ledger.observe({}, LABELS)  # the counter was deleted (pod no longer isolated)
    assert ledger.totals[C_IN].packets == 7
    ledger.observe({key("pod_c_ingress"): CounterValue(2, 100)}, LABELS)  # re-created, counted from 0
    assert (ledger.totals[C_IN].packets, ledger.totals[C_IN].bytes) == (9, 800)
    ledger.observe({key("pod_c_ingress"): CounterValue(1, 50)}, LABELS)  # reset under our feet
    assert ledger.totals[C_IN].packets == 10


def test_ledger_ignores_counters_nobody_rendered():
    ledger = CounterLedger()
    ledger.observe({key("someone_elses"): CounterValue(3, 3)}, LABELS)
    assert ledger.totals == {}


def test_exposition_has_the_contract_names_and_labels():
    readings = {key("pod_c_ingress"): CounterValue(4, 240), key("pod_a_egress"): CounterValue(1, 60),
                key("pod_a_spoof"): CounterValue(2, 84)}
    metrics = AgentMetrics(read_counters=lambda: readings)
    metrics.set_labels(LABELS)
    metrics.applied(0.004, generation=7)
    metrics.failed(0.3)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    assert samples[("netfence_dropped_packets_total", (("direction", "ingress"), ("namespace", "x"), ("pod", "c")))] == 4
    assert samples[("netfence_dropped_bytes_total", (("direction", "ingress"), ("namespace", "x"), ("pod", "c")))] == 240
    assert samples[("netfence_dropped_packets_total", (("direction", "egress"), ("namespace", "x"), ("pod", "a")))] == 1
    assert samples[("netfence_spoofed_packets_total", (("namespace", "x"), ("pod", "a")))] == 2
    assert samples[("netfence_rules_applied_total", ())] == 1
    assert samples[("netfence_rule_apply_failures_total", ())] == 1
    assert samples[("netfence_ruleset_generation", ())] == 7
    assert samples[("netfence_rule_apply_duration_seconds_count", ())] == 2
    assert samples[("netfence_rule_apply_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("netfence_rule_apply_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert families["netfence_rule_apply_duration_seconds"].type == "histogram"
    assert families["netfence_ruleset_generation"].type == "gauge"
    for name in ("netfence_dropped_packets", "netfence_dropped_bytes", "netfence_spoofed_packets",
                 "netfence_rules_applied", "netfence_rule_apply_failures"):
        assert families[name].type == "counter"
    assert not any(name.endswith("_created") for name, _ in samples)


def test_declared_counters_export_zero_before_any_reading():
    metrics = AgentMetrics(read_counters=None)
    metrics.set_labels(LABELS)
    text = metrics.exposition().decode()
    assert 'netfence_dropped_packets_total{direction="ingress",namespace="x",pod="c"} 0.0' in text


def test_a_failing_kernel_read_keeps_the_last_totals():
    readings = {key("pod_c_ingress"): CounterValue(4, 240)}

    def read():
        if not readings:
            raise OSError("netlink went away")
        return readings

    metrics = AgentMetrics(read_counters=read)
    metrics.set_labels(LABELS)
    metrics.exposition()
    readings.clear()
    assert 'pod="c"} 4.0' in metrics.exposition().decode()


@pytest.mark.parametrize("text, expected", [
    (":9469", ("", 9469)), ("127.0.0.1:9000", ("127.0.0.1", 9000)), ("[::1]:9469", ("::1", 9469)),
])
def test_bind_address(text, expected):
    assert parse_bind_address(text) == expected


def test_bad_bind_address_is_refused():
    with pytest.raises(ValueError, match="PORT"):
        parse_bind_address("localhost")


def test_anti_spoofing_coverage_is_a_gauge_and_repairs_a_counter():
    metrics = AgentMetrics(read_counters=None)
    metrics.anti_spoofing(2, repaired=True)
    metrics.anti_spoofing(1)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert families["netfence_unprotected_pods"].type == "gauge"
    assert families["netfence_unprotected_pods"].samples[0].value == 1
    assert families["netfence_anti_spoofing_repairs"].type == "counter"
    assert families["netfence_anti_spoofing_repairs"].samples[0].value == 1


def test_cluster_network_policy_deny_rules_are_exported_per_policy_and_rule():
    from netfence_agent.render import RuleCounterLabels

    rule = RuleCounterLabels("deny-metadata", "Admin", "no-cloud-metadata", "egress")
    readings = {key("pod_a_egress"): CounterValue(3, 180), key("cnp_0123456789ab"): CounterValue(3, 180)}
    metrics = AgentMetrics(read_counters=lambda: readings)
    metrics.set_labels({**LABELS, "cnp_0123456789ab": rule})
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    labels = (("direction", "egress"), ("policy", "deny-metadata"), ("rule", "no-cloud-metadata"), ("tier", "Admin"))
    assert samples[("netfence_policy_rule_dropped_packets_total", labels)] == 3
    assert samples[("netfence_policy_rule_dropped_bytes_total", labels)] == 180
    # the pod's own counter keeps counting the same drops (DESIGN.md §5)
    assert samples[("netfence_dropped_packets_total", (("direction", "egress"), ("namespace", "x"), ("pod", "a")))] == 3
