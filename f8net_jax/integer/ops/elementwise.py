"""Between layers, on int32 streams: 'relu' and the residual 'add'."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax.integer import arithmetic
from f8net_jax.integer.ops.base import (OpKind, follows, fraclens, is_json, magnitude,
                                        register, same_format, static_check, to_int32)


@register
class Relu(OpKind):
    """int32 max(x, 0), in the input's format.

    A recorded ReLU waits for its readers: one read only by unsigned requantizations is
    left out (their saturation at 0 is that ReLU); it becomes an op where an int32
    consumer (a residual add, a pool, a signed reader) needs it."""

    name = "relu"
    events = ("relu",)

    def check(self, op, v):
        v.expect_kind(op["in"][0], ("int32",))
        v.same_channels()

    def format_rule(self, op, tensors) -> Optional[str]:
        return same_format(op, tensors)

    def build(self, b, src: str) -> str:
        lo, hi = b.bounds[src]
        return b.emit({"op": "relu", "in": [src], "out": f"{src}/relu"}, "int32",
                      b.fraclen(src), np.maximum(lo, 0), np.maximum(hi, 0))

    def replay(self, event, r):
        r.defer(event.output, self, event)

    def materialize(self, event, r, reader) -> str:
        return self.build(r.b, r.tensor(event.inputs[0], event))

    def run(self, op, args, run):
        return jnp.maximum(args[0], 0)

    def lower(self, op, lo):
        lo.float_of[op["out"]] = lo.g.node("Relu", [lo.float_of[op["in"][0]]],
                                           lo.name(op["out"]))


@register
class Add(OpKind):
    """int32 + int32 (then ReLU with 'relu'): each operand shifted left by 'shift' (one list
    per operand) to the finer operand's format first, so the sum is exact."""

    name = "add"
    arity = 2
    fields = {"name": str, "shift": list, "relu": bool, "saturate": bool}
    events = ("add",)

    def check(self, op, v):
        a, b = (v.tensors[n] for n in op["in"])
        for name in op["in"]:
            v.expect_kind(name, ("int32",))
        shift = op["shift"]
        if len(shift) != 2 or not all(is_json(s, list) for s in shift):
            v.fail("'shift' must hold one list per input")
        v.expect("the channels of its inputs", (a["channels"], b["channels"]),
                 (v.dst["channels"],) * 2)
        v.expect("the lengths of 'shift'", tuple(map(len, shift)), (v.dst["channels"],) * 2)

    def format_rule(self, op, tensors) -> Optional[str]:
        """The sum is in the finer operand's format, each operand shifted left to it."""
        (fa, fb), out = fraclens(op, tensors)
        sources = dict(zip(op["in"], (fa, fb)))
        return (follows(f"the fraclen of {op['out']!r}", out, np.maximum(fa, fb), sources)
                or follows(f"the shift of {op['in'][0]!r}", op["shift"][0], out - fa, sources)
                or follows(f"the shift of {op['in'][1]!r}", op["shift"][1], out - fb, sources))

    def build(self, b, name: str, a: str, c: str, *, relu: bool) -> str:
        fa, fc = b.fraclen(a), b.fraclen(c)
        fl = np.maximum(fa, fc)
        (lo_a, hi_a), (lo_c, hi_c) = b.bounds[a], b.bounds[c]
        sa, sc = fl - fa, fl - fc
        lo = lo_a * 2 ** sa + lo_c * 2 ** sc
        hi = hi_a * 2 ** sa + hi_c * 2 ** sc
        bound = magnitude(lo, hi)
        op = {"op": "add", "name": name, "in": [a, c], "out": name,
              "shift": [[int(v) for v in sa], [int(v) for v in sc]],
              "relu": relu, "saturate": bound > fp.INT32_MAX,
              "check": static_check(name, "add", bound)}
        lo, hi = to_int32(lo), to_int32(hi)
        if relu:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
        return b.emit(op, "int32", fl, lo, hi)

    def replay(self, event, r):
        a = event.attrs
        return self.build(r.b, a["name"] or r.unique("add"), r.tensor(event.inputs[0], event),
                          r.tensor(event.inputs[1], event), relu=a["relu"])

    def run(self, op, args, run):
        a = arithmetic.shift_left(args[0], op["shift"][0], op["saturate"])
        b = arithmetic.shift_left(args[1], op["shift"][1], op["saturate"])
        y = arithmetic.bias_add(a, b, op["saturate"])
        return jnp.maximum(y, 0) if op["relu"] else y

    def pairs(self, op):
        """Its output, where its name is a module whose output it is (a block); an add
        outside any module has no captured value and is covered by its readers."""
        return [(op["name"], op["out"], False)]

    def lower(self, op, lo):
        name, g = lo.name(op["out"]), lo.g
        y = g.node("Add", [lo.float_of[op["in"][0]], lo.float_of[op["in"][1]]],
                   None if op["relu"] else name)
        lo.float_of[op["out"]] = g.node("Relu", [y], name) if op["relu"] else y
