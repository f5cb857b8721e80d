"""The fast CPU path of the executor: convolutions of uint8 activations with int8 weights
by an AVX-512 VNNI kernel (kernels/conv_u8s8.cc), called through the XLA FFI.

XLA's own int8 convolution runs on this kind of CPU at 0.24x to 2.5x the speed of its
float32 one, the kernel at 2.2x to 6.8x (benchmarks/int8_conv.py measures both per
layer); vpdpbusd multiplies 8-bit by 8-bit and sums four products into an int32 lane.
The kernel is compiled on first use (f8net_jax.native) and used only on x86-64 CPUs that
report avx512_vnni; ``available()`` says whether it loaded and, if not, why (the executor
then uses XLA's convolution).
"""

from __future__ import annotations

import functools
import os
import subprocess
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import machine, native
from f8net_jax.ops import window_output_size

TARGET = "f8net_conv_u8s8"
SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "conv_u8s8.cc")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw",
         "-mavx512vl", "-mavx512vnni", "-w"]
COLS = 16  # output channels are padded to a multiple of this


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """None once the kernel is registered, else the reason it is not."""
    if os.environ.get("F8NET_JAX_NO_VNNI"):
        return "disabled by F8NET_JAX_NO_VNNI"
    if not machine.x86_features(["avx512_vnni"]):
        return "this CPU has no AVX-512 VNNI"
    try:
        native.load(native.build(SOURCE, "conv_u8s8", FLAGS), {TARGET: "F8netConvU8S8"})
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        return f"the kernel did not build or load: {native.failure(e)}"
    return None


def available() -> tuple[bool, str]:
    """(True, '') if the VNNI kernel is ready and JAX computes on this machine's CPU,
    else (False, why)."""
    if jax.default_backend() != "cpu":
        return False, f"JAX runs on {jax.default_backend()}, the kernel on the CPU"
    reason = _load()
    return reason is None, reason or ""


def pack_weight(weight: np.ndarray) -> tuple[np.ndarray, int, int]:
    """HWIO int8 weights laid out for the kernel: input channels padded to a multiple of 4,
    output channels to a multiple of 16, as [KH * KW * C/4, Co, 4]. Returns (packed,
    padded input channels, padded output channels)."""
    kh, kw, c, co = weight.shape
    cp, cop = -(-c // 4) * 4, -(-co // COLS) * COLS
    w = np.zeros((kh, kw, cp, cop), np.int8)
    w[:, :, :c, :co] = weight
    packed = w.reshape(kh, kw, cp // 4, 4, cop).transpose(0, 1, 2, 4, 3)
    return np.ascontiguousarray(packed.reshape(kh * kw * cp // 4, cop, 4)), cp, cop


def conv(x: jax.Array, packed: jax.Array, bias: jax.Array, *, kernel_size: int, strides: int,
         out_channels: int) -> jax.Array:
    """y = bias + conv(x, w) in int32 for uint8 x [N, Hp, Wp, Cp] already padded (spatially
    and to the packed input channels); returns [N, OH, OW, out_channels]."""
    n, hp, wp, _ = x.shape
    oh, ow = window_output_size(hp, kernel_size, strides), window_output_size(wp, kernel_size, strides)
    cop = packed.shape[1]
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, oh, ow, cop), jnp.int32))(
        x, packed, bias, stride=np.int64(strides), kh=np.int64(kernel_size),
        kw=np.int64(kernel_size))
    return y if cop == out_channels else y[..., :out_channels]
