"""The executor's backends: how each computes the ops of an integer program.

``Backend`` computes every op kind with integer JAX ops (XLA's int8 convolution for conv);
``Im2colBackend`` (GPUs, portable jax.export artifacts), ``VnniBackend`` (the AVX-512 VNNI
kernel) and ``OnednnBackend`` (oneDNN's int8 primitives) override the products they
accelerate and inherit the rest. Activations are stored as uint8 or int8 codes
(``storage``); ``_recode`` moves between them by flipping the top bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax.ops import window_output_size
from f8net_jax.integer import onednn, vnni
from f8net_jax.integer.program import ACCUMULATING, OPS


def _channels(values) -> np.ndarray:
    """A per-channel int list as an int32 constant (a scalar if all entries are equal)."""
    v = np.asarray(values, np.int32)
    return np.int32(v[0]) if np.all(v == v[0]) else v


def saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """a + b for int32, clipped to the int32 range instead of wrapping."""
    b = jnp.asarray(b, jnp.int32)
    s = a + b
    return jnp.where(b > 0, jnp.where(a > fp.INT32_MAX - b, fp.INT32_MAX, s),
                     jnp.where(a < fp.INT32_MIN - b, fp.INT32_MIN, s))


def _zero_point(kind: str, code: str) -> int:
    """code = value + zero point for an 8-bit tensor of ``kind`` stored as ``code``."""
    if kind == "unsigned":
        return 0 if code == "u8" else -128
    return 128 if code == "u8" else 0


def _recode(x, have: str, need: str):
    """uint8 <-> int8 by flipping the top bit: value + 128 <-> value (and back)."""
    if have == need:
        return x
    if need == "s8":
        return jax.lax.bitcast_convert_type(x ^ jnp.uint8(128), jnp.int8)
    return jax.lax.bitcast_convert_type(x, jnp.uint8) ^ jnp.uint8(128)


def _requantize(x, shift, signed: bool, code: str):
    lo, hi = fp.integer_range(signed=signed)
    s = np.asarray(shift, np.int32)
    if np.all(s > 0):  # the usual case: one branch of fp.requantize, nothing to select
        r = jnp.clip(fp.rounding_shift(x, _channels(s)), lo, hi)
    else:  # the shift is fl_in - fl_out; fp.requantize takes them as two formats >= 0
        r = fp.requantize(x, np.maximum(s, 0), np.maximum(-s, 0), signed=signed, axis=-1,
                          wide=True)  # any left shift the program holds
    if code == "u8":
        return r.astype(jnp.uint8)
    return (r if signed else r - 128).astype(jnp.int8)


def _shift_left(x, shift, saturate: bool):
    s = np.asarray(shift, np.int32)
    if not np.any(s):
        return x
    if saturate:
        return fp.saturating_shift_left(x, _channels(s), -fp.INT32_MAX, fp.INT32_MAX)
    return jnp.left_shift(x, _channels(s))


def _bias_add(y, b, saturate: bool, correction=None):
    if correction is not None:
        y = y + correction
    return saturating_add(y, b) if saturate else y + b


class Backend:
    """How an executor computes each op kind of the program: one method per kind in
    ``program.OPS`` (``Backend.table`` dispatches), and the integer products of its conv and
    dense ops. Unsigned and signed 8-bit tensors are both stored as int8 (unsigned ones
    offset by -128, since both operands of an int8 product must be signed) unless a backend
    says otherwise in ``storage``."""

    name = ""

    def storage(self, kind: str) -> str:
        return "s8"

    def choose(self, op: dict, kind: str, corrected_bias) -> tuple[bool, str]:
        """(fast, need) for a conv or dense layer whose input has ``kind``: whether it runs
        on the backend's own kernel (then ``pack`` lays its weight out), and the 8-bit code
        its products take ('u8' or 's8'); ``corrected_bias(code)`` is the int64 bias
        with that code's zero-point correction."""
        return False, "s8"

    def pack(self, op: dict, w, bias):
        """(weight, bias, fields added to the op) for a fast layer."""
        raise NotImplementedError

    def table(self) -> dict:
        return {kind: getattr(self, kind) for kind in OPS}

    # -- the products ------------------------------------------------------------------
    def convolve(self, op: dict, x, w):
        """int32 conv(x, w) of padded int8 x (no bias)."""
        return jax.lax.conv_general_dilated(
            x, w, window_strides=(op["strides"],) * 2, padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=op["groups"],
            preferred_element_type=jnp.int32)

    # -- the ops: (op, its input arrays, the run) -> its output ------------------------
    def image(self, op, args, run):
        return _recode(run.images, "u8", run.code[op["out"]])

    def lookup(self, op, args, run):
        table = run.arrays[op["table"]]
        return table[jnp.arange(table.shape[0]), run.images.astype(jnp.int32)]

    def conv(self, op, args, run):
        x, w, b, c = self._layer_inputs(op, args, run)
        p = op["padding"]
        if p:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)),
                        constant_values=jnp.int8(op["pad_code"]))
        return _bias_add(self.convolve(op, x, w), b, op["saturate"], c)

    def dense(self, op, args, run):
        x, w, b, c = self._layer_inputs(op, args, run)
        extra = -x.shape[1] % 4  # contractions padded to a multiple of 4, as in im2col
        if extra:
            x, w = jnp.pad(x, ((0, 0), (0, extra))), jnp.pad(w, ((0, extra), (0, 0)))
        y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.int32)
        return _bias_add(y, b, op["saturate"], c)

    def requantize(self, op, args, run):
        return _requantize(args[0], op["shift"], op["signed"], run.code[op["out"]])

    def relu(self, op, args, run):
        return jnp.maximum(args[0], 0)

    def add(self, op, args, run):
        a = _shift_left(args[0], op["shift"][0], op["saturate"])
        b = _shift_left(args[1], op["shift"][1], op["saturate"])
        y = _bias_add(a, b, op["saturate"])
        return jnp.maximum(y, 0) if op["relu"] else y

    def max_pool(self, op, args, run):
        w, s, p = op["window"], op["strides"], op["padding"]
        return jax.lax.reduce_window(args[0], jnp.int32(fp.INT32_MIN), jax.lax.max,
                                     (1, w, w, 1), (1, s, s, 1),
                                     ((0, 0), (p, p), (p, p), (0, 0)))

    def avg_pool(self, op, args, run):
        if op["saturate"]:
            return jax.lax.reduce(args[0], jnp.int32(0), saturating_add, (1, 2))
        return jnp.sum(args[0], axis=(1, 2), dtype=jnp.int32)

    @staticmethod
    def _layer_inputs(op, args, run):
        x = _recode(args[0], run.code[op["in"][0]], op["need"])
        key = op["name"]
        return (x, run.arrays[f"{key}/weight"], run.arrays[f"{key}/bias"],
                run.arrays.get(f"{key}/correction"))


class XlaBackend(Backend):
    """XLA's int8 convolution with int32 results (CPU only)."""

    name = "xla"


class Im2colBackend(Backend):
    """Patches by strided slices, then int8 dot_general: for GPUs, whose XLA has no int8
    convolution with int32 results, and for portable jax.export artifacts."""

    name = "im2col"

    def convolve(self, op, x, w):
        return _im2col_conv(x, w, op["strides"], op["groups"])


class VnniBackend(Backend):
    """Convolutions by the AVX-512 VNNI kernel (CPU) on uint8 x int8, its native product;
    unsigned tensors are kept as uint8. Depthwise and saturating layers, and dense ones,
    run as on 'xla'."""

    name = "vnni"

    def storage(self, kind):
        return "u8" if kind == "unsigned" else "s8"

    def choose(self, op, kind, corrected_bias):
        fast = (op["op"] == "conv" and op["groups"] == 1 and not op["saturate"]
                and bool(np.all(np.abs(corrected_bias("u8")) <= fp.INT32_MAX)))
        return fast, ("u8" if fast else "s8")

    def pack(self, op, w, bias):
        packed, cp, cop = vnni.pack_weight(w)
        padded = np.zeros(cop, np.int32)
        padded[:bias.size] = bias
        return packed, padded, {"in_channels": w.shape[2], "padded_channels": cp}

    def conv(self, op, args, run):
        if not op["fast"]:
            return super().conv(op, args, run)
        x, w, b, _ = self._layer_inputs(op, args, run)
        p, extra = op["padding"], op["padded_channels"] - op["in_channels"]
        if p or extra:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, extra)),
                        constant_values=jnp.uint8(op["pad_code"]))
        return vnni.conv(x, w, b, kernel_size=int(op["weight_shape"][0]),
                         strides=op["strides"], out_channels=int(op["weight_shape"][3]))


class OnednnBackend(Backend):
    """Every conv (depthwise too) and the dense layer by oneDNN's int8 primitives (AMX int8
    or VNNI, see onednn.py) on uint8 x int8 into int32: unsigned tensors are kept as
    uint8, signed ones as int8 and offset to uint8 for the products (value + 128, the
    correction -128 * sum(w) joins the bias), since oneDNN's int8-source path is exact
    only below 2^24. The bias add and requantization run in XLA, in integers."""

    name = "onednn"

    def storage(self, kind):
        return "u8" if kind == "unsigned" else "s8"

    def choose(self, op, kind, corrected_bias):
        return True, "u8"

    def pack(self, op, w, bias):
        geometry, padding = self._geometry(op, batch=1)
        return onednn.pack_weight(w, geometry), bias, {"kernel_padding": padding}

    @staticmethod
    def _geometry(op, batch):
        """The layer as the kernel sees it, and the padding oneDNN applies: oneDNN pads
        with the code 0, which is the value 0 only for unsigned inputs; other inputs are
        padded by the executor with their zero point's code."""
        w = op["weight_shape"]
        if op["op"] == "dense":
            return onednn.layer("dense", batch=batch, in_channels=w[0], out_channels=w[1],
                                signed=False), 0
        (h, wd), p = op["in_spatial"], op["padding"]
        padding = p if op["pad_code"] == 0 else 0
        extra = 2 * (p - padding)
        return onednn.layer("conv", batch=batch, height=h + extra, width=wd + extra,
                            in_channels=w[2] * op["groups"], out_channels=w[3],
                            kernel_size=w[0], strides=op["strides"], padding=padding,
                            groups=op["groups"], signed=False), padding

    def conv(self, op, args, run):
        x, w, b, c = self._layer_inputs(op, args, run)
        p, padding = op["padding"], op["kernel_padding"]
        if p != padding:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)),
                        constant_values=jnp.uint8(op["pad_code"]))
        y = onednn.conv(x, w, kernel_size=int(op["weight_shape"][0]), strides=op["strides"],
                        padding=padding, groups=op["groups"],
                        out_channels=int(op["weight_shape"][3]))
        return _bias_add(y, b, op["saturate"], c)

    def dense(self, op, args, run):
        x, w, b, c = self._layer_inputs(op, args, run)
        y = onednn.dense(x, w, out_channels=int(op["weight_shape"][1]))
        return _bias_add(y, b, op["saturate"], c)

    def implementations(self, plan: "Plan", batch: int) -> dict:
        """Per layer, the primitive oneDNN runs at this batch size."""
        return {op["name"]: onednn.implementation(self._geometry(op, batch)[0])
                for op in plan.ops if op["op"] in ACCUMULATING}



def _im2col_conv(x, w, strides: int, groups: int):
    """conv(x, w) of padded int8 x as int8 x int8 -> int32 dot_generals over patches taken
    by strided slices (no arithmetic): [N*OH*OW, KH*KW*C] @ [KH*KW*C, Co], or per channel
    (a batched dot) for depthwise convs."""
    n, hp, wp, c = x.shape
    k = w.shape[0]
    oh, ow = window_output_size(hp, k, strides), window_output_size(wp, k, strides)
    patches = jnp.stack([jax.lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * strides + 1,
                                                         j + (ow - 1) * strides + 1, c),
                                       (1, strides, strides, 1))
                         for i in range(k) for j in range(k)], axis=3)  # [N, OH, OW, KK, C]
    if groups == 1:
        lhs, rhs = patches.reshape(n * oh * ow, k * k * c), w.reshape(k * k * c, w.shape[3])
        extra = -(k * k * c) % 4  # a multiple of 4 (GPU int8 GEMMs need it), with zeros
        if extra:
            lhs = jnp.pad(lhs, ((0, 0), (0, extra)))
            rhs = jnp.pad(rhs, ((0, extra), (0, 0)))
        y = jax.lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.int32)
        return y.reshape(n, oh, ow, w.shape[3])
    lhs = patches.reshape(n * oh * ow, k * k, c).transpose(2, 0, 1)  # [C, M, KK]
    rhs = w.reshape(k * k, c).T[:, :, None]                           # [C, KK, 1]
    extra = -(k * k) % 4
    if extra:
        lhs = jnp.pad(lhs, ((0, 0), (0, 0), (0, extra)))
        rhs = jnp.pad(rhs, ((0, 0), (0, extra), (0, 0)))
    y = jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.int32)        # [C, M, 1]
    return y[:, :, 0].T.reshape(n, oh, ow, c)
