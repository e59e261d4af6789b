"""Shared pieces of the scenario and stateful lab tests (imported as lab.scenarios.kit).

- `module_lab`: one lab with the real agents per test module, always torn down;
- `parse_table` / `cell_differences`: hand-written reachability tables (rows = from, columns =
  to, `.` allowed, `X` blocked) against matrices ({"x/a": {"x/b": True, ...}}).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from lab.labkit import require_real_agent, require_root
from netfence_lab import system
from netfence_lab.lab import Lab
from netfence_lab.state import StateStore

HERE = Path(__file__).resolve().parent
SCENARIO_CLUSTER = HERE / "cluster.yaml"

Matrix = dict[str, dict[str, bool]]


@contextlib.contextmanager
def module_lab(tmp_path_factory: pytest.TempPathFactory, docs: list[dict[str, Any]], name: str) -> Iterator[Lab]:
    """A lab with real agents in a private state dir ($NETFENCE_LAB_DIR), down at the end whatever happens."""
    require_root()
    require_real_agent()
    lab_dir = tmp_path_factory.mktemp(name) / "lab"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NETFENCE_LAB_DIR", str(lab_dir))
        mp.delenv("NETFENCE_LAB_NO_AGENT", raising=False)
        mp.delenv("NETFENCE_LAB_AGENT", raising=False)
        lab = Lab(StateStore(lab_dir))
        try:
            lab.up(docs, agents=True)
            yield lab
        finally:
            state = lab.store.load()
            names = list(state.netns) if state else []
            lab.down()
            left = [n for n in names if system.netns_exists(n)]
            assert not left, f"lab down left namespaces: {left}"


def parse_table(text: str) -> Matrix:
    """A table as the conformance cases write it: a header `- to1 to2 ...`, then `from . X ...`."""
    lines = [line.split() for line in text.strip().splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    if header[0] != "-":
        raise ValueError(f"table header must start with '-': {header}")
    cols = header[1:]
    out: Matrix = {}
    for row in rows:
        src, cells = row[0], row[1:]
        if len(cells) != len(cols) or any(c not in ".X" for c in cells):
            raise ValueError(f"bad table row {row} for columns {cols}")
        out[src] = {dst: c == "." for dst, c in zip(cols, cells)}
    return out


def cell_differences(expected: Matrix, actual: Matrix, what: str) -> list[str]:
    """Every cell where `actual` differs from `expected`, spelled out; missing rows/columns too."""
    problems = []
    if set(actual) != set(expected):
        problems.append(f"{what}: rows {sorted(actual)} != expected rows {sorted(expected)}")
    for src, row in expected.items():
        got = actual.get(src, {})
        if set(got) != set(row):
            problems.append(f"{what}: row {src} has columns {sorted(got)}, expected {sorted(row)}")
        for dst, ok in row.items():
            if dst in got and got[dst] != ok:
                problems.append(f"{what}: {src} -> {dst} is {'allowed' if got[dst] else 'blocked'}, "
                                f"expected {'allowed' if ok else 'blocked'}")
    return problems


def format_matrix(m: Matrix) -> str:
    cols = sorted({c for row in m.values() for c in row})
    lines = ["-    " + " ".join(c.ljust(3) for c in cols)]
    for src in sorted(m):
        lines.append(src.ljust(5) + " ".join(("." if m[src].get(c) else "X").ljust(3) for c in cols))
    return "\n".join(lines)
