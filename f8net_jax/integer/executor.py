"""Runs an integer program with integer arithmetic only (JAX).

Activations are 8-bit (int8; unsigned ones offset by -128), weights int8, accumulators,
residual streams and logits int32. The only multiplications are the int8 x int8 products
inside conv and dot_general (int32 accumulation); requantization is shifts, comparisons
and adds; nothing is float. ``tests/test_integer.py`` audits the jaxpr of every
architecture for exactly that.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax.integer.program import IntegerProgram

INT32_MAX = 2 ** 31 - 1
INT32_MIN = -(2 ** 31)


def _channels(values) -> np.ndarray:
    """A per-channel int list as an int32 constant (a scalar if all entries are equal)."""
    v = np.asarray(values, np.int32)
    return np.int32(v[0]) if np.all(v == v[0]) else v


def saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """a + b for int32, clipped to the int32 range instead of wrapping."""
    b = jnp.asarray(b, jnp.int32)
    s = a + b
    return jnp.where(b > 0, jnp.where(a > INT32_MAX - b, INT32_MAX, s),
                     jnp.where(a < INT32_MIN - b, INT32_MIN, s))


def _requantize(x, shift, signed: bool):
    lo, hi = (-127, 127) if signed else (0, 255)
    s = np.asarray(shift, np.int32)
    if np.all(s > 0):
        r = jnp.clip(fp.rounding_shift(x, _channels(s)), lo, hi)
    elif np.all(s <= 0):
        r = fp.saturating_shift_left(x, _channels(-s), lo, hi)
    else:
        down = jnp.clip(fp.rounding_shift(x, np.maximum(s, 0)), lo, hi)
        up = fp.saturating_shift_left(x, np.maximum(-s, 0), lo, hi)
        r = jnp.where(s > 0, down, up)
    return (r if signed else r - 128).astype(jnp.int8)


def _shift_left(x, shift, saturate: bool):
    s = np.asarray(shift, np.int32)
    if not np.any(s):
        return x
    if saturate:
        return fp.saturating_shift_left(x, _channels(s), INT32_MIN, INT32_MAX)
    return jnp.left_shift(x, _channels(s))


def _conv(op, x, w, b):
    p = op["padding"]
    if p:
        zero = -128 if op["offset"] else 0  # the int8 code of the value 0
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=jnp.int8(zero))
    y = jax.lax.conv_general_dilated(
        x, w, window_strides=(op["strides"],) * 2, padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=op["groups"],
        preferred_element_type=jnp.int32)
    return saturating_add(y, b) if op["saturate"] else y + b


def _dense(op, x, w, b):
    y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return saturating_add(y, b) if op["saturate"] else y + b


def check_images(program: IntegerProgram, images) -> None:
    """Raises ValueError unless ``images`` is a uint8 batch of the program's image shape."""
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    expected = tuple(program.image_shape)
    if len(shape) != 4 or shape[1:] != expected:
        raise ValueError(f"images must have shape (batch, {', '.join(map(str, expected))}) for "
                         f"this program, got {shape}")
    if dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got dtype {dtype}")


def execute(program: IntegerProgram, arrays: dict, images: jax.Array,
            collect: bool = False):
    """The program's int32 logits for uint8 ``images`` (traceable: ``arrays`` may be
    traced). With ``collect`` also {tensor name: int32 integers} of every tensor, unsigned
    ones without the offset (the value is integer * 2^-fraclen)."""
    check_images(program, images)
    env, seen = {}, {}
    for op in program.ops:
        kind, out = op["op"], op["out"]
        args = [env[name] for name in op["in"]]
        if kind == "image":
            y = jax.lax.bitcast_convert_type(images ^ jnp.uint8(128), jnp.int8)
        elif kind == "lookup":
            table = arrays[op["table"]]
            y = table[jnp.arange(table.shape[0]), images.astype(jnp.int32)]
        elif kind == "conv":
            y = _conv(op, args[0], arrays[op["weight"]], arrays[op["bias"]])
        elif kind == "dense":
            y = _dense(op, args[0], arrays[op["weight"]], arrays[op["bias"]])
        elif kind == "requantize":
            y = _requantize(args[0], op["shift"], op["signed"])
        elif kind == "relu":
            y = jnp.maximum(args[0], 0)
        elif kind == "add":
            a = _shift_left(args[0], op["shift"][0], op["saturate"])
            b = _shift_left(args[1], op["shift"][1], op["saturate"])
            y = saturating_add(a, b) if op["saturate"] else a + b
            if op["relu"]:
                y = jnp.maximum(y, 0)
        elif kind == "max_pool":
            w, s, p = op["window"], op["strides"], op["padding"]
            y = jax.lax.reduce_window(args[0], jnp.int32(INT32_MIN), jax.lax.max,
                                      (1, w, w, 1), (1, s, s, 1),
                                      ((0, 0), (p, p), (p, p), (0, 0)))
        elif kind == "avg_pool":
            if op["saturate"]:
                y = jax.lax.reduce(args[0], jnp.int32(0), saturating_add, (1, 2))
            else:
                y = jnp.sum(args[0], axis=(1, 2), dtype=jnp.int32)
        else:
            raise ValueError(f"unknown op {kind!r}")
        env[out] = y
        if collect:
            unsigned = program.tensors[out]["kind"] == "unsigned"
            seen[out] = y.astype(jnp.int32) + 128 if unsigned else y.astype(jnp.int32)
    logits = env[program.output]
    return (logits, seen) if collect else logits


class Executor:
    """A compiled integer program: ``executor(images) -> int32 logits`` (at fraclen
    ``program.logits_fraclen``); ``executor.collect(images)`` also returns every tensor."""

    def __init__(self, program: IntegerProgram):
        self.program = program
        self.arrays = {k: jnp.asarray(v) for k, v in program.arrays.items()}
        self._run = jax.jit(functools.partial(execute, program))
        self._collect = jax.jit(functools.partial(execute, program, collect=True))

    def __call__(self, images) -> jax.Array:
        check_images(self.program, images)
        return self._run(self.arrays, images)

    def collect(self, images):
        check_images(self.program, images)
        return self._collect(self.arrays, images)

    def jaxpr(self, batch_size: int = 1):
        """The executor's jaxpr for a batch of uint8 images (what the audit walks)."""
        spec = jax.ShapeDtypeStruct((batch_size,) + tuple(self.program.image_shape), jnp.uint8)
        return jax.make_jaxpr(functools.partial(execute, self.program))(self.arrays, spec)


def serialize(program: IntegerProgram, batch_size: int) -> bytes:
    """The executor for a fixed batch of uint8 images, weights included, as a jax.export
    artifact (StableHLO); ``deserialize(data).call(images)`` returns the int32 logits."""
    arrays = {k: jnp.asarray(v) for k, v in program.arrays.items()}
    fn = jax.jit(lambda images: execute(program, arrays, images))
    spec = jax.ShapeDtypeStruct((batch_size,) + tuple(program.image_shape), jnp.uint8)
    return jax.export.export(fn)(spec).serialize()


def deserialize(data: bytes) -> "jax.export.Exported":
    """An executor serialized by ``serialize``: call it with ``.call(images)``."""
    return jax.export.deserialize(bytearray(data))


def run(program: IntegerProgram, images, *, batch_size: Optional[int] = None) -> np.ndarray:
    """Logits of all ``images`` (numpy), in batches of ``batch_size``."""
    executor = Executor(program)
    images = np.asarray(images)
    n = images.shape[0]
    batch_size = batch_size or n
    return np.concatenate([np.asarray(executor(images[i:i + batch_size]))
                           for i in range(0, n, batch_size)])
