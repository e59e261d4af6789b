"""What a test needs from the machine: under CI a missing piece fails the test, elsewhere it skips.

CI runs as root on a checkout with shared/ beside it, so there a skip would only hide a
missing install step or a broken layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def unavailable(message: str) -> NoReturn:
    """Stop the test for want of `message`: a failure under CI, a skip on a developer machine."""
    if IN_CI:
        pytest.fail(f"{message} (CI: not skipping)")
    pytest.skip(message)


def shared_path(relative: str) -> Path:
    """A file or folder of ../shared (the design, tutorials, conformance sample)."""
    path = SHARED / relative
    if not path.exists():
        unavailable(f"{path} is missing: shared/ must be beside the repo")
    return path
