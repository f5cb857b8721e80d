"""The program's first op: the image as 8-bit integers, its pixels as they are ('image') or
normalized through a per-channel table ('lookup')."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax.integer import arithmetic
from f8net_jax.integer.ops.base import REGISTRY, OpKind, brief, fraclens, register
from f8net_jax.models import common


@register
class Image(OpKind):
    """uint8 pixels p -> 'unsigned' p at fraclen 8 (the value p / 256).

    Recorded as the 'image' event of the model's input, which waits for its first reader:
    a layer whose input is normalized reads it through a 'lookup' instead."""

    name = "image"
    arity = 0
    events = ("image",)

    def check(self, op, v):
        v.expect_kind(op["out"], ("unsigned",))
        v.expect(f"the channels of {op['out']!r}", (v.dst["channels"],), (v.image_shape[2],))

    def format_rule(self, op, tensors) -> Optional[str]:
        _, out = fraclens(op, tensors)
        if set(out.tolist()) != {8}:
            return f"the fraclen of {op['out']!r} is {brief(out)}: pixels have fraclen 8"
        return None

    def build(self, b, channels: int) -> str:
        return b.emit({"op": "image", "in": [], "out": "image"}, "unsigned", [8] * channels,
                      [0] * channels, [255] * channels)

    def replay(self, event, r):
        r.defer(event.output, self, event)

    def materialize(self, event, r, reader) -> str:
        channels = event.attrs["channels"]
        if not event.attrs["normalized"]:
            return self.build(r.b, channels)
        layer = reader.attrs.get("layer") if reader is not None else None
        if layer is None:
            raise ValueError("a normalized image must be read by a layer's input quantizer")
        return REGISTRY["lookup"].build(r.b, channels, layer, event.attrs.get("normalize"))

    def run(self, op, args, run):
        return arithmetic.recode(run.images, "u8", run.code[op["out"]])

    def lower(self, op, lo):
        out = op["out"]
        lo.int8_of[out] = lo.images
        lo.float_of[out] = lo.dequantized(lo.images, out, np.uint8, lo.name(out))


@register
class Lookup(OpKind):
    """uint8 pixels -> 'signed' int8 through a per-channel table [channels, 256]: the
    normalized image, straight in the first layer's signed input format."""

    name = "lookup"
    arity = 0
    fields = {"table": str}
    arrays = {"table": np.int8}
    onnx_intermediate = True

    def check(self, op, v):
        channels = v.image_shape[2]
        v.expect_kind(op["out"], ("signed",))
        v.expect(f"the shape of {op['table']!r}", v.arrays[op["table"]].shape, (channels, 256))
        v.expect(f"the channels of {op['out']!r}", (v.dst["channels"],), (channels,))

    def build(self, b, channels: int, stem: str, normalize=None) -> str:
        """Per channel and pixel value p, round(norm_c(p) * 2^fl) saturated, computed with
        the simulation's own float ops: ``normalize`` (pixels -> values; the model's own,
        for a plain Flax model that normalizes its pixels) or common.normalize_pixels,
        then fp.quantize."""
        fl = int(b.layer(stem)["input_fraclen"])
        pixels = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None],
                                 (1, 1, 256, channels))
        value = (normalize or common.normalize_pixels)(jnp.asarray(pixels))
        q = fp.quantize(value, jnp.float32(fl), signed=True, wide=True) * fp.pow2(fl)
        table = np.asarray(q, np.float32)[0, 0].T.astype(np.int8)  # [channels, 256]
        key = f"{stem}/table"
        b.arrays[key] = table
        return b.emit({"op": "lookup", "in": [], "out": "image", "table": key}, "signed",
                      [fl] * channels, table.min(1), table.max(1))

    def run(self, op, args, run):
        table = run.arrays[op["table"]]
        return table[jnp.arange(table.shape[0]), run.images.astype(jnp.int32)]

    def lower(self, op, lo):
        out, name, g = op["out"], lo.name(op["out"]), lo.g
        table = lo.program.arrays[op["table"]]  # [C, 256] int8
        channels = table.shape[0]
        offsets = (np.arange(channels, dtype=np.int64) * 256).reshape(1, channels, 1, 1)
        index = g.node("Add", [g.node("Cast", [lo.images], to=g.onnx.TensorProto.INT64),
                               g.const(f"{name}/offsets", offsets)])
        lo.int8_of[out] = g.node("Gather", [g.const(f"{name}/table", table.reshape(-1)),
                                            index], name)
        lo.float_of[out] = lo.dequantized(lo.int8_of[out], out, np.int8, f"{name}/dq")
