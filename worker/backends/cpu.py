"""Whether this CPU can run the engine's prebuilt kernels, asked before any of them runs.

xllamacpp's Linux CPU wheel is built for AVX2 (with FMA and F16C) and chooses no wider kernels
at run time: it never executes AVX-512 or AMX, so a CPU that advertises those but cannot run
them is safe. A CPU without AVX2 would die of SIGILL on the first matrix product; the engine
refuses to load there instead, saying what is missing.
"""

from __future__ import annotations

import platform
from pathlib import Path

# What the prebuilt x86-64 kernels execute, as /proc/cpuinfo names it.
X86_NEEDS = ("avx", "avx2", "fma", "f16c")


def missing_features(machine: str, flags: set[str]) -> list[str]:
    """The instruction sets the engine needs that this CPU does not list."""
    if machine.lower() not in ("x86_64", "amd64"):
        return []  # other architectures' wheels target their own baseline
    return [f for f in X86_NEEDS if f not in flags]


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def engine_cpu_problem() -> str:
    """Why the engine must not start on this CPU ('' if it may)."""
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return ""  # not Linux: the wheel for that platform picks its own kernels
    missing = missing_features(platform.machine(), flags)
    if not missing:
        return ""
    return (
        f"this CPU lacks {', '.join(missing).upper()}, which the prebuilt llama.cpp engine's "
        "kernels use; it would die of an illegal instruction. Run the engine on a CPU with "
        "AVX2, or an engine built for this one (an external engine)"
    )
