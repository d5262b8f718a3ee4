"""What a benchmark ran on: the machine, its load, the PostgreSQL server's settings, the code.

Flow: benchmark script -> **machine** -> the header of its printed figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as every benchmark prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict[str, str]:
    vm = psutil.virtual_memory()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{vm.total / 2**30:.1f} GiB total, {vm.available / 2**30:.1f} GiB available",
        "python": platform.python_version(),
        "loadavg": load_average(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def print_machine(info: dict[str, str]) -> None:
    print("machine:")
    for k, v in info.items():
        print(f"  {k:<11} {v}")


def code_fingerprint() -> str:
    """Commit + a hash of the uncommitted diff of daemon/ and providers/ (the code measured)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "daemon", "providers"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
    except OSError:
        return "?"
    digest = hashlib.sha1(diff.encode()).hexdigest()[:10] if diff else "clean"
    return f"{head}+diff:{digest}"
