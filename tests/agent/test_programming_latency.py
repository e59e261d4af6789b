"""netfence_network_programming_duration_seconds: trigger time -> rules in the kernel, once per generation."""

from __future__ import annotations

import datetime
import time

from prometheus_client.parser import text_string_to_metric_families

from netfence_agent.metrics import TRIGGER_ANNOTATION, AgentMetrics, trigger_seconds
from netfence_api.crd import TRIGGER_ANNOTATION as PUBLISHED_ANNOTATION
from netfence_operator.publish import trigger_time


def histogram(metrics: AgentMetrics) -> dict[str, float]:
    text = metrics.exposition().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "netfence_network_programming_duration_seconds")
    return {s.name.rsplit("_", 1)[-1] + (s.labels.get("le", "") and f"{{{s.labels['le']}}}"): s.value for s in family.samples}


def test_the_agent_reads_what_the_controller_writes():
    assert TRIGGER_ANNOTATION == PUBLISHED_ANNOTATION
    now = time.time()
    assert abs(trigger_seconds({TRIGGER_ANNOTATION: trigger_time(now)}) - now) < 1e-5
    assert trigger_seconds({}) is None and trigger_seconds({TRIGGER_ANNOTATION: "yesterday"}) is None


def test_observed_once_per_generation_from_the_trigger_time():
    metrics = AgentMetrics()
    assert histogram(metrics)["count"] == 0
    triggered = {TRIGGER_ANNOTATION: trigger_time(time.time() - 0.3)}
    metrics.programmed("uid-1", 2, triggered)
    metrics.programmed("uid-1", 2, triggered)  # a later sync of the same generation (e.g. a new veth)
    h = histogram(metrics)
    assert h["count"] == 1 and 0.3 <= h["sum"] < 0.3 + 5
    assert h["bucket{0.25}"] == 0 and h["bucket{0.5}"] == 1
    metrics.programmed("uid-1", 3, {TRIGGER_ANNOTATION: trigger_time(time.time() - 2.5)})
    metrics.programmed("uid-1", 4, None)  # a rule set nobody stamped (a hand-written rules file)
    h = histogram(metrics)
    assert h["count"] == 2 and h["bucket{1.0}"] == 1 and h["bucket{5.0}"] == 2
    # a clock ahead of ours never gives a negative latency
    metrics.programmed("uid-1", 5, {TRIGGER_ANNOTATION: trigger_time(time.time() + 10)})
    assert histogram(metrics)["bucket{0.05}"] == 1


def test_trigger_time_format_is_rfc3339_utc_with_microseconds():
    text = trigger_time(datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=datetime.timezone.utc).timestamp())
    assert text == "2024-05-01T12:00:00.123456Z"
