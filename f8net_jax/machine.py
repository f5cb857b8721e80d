"""Facts about this machine that choices are made from: the CPU's model and instruction-set
flags (/proc/cpuinfo, read once), and whether oneDNN is switched off
($F8NET_JAX_NO_ONEDNN, for the training convolutions and the integer executor alike)."""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional, Sequence

NO_ONEDNN = "F8NET_JAX_NO_ONEDNN"
# The features worth naming beside a measurement: int8 dot products and bfloat16.
NOTABLE = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = platform.processor() or "unknown CPU", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset:
    """The instruction-set flags of the first CPU (empty where /proc/cpuinfo is absent)."""
    return _cpuinfo()[1]


def x86_features(names: Sequence[str]) -> list[str]:
    """Those of ``names`` this x86-64 CPU has (none on other machines)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    return [name for name in names if name in cpu_flags()]


def describe() -> str:
    """CPU model, core count and notable features, for beside a measurement."""
    features = x86_features(NOTABLE)
    return (f"{cpu_model()} ({os.cpu_count()} cpus; {', '.join(features) or 'no AVX-512'}), "
            f"load average {os.getloadavg()[0]:.2f}")


def onednn_disabled() -> Optional[str]:
    """Why oneDNN is not to be used, or None."""
    return f"disabled by {NO_ONEDNN}" if os.environ.get(NO_ONEDNN) else None
