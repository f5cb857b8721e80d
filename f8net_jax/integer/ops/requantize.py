"""'requantize': an int32 tensor as a layer's 8-bit input."""

from __future__ import annotations

from typing import Optional

import numpy as np

from f8net_jax.integer import arithmetic
from f8net_jax.integer.ops.base import SIGNED, UNSIGNED, OpKind, follows, fraclens, register


@register
class Requantize(OpKind):
    """int32 -> 8-bit: a rounding right shift (half to even) or a saturating left shift per
    channel (shift = fl_in - fl_out), then saturation to the 8-bit range ('unsigned'
    [0, 255]: the ReLU of unsigned ones; 'signed' [-127, 127]).

    Recorded as a layer's 'input' event (its input quantizer); an input that is already
    8-bit in the layer's format becomes no op."""

    name = "requantize"
    fields = {"signed": bool, "shift": list}
    events = ("input",)
    onnx_intermediate = True

    def check(self, op, v):
        v.expect_kind(op["in"][0], ("int32",))
        v.expect_kind(op["out"], ("signed",) if op["signed"] else ("unsigned",))
        v.expect("the length of 'shift'", (len(op["shift"]),), (v.src["channels"],))
        v.same_channels()

    def format_rule(self, op, tensors) -> Optional[str]:
        """A right shift by the input's fraclen minus the output's (left where negative)."""
        (fl_in,), out = fraclens(op, tensors)
        return follows("'shift'", op["shift"], fl_in - out, {op["in"][0]: fl_in, op["out"]: out})

    def build(self, b, src: str, layer: str, signed: bool) -> str:
        """``layer``'s quantized input read from ``src`` (requantized to its format)."""
        fl = int(b.layer(layer)["input_fraclen"])
        kind = "signed" if signed else "unsigned"
        t = b.tensors[src]
        if t["kind"] != "int32":
            if t["kind"] != kind or set(t["fraclen"]) != {fl}:
                raise ValueError(f"{layer} reads the 8-bit tensor {src!r} ({t['kind']}, "
                                 f"fraclen {t['fraclen'][0]}) as {kind} at fraclen {fl}")
            return src
        shift = b.fraclen(src) - fl
        lo, hi = SIGNED if signed else UNSIGNED
        op = {"op": "requantize", "in": [src], "out": f"{layer}/input", "signed": signed,
              "shift": [int(s) for s in shift]}
        c = t["channels"]
        return b.emit(op, kind, [fl] * c, [lo] * c, [hi] * c)

    def replay(self, event, r):
        """An unsigned reader of a deferred ReLU reads past it: its saturation at 0 is that
        ReLU (the value is the same)."""
        from f8net_jax.integer.ops.elementwise import Relu  # registered after this kind

        a, src = event.attrs, event.inputs[0]
        while not a["signed"] and isinstance(r.deferred_kind(src), Relu):
            src = r.deferred_event(src).inputs[0]
        return self.build(r.b, r.tensor(src, event), a["layer"], signed=a["signed"])

    def run(self, op, args, run):
        return arithmetic.requantize(args[0], op["shift"], op["signed"], run.code[op["out"]])

    def lower(self, op, lo):
        src, out, name, g = op["in"][0], op["out"], lo.name(op["out"]), lo.g
        x = lo.float_of[src]
        scale = lo.scale(lo.fraclen(out), out)
        limit = np.asarray(scale, np.float32) * np.float32(127 if op["signed"] else 255)
        if np.ndim(limit) and src not in lo.flat:
            limit = limit.reshape(-1, 1, 1)  # [C, 1, 1] against [N, C, H, W]
        if not lo.quantized:  # the 8-bit range as a clip, no rounding
            low = -limit if op["signed"] else np.zeros_like(limit)
            lo.float_of[out] = g.node("Min", [g.node("Max", [x, g.const(f"{name}/low", low)]),
                                              g.const(f"{name}/high", limit)], name)
            return
        if op["signed"]:  # the program's int8 range is [-127, 127]
            x = g.node("Max", [x, g.const(f"{name}/low", -limit)])
        dtype = np.int8 if op["signed"] else np.uint8
        lo.int8_of[out] = g.quantize(x, scale, dtype, name)
        lo.float_of[out] = g.dequantize(lo.int8_of[out], scale, dtype, f"{name}/dq")
