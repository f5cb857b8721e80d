"""The executor's oneDNN path: convolutions and inner products of 8-bit activations
(uint8 or int8) with int8 weights into int32, by oneDNN's int8 primitives
(kernels/int8_onednn.cc, custom calls of the XLA FFI).

oneDNN picks the CPU's best int8 instructions: AMX int8 tiles where the CPU has them
(amx_int8), AVX-512 VNNI or AVX-VNNI otherwise. It is asked for no scales, zero points,
bias or post-ops, so it returns the integer sums of 8-bit products; the bias add and the
requantization shifts stay in the executor. Only exact implementations are used (AMX or
VNNI: the kernel walks oneDNN's list of implementations for each layer and takes the
first such one): oneDNN's reference loops are a thousand times slower, and its int8
kernels without VNNI add pairs of u8 x s8 products in int16 with saturation. Which one a
layer gets depends on its geometry and batch size (``choice``); a layer with none is
computed by the executor another way. The path is offered only where the CPU reports
avx512_vnni, avx_vnni or amx_int8 and oneDNN's own choice for a probe convolution is exact
(``ONEDNN_MAX_CPU_ISA`` below VNNI makes it not).

Weights are reordered into the layout of the layer's primitive at the batch it runs
(``pack_weight``: once per layout, when the executor first sees that batch);
``available()`` says whether the kernel loaded and, if not, why (the executor then uses
another backend).
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
    """(library, None) once the kernels are registered and exact here, else (None, reason)."""
    if machine.onednn_disabled():
        return None, machine.onednn_disabled()
    if not cpu_int8_features():
        return None, ("this CPU has no VNNI or AMX int8 instructions (without them oneDNN's "
                      "u8 x s8 products can saturate)")
    library, reason = native.build_with_onednn(SOURCE, "int8_onednn", ["-O2"], TARGETS)
    if library is None:
        return None, reason
    impl, exact, _ = _impl(library, PROBE)
    if not exact:
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
        return None, (f"oneDNN offers no exact int8 convolution here (only {impl}"
                      + (f"; ONEDNN_MAX_CPU_ISA={cap}" if cap else "") + "): without VNNI or "
                      "AMX its u8 x s8 products are added in int16 with saturation")
    return library, None


def _impl(library, geometry) -> tuple[str, bool, int]:
    fn = library.F8netInt8Impl
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    out = ctypes.create_string_buffer(1024)
    layout = ctypes.c_int64(-1)
    geometry = np.ascontiguousarray(geometry, np.int64)
    status = fn(geometry.ctypes.data, out, len(out), ctypes.byref(layout))
    if status < 0:
        raise RuntimeError(f"oneDNN has no int8 primitive for the layer {geometry.tolist()}")
    return out.value.decode(), status == 1, layout.value


def available() -> tuple[bool, str]:
    """(True, '') if the oneDNN int8 kernels are ready, exact here, and JAX computes on the
    CPU, else (False, why)."""
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


PROBE = layer("conv", batch=1, height=14, width=14, in_channels=64, out_channels=64,
              kernel_size=3, padding=1, signed=False)


def pack_weight(weight: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """The int8 weights of a layer (HWIO for a conv, [C, O] for a dense layer) in the layout
    of the primitive that runs ``geometry`` (``layer(...)``, its batch included), as bytes:
    what ``conv`` and ``dense`` take for that geometry."""
    library = _library()
    pack = library.F8netInt8Pack
    pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    pack.restype = ctypes.c_int64
    geometry = np.ascontiguousarray(geometry, np.int64)
    w = np.ascontiguousarray(weight, np.int8)
    size = pack(geometry.ctypes.data, w.ctypes.data, None, 0)
    if size < 0:
        raise ValueError(f"oneDNN has no exact int8 primitive for the layer "
                         f"{geometry.tolist()} ({implementation(geometry)})")
    out = np.zeros(size, np.uint8)
    if pack(geometry.ctypes.data, w.ctypes.data, out.ctypes.data, size) != size:
        raise RuntimeError(f"oneDNN could not reorder the weights of {geometry.tolist()}")
    return out


@functools.lru_cache(maxsize=4096)
def _choice(geometry: tuple) -> tuple[str, bool, int]:
    return _impl(_library(), np.array(geometry, np.int64))


def choice(geometry: np.ndarray) -> tuple[str, bool, int]:
    """(implementation, exact, layout) for a layer at its batch: the exact primitive oneDNN
    runs (e.g. 'brg:avx512_core_amx') and the index of its weight layout (two geometries
    with one index take the same packed weights), or, when oneDNN offers none that is
    exact, every implementation it offers, False and -1."""
    return _choice(tuple(int(v) for v in np.asarray(geometry).ravel()))


def implementation(geometry: np.ndarray) -> str:
    """The primitive oneDNN runs for a layer at its batch (e.g. 'brg:avx512_core_amx'), or
    'none exact (offered: ...)'."""
    impl, exact, _ = choice(geometry)
    return impl if exact else f"none exact (offered: {impl})"


def conv(x: jax.Array, packed: jax.Array, *, kernel_size: int, strides: int, padding: int,
         groups: int, out_channels: int, layout: int) -> jax.Array:
    """int32 conv(x, w) for 8-bit x [N, H, W, C] (zero padding of ``padding``); ``packed``
    by ``pack_weight`` for this geometry, ``layout`` its index (``choice``)."""
    n, h, w, _ = x.shape
    oh = window_output_size(h, kernel_size, strides, padding)
    ow = window_output_size(w, kernel_size, strides, padding)
    return jax.ffi.ffi_call("f8net_int8_conv",
                            jax.ShapeDtypeStruct((n, oh, ow, out_channels), jnp.int32))(
        x, packed, stride=np.int64(strides), pad=np.int64(padding), groups=np.int64(groups),
        kh=np.int64(kernel_size), kw=np.int64(kernel_size), layout=np.int64(layout))


def dense(x: jax.Array, packed: jax.Array, *, out_channels: int, layout: int) -> jax.Array:
    """int32 x @ w for 8-bit x [N, C] (``packed`` and ``layout`` as for ``conv``)."""
    return jax.ffi.ffi_call("f8net_int8_dense",
                            jax.ShapeDtypeStruct((x.shape[0], out_channels), jnp.int32))(
        x, packed, layout=np.int64(layout))
