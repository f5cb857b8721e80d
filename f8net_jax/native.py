"""Building and loading the project's C++ custom calls (XLA FFI handlers).

A kernel source is compiled with the system's C++ compiler on first use into a cache
directory ($F8NET_JAX_CACHE, default ~/.cache/f8net_jax), under a name that hashes the
source, the flags, and the contents of the XLA FFI headers and of the headers and
libraries it is built against, so a changed source or an upgraded jaxlib or oneDNN
rebuilds it. A build that fails leaves nothing behind; the caller reports why and falls
back.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import jax


def cache_dir() -> str:
    return os.environ.get("F8NET_JAX_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "f8net_jax"))


@functools.lru_cache(maxsize=None)
def _contents_digest(path: str) -> str:
    """SHA-256 of a file, or of every file under a folder (names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    for file in files:
        h.update(os.path.relpath(file, path).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build(source: str, name: str, flags: Sequence[str], libs: Sequence[str] = (),
          depends: Sequence[str] = ()) -> str:
    """Compiles ``source`` into a shared library and returns its path. It is built once per
    source, flags, XLA FFI headers and ``depends`` (the files or folders of the headers
    and libraries it is built against, hashed by content). Raises
    subprocess.CalledProcessError with the compiler's stderr."""
    text = open(source, "rb").read()
    command_tail = list(flags) + ["-I", jax.ffi.include_dir()]
    inputs = [jax.ffi.include_dir(), *depends]
    key = hashlib.sha256(text + " ".join(command_tail + list(libs)).encode() + " ".join(
        _contents_digest(os.path.realpath(p)) for p in inputs).encode()).hexdigest()[:16]
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
    """A one-line reason from a build or load error: the compiler's last error line (the
    last line of its output if none says "error")."""
    lines = [line.strip() for line in (getattr(error, "stderr", "") or str(error) or
                                       type(error).__name__).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    line = (errors or lines or [type(error).__name__])[-1]
    return line if len(line) <= 300 else line[:300] + " ..."


# --------------------------------------------------------------------------------------
# oneDNN: the pip wheels onednn-cpu-gomp / onednn-devel-cpu-gomp (requirements.txt) put it
# in this Python's prefix; $ONEDNN_ROOT or a system install (Debian's libdnnl-dev) also do.


def onednn_roots() -> list[str]:
    """Prefixes holding include/oneapi/dnnl/dnnl.hpp, in order: $ONEDNN_ROOT, this Python's
    prefix (pip's onednn-devel-cpu-gomp), /usr/local, /usr."""
    roots = [os.environ.get("ONEDNN_ROOT", ""), sys.prefix, "/usr/local", "/usr"]
    return [r for r in roots if r and os.path.exists(os.path.join(
        r, "include", "oneapi", "dnnl", "dnnl.hpp"))]


def _library_dir(root: str) -> Optional[str]:
    for pattern in ("lib", "lib64", "lib/*-linux-gnu"):
        for d in glob.glob(os.path.join(root, pattern)):
            if glob.glob(os.path.join(d, "libdnnl.so*")):
                return d
    return None


def build_with_onednn(source: str, name: str, flags: Sequence[str],
                      targets: dict[str, str]) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """Builds ``source`` against the first oneDNN that compiles and links it and registers
    its FFI ``targets``: (library, None), or (None, why not, for every prefix tried)."""
    if platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None, f"no oneDNN build for {platform.machine()}"
    reasons = []
    for root in onednn_roots():
        libdir = _library_dir(root)
        if libdir is None:
            reasons.append(f"{root}: headers but no libdnnl.so")
            continue
        all_flags = list(flags) + ["-std=c++17", "-shared", "-fPIC", "-w",
                                   "-I", os.path.join(root, "include")]
        libs = [f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-ldnnl"]
        depends = [os.path.join(root, "include", "oneapi", "dnnl"),
                   os.path.join(libdir, "libdnnl.so")]
        try:
            return load(build(source, name, all_flags, libs, depends), targets), None
        except (OSError, subprocess.CalledProcessError, AttributeError) as e:
            reasons.append(f"{root}: {failure(e)}")
    if not reasons:
        return None, ("oneDNN not found (pip install onednn-cpu-gomp onednn-devel-cpu-gomp, "
                      "or set ONEDNN_ROOT to a prefix with include/oneapi/dnnl and "
                      "lib/libdnnl.so)")
    return None, "; ".join(reasons)
