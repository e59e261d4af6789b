"""render_update (the agent's partial render) equals a full render, for any change of the node.

Random clusters (reference.strategies, with and without ClusterNetworkPolicies) go through a
random history of events - a pod born, deleted, relabelled, given a new IP or a second
(IPv6) address, a policy added or removed, veths found, lost or renamed, new pods held or
released, drop logging switched - and after every event each node's spec, as the controller
compiles it, is rendered two ways: by render_update from the node's previous result (what the
agent does) and by a full render. Both must be the very same model: the `nft -f` text (order
included), the counters' labels, the families; the plan between them must find nothing to do;
and the previous result must be left as it was (the kernel still holds it until the commit).
"""

from __future__ import annotations

import json
from collections import Counter as Tally

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netfence_api
from netfence_agent.nft.serialize import ruleset_text
from netfence_agent.nft.transaction import plan
from netfence_agent.render import RenderResult, render, render_update
from netfence_agent.source import RuleSetReader
from reference.node_events import histories, node_specs, ports_of, steps_of

HOW_OFTEN = Tally()  # how each render_update was made, over the whole run (checked below)


def no_inventory():
    raise AssertionError("the plan between two equal renders must not need the kernel")


class NodeView:
    """One node as its agent sees it: its previous result and its rule-set reader."""

    def __init__(self, name: str):
        self.name = name
        self.previous: RenderResult | None = None
        self.reader = RuleSetReader()
        self.generation = 0


def as_delivered(view: NodeView, spec: netfence_api.NodeRuleSetSpec, via_reader: bool) -> netfence_api.NodeRuleSetSpec:
    """The spec as the agent meets it: through RuleSetReader (unchanged pods keep their models)
    or straight from the compiler (every object new, equal ones compared)."""
    if not via_reader:
        return spec
    view.generation += 1
    text = netfence_api.NodeRuleSet.for_node(spec, view.generation).model_dump_json()
    return view.reader.read(json.loads(text)).spec


def assert_same(updated: RenderResult, full: RenderResult) -> None:
    assert ruleset_text(updated.ruleset) == ruleset_text(full.ruleset)
    assert updated.counters == full.counters
    assert updated.rule_counters == full.rule_counters
    assert updated.families == full.families
    assert plan(full.ruleset, updated.ruleset, no_inventory).kind == "noop"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(histories(), st.booleans())
def test_a_partial_render_after_any_change_equals_a_full_render(history, via_reader):
    views: dict[str, NodeView] = {}
    for docs, veths, holds, options in steps_of(history):
        for name, compiled in node_specs(docs).items():
            view = views.setdefault(name, NodeView(name))
            spec = as_delivered(view, compiled, via_reader)
            ports = ports_of(spec, veths)
            full = render(spec, ports, options, holds=holds)
            if view.previous is None:
                view.previous = full
                continue
            before = ruleset_text(view.previous.ruleset)
            updated = render_update(view.previous, spec, ports, options, holds)
            assert ruleset_text(view.previous.ruleset) == before, "render_update changed the previous result"
            assert_same(updated, full)
            HOW_OFTEN[_how(view.previous, updated)] += 1
            view.previous = updated


def _how(previous: RenderResult, updated: RenderResult) -> str:
    """Which way render_update went: all anew, group sets only, or per pod (some chain kept)."""
    old, new = previous.ruleset.tables[0], updated.ruleset.tables[0]
    if new.chains is old.chains:
        return "groups"
    kept = [name for t_old, t_new in zip(previous.ruleset.tables, updated.ruleset.tables)
            for name, chain in t_new.chains.items() if t_old.chains.get(name) is chain]
    return "per pod" if kept else "anew"


def test_the_history_covers_every_way_render_update_goes():
    """Run after the property (same module, file order): it reached every path."""
    assert {"groups", "per pod", "anew"} <= set(HOW_OFTEN), HOW_OFTEN
