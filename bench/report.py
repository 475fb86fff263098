"""What every benchmark writes with its figures: the machine it ran on, and its own section of RESULTS.md."""

from __future__ import annotations

import importlib
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")


def machine(*packages: str) -> str:
    """CPU model, cores, memory, Python and the versions of ``packages``."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = names[0].strip() if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in packages)
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; Python {platform.python_version()}" + (f", {versions}" if versions else "")


def write_section(heading: str, text: str) -> None:
    """Replace the section that starts with ``heading`` (up to the next "## " heading) in place, or append it."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = text.rstrip("\n") + "\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        current = pattern.sub(lambda _: section, current)
    else:
        current = current.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(current.rstrip("\n") + "\n")


def publish(heading: str, text: str, *, write: bool) -> None:
    """Print a benchmark's section, and with ``write`` put it into RESULTS.md (``write_section``)."""
    if write:
        write_section(heading, text)
    print(text)
