"""The agent: rule set and local veths in, nftables rules in the kernel out, status back.

One sync loop owns the kernel. Everything else only tells it that something changed:
  - the rule-set source (API watch or file) delivers the latest NodeRuleSet;
  - discovery delivers the latest pod -> veth map (a veth appeared or went away);
  - a failed apply schedules a retry with backoff;
  - a held new pod reaches its hold timeout (netfence_agent.hold).
The loop then renders the latest of both and applies the difference in one transaction. Changes
arriving while it applies are coalesced into the next round.

What the agent never does: flush or delete anything outside a transaction that also loads the
new rules (a restarting agent opens no window), touch tables other than its own, or remove its
rules when it stops (SIGTERM leaves the last rules enforcing; `netfence cleanup` removes them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Literal

import netfence_api
from netfence_agent import br_netfilter, netns
from netfence_agent.coverage import (
    ADDRESS_SETS,
    PORTS_MAP,
    CoverageWatch,
    Gap,
    anti_spoofing_gaps,
    loaded_from,
    needed_families,
)
from netfence_agent.discovery import DEFAULT_CNI_DIR, DEFAULT_NETNS_DIR, Discovery, Snapshot
from netfence_agent.hold import DEFAULT_HOLD_TIMEOUT, HoldBook, describe, next_book
from netfence_agent.metrics import AgentMetrics, serve
from netfence_agent.nft.kernel import OWNED_TABLES, Kernel, NftError
from netfence_agent.nft.transaction import Transaction, plan
from netfence_agent.render import (
    BRIDGE_TABLE,
    NO_HOLDS,
    Holds,
    PodPort,
    RenderOptions,
    RenderResult,
    render,
    render_update,
)
from netfence_agent.source import RuleSetSource

log = logging.getLogger("netfence.agent")

MESSAGE_MAX = 1000


@dataclass(frozen=True)
class AgentConfig:
    node: str
    metrics_bind_address: str | None = ":9469"  # None: no HTTP server (tests, benchmarks)
    netns_dir: str = DEFAULT_NETNS_DIR
    cni_dir: str = DEFAULT_CNI_DIR
    log_drops: bool = False
    nflog_group: int = 100
    log_rate_per_second: int = 10
    proc_sys: str = "/proc/sys"
    # Partial syncs trust that the kernel still holds what this process loaded. A full sync
    # every so often repairs edits to our tables by others (an `nft` typed by hand, a tool
    # flushing chains), as kube-proxy's nftables mode does hourly. 0: never.
    full_sync_period: float = 3600.0
    # The kernel's anti-spoofing is read back and checked against the rule set's pods after
    # syncs that change it and this often (0: only after syncs); a pod may lack a veth for
    # unprotected_grace seconds before it counts (its veth is being created or deleted).
    anti_spoofing_check_period: float = 30.0
    unprotected_grace: float = 10.0
    # "hold": a pod the rule set does not cover yet is held closed, at most hold_new_pods_timeout
    # seconds; "open": it is left unpoliced until covered (fail-open, as before holds existed).
    new_pods: Literal["hold", "open"] = "hold"
    hold_new_pods_timeout: float = DEFAULT_HOLD_TIMEOUT

    @property
    def render_options(self) -> RenderOptions:
        return RenderOptions(self.log_drops, self.nflog_group, self.log_rate_per_second)


@dataclass(frozen=True)
class SyncOutcome:
    kind: str  # a Transaction kind ("noop", "elements", "partial", "full"), "failed" or "skipped"
    seconds: float = 0.0
    error: str | None = None


def _describe(gaps: list[Gap]) -> str:
    return "; ".join(f"{g.pod} ({g.why})" for g in gaps)[:MESSAGE_MAX]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Agent:
    RETRY_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    BR_NETFILTER_RECHECK = 30.0

    def __init__(self, config: AgentConfig, source: RuleSetSource, kernel: Kernel | None = None):
        self.config = config
        self.source = source
        self.kernel = kernel or Kernel()
        self.metrics = AgentMetrics(read_counters=self.kernel.counters)
        self._cond = threading.Condition()
        self._desired: netfence_api.NodeRuleSet | None = None
        self._ports: dict[str, PodPort] = {}
        self._unaddressed: dict[int, PodPort] = {}  # veths of pods without a known IP
        self._other_ports: dict[int, PodPort] = {}  # veths on bridges without pods
        self._dirty = False
        self._stopping = False
        self._retry_at: float | None = None
        self._failures_in_row = 0
        self._full_sync_due = False
        self._next_full_sync: float | None = None  # armed by the first full sync
        # What the kernel holds as far as this process knows (None: not loaded by us yet).
        self.applied: RenderResult | None = None
        self.applied_object: netfence_api.NodeRuleSet | None = None
        self._applied_ports: dict[str, PodPort] = {}
        self.hold = HoldBook()  # the holds the kernel enforces
        self._applied_holds = NO_HOLDS
        self._hold_ends: float | None = None  # when the oldest of them times out
        self.last_error: str | None = None
        self.br_state = br_netfilter.BrNetfilterState(False, "not checked yet")
        self.netns_problem: str | None = None  # the pod netns mount does not propagate (checked at start)
        self._conditions: dict[str, netfence_api.Condition] = {}
        self._last_status: netfence_api.NodeRuleSetStatus | None = None
        self.discovery: Discovery | None = None
        # Anti-spoofing coverage (check_anti_spoofing): local pods it misses in the kernel -> why.
        self.unprotected: dict[str, str] = {}
        self._coverage = CoverageWatch(config.unprotected_grace)
        self._coverage_inputs: tuple | None = None  # (pods, ports) of the last check
        self._next_coverage_check: float | None = None
        self._last_repair: float | None = None
        self._repair_why: str | None = None
        self._http = None
        self._nflog = None

    # ------------------------------------------------------------------ inputs
    def set_rule_set(self, rule_set: netfence_api.NodeRuleSet) -> None:
        with self._cond:
            self._desired = rule_set
            self._dirty = True
            self._cond.notify()

    def set_ports(self, ports: dict[str, PodPort], unaddressed: dict[int, PodPort] | None = None,
                  other_ports: dict[int, PodPort] | None = None) -> None:
        unaddressed, other_ports = unaddressed or {}, other_ports or {}
        with self._cond:
            if ports != self._ports or unaddressed != self._unaddressed or other_ports != self._other_ports:
                self._ports = dict(ports)
                self._unaddressed = dict(unaddressed)
                self._other_ports = dict(other_ports)
                self._dirty = True
                self._cond.notify()

    def _on_discovery(self, snapshot: Snapshot) -> None:
        added = sorted(set(snapshot.pods) - set(self._ports))
        gone = sorted(set(self._ports) - set(snapshot.pods))
        if added or gone:
            log.info("pods on this node: +%s -%s",
                     [f"{ip} on {snapshot.pods[ip].ifname}" for ip in added], gone)
        self.set_ports(snapshot.ports, snapshot.unaddressed, snapshot.other_ports)

    # ------------------------------------------------------------------ health
    def readiness(self) -> tuple[bool, str]:
        """Ready while the latest rule set is enforced and same-node traffic reaches the rules."""
        if self.applied is None:
            return False, f"no rule set applied yet{': ' + self.last_error if self.last_error else ''}"
        if not self.br_state.ok:
            return False, f"br_netfilter off, same-node pod traffic is not policed: {self.br_state.message}"
        if self.netns_problem:
            return False, self.netns_problem
        if self.last_error:
            return False, (f"the latest rule set was rejected, rules of generation {self.metrics.generation} "
                           f"stay enforced: {self.last_error}")
        if self.unprotected:
            return False, self._unprotected_message()
        return True, f"rules of generation {self.metrics.generation} enforced"

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    # ------------------------------------------------------------------ the loop
    def check_br_netfilter(self) -> None:
        self.br_state = br_netfilter.ensure(self.config.proc_sys)
        if not self.br_state.ok:
            log.error("br_netfilter: %s", self.br_state.message)

    def sync_once(self) -> SyncOutcome:
        with self._cond:
            rule_set, ports = self._desired, dict(self._ports)
            unaddressed, other_ports = dict(self._unaddressed), dict(self._other_ports)
            self._dirty = False
            self._retry_at = None  # a failure below schedules the next attempt again
            periodic, self._full_sync_due = self._full_sync_due, False
            repair, self._repair_why = self._repair_why, None
        self.check_br_netfilter()
        if rule_set is None:
            return SyncOutcome("skipped")  # nothing to load yet; whatever the kernel has stays
        started = time.perf_counter()
        if rule_set.spec.nodeName != self.config.node:
            return self._failed(rule_set, started, f"rule set is for node {rule_set.spec.nodeName!r}, "
                                                   f"this agent is node {self.config.node!r}", "WrongNode", retry=False)
        hold = self._next_hold(rule_set, ports, unaddressed)
        holds = self._holds(hold, other_ports)
        try:
            if self.applied is not None and not (periodic or repair):
                # What changed only: a pod's chains and elements, a group's sets (render_update).
                result = render_update(self.applied, rule_set.spec, ports, self.config.render_options, holds=holds)
            else:
                # The safety net renders everything anew, trusting nothing kept from before.
                result = render(rule_set.spec, ports, self.config.render_options, holds=holds)
        except ValueError as exc:  # e.g. an address that is none: nothing sensible to load
            return self._failed(rule_set, started, f"cannot render: {exc}", "InvalidRuleSet", retry=False)
        if self.applied is not None and not set(OWNED_TABLES) <= self.kernel.tables():
            log.warning("netfence tables were removed from the kernel by someone else; loading them again")
            self.applied = None
        if (periodic or repair) and self.applied is not None:
            transaction = replace(plan(result.ruleset, None, self.kernel.inventory),
                                  why=repair or f"periodic, every {self.config.full_sync_period:g} s")
        else:
            transaction = plan(result.ruleset, self.applied.ruleset if self.applied else None, self.kernel.inventory)
        try:
            self._apply(transaction)
        except NftError as first:
            if transaction.kind == "full":
                outcome = self._failed(rule_set, started, str(first))
                if periodic:  # the retry repairs too
                    self._next_full_sync = self._retry_at
                return outcome
            # Either the new rules are bad or the kernel no longer holds what we loaded last
            # (someone changed it). A full sync tells which, and repairs the second case.
            log.warning("%s sync rejected (%s); trying a full sync", transaction.kind, first)
            transaction = plan(result.ruleset, None, self.kernel.inventory)
            try:
                self._apply(transaction)
            except NftError as second:
                return self._failed(rule_set, started, str(second))
        seconds = time.perf_counter() - started
        self.applied, self.applied_object, self._applied_ports = result, rule_set, ports
        self._holds_applied(hold)
        self._applied_holds = holds
        self.last_error = None
        self._failures_in_row = 0
        self.metrics.set_labels({**result.counters, **result.rule_counters})
        if transaction.kind == "full" and self.config.full_sync_period > 0:
            self._next_full_sync = time.monotonic() + self.config.full_sync_period
        self.metrics.programmed(rule_set.metadata.uid, rule_set.metadata.generation, rule_set.metadata.annotations)
        if transaction.kind != "noop":
            if transaction.kind == "full":
                self.metrics.book_counters()  # forget counters the sync deleted
            self.metrics.applied(seconds, rule_set.metadata.generation)
            log.info("applied generation %s (%s sync%s, %d commands, %d local pods, %d veths) in %.1f ms",
                     rule_set.metadata.generation, transaction.kind,
                     f": {transaction.why}" if transaction.why else "", len(transaction.commands),
                     len(rule_set.spec.pods), len(ports), seconds * 1000)
        self.check_anti_spoofing(transaction.kind)
        self._report(rule_set, force=transaction.kind != "noop")
        return SyncOutcome(transaction.kind, seconds)

    def _next_hold(self, rule_set: netfence_api.NodeRuleSet, ports: dict[str, PodPort],
                   unaddressed: dict[int, PodPort]) -> HoldBook:
        if self.config.new_pods != "hold":
            return HoldBook()
        return next_book(self.hold, rule_set.spec, ports, unaddressed, time.monotonic(),
                         self.config.hold_new_pods_timeout)

    def _holds(self, hold: HoldBook, other_ports: dict[int, PodPort]) -> Holds:
        if self.config.new_pods != "hold":
            return NO_HOLDS
        passed = [entry.port for entry in hold.released.values()] + list(other_ports.values())
        return Holds(True, hold.held, tuple(sorted(passed, key=lambda p: p.ifname)))

    def _holds_applied(self, hold: HoldBook) -> None:
        """The kernel now enforces `hold`: say what changed."""
        for entry in hold.started:
            log.info("holding new pod veth %s closed: the rule set does not cover it (yet)", describe(entry))
        for entry, held_for in hold.covered:
            log.info("released %s: its rules are in the kernel after %.3f s held", describe(entry), held_for)
        for entry in hold.timed_out:
            log.warning("released %s UNPOLICED: held %g s (--hold-new-pods-timeout) and the rule set still does "
                        "not cover it; is the controller running?", describe(entry), hold.timeout)
        self.metrics.holds(len(hold.held), [held_for for _, held_for in hold.covered], len(hold.timed_out))
        self.hold = hold
        with self._cond:
            self._hold_ends = hold.next_deadline

    def _apply(self, transaction: Transaction) -> None:
        if transaction.kind == "noop":
            return
        if transaction.kind == "full":
            self.metrics.book_counters()  # book counts of counters this sync may delete
        self.kernel.apply(transaction)

    def _failed(self, rule_set: netfence_api.NodeRuleSet, started: float, error: str,
                reason: str = "KernelRejected", retry: bool = True) -> SyncOutcome:
        """Keep the rules loaded before (a transaction is all or nothing), and say so."""
        seconds = time.perf_counter() - started
        self.metrics.failed(seconds)
        self.last_error = error.strip()[:MESSAGE_MAX]
        kept = f"generation {self.applied_object.metadata.generation}" if self.applied_object else "none by this agent"
        if retry:  # the same input may load later (e.g. someone else's rules were in the way)
            delay = self.RETRY_BACKOFF[min(self._failures_in_row, len(self.RETRY_BACKOFF) - 1)]
            self._failures_in_row += 1
            self._retry_at = time.monotonic() + delay
            log.error("generation %s not loaded (%s), keeping the rules loaded before (%s); retry in %.1fs: %s",
                      rule_set.metadata.generation, reason, kept, delay, self.last_error)
        else:
            log.error("generation %s not loaded (%s), keeping the rules loaded before (%s): %s",
                      rule_set.metadata.generation, reason, kept, self.last_error)
        self._report(rule_set, error=(reason, self.last_error))
        return SyncOutcome("failed", seconds, self.last_error)

    # ------------------------------------------------------------------ anti-spoofing coverage
    def check_anti_spoofing(self, after: str | None = None) -> bool:
        """Read the bridge table back: which local pods of the loaded rule set does it not cover?
        Repairs what the kernel lost, asks discovery to look again for veths it lacks (issue 12).
        `after`: the kind of the sync just made (skipped when it changed nothing anti-spoofing
        depends on). Runs on the sync loop. True if the set of unprotected pods changed."""
        if self.applied is None or self.applied_object is None:
            return False
        pods, ports = self.applied_object.spec.pods, self._applied_ports
        inputs = self._coverage_inputs
        if (after in ("noop", "elements") and inputs is not None and not self.unprotected and inputs[1] == ports
                and (inputs[0] is pods or inputs[0] == pods)):
            return False  # e.g. peer group members changed: nothing of anti-spoofing did
        self._coverage_inputs = (pods, ports)
        now = time.monotonic()
        try:
            elements = self.kernel.set_elements(
                *BRIDGE_TABLE, [PORTS_MAP, *(ADDRESS_SETS[f] for f in needed_families(pods))])
        except OSError as exc:
            log.warning("cannot read anti-spoofing back from the kernel: %s", exc)
            return False
        gaps = anti_spoofing_gaps(pods, ports, loaded_from(elements))
        unprotected, recheck = self._coverage.judge(gaps, now)
        period = self.config.anti_spoofing_check_period
        due = [t for t in (now + period if period > 0 else None, recheck) if t is not None]
        self._next_coverage_check = min(due) if due else None
        lost = [g for g in gaps if g.loaded]
        repair = bool(lost) and (self._last_repair is None or now - self._last_repair >= max(period, 1.0))
        if repair:
            self._last_repair = now
            why = f"anti-spoofing missing from the kernel: {_describe(lost)}"
            log.warning("%s; loading the whole rule set again", why)
            with self._cond:
                self._repair_why = why  # the loop's next sync is a full one
        elif lost:
            log.error("anti-spoofing still missing from the kernel after a repair: %s", _describe(lost))
        if self.discovery is not None and any(not g.loaded and g.pod in unprotected for g in gaps):
            self.discovery.request_rescan()  # a belt: in case discovery lost a veth it should know
        self.metrics.anti_spoofing(len(unprotected), repaired=repair)
        if unprotected == self.unprotected:
            return False
        if unprotected:
            log.warning("%d local pods without anti-spoofing in the kernel: %s", len(unprotected),
                        _describe([Gap(pod, why, False) for pod, why in unprotected.items()]))
        else:
            log.info("anti-spoofing covers every local pod again")
        self.unprotected = unprotected
        return True

    def _anti_spoofing_check_due(self) -> bool:
        """The check on its timer; the status goes out if what it found changed."""
        if self._next_coverage_check is None or time.monotonic() < self._next_coverage_check:
            return False
        # After a rejected rule set the status speaks of that one; the gauge and /readyz still tell.
        if self.check_anti_spoofing() and self.last_error is None and self.applied_object is not None:
            self._report(self.applied_object)
        return True

    def _unprotected_message(self) -> str:
        return (f"anti-spoofing missing in the kernel for {len(self.unprotected)} local pods: "
                + _describe([Gap(pod, why, False) for pod, why in sorted(self.unprotected.items())]))

    # ------------------------------------------------------------------ status
    def _condition(self, type_: str, status: str, reason: str, message: str) -> netfence_api.Condition:
        previous = self._conditions.get(type_)
        since = previous.lastTransitionTime if previous is not None and previous.status == status else _now()
        return netfence_api.Condition(type=type_, status=status, reason=reason,
                                      message=message[:MESSAGE_MAX], lastTransitionTime=since)

    def _report(self, rule_set: netfence_api.NodeRuleSet, error: tuple[str, str] | None = None,
                force: bool = False) -> None:
        """Send the status if it says something new (or force: rules were just loaded)."""
        applied = self.applied_object
        is_current = error is None and applied is rule_set
        if is_current:
            chains = sum(len(t.chains) for t in self.applied.ruleset.tables)
            applied_cond = self._condition("Applied", "True", "Applied",
                                           f"{len(rule_set.spec.pods)} local pods, {chains} chains, "
                                           f"{len(self._ports)} pod veths"
                                           + (f", {len(self.hold.held)} held new" if self.hold.held else ""))
        else:
            kept = (f"kept rules of generation {applied.metadata.generation} ({applied.spec.content_hash()})"
                    if applied is not None else "no rules loaded by this agent")
            applied_cond = self._condition("Applied", "False", error[0] if error else "Pending", kept)
        if error is not None:
            degraded = self._condition("Degraded", "True", error[0], error[1])
        elif not self.br_state.ok:
            degraded = self._condition("Degraded", "True", "BrNetfilterOff", self.br_state.message)
        elif self.netns_problem:
            degraded = self._condition("Degraded", "True", "PodNetnsNotPropagated", self.netns_problem)
        elif self.unprotected:
            degraded = self._condition("Degraded", "True", "PodsUnprotected", self._unprotected_message())
        elif self.hold.released:
            released = sorted(self.hold.released.values(), key=describe)
            degraded = self._condition(
                "Degraded", "True", "NewPodsReleasedUnpoliced",
                f"{len(released)} local pod veths were held {self.hold.timeout:g} s without a rule set covering them "
                f"and are now unpoliced until it does: {', '.join(map(describe, released))}")
        else:
            degraded = self._condition("Degraded", "False", "AsExpected", "")
        previous = self._last_status
        status = netfence_api.NodeRuleSetStatus(
            observedGeneration=rule_set.metadata.generation,
            appliedHash=applied.spec.content_hash() if applied is not None else None,
            lastAppliedTime=_now() if force else previous.lastAppliedTime if previous is not None else None,
            conditions=[applied_cond, degraded],
        )
        if not force and previous is not None and status == previous:
            return
        try:
            self.source.report(status)
        except Exception as exc:  # the rules are what matters; the status goes out with the next change
            log.warning("cannot report status: %s", exc)
            return
        self._last_status = status
        self._conditions = {c.type: c for c in status.conditions}

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """Everything but the loop: discovery, source, metrics, drop log."""
        found = self.kernel.tables() & {("inet", "netfence"), ("bridge", "netfence")}
        if found:
            log.info("netfence tables from a previous run are in the kernel (%s); they stay enforcing "
                     "until the first sync replaces them in place", ", ".join(" ".join(t) for t in sorted(found)))
        self.netns_problem = netns.mount_propagation_problem(self.config.netns_dir)
        if self.netns_problem:
            log.error("%s", self.netns_problem)
        self.discovery = Discovery(self.config.netns_dir, self.config.cni_dir, on_change=self._on_discovery)
        self._on_discovery(self.discovery.scan())
        self.discovery.start()
        if self.config.log_drops:
            from netfence_agent.nflog import NflogReader

            self._nflog = NflogReader(self.config.nflog_group, lambda: self.metrics.labels)
            self._nflog.start()
        if self.config.metrics_bind_address:
            self._http = serve(self.metrics, self.config.metrics_bind_address, self.health, self.readiness)
        threading.Thread(target=self._consume_source, name="source", daemon=True).start()

    def _consume_source(self) -> None:
        delay = 1.0
        while not self._stopping:
            try:
                for rule_set in self.source.updates():
                    self.set_rule_set(rule_set)
                    delay = 1.0
                    if self._stopping:
                        return
                return
            except Exception:
                log.exception("rule-set source failed; restarting it in %.0fs", delay)
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=delay)
                delay = min(delay * 2, 30.0)

    def loop(self) -> None:
        next_check = time.monotonic() + self.BR_NETFILTER_RECHECK
        while True:
            with self._cond:
                def due() -> bool:
                    now = time.monotonic()
                    if self._next_full_sync is not None and now >= self._next_full_sync:
                        # Again after a period even if this one fails; a success pushes it on.
                        self._next_full_sync = now + self.config.full_sync_period
                        self._full_sync_due = True
                    if self._hold_ends is not None and now >= self._hold_ends:
                        self._hold_ends = None  # armed again by the sync that releases the pod
                        self._dirty = True
                    return (self._dirty or self._full_sync_due or self._repair_why is not None
                            or (self._retry_at is not None and now >= self._retry_at))
                deadline = min(t for t in (next_check, self._retry_at, self._next_full_sync, self._next_coverage_check,
                                           self._hold_ends)
                               if t is not None)
                self._cond.wait_for(lambda: self._stopping or due(), timeout=max(0.0, deadline - time.monotonic()))
                if self._stopping:
                    return
                work = due()
            if not work and self._anti_spoofing_check_due():
                continue
            if not work:  # only the timer: is same-node traffic still reaching the rules?
                next_check = time.monotonic() + self.BR_NETFILTER_RECHECK
                was = self.br_state.ok
                self.check_br_netfilter()
                if self.br_state.ok == was:
                    continue  # nothing new; otherwise sync to report it
            try:
                self.sync_once()
            except Exception:  # a bug must not end enforcement: the old rules stay; try again
                log.exception("sync failed")
                with self._cond:
                    self._retry_at = time.monotonic() + self.RETRY_BACKOFF[-1]

    def run(self) -> None:
        self.start()
        try:
            self.loop()
        finally:
            self.shutdown()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Stop watching and serving. The rules stay in the kernel."""
        self.stop()
        self.source.close()
        if self.discovery is not None:
            self.discovery.stop()
        if self._nflog is not None:
            self._nflog.stop()
        if self._http is not None:
            self._http.shutdown()
        log.info("stopped; netfence rules stay loaded (`netfence cleanup` removes them)")
