"""The two matrix engines the spec tests hold to the same hand-written expectations.

`reference` is this package's evaluator; `netfence` is the project's in-process entry point
(netfence_cli.offline.matrix), imported lazily so that its absence fails the netfence half
of a test (ImportError) without hiding the reference half.
"""
from __future__ import annotations

from typing import Callable

import pytest

from reference.evaluator import reference_matrix
from reference.tables import render, table_mismatches

MatrixFunction = Callable[[list[dict], int, str], dict]


def netfence_matrix(docs: list[dict], port: int, protocol: str) -> dict:
    from netfence_cli.offline import matrix

    return matrix(docs, port, protocol)


ENGINES: dict[str, MatrixFunction] = {"reference": reference_matrix, "netfence": netfence_matrix}


@pytest.fixture(params=list(ENGINES))
def engine(request) -> MatrixFunction:
    return ENGINES[request.param]


def assert_reachability(engine: MatrixFunction, docs: list[dict], probe: str, expected: str) -> None:
    """`probe` is "PORT/PROTO"; `expected` a hand-written table (see reference.tables)."""
    port_text, protocol = probe.split("/")
    got = engine(docs, int(port_text), protocol)
    assert got["port"] == probe
    problems = table_mismatches(expected, got)
    assert not problems, f"{probe}:\n" + "\n".join(problems) + "\n\ngot:\n" + render(got)
