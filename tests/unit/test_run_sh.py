"""run.sh picks a Python >= 3.11 that can make a virtualenv, and finds none on a bare Debian
(issue 12.7: there `./run.sh demo` must install python3 + python3-venv instead of failing with
`python3: command not found`). Run with a PATH holding only what a Debian without Python has for
run.sh (dirname, id) plus the Pythons each case puts there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REAL_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("dirname", "id"):
        (path / tool).symlink_to(subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                                                text=True, check=True).stdout.strip())
    return path


def wrapped_python(bin_dir: Path, name: str, pythonpath: Path) -> None:
    """A real Python whose startup sees `pythonpath` first (to hide ensurepip or fake a version)."""
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{pythonpath}" exec "{REAL_PYTHON}" "$@"\n')
    script.chmod(0o755)


def chosen(bin_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(ROOT / "run.sh"), "python"], capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": "/nonexistent"}, timeout=60)


def test_no_python_at_all(bin_dir):
    out = chosen(bin_dir)
    assert out.returncode == 1 and "no Python >= 3.11 with venv found" in out.stderr
    assert "command not found" not in out.stderr


def test_debian_python3_is_taken(bin_dir):
    (bin_dir / "python3").symlink_to(REAL_PYTHON)
    out = chosen(bin_dir)
    assert (out.returncode, out.stdout.strip()) == (0, "python3"), out.stderr


def test_python3_without_venv_support_does_not_count(bin_dir, tmp_path):
    """Debian's python3 without python3-venv has no ensurepip: `python3 -m venv` would fail."""
    hidden = tmp_path / "no-ensurepip"
    (hidden / "ensurepip").mkdir(parents=True)
    (hidden / "ensurepip" / "__init__.py").write_text("raise ImportError('python3-venv is not installed')\n")
    wrapped_python(bin_dir, "python3", hidden)
    assert chosen(bin_dir).returncode == 1
    (bin_dir / "python3.13").symlink_to(REAL_PYTHON)
    assert chosen(bin_dir).stdout.strip() == "python3.13"


def test_too_old_python3_does_not_count_and_python311_comes_first(bin_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "sitecustomize.py").write_text("import sys\nsys.version_info = (3, 9, 2, 'final', 0)\n")
    wrapped_python(bin_dir, "python3", old)
    assert chosen(bin_dir).returncode == 1
    (bin_dir / "python3.11").symlink_to(REAL_PYTHON)
    (bin_dir / "python3.12").symlink_to(REAL_PYTHON)
    assert chosen(bin_dir).stdout.strip() == "python3.11", "a pyenv 3.11 is kept where there is one"


def test_apt_packages_include_the_cni_plugins_and_python_when_missing():
    text = (ROOT / "run.sh").read_text()
    apt = next(line for line in text.splitlines() if line.startswith("APT_PACKAGES="))
    assert "containernetworking-plugins" in apt and "nftables" in apt
    python = next(line for line in text.splitlines() if line.startswith("APT_PYTHON_PACKAGES="))
    assert set(python.split("=", 1)[1].strip('"').split()) == {"python3", "python3-venv"}
