"""The executor's oneDNN path: convolutions and inner products of 8-bit activations
(uint8 or int8) with int8 weights into int32, by oneDNN's int8 primitives
(kernels/int8_onednn.cc, custom calls of the XLA FFI).

oneDNN picks the CPU's best int8 instructions: AMX int8 tiles where the CPU has them
(amx_int8), AVX-512 VNNI or AVX-VNNI otherwise. It is asked for no scales, zero points,
bias or post-ops, so it returns the integer sums of 8-bit products; the bias add and the
requantization shifts stay in the executor. On x86 CPUs without a VNNI instruction oneDNN
computes u8 x s8 products with an int16 intermediate that can saturate, so this path is
offered only where the CPU reports avx512_vnni, avx_vnni or amx_int8.

Weights are reordered once, when the executor is built (``pack_weight``), into the layout
oneDNN prefers for the layer; ``available()`` says whether the kernel loaded and, if not,
why (the executor then uses another backend).
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import machine, native
from f8net_jax.ops import window_output_size

SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "int8_onednn.cc")
TARGETS = {"f8net_int8_conv": "F8netInt8Conv", "f8net_int8_dense": "F8netInt8Dense"}
INT8_FEATURES = ("amx_int8", "avx512_vnni", "avx_vnni")


def cpu_int8_features() -> list[str]:
    """The int8 dot-product features of this CPU that oneDNN uses exactly (cpuinfo flags)."""
    return machine.x86_features(INT8_FEATURES)


@functools.lru_cache(maxsize=None)
def _load():
    """(library, None) once the kernels are registered, else (None, reason)."""
    if machine.onednn_disabled():
        return None, machine.onednn_disabled()
    if not cpu_int8_features():
        return None, ("this CPU has no VNNI or AMX int8 instructions (without them oneDNN's "
                      "u8 x s8 products can saturate)")
    return native.build_with_onednn(SOURCE, "int8_onednn", ["-O2"], TARGETS)


def available() -> tuple[bool, str]:
    """(True, '') if the oneDNN int8 kernels are ready and JAX computes on the CPU, else
    (False, why)."""
    if jax.default_backend() != "cpu":
        return False, f"JAX runs on {jax.default_backend()}, the oneDNN kernels on the CPU"
    library, reason = _load()
    return library is not None, reason or ""


def _library():
    library, reason = _load()
    if library is None:
        raise RuntimeError(f"the oneDNN int8 kernels are not available: {reason}")
    return library


def layer(kind: str, *, batch: int, height: int = 1, width: int = 1, in_channels: int,
          out_channels: int, kernel_size: int = 1, strides: int = 1, padding: int = 0,
          groups: int = 1, signed: bool) -> np.ndarray:
    """A layer's geometry as the kernel reads it (``kind``: 'conv' or 'dense')."""
    oh = window_output_size(height, kernel_size, strides, padding)
    ow = window_output_size(width, kernel_size, strides, padding)
    return np.array([{"conv": 0, "dense": 1}[kind], batch, height, width, in_channels,
                     out_channels, kernel_size, kernel_size, oh, ow, strides, padding, groups,
                     int(signed)], np.int64)


def pack_weight(weight: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """The int8 weights of a layer (HWIO for a conv, [C, O] for a dense layer) in oneDNN's
    layout for ``geometry`` (``layer(...)``), as bytes: what ``conv`` and ``dense`` take."""
    library = _library()
    pack = library.F8netInt8Pack
    pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    pack.restype = ctypes.c_int64
    geometry = np.ascontiguousarray(geometry, np.int64)
    w = np.ascontiguousarray(weight, np.int8)
    size = pack(geometry.ctypes.data, w.ctypes.data, None, 0)
    if size < 0:
        raise ValueError(f"oneDNN has no int8 primitive for the layer {geometry.tolist()}")
    out = np.zeros(size, np.uint8)
    if pack(geometry.ctypes.data, w.ctypes.data, out.ctypes.data, size) != size:
        raise RuntimeError(f"oneDNN could not reorder the weights of {geometry.tolist()}")
    return out


def implementation(geometry: np.ndarray) -> str:
    """The primitive oneDNN runs for a layer (e.g. 'brg_conv_fwd:avx512_core_amx')."""
    impl = _library().F8netInt8Impl
    impl.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    out = ctypes.create_string_buffer(128)
    geometry = np.ascontiguousarray(geometry, np.int64)
    if impl(geometry.ctypes.data, out, len(out)) != 0:
        raise RuntimeError(f"oneDNN has no int8 primitive for the layer {geometry.tolist()}")
    return out.value.decode()


def conv(x: jax.Array, packed: jax.Array, *, kernel_size: int, strides: int, padding: int,
         groups: int, out_channels: int) -> jax.Array:
    """int32 conv(x, w) for 8-bit x [N, H, W, C] (zero padding of ``padding``)."""
    n, h, w, _ = x.shape
    oh = window_output_size(h, kernel_size, strides, padding)
    ow = window_output_size(w, kernel_size, strides, padding)
    return jax.ffi.ffi_call("f8net_int8_conv",
                            jax.ShapeDtypeStruct((n, oh, ow, out_channels), jnp.int32))(
        x, packed, stride=np.int64(strides), pad=np.int64(padding), groups=np.int64(groups),
        kh=np.int64(kernel_size), kw=np.int64(kernel_size))


def dense(x: jax.Array, packed: jax.Array, *, out_channels: int) -> jax.Array:
    """int32 x @ w for 8-bit x [N, C]."""
    return jax.ffi.ffi_call("f8net_int8_dense",
                            jax.ShapeDtypeStruct((x.shape[0], out_channels), jnp.int32))(
        x, packed)
