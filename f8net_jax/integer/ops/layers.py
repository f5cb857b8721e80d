"""The layers: 'conv' and 'dense', int8 x int8 products of an 8-bit input and int8
weights summed into int32 with an int32 bias (an ``AccumulatingLayer``)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax.integer import arithmetic
from f8net_jax.integer.ops.base import (SIGNED, UNSIGNED, OpKind, brief, follows, fraclens,
                                        is_json, magnitude, register, static_check, to_int32)
from f8net_jax.ops import window_output_size


class AccumulatingLayer(OpKind):
    """8-bit input, int8 weight, int32 bias -> int32 accumulator at fraclen input + weight
    (per output channel). The exporter stores q_w = round(W_f * 2^fl_w) and the bias times
    2^(fl_in + fl_w); the executor's Plan adds the zero-point correction of the input's
    storage code to the bias and lets the backend pack the weight."""

    accumulating = True
    common_fields = {"name": str, "weight": str, "bias": str, "saturate": bool,
                     "input_fraclen": int, "weight_fraclen": list}
    arrays = {"weight": np.int8, "bias": np.int32}
    reduce_axes: tuple = ()  # the weight's axes that a product sums over

    def check(self, op, v):
        src = op["in"][0]
        v.expect_kind(src, ("unsigned", "signed"))
        v.expect_kind(op["out"], ("int32",))
        cout = v.dst["channels"]
        self.check_weight(op, v, v.arrays[op["weight"]], cout)
        v.expect(f"the shape of {op['bias']!r}", v.arrays[op["bias"]].shape, (cout,))

    def check_weight(self, op, v, weight, cout) -> None:
        raise NotImplementedError

    def format_rule(self, op, tensors) -> Optional[str]:
        """One input format; the accumulator's fraclen is the input's plus the weight's."""
        (fl_in,), out = fraclens(op, tensors)
        src, w_fl = op["in"][0], op["weight_fraclen"]
        if set(fl_in.tolist()) != {op["input_fraclen"]}:
            return f"'input_fraclen' {op['input_fraclen']} is not the fraclen of {src!r} " \
                   f"({brief(fl_in)})"
        if len(w_fl) != out.size or not all(is_json(v, int) for v in w_fl):
            return f"'weight_fraclen' must hold one integer per output channel, got {w_fl!r}"
        return follows(f"the fraclen of {op['out']!r}", out, fl_in[0] + np.asarray(w_fl),
                       {src: fl_in})

    # -- the exporter --------------------------------------------------------------------
    def build(self, b, op: dict, name: str, src: str) -> str:
        """Appends layer ``name`` reading ``src``: its integers, the bounds of its
        accumulator (8-bit input in its full range against the actual weights and bias),
        'saturate' where they reach 2^31, and its 'check'."""
        t = b.tensors[src]
        weight = np.asarray(b.layer(name)["weight"])
        q_w, bias, w_fraclen, bias_saturated = _weights(b.layer(name), name, weight,
                                                        weight.shape[-1])
        lo_in, hi_in = SIGNED if t["kind"] == "signed" else UNSIGNED
        w = q_w.astype(np.int64)
        pos = np.sum(np.maximum(w, 0), axis=self.reduce_axes)
        neg = np.sum(np.minimum(w, 0), axis=self.reduce_axes)
        raw_hi, raw_lo = hi_in * pos + lo_in * neg, lo_in * pos + hi_in * neg
        lo, hi = raw_lo + bias, raw_hi + bias
        bound, raw = magnitude(lo, hi), magnitude(raw_lo, raw_hi)
        b.arrays[f"{name}/weight"] = q_w.astype(np.int8)
        b.arrays[f"{name}/bias"] = bias.astype(np.int32)
        in_fl = int(t["fraclen"][0])
        op.update({"name": name, "in": [src], "out": name, "weight": f"{name}/weight",
                   "bias": f"{name}/bias", "saturate": bool(bound > fp.INT32_MAX),
                   "input_fraclen": in_fl, "weight_fraclen": [int(v) for v in w_fraclen],
                   "check": dict(static_check(name, op["op"], bound, raw),
                                 bias_saturated=bias_saturated)})
        return b.emit(op, "int32", in_fl + w_fraclen, to_int32(lo), to_int32(hi))

    # -- the executor --------------------------------------------------------------------
    def prepare(self, op, program, plan) -> None:
        """The backend's choice for this layer (its own kernel or not, the 8-bit code of the
        products), the bias with the zero-point correction -z * sum(w) of that code (exact),
        the weight as the backend packs it."""
        kind = program.tensors[op["in"][0]]["kind"]
        w = program.arrays[op["weight"]]
        bias = program.arrays[op["bias"]].astype(np.int64)
        wsum = np.sum(w.astype(np.int64), axis=tuple(range(w.ndim - 1)))

        def correction(code):
            # The codes' products sum to conv(value) + z * sum(w): subtract it again
            # (|z * sum(w)| <= 128 * 127 * fan-in fits int32).
            return -arithmetic.zero_point(kind, code) * wsum

        fast, need = plan.backend.choose(op, kind, lambda code: bias + correction(code))
        if np.any(np.abs(bias + correction(need)) > fp.INT32_MAX):
            op["saturate"] = True  # the corrected bias alone leaves int32
        if op["saturate"]:
            # Exact conv(value) first (it fits int32), then the saturating bias add.
            plan.arrays[f"{op['name']}/correction"] = correction(need).astype(np.int32)
        else:
            bias = bias + correction(need)
        op.update(need=need, pad_code=arithmetic.zero_point(kind, need), fast=fast,
                  weight_shape=w.shape, in_spatial=plan.spatial[op["in"][0]])
        key = op["name"]
        if fast:
            weight, bias, extra = plan.backend.pack(op, w, bias.astype(np.int32))
            op.update(extra)
        else:
            weight = w
        plan.arrays[f"{key}/weight"], plan.arrays[f"{key}/bias"] = weight, bias.astype(np.int32)

    @staticmethod
    def layer_inputs(op, args, run):
        """(input in the code its products take, weight, bias, correction or None)."""
        x = arithmetic.recode(args[0], run.code[op["in"][0]], op["need"])
        key = op["name"]
        return (x, run.arrays[f"{key}/weight"], run.arrays[f"{key}/bias"],
                run.arrays.get(f"{key}/correction"))

    # -- verification and ONNX -----------------------------------------------------------
    def pairs(self, op):
        """The layer's quantized input and its output (accumulator plus rounded bias)."""
        return [(f"{op['name']}/input", op["in"][0], True), (op["name"], op["out"], True)]

    def lower(self, op, lo):
        src, out, name = op["in"][0], op["out"], lo.name(op["out"])
        fl, fl_in = lo.fraclen(out), lo.fraclen(src)
        if len(set(fl_in)) != 1:
            raise ValueError(f"{op['name']}: its input {src!r} has per-channel formats; "
                             "a conv's input needs one")
        fl_w = np.asarray(fl, np.int64) - fl_in[0]
        weight, axis = self.onnx_weight(lo.program.arrays[op["weight"]])
        wf = lo.g.constant(weight, lo.scale(fl_w, op["name"]), np.int8, f"{name}/w", axis=axis)
        bf = lo.g.constant(lo.program.arrays[op["bias"]], lo.scale(fl, op["name"]), np.int32,
                           f"{name}/b", axis=0)
        lo.float_of[out] = self.onnx_node(op, lo, [lo.float_of[src], wf, bf], name)

    def onnx_weight(self, w) -> tuple:
        """(the weight as the ONNX node takes it, its output-channel axis)."""
        raise NotImplementedError

    def onnx_node(self, op, lo, inputs, name) -> str:
        raise NotImplementedError


def _weights(entry: dict, name: str, weight: np.ndarray, channels: int):
    """(q_w, int64 bias, weight fraclens, whether the bias saturated) of a layer whose
    simulation reported ``entry`` (its formats, folded weight and rounded bias)."""
    w_fl = np.broadcast_to(np.asarray(entry["weight_fraclen"], np.int64), (channels,))
    in_fl = int(entry["input_fraclen"])
    # The simulation's own quantizer, then its integers (value * 2^fl, exact).
    value = fp.quantize(jnp.asarray(weight, jnp.float32), jnp.asarray(w_fl, jnp.float32),
                        signed=True, axis=-1, wide=True)
    q_w = np.asarray(value, np.float64) * np.exp2(w_fl.astype(np.float64))
    acc_fl = in_fl + w_fl
    b = np.asarray(entry["bias"], np.float64) * np.exp2(acc_fl.astype(np.float64))
    if not np.array_equal(b, np.round(b)):
        raise ValueError(f"{name}: the reported bias is not on the accumulator's grid")
    # The simulation saturates the bias in float32, where 2^31 - 1 rounds to 2^31: such
    # a bias is recorded (the layer then cannot match the simulation exactly anyway).
    saturated = bool(np.any(np.abs(b) > fp.INT32_MAX))
    return q_w, to_int32(b).astype(np.int64), w_fl, saturated


def xla_conv(op, x, w):
    """int32 conv(x, w) of padded int8 x (no bias), by XLA's int8 convolution."""
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(op["strides"],) * 2, padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=op["groups"],
        preferred_element_type=jnp.int32)


@register
class Conv(AccumulatingLayer):
    """A square HWIO convolution with zero padding and groups (depthwise: one group per
    channel), as the layer (layers.QuantConvBN) recorded them."""

    name = "conv"
    fields = {**AccumulatingLayer.common_fields, "strides": int, "padding": int,
              "groups": int}
    minimums = {"strides": 1, "padding": 0}
    events = ("conv",)
    reduce_axes = (0, 1, 2)

    def check_weight(self, op, v, weight, cout):
        groups, cin = op["groups"], v.src["channels"]
        if groups < 1 or cin % groups:
            v.fail(f"'groups' {groups} does not divide the {cin} input channels")
        if weight.ndim != 4 or weight.shape[0] != weight.shape[1]:
            v.fail(f"weight {op['weight']!r} must be square HWIO, got shape {weight.shape}")
        v.expect(f"the shape of {op['weight']!r}", weight.shape,
                 (weight.shape[0], weight.shape[0], cin // groups, cout))

    def replay(self, event, r):
        a = event.attrs
        op = {"op": "conv", "strides": int(a["strides"]), "padding": int(a["padding"]),
              "groups": int(a["groups"])}
        return self.build(r.b, op, a["layer"], r.tensor(event.inputs[0], event))

    def output_size(self, op, program, sizes):
        k = program.arrays[op["weight"]].shape[0]
        return tuple(window_output_size(d, k, op["strides"], op["padding"])
                     for d in sizes[op["in"][0]])

    def run(self, op, args, run, convolve=xla_conv):
        """Zero padding (the input code's zero point), ``convolve``, the bias."""
        x, w, b, c = self.layer_inputs(op, args, run)
        p = op["padding"]
        if p:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)),
                        constant_values=jnp.int8(op["pad_code"]))
        return arithmetic.bias_add(convolve(op, x, w), b, op["saturate"], c)

    def onnx_weight(self, w):
        return np.ascontiguousarray(w.transpose(3, 2, 0, 1)), 0  # HWIO -> OIHW

    def onnx_node(self, op, lo, inputs, name):
        k, p, st = lo.program.arrays[op["weight"]].shape[0], op["padding"], op["strides"]
        return lo.g.node("Conv", inputs, name, kernel_shape=[k, k], pads=[p] * 4,
                         strides=[st, st], group=op["groups"])


@register
class Dense(AccumulatingLayer):
    """A [channels in, channels out] matmul (the classifier: its output is the logits)."""

    name = "dense"
    fields = AccumulatingLayer.common_fields
    gives_logits = True
    events = ("dense",)
    reduce_axes = (0,)

    def check_weight(self, op, v, weight, cout):
        v.expect(f"the shape of {op['weight']!r}", weight.shape, (v.src["channels"], cout))

    def replay(self, event, r):
        return self.build(r.b, {"op": "dense"}, event.attrs["layer"],
                          r.tensor(event.inputs[0], event))

    def output_size(self, op, program, sizes):
        return (1, 1)

    def run(self, op, args, run):
        x, w, b, c = self.layer_inputs(op, args, run)
        extra = -x.shape[1] % 4  # contractions padded to a multiple of 4, as in im2col
        if extra:
            x, w = jnp.pad(x, ((0, 0), (0, extra))), jnp.pad(w, ((0, extra), (0, 0)))
        y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.int32)
        return arithmetic.bias_add(y, b, op["saturate"], c)

    def onnx_weight(self, w):
        return np.ascontiguousarray(w), 1  # [C, O], Gemm's B

    def onnx_node(self, op, lo, inputs, name):
        return lo.g.node("Gemm", inputs, name)
