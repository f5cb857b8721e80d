"""The training step's float32 convolutions (forward and both gradients) and max pools
through oneDNN: the Python side of kernels/train_onednn.cc, custom calls of the XLA FFI
built on first use (f8net_jax/native.py).

f8net_jax.ops decides when they run (``ComputePolicy``) and hands them their output
shapes; ``status()`` says whether they can run here and, if not, why. On this project's
CPUs XLA's convolutions are 2-3x slower than oneDNN's.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import machine, native

SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "train_onednn.cc")
TARGETS = {"f8net_conv_f32_forward": "F8netConvF32Forward",
           "f8net_conv_f32_backward_data": "F8netConvF32BackwardData",
           "f8net_conv_f32_backward_weights": "F8netConvF32BackwardWeights",
           "f8net_max_pool_forward": "F8netMaxPoolForward",
           "f8net_max_pool_backward": "F8netMaxPoolBackward"}


@functools.lru_cache(maxsize=None)
def _load():
    """(library, None) once the oneDNN handlers are registered, else (None, reason)."""
    if machine.onednn_disabled():
        return None, machine.onednn_disabled()
    return native.build_with_onednn(SOURCE, "train_onednn", ["-O2"], TARGETS)


def status() -> tuple[bool, str]:
    """(True, '') if the oneDNN convolutions are ready and JAX computes on the CPU, else
    (False, why)."""
    if jax.default_backend() != "cpu":
        return False, f"JAX runs on {jax.default_backend()}; the oneDNN kernels on the CPU"
    library, reason = _load()
    return library is not None, reason or ""


# --------------------------------------------------------------------------------------
# Convolutions: x NHWC, kernel HWIO, symmetric zero padding, float32.


def _ffi(target, operand, other, out_shape, strides, padding, groups):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")(
        operand, other, stride=np.int64(strides), pad=np.int64(padding),
        groups=np.int64(groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x, kernel, out_shape, strides, padding, groups):
    """conv(x, kernel) of float32 operands into ``out_shape`` (N, OH, OW, O); its gradients
    are oneDNN's backward-data and backward-weights convolutions."""
    return _ffi("f8net_conv_f32_forward", x, kernel, out_shape, strides, padding, groups)


def _conv2d_fwd(x, kernel, out_shape, strides, padding, groups):
    return conv2d(x, kernel, out_shape, strides, padding, groups), (x, kernel)


def _conv2d_bwd(out_shape, strides, padding, groups, residuals, g):
    x, kernel = residuals
    g = g.astype(jnp.float32)
    dx = _ffi("f8net_conv_f32_backward_data", g, kernel, x.shape, strides, padding, groups)
    dw = _ffi("f8net_conv_f32_backward_weights", x, g, kernel.shape, strides, padding, groups)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# --------------------------------------------------------------------------------------
# Max pooling: the forward writes oneDNN's workspace (which position won: the first
# maximum in row-major window order), which the gradient reads.


def _pool_attrs(window, strides, padding):
    return dict(window=np.int64(window), stride=np.int64(strides), pad=np.int64(padding))


@functools.lru_cache(maxsize=None)
def _workspace_bytes(x_shape, out_shape, window, strides, padding) -> int:
    library, reason = _load()
    if library is None:
        raise RuntimeError(f"oneDNN is not available: {reason}")
    query = library.F8netMaxPoolWorkspaceBytes
    query.argtypes, query.restype = [ctypes.c_void_p], ctypes.c_int64
    geometry = np.array(list(x_shape) + list(out_shape[1:3]) + [window, strides, padding],
                        np.int64)
    size = query(geometry.ctypes.data)
    if size < 0:
        raise RuntimeError(f"oneDNN could not create a max pool for input {x_shape}")
    return int(size)


def _max_pool_forward(x, out_shape, window, strides, padding):
    workspace = _workspace_bytes(tuple(x.shape), out_shape, window, strides, padding)
    return jax.ffi.ffi_call("f8net_max_pool_forward",
                            (jax.ShapeDtypeStruct(out_shape, jnp.float32),
                             jax.ShapeDtypeStruct((workspace,), jnp.uint8)),
                            vmap_method="sequential")(x, **_pool_attrs(window, strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def max_pool(x, out_shape, window, strides, padding):
    """Max pooling of float32 NHWC x into ``out_shape`` (N, OH, OW, C), padded positions
    never winning; the gradient goes to the first maximum of each window."""
    return _max_pool_forward(x, out_shape, window, strides, padding)[0]


def _max_pool_fwd(x, out_shape, window, strides, padding):
    y, workspace = _max_pool_forward(x, out_shape, window, strides, padding)
    return y, (workspace, x.shape)


def _max_pool_bwd(out_shape, window, strides, padding, residuals, g):
    workspace, x_shape = residuals
    dx = jax.ffi.ffi_call("f8net_max_pool_backward", jax.ShapeDtypeStruct(x_shape, jnp.float32),
                          vmap_method="sequential")(
        g.astype(jnp.float32), workspace, **_pool_attrs(window, strides, padding))
    return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
