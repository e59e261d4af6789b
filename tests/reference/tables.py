"""Reachability tables written by hand, in the conformance corpus format.

    -    x/a x/b
    x/a  .   X
    x/b  .   .
Rows are sources, columns destinations, `.` = connection succeeds, `X` = blocked.
"""
from __future__ import annotations


def parse_table(text: str) -> dict[tuple[str, str], bool]:
    lines = [line.split() for line in text.strip().splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    if header[0] != "-":
        raise ValueError("table header must start with '-'")
    columns = header[1:]
    cells: dict[tuple[str, str], bool] = {}
    for row in rows:
        if len(row) != len(columns) + 1 or any(v not in ".X" for v in row[1:]):
            raise ValueError(f"bad table row {row!r}")
        for column, value in zip(columns, row[1:]):
            cells[(row[0], column)] = value == "."
    if sorted(r[0] for r in rows) != sorted(columns):
        raise ValueError("a hand-written table must list the same pods as rows and columns")
    return cells


def table_mismatches(expected_text: str, got: dict) -> list[str]:
    """Every difference between a hand-written table and a matrix result, including missing pods."""
    expected = parse_table(expected_text)
    matrix = got.get("matrix") or {}
    problems = []
    pods = {source for source, _ in expected}
    if set(matrix) != pods:
        problems.append(f"rows are {sorted(matrix)}, expected {sorted(pods)}")
    for (source, destination), want in expected.items():
        have = (matrix.get(source) or {}).get(destination)
        if have is not want:
            problems.append(f"{source}->{destination}: expected {'.' if want else 'X'}, got {have!r}")
    return problems


def render(got: dict) -> str:
    """A matrix result drawn as a table, for failure messages."""
    matrix = got["matrix"]
    pods = list(matrix)
    width = max(len(p) for p in pods) + 1
    lines = ["-".ljust(width) + " ".join(p.ljust(width) for p in pods)]
    for source in pods:
        cells = " ".join(("." if matrix[source].get(d) else "X").ljust(width) for d in pods)
        lines.append(source.ljust(width) + cells)
    return "\n".join(lines)
