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

from f8net_jax.integer import ops
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


class _Lowering:
    """What the op kinds' ``lower`` methods read and write while the graph is built."""

    def __init__(self, program: IntegerProgram, g: _Graph, quantized: bool):
        self.program, self.g, self.quantized = program, g, quantized
        self.images = INPUT
        self.float_of = {}   # program tensor -> float ONNX tensor holding its exact value
        self.int8_of = {}    # program 8-bit tensor -> its 8-bit ONNX tensor
        self.flat = set()    # tensors of shape [N, C] (after the global pool)

    name = staticmethod(_name)
    scale = staticmethod(_scale)

    def fraclen(self, tensor: str) -> list:
        return self.program.tensors[tensor]["fraclen"]

    def dequantized(self, x: str, tensor: str, dtype, dq_name: str) -> str:
        """The value of integers ``x`` of program ``tensor``: a DequantizeLinear (named
        ``dq_name``), or (float graphs) their float32 cast times 2^-fl."""
        scale = _scale(self.fraclen(tensor), tensor)
        if self.quantized:
            return self.g.dequantize(x, scale, dtype, dq_name)
        g = self.g
        return g.node("Mul", [g.node("Cast", [x], to=g.onnx.TensorProto.FLOAT),
                              g.const(f"{_name(tensor)}/pow2", scale)])


def to_onnx(program: IntegerProgram, *, intermediates: bool = False, warn: bool = True,
            quantized: bool = True):
    """The program as an ONNX model (opset 17): input 'images', uint8 [N, C, H, W]; output
    'logits', float32 [N, classes] (exact: the program's int32 logits * 2^-fl where the
    runtime is exact, see the module docstring). ``intermediates``: every 8-bit tensor of
    the program is also an output, under its program name (NCHW, uint8 or int8 values).
    ``quantized=False``: the same network in float32 instead (no QuantizeLinear or
    DequantizeLinear; weights and biases as float32 values, each requantization a clip to
    its 8-bit range without rounding): the float model of the exported network, for
    float32 baselines and for other quantization tools to start from. Each op is lowered
    by its kind (``OpKind.lower``, integer/ops)."""
    onnx = _onnx()
    program.validate()
    ops_inexact = inexact_ops(program)
    if ops_inexact and warn:
        warnings.warn("ONNX runtimes may compute these ops in float32, where a sum at or "
                      "above 2^24 rounds; the static check cannot rule that out for: "
                      + "; ".join(ops_inexact), stacklevel=2)
    lo = _Lowering(program, _Graph(onnx, quantized), quantized)
    for op in program.ops:
        if op["in"] and all(name in lo.flat for name in op["in"]):
            lo.flat.add(op["out"])  # an op of [N, C] tensors gives one (pools declare theirs)
        ops.kind_of(op).lower(op, lo)
    model = _model(lo, intermediates and quantized)
    h = onnx.helper
    h.set_model_props(model, {
        "logits_fraclen": str(program.logits_fraclen),
        "inexact_ops": "; ".join(ops_inexact) or "none",
        "layout": "images: uint8 pixels [N, C, H, W]; logits = int32 logits * 2^-logits_fraclen",
        "openvino": OPENVINO,
    })
    onnx.checker.check_model(model, full_check=True)
    return model


def _model(lo: _Lowering, intermediates: bool):
    """The ONNX model of a lowered program: its input, logits and (``intermediates``) its
    8-bit tensors as outputs."""
    program, g = lo.program, lo.g
    logits = g.node("Identity", [lo.float_of[program.output]], OUTPUT)
    h, tp = g.h, g.onnx.TensorProto
    c = program.image_shape[2]
    inputs = [h.make_tensor_value_info(INPUT, tp.UINT8, ["N", c, *program.image_shape[:2]])]
    outputs = [h.make_tensor_value_info(logits, tp.FLOAT, ["N", program.num_classes])]
    if intermediates:
        for tensor, q in lo.int8_of.items():
            if q == INPUT:
                continue
            dtype = tp.INT8 if program.tensors[tensor]["kind"] == "signed" else tp.UINT8
            channels = program.tensors[tensor]["channels"]
            shape = ["N", channels] + ([] if tensor in lo.flat else [None, None])
            outputs.append(h.make_tensor_value_info(q, dtype, shape))
    graph = h.make_graph(g.nodes, f"{program.model}_{'integer' if lo.quantized else 'float32'}",
                         inputs, outputs, g.initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)],
                         producer_name="f8net_jax")
    model.ir_version = 8
    return model


def intermediate_names(program: IntegerProgram) -> list[str]:
    """The program's 8-bit tensors that ``to_onnx(..., intermediates=True)`` also outputs
    (their ONNX names are ``_name`` of these)."""
    return [op["out"] for op in program.ops if ops.kind_of(op).onnx_intermediate]
