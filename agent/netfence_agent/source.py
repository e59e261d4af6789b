"""Where an agent's rule set comes from, and where its status goes.

The daemon consumes any RuleSetSource: the API (netfence_agent.apisource, the NodeRuleSet named
after the node) or a file (lab and offline mode, below).
"""

from __future__ import annotations

import json
import logging
import os
import select
import tempfile
import threading
from typing import Iterator, Protocol

import yaml
from pydantic import TypeAdapter, ValidationError

import netfence_api
from netfence_agent import inotify
from netfence_api.manifests import SafeLoader
from netfence_api.slices import Incomplete, assemble, assemble_from_objects

log = logging.getLogger("netfence.source")


class RuleSetSource(Protocol):
    def updates(self) -> Iterator[netfence_api.NodeRuleSet]:  # blocking; latest full object on every change
        ...

    def report(self, status: netfence_api.NodeRuleSetStatus) -> None:
        ...

    def close(self) -> None:
        ...


class RuleSetFileError(ValueError):
    pass


class RuleSetReader:
    """NodeRuleSets from their JSON data, one update after another, validating what changed only.

    Every update carries the whole object (~1 MB at 1,000 local pods) while the common change,
    a pod joining a peer group elsewhere in the cluster, touches one group. Validating all of it
    takes ~45 ms; comparing it with the previous update as plain data takes ~2 ms. Parts equal to
    the previous update's reuse its validated models, so an update costs what it changed, and
    the daemon, finding the very same `pods` list, knows at once that only group members moved.
    Whatever does not validate is validated whole again, so errors name fields as always.
    """

    def __init__(self) -> None:
        self._data: dict | None = None
        self._last: netfence_api.NodeRuleSet | None = None

    def read(self, data: dict) -> netfence_api.NodeRuleSet:
        """Raises pydantic.ValidationError for an invalid object (and forgets nothing)."""
        rule_set = self._reusing_last(data) if self._last is not None else None
        if rule_set is None:
            rule_set = netfence_api.NodeRuleSet.model_validate(data)
        self._data, self._last = data, rule_set
        return rule_set

    def _reusing_last(self, data: dict) -> netfence_api.NodeRuleSet | None:
        spec, old = data.get("spec"), (self._data or {}).get("spec")
        if not isinstance(spec, dict) or not isinstance(old, dict) or not set(spec) <= _SPEC_FIELDS:
            return None
        last = self._last.spec
        try:
            envelope = netfence_api.NodeRuleSet.model_validate({**data, "spec": {"nodeName": spec.get("nodeName")}})
            pods = last.pods if spec.get("pods", []) == old.get("pods", []) else _reused(
                spec.get("pods", []), old.get("pods", []), last.pods, netfence_api.PolicedPod, _pod_key)
            groups = _reused(spec.get("peerGroups", []), old.get("peerGroups", []), last.peerGroups, netfence_api.PeerGroup)
            port_groups = _reused(spec.get("peerPortGroups", []), old.get("peerPortGroups", []), last.peerPortGroups,
                                  netfence_api.PeerPortGroup)
        except ValidationError:
            return None
        new_spec = netfence_api.NodeRuleSetSpec.model_construct(
            _fields_set=set(spec), nodeName=envelope.spec.nodeName, pods=pods, peerGroups=groups, peerPortGroups=port_groups)
        return envelope.model_copy(update={"spec": new_spec})


_SPEC_FIELDS = set(netfence_api.NodeRuleSetSpec.model_fields)


def _name(item: dict):
    return item.get("name")


def _pod_key(item: dict):
    return item.get("namespace"), item.get("name")


def _reused(items, old_items, old_models: list, model, key=_name):
    """Models of `items`, reusing the model of an equal item of the previous update (by `key`).

    A pod born, deleted or relabelled on the node thus validates that one pod, and the render
    finds every other pod the very model it rendered before (render_update)."""
    if not isinstance(items, list) or not isinstance(old_items, list) or len(old_items) != len(old_models):
        return TypeAdapter(list[model]).validate_python(items)
    if len(items) == len(old_items):  # the common case: members changed, no group came or went
        return [m if item == old else model.model_validate(item) for item, old, m in zip(items, old_items, old_models)]
    previous = {key(item): (item, m) for item, m in zip(old_items, old_models) if isinstance(item, dict)}
    out = []
    for item in items:
        before = previous.get(key(item)) if isinstance(item, dict) else None
        out.append(before[1] if before is not None and before[0] == item else model.model_validate(item))
    return out


def parse_rule_set(text: str, origin: str = "rule set", reader: RuleSetReader | None = None) -> netfence_api.NodeRuleSet:
    """A NodeRuleSet from JSON or YAML (JSON is YAML); errors name the file and the field.

    With a reader, parts equal to the reader's previous rule set are not validated again.
    """
    try:
        # JSON first: the C parser takes a 1,000-pod rule set in milliseconds, PyYAML in ~200 ms.
        data = json.loads(text)
    except ValueError:
        try:
            data = yaml.load(text, Loader=SafeLoader)
        except yaml.YAMLError as exc:
            raise RuleSetFileError(f"{origin}: not JSON or YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RuleSetFileError(f"{origin}: expected a NodeRuleSet object, got {type(data).__name__}")
    if data.get("kind") == "List":
        data = _assembled(data, origin)
    try:
        rule_set = (reader or RuleSetReader()).read(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise RuleSetFileError(f"{origin}: invalid NodeRuleSet: {problems}") from None
    try:
        assemble(rule_set.spec, lambda name: None)  # a file holds the groups its rules name (or the List their slices)
    except Incomplete as exc:
        raise RuleSetFileError(f"{origin}: {exc}") from None
    return rule_set


def _assembled(listing: dict, origin: str) -> dict:
    """One node's complete NodeRuleSet from a List of the objects the controller publishes
    (`netfence compile --node N -o json`)."""
    try:
        specs = assemble_from_objects([listing])
    except ValidationError as exc:
        raise RuleSetFileError(f"{origin}: invalid object in the List: {exc.errors()[0]['msg']}") from None
    except Incomplete as exc:
        raise RuleSetFileError(f"{origin}: {exc}") from None
    if len(specs) != 1:
        raise RuleSetFileError(f"{origin}: a List must hold the objects of exactly one node's NodeRuleSet, "
                               f"found {len(specs)}")
    (spec,) = specs.values()
    return netfence_api.NodeRuleSet.for_node(spec).model_dump(mode="json", exclude_none=True)


def write_atomically(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one (write, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class FileRuleSetSource:
    """A NodeRuleSet in a file (JSON or YAML), reloaded when it changes; status in a side file.

    Changes are seen through inotify on the file's directory, so a writer that renames a new
    file over the old one (the atomic way, and how ConfigMap volumes swap) is seen as well as
    one that rewrites in place. Content identical to what was last delivered is not delivered
    again. An invalid file is reported in the status (Degraded) and otherwise ignored: the agent
    keeps enforcing the last good rule set.
    """

    POLL_SECONDS = 1.0  # belt under inotify (e.g. a filesystem without it); cheap: one stat
    SETTLE_SECONDS = 0.1  # a writer rewriting in place is seen mid-write; give it this long

    def __init__(self, path: str, status_path: str | None = None):
        self.path = os.path.abspath(path)
        self.status_path = os.path.abspath(status_path) if status_path else self.path + ".status.json"
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._inotify = inotify.Inotify()
        self._inotify.watch(os.path.dirname(self.path))
        self._last_text: str | None = None
        self._last_stat: tuple | None = None
        self._reader = RuleSetReader()
        self._lock = threading.Lock()

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_if_changed(self) -> netfence_api.NodeRuleSet | RuleSetFileError | None:
        stat = self._stat()
        if stat is None or stat == self._last_stat:
            return None
        self._last_stat = stat
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            return None
        if text == self._last_text:
            return None
        self._last_text = text
        try:
            return parse_rule_set(text, self.path, self._reader)
        except RuleSetFileError as exc:
            return exc

    def _wait(self, seconds: float) -> bool:
        """Sleep until something happens in the directory (True), time is up or we stop."""
        readable, _, _ = select.select([self._inotify, self._wake_r], [], [], seconds)
        if self._inotify in readable:
            self._inotify.read()
            return True
        return False

    def updates(self) -> Iterator[netfence_api.NodeRuleSet]:
        try:
            while not self._stop.is_set():
                found = self._read_if_changed()
                if isinstance(found, RuleSetFileError):
                    if self._wait(self.SETTLE_SECONDS):
                        self._last_stat = self._last_text = None  # still being written: read it again
                        continue
                    log.error("%s", found)
                    self.report(netfence_api.NodeRuleSetStatus(conditions=[netfence_api.Condition(
                        type="Degraded", status="True", reason="InvalidRuleSet", message=str(found)[:1000],
                    )]), keep_applied=True)
                elif found is not None:
                    yield found
                    continue
                self._wait(self.POLL_SECONDS)
        finally:
            self._release()

    def report(self, status: netfence_api.NodeRuleSetStatus, keep_applied: bool = False) -> None:
        """Write the status file. keep_applied: a report that knows nothing about what is applied
        (a file that does not parse) keeps appliedHash, lastAppliedTime and the other
        conditions of the previous status."""
        with self._lock:
            if keep_applied:
                status = self._merge_previous(status)
            write_atomically(self.status_path, json.dumps(status.model_dump(mode="json"), indent=2) + "\n")

    def _merge_previous(self, status: netfence_api.NodeRuleSetStatus) -> netfence_api.NodeRuleSetStatus:
        try:
            with open(self.status_path, encoding="utf-8") as f:
                previous = netfence_api.NodeRuleSetStatus.model_validate_json(f.read())
        except (OSError, ValueError):
            return status
        replaced = {c.type for c in status.conditions}
        return status.model_copy(update={
            "observedGeneration": previous.observedGeneration,
            "appliedHash": previous.appliedHash,
            "lastAppliedTime": previous.lastAppliedTime,
            "conditions": [c for c in previous.conditions if c.type not in replaced] + list(status.conditions),
        })

    def close(self) -> None:
        """Stop updates() from any thread; it returns at its next wake-up."""
        with self._lock:
            self._stop.set()
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    def _release(self) -> None:
        with self._lock:  # close() must never write to a descriptor number reused since
            self._inotify.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
