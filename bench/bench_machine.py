"""What a benchmark ran on, in one line (printed by bench/apply.py and bench/datapath.py)."""

from __future__ import annotations

import os
import platform
import subprocess


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} CPUs, kernel {platform.release()}, {nft}, Python {platform.python_version()}, "
            f"load average {load:.1f} at the end")
