"""The lab's record on disk: what was made, written before it is made.

Every netns name is recorded before `ip netns add`, every process right after it starts, and
the file is replaced atomically on each change, so a crash at any point leaves a record that
covers everything that exists. `lab down` works from this record alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from netfence_lab.model import LabPlan

DEFAULT_LAB_DIR = "/run/netfence-lab"
STATE_FILE = "state.json"


def lab_dir() -> Path:
    return Path(os.environ.get("NETFENCE_LAB_DIR") or DEFAULT_LAB_DIR)


@dataclass
class ProcessRecord:
    pid: int
    starttime: int  # /proc/<pid>/stat field 22: tells a recycled pid from ours
    role: str  # "server" | "agent" | "kubelet" | "controller" | "apiproxy"
    owner: str  # pod key, node name, or "lab"
    netns: str
    log: str = ""


@dataclass
class LabState:
    phase: str = "building"  # building | up | down
    agents: bool = True
    netns: list[str] = field(default_factory=list)  # in creation order
    processes: list[ProcessRecord] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    policies: list[dict[str, Any]] = field(default_factory=list)
    generation: int = 0
    created: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)
    # On an API server (lab up --kubeconfig): where, and what the lab registered there
    kubeconfig: str | None = None
    agent_kubeconfig: str | None = None  # what the agents in the node namespaces use
    controller: bool = False
    api_objects: list[dict[str, str]] = field(default_factory=list)  # {kind, namespace, name}, recorded before creation
    crd_created: bool = False

    @property
    def on_api(self) -> bool:
        return self.kubeconfig is not None

    def lab_plan(self) -> LabPlan:
        if self.plan is None:
            raise RuntimeError("lab record has no plan")
        return LabPlan.from_dict(self.plan)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LabState":
        d = json.loads(text)
        d["processes"] = [ProcessRecord(**p) for p in d.get("processes", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class StateStore:
    def __init__(self, root: Path | None = None, filename: str = STATE_FILE):
        self.root = root or lab_dir()
        self.filename = filename

    @property
    def path(self) -> Path:
        return self.root / self.filename

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> LabState | None:
        try:
            return LabState.from_json(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: LabState) -> None:
        write_atomic(self.path, state.to_json())

    def node_dir(self, node: str) -> Path:
        return self.root / node

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One lab command at a time per lab dir (flock on the dir itself)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"another lab command holds {self.root} for over 60 s")
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)
