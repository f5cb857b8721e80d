"""The executor's integer steps, shared by the op kinds' reference semantics and the
backends' kernels: saturating adds and shifts, the rounding requantization, the bias add,
and the 8-bit codes (uint8 or int8) that tensors are stored as. Integer JAX ops only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp


def channels(values) -> np.ndarray:
    """A per-channel int list as an int32 constant (a scalar if all entries are equal)."""
    v = np.asarray(values, np.int32)
    return np.int32(v[0]) if np.all(v == v[0]) else v


def saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """a + b for int32, clipped to the int32 range instead of wrapping."""
    b = jnp.asarray(b, jnp.int32)
    s = a + b
    return jnp.where(b > 0, jnp.where(a > fp.INT32_MAX - b, fp.INT32_MAX, s),
                     jnp.where(a < fp.INT32_MIN - b, fp.INT32_MIN, s))


def zero_point(kind: str, code: str) -> int:
    """code = value + zero point for an 8-bit tensor of ``kind`` stored as ``code``."""
    if kind == "unsigned":
        return 0 if code == "u8" else -128
    return 128 if code == "u8" else 0


def recode(x, have: str, need: str):
    """uint8 <-> int8 by flipping the top bit: value + 128 <-> value (and back)."""
    if have == need:
        return x
    if need == "s8":
        return jax.lax.bitcast_convert_type(x ^ jnp.uint8(128), jnp.int8)
    return jax.lax.bitcast_convert_type(x, jnp.uint8) ^ jnp.uint8(128)


def requantize(x, shift, signed: bool, code: str):
    """int32 ``x`` shifted right by ``shift`` per channel (rounding half to even; left where
    negative, saturating), saturated to the 8-bit range, stored as ``code``."""
    lo, hi = fp.integer_range(signed=signed)
    s = np.asarray(shift, np.int32)
    if np.all(s > 0):  # the usual case: one branch of fp.requantize, nothing to select
        r = jnp.clip(fp.rounding_shift(x, channels(s)), lo, hi)
    else:  # the shift is fl_in - fl_out; fp.requantize takes them as two formats >= 0
        r = fp.requantize(x, np.maximum(s, 0), np.maximum(-s, 0), signed=signed, axis=-1,
                          wide=True)  # any left shift the program holds
    if code == "u8":
        return r.astype(jnp.uint8)
    return (r if signed else r - 128).astype(jnp.int8)


def shift_left(x, shift, saturate: bool):
    s = np.asarray(shift, np.int32)
    if not np.any(s):
        return x
    if saturate:
        return fp.saturating_shift_left(x, channels(s), -fp.INT32_MAX, fp.INT32_MAX)
    return jnp.left_shift(x, channels(s))


def bias_add(y, b, saturate: bool, correction=None):
    if correction is not None:
        y = y + correction
    return saturating_add(y, b) if saturate else y + b
