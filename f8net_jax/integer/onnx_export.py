"""An integer program as an ONNX graph that standard runtimes run (ONNX Runtime, OpenVINO).

    model = to_onnx(program)              # onnx.ModelProto; onnx.save(model, "net.onnx")
    logits = session.run(None, {"images": nchw_uint8})[0]   # = int32 logits * 2^-fl

The graph is in the QDQ form (QuantizeLinear / DequantizeLinear around float Conv, Gemm,
Add, MaxPool, ReduceSum), the form ONNX Runtime, OpenVINO and TensorRT all read and turn
into their own int8 kernels (ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear
into QLinearConv; OpenVINO into int8 convolutions). QLinearConv/ConvInteger graphs say the
same things but not every runtime optimizes them, and int32 tensors (our residual streams)
have no integer op for the alignment shifts or the rounding right shift in the standard
opset.

Every scale is a power of two, so every value the graph computes is exactly
representable: the input is uint8 pixels [N, C, H, W] at scale 2^-8 (or the program's
per-channel lookup table, by Gather), weights are int8 with per-channel scales 2^-fl,
biases int32 at the accumulator's scale, every 8-bit tensor of the program is a
QuantizeLinear output (uint8 for unsigned, int8 for signed) with the program's format, the
logits are float32 = int32 logits * 2^-fl. QuantizeLinear rounds half to even and
saturates, as the program's requantization does (signed tensors are clipped to
[-127, 127] first: the program's 8-bit range is symmetric). A runtime sums products or
adds int32 values either in integers or in float32; float32 is exact while every sum's
integer stays below 2^24, which the program's static checks say per op: ``inexact_ops``
lists those where they cannot rule it out (``to_onnx`` warns, naming them). OpenVINO
computes those float parts in bfloat16 by default on CPUs that have it: it is exact with
INFERENCE_PRECISION_HINT=f32 (the model's metadata says so, under 'openvino').
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

import numpy as np

from f8net_jax.integer.program import IntegerProgram

OPSET = 17
INPUT = "images"
OUTPUT = "logits"
OPENVINO = ("compile with INFERENCE_PRECISION_HINT=f32 for logits equal to the integer "
            "program's; the default precision (bf16 on CPUs that have it) rounds them")


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in requirements.txt
        raise ImportError("ONNX export needs the onnx package (pip install onnx)") from e
    return onnx


def inexact_ops(program: IntegerProgram) -> list[str]:
    """The ops whose static bound does not rule out a sum at or above 2^24 (or beyond
    int32): a runtime computing them in float32 may round there."""
    return [f"{c['layer']} ({c['op']}, bound {c['accumulator_bound']:,})"
            for c in program.checks() if not c["float32_exact"] or not c["int32_safe"]]


def _scale(fraclens, what: str) -> np.ndarray:
    """2^-fl as float32: a scalar if all channels share it, else one per channel."""
    fl = np.asarray(fraclens, np.int64)
    if np.any(np.abs(fl) > 120):
        raise ValueError(f"{what}: fraclen {fl.max()} has no float32 power of two")
    s = np.exp2(-fl.astype(np.float64)).astype(np.float32)
    return np.float32(s[0]) if np.all(fl == fl[0]) else s


def _name(tensor: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", tensor)


class _Graph:
    def __init__(self, onnx, quantized: bool):
        self.onnx, self.h, self.quantized = onnx, onnx.helper, quantized
        self.nodes, self.initializers, self.outputs = [], [], []
        self.count = 0

    def const(self, name: str, value) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list, output: Optional[str] = None, **attrs) -> str:
        self.count += 1
        output = output or f"n{self.count}/{op}"
        self.nodes.append(self.h.make_node(op, inputs, [output], name=f"{op}_{self.count}",
                                           **attrs))
        return output

    def dequantize(self, x: str, scale, dtype, name: str, axis: int = 1) -> str:
        """DequantizeLinear with zero point 0 (per ``axis`` if ``scale`` is per channel)."""
        return self.node("DequantizeLinear", self._qparams(x, scale, dtype, name),
                         **self._axis(scale, axis))

    def constant(self, values, scale, dtype, name: str, axis: int) -> str:
        """An integer array at per-channel (``axis``) scale: int8/int32 with a
        DequantizeLinear, or (float graphs) its float32 values."""
        if self.quantized:
            return self.dequantize(self.const(f"{name}/{np.dtype(dtype).name}",
                                              values.astype(dtype)), scale, dtype, name, axis)
        shape = [1] * values.ndim
        if np.ndim(scale):
            shape[axis] = -1
        value = values.astype(np.float64) * np.reshape(scale, shape)
        return self.const(f"{name}/float", value.astype(np.float32))

    def quantize(self, x: str, scale, dtype, out: str) -> str:
        """QuantizeLinear to ``dtype`` (zero point 0, channel axis 1), named ``out``."""
        return self.node("QuantizeLinear", self._qparams(x, scale, dtype, out), out,
                         **self._axis(scale, 1))

    def _qparams(self, x, scale, dtype, name):
        return [x, self.const(f"{name}/scale", scale),
                self.const(f"{name}/zero", np.zeros(np.shape(scale), dtype))]

    @staticmethod
    def _axis(scale, axis):
        return {} if np.ndim(scale) == 0 else {"axis": axis}


def to_onnx(program: IntegerProgram, *, intermediates: bool = False, warn: bool = True,
            quantized: bool = True):
    """The program as an ONNX model (opset 17): input 'images', uint8 [N, C, H, W]; output
    'logits', float32 [N, classes] (exact: the program's int32 logits * 2^-fl where the
    runtime is exact, see the module docstring). ``intermediates``: every 8-bit tensor of
    the program is also an output, under its program name (NCHW, uint8 or int8 values).
    ``quantized=False``: the same network in float32 instead (no QuantizeLinear or
    DequantizeLinear; weights and biases as float32 values, each requantization a clip to
    its 8-bit range without rounding): the float model of the exported network, for
    float32 baselines and for other quantization tools to start from."""
    onnx = _onnx()
    program.validate()
    ops_inexact = inexact_ops(program)
    if ops_inexact and warn:
        warnings.warn("ONNX runtimes may compute these ops in float32, where a sum at or "
                      "above 2^24 rounds; the static check cannot rule that out for: "
                      + "; ".join(ops_inexact), stacklevel=2)
    g = _Graph(onnx, quantized)
    tensors = program.tensors
    float_of = {}   # program tensor -> float ONNX tensor holding its exact value
    int8_of = {}    # program 8-bit tensor -> its QuantizeLinear output
    images = INPUT
    flat = set()    # tensors of shape [N, C] (after the global pool)
    for op in program.ops:
        kind, out, name = op["op"], op["out"], _name(op["out"])
        fl = tensors[out]["fraclen"]
        if kind == "image":
            int8_of[out] = images
            float_of[out] = (g.dequantize(images, _scale(fl, out), np.uint8, name) if quantized
                             else g.node("Mul", [g.node("Cast", [images],
                                                        to=onnx.TensorProto.FLOAT),
                                                 g.const(f"{name}/pow2", _scale(fl, out))]))
        elif kind == "lookup":
            table = program.arrays[op["table"]]  # [C, 256] int8
            channels = table.shape[0]
            offsets = (np.arange(channels, dtype=np.int64) * 256).reshape(1, channels, 1, 1)
            index = g.node("Add", [g.node("Cast", [images], to=onnx.TensorProto.INT64),
                                   g.const(f"{name}/offsets", offsets)])
            int8_of[out] = g.node("Gather", [g.const(f"{name}/table", table.reshape(-1)),
                                             index], name)
            float_of[out] = (g.dequantize(int8_of[out], _scale(fl, out), np.int8, f"{name}/dq")
                             if quantized else g.node("Mul", [
                                 g.node("Cast", [int8_of[out]], to=onnx.TensorProto.FLOAT),
                                 g.const(f"{name}/pow2", _scale(fl, out))]))
        elif kind in ("conv", "dense"):
            src = op["in"][0]
            x = float_of[src]
            w = program.arrays[op["weight"]]
            fl_in = tensors[src]["fraclen"]
            if len(set(fl_in)) != 1:
                raise ValueError(f"{op['name']}: its input {src!r} has per-channel formats; "
                                 "a conv's input needs one")
            fl_w = np.asarray(fl, np.int64) - fl_in[0]
            if kind == "conv":
                weight = np.ascontiguousarray(w.transpose(3, 2, 0, 1))  # HWIO -> OIHW
            else:
                weight = np.ascontiguousarray(w)  # [C, O], Gemm's B
            wf = g.constant(weight, _scale(fl_w, op["name"]), np.int8, f"{name}/w",
                            axis=0 if kind == "conv" else 1)
            bf = g.constant(program.arrays[op["bias"]], _scale(fl, op["name"]), np.int32,
                            f"{name}/b", axis=0)
            if kind == "conv":
                k, p, st = w.shape[0], op["padding"], op["strides"]
                float_of[out] = g.node("Conv", [x, wf, bf], name, kernel_shape=[k, k],
                                       pads=[p] * 4, strides=[st, st], group=op["groups"])
            else:
                float_of[out] = g.node("Gemm", [x, wf, bf], name)
        elif kind == "requantize":
            x = float_of[op["in"][0]]
            if op["in"][0] in flat:
                flat.add(out)
            scale = _scale(fl, out)
            limit = np.asarray(scale, np.float32) * np.float32(127 if op["signed"] else 255)
            if np.ndim(limit) and op["in"][0] not in flat:
                limit = limit.reshape(-1, 1, 1)  # [C, 1, 1] against [N, C, H, W]
            if not quantized:  # the 8-bit range as a clip, no rounding
                low = -limit if op["signed"] else np.zeros_like(limit)
                float_of[out] = g.node("Min", [g.node("Max", [x, g.const(f"{name}/low", low)]),
                                               g.const(f"{name}/high", limit)], name)
                continue
            if op["signed"]:  # the program's int8 range is [-127, 127]
                x = g.node("Max", [x, g.const(f"{name}/low", -limit)])
            dtype = np.int8 if op["signed"] else np.uint8
            int8_of[out] = g.quantize(x, scale, dtype, name)
            float_of[out] = g.dequantize(int8_of[out], scale, dtype, f"{name}/dq")
        elif kind == "relu":
            if op["in"][0] in flat:
                flat.add(out)
            float_of[out] = g.node("Relu", [float_of[op["in"][0]]], name)
        elif kind == "add":
            y = g.node("Add", [float_of[op["in"][0]], float_of[op["in"][1]]],
                       None if op["relu"] else name)
            float_of[out] = g.node("Relu", [y], name) if op["relu"] else y
        elif kind == "max_pool":
            w, s, p = op["window"], op["strides"], op["padding"]
            float_of[out] = g.node("MaxPool", [float_of[op["in"][0]]], name,
                                   kernel_shape=[w, w], strides=[s, s], pads=[p] * 4)
        elif kind == "avg_pool":
            total = g.node("ReduceSum", [float_of[op["in"][0]],
                                         g.const(f"{name}/axes", np.array([2, 3], np.int64))],
                           keepdims=0)
            flat.add(out)
            float_of[out] = g.node("Mul", [total, g.const(
                f"{name}/pow2", np.float32(2.0 ** -op["shift"]))], name)
        else:  # pragma: no cover - validate() knows every op
            raise ValueError(f"op {kind!r} has no ONNX form")
    logits = g.node("Identity", [float_of[program.output]], OUTPUT)
    h, tp = g.h, onnx.TensorProto
    c = program.image_shape[2]
    inputs = [h.make_tensor_value_info(INPUT, tp.UINT8, ["N", c, *program.image_shape[:2]])]
    outputs = [h.make_tensor_value_info(logits, tp.FLOAT, ["N", program.num_classes])]
    if intermediates and quantized:
        for tensor, q in int8_of.items():
            if q == INPUT:
                continue
            dtype = tp.INT8 if tensors[tensor]["kind"] == "signed" else tp.UINT8
            channels = tensors[tensor]["channels"]
            shape = ["N", channels] + ([] if tensor in flat else [None, None])
            outputs.append(h.make_tensor_value_info(q, dtype, shape))
    graph = h.make_graph(g.nodes, f"{program.model}_{'integer' if quantized else 'float32'}",
                         inputs, outputs, g.initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)],
                         producer_name="f8net_jax")
    model.ir_version = 8
    h.set_model_props(model, {
        "logits_fraclen": str(program.logits_fraclen),
        "inexact_ops": "; ".join(ops_inexact) or "none",
        "layout": "images: uint8 pixels [N, C, H, W]; logits = int32 logits * 2^-logits_fraclen",
        "openvino": OPENVINO,
    })
    onnx.checker.check_model(model, full_check=True)
    return model


def intermediate_names(program: IntegerProgram) -> list[str]:
    """The program's 8-bit tensors that ``to_onnx(..., intermediates=True)`` also outputs
    (their ONNX names are ``_name`` of these)."""
    return [op["out"] for op in program.ops if op["op"] in ("requantize", "lookup")]
