"""Building and loading the project's C++ custom calls (XLA FFI handlers).

A kernel source is compiled with the system's C++ compiler on first use into a cache
directory ($F8NET_JAX_CACHE, default ~/.cache/f8net_jax), under a name that hashes the
source, the flags and the XLA FFI headers, so a changed source or jaxlib rebuilds it. A
build that fails leaves nothing behind; the caller reports why and falls back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from typing import Sequence

import jax


def cache_dir() -> str:
    return os.environ.get("F8NET_JAX_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "f8net_jax"))


def build(source: str, name: str, flags: Sequence[str], libs: Sequence[str] = ()) -> str:
    """Compiles ``source`` into a shared library (once per source, flags and jaxlib) and
    returns its path. Raises subprocess.CalledProcessError with the compiler's stderr."""
    text = open(source, "rb").read()
    command_tail = list(flags) + ["-I", jax.ffi.include_dir()]
    key = hashlib.sha256(text + " ".join(command_tail + list(libs)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{name}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".so.partial")
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CXX", "g++"), *command_tail, source, "-o", tmp,
                            *libs], check=True, capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def load(path: str, targets: dict[str, str]) -> ctypes.CDLL:
    """Loads a built library and registers its FFI handlers for the CPU: ``targets`` maps
    each XLA custom-call name to the handler symbol that implements it."""
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return library


def failure(error: BaseException) -> str:
    """A one-line reason from a build or load error."""
    detail = getattr(error, "stderr", "") or str(error)
    return " ".join(detail.strip().split())[:300]
