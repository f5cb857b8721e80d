"""Pooling of int32 streams: 'max_pool' over windows, 'avg_pool' over the whole image."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax import folding
from f8net_jax.integer import arithmetic
from f8net_jax.integer.ops.base import (OpKind, follows, fraclens, magnitude, register,
                                        same_format, static_check, to_int32)
from f8net_jax.ops import window_output_size


@register
class MaxPool(OpKind):
    """int32 window max with symmetric padding (padded values never win), in the input's
    format."""

    name = "max_pool"
    fields = {"window": int, "strides": int, "padding": int}
    minimums = {"strides": 1, "window": 1, "padding": 0}
    events = ("max_pool",)

    def check(self, op, v):
        v.expect_kind(op["in"][0], ("int32",))
        v.same_channels()

    def format_rule(self, op, tensors) -> Optional[str]:
        return same_format(op, tensors)

    def build(self, b, src: str, window: int, strides: int, padding: int, name: str) -> str:
        op = {"op": "max_pool", "in": [src], "out": name, "window": window,
              "strides": strides, "padding": padding}
        return b.emit(op, "int32", b.fraclen(src), *b.bounds[src])

    def replay(self, event, r):
        a = event.attrs
        return self.build(r.b, r.tensor(event.inputs[0], event), a["window"], a["strides"],
                          a["padding"], name=r.unique("max_pool"))

    def output_size(self, op, program, sizes):
        return tuple(window_output_size(d, op["window"], op["strides"], op["padding"])
                     for d in sizes[op["in"][0]])

    def run(self, op, args, run):
        w, s, p = op["window"], op["strides"], op["padding"]
        return jax.lax.reduce_window(args[0], jnp.int32(fp.INT32_MIN), jax.lax.max,
                                     (1, w, w, 1), (1, s, s, 1),
                                     ((0, 0), (p, p), (p, p), (0, 0)))

    def lower(self, op, lo):
        w, s, p = op["window"], op["strides"], op["padding"]
        lo.float_of[op["out"]] = lo.g.node("MaxPool", [lo.float_of[op["in"][0]]],
                                           lo.name(op["out"]), kernel_shape=[w, w],
                                           strides=[s, s], pads=[p] * 4)


@register
class AvgPool(OpKind):
    """int32 global sum over the image (a 'window' of height x width): the value is the
    mean's sum * 2^-shift, so the format gains 'shift' = round(log2(window)) fractional
    bits and no rounding happens here (the leftover factor is the classifier's)."""

    name = "avg_pool"
    fields = {"shift": int, "window": int, "saturate": bool}
    minimums = {"window": 1}
    events = ("avg_pool",)

    def check(self, op, v):
        v.expect_kind(op["in"][0], ("int32",))
        v.same_channels()

    def format_rule(self, op, tensors) -> Optional[str]:
        """The window's sum gains round(log2(window)) fractional bits (folding.pool_shift)."""
        (fl_in,), out = fraclens(op, tensors)
        wanted = folding.pool_shift(op["window"])
        if op["shift"] != wanted:
            return f"'shift' is {op['shift']}, which does not follow from the window " \
                   f"{op['window']}: expected {wanted}"
        return follows(f"the fraclen of {op['out']!r}", out, fl_in + op["shift"],
                       {op["in"][0]: fl_in})

    def build(self, b, src: str, window: int, name: str) -> str:
        shift = folding.pool_shift(window)
        lo, hi = b.bounds[src]
        lo, hi = lo * window, hi * window
        bound = magnitude(lo, hi)
        op = {"op": "avg_pool", "name": name, "in": [src], "out": name, "shift": shift,
              "window": window, "saturate": bound > fp.INT32_MAX,
              "check": static_check(name, "avg_pool", bound)}
        return b.emit(op, "int32", b.fraclen(src) + shift, to_int32(lo), to_int32(hi))

    def replay(self, event, r):
        return self.build(r.b, r.tensor(event.inputs[0], event), event.attrs["window"],
                          name=r.unique("avg_pool"))

    def output_size(self, op, program, sizes):
        return (1, 1)

    def run(self, op, args, run):
        if op["saturate"]:
            return jax.lax.reduce(args[0], jnp.int32(0), arithmetic.saturating_add, (1, 2))
        return jnp.sum(args[0], axis=(1, 2), dtype=jnp.int32)

    def lower(self, op, lo):
        """The sum over H and W, then the change of format (exact: a power of two)."""
        name, g = lo.name(op["out"]), lo.g
        total = g.node("ReduceSum", [lo.float_of[op["in"][0]],
                                     g.const(f"{name}/axes", np.array([2, 3], np.int64))],
                       keepdims=0)
        lo.flat.add(op["out"])
        lo.float_of[op["out"]] = g.node("Mul", [total, g.const(
            f"{name}/pow2", np.float32(2.0 ** -op["shift"]))], name)
