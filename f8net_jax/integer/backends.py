"""The executor's backends: how each computes the ops of an integer program.

Every op kind has reference semantics in integer JAX ops (``OpKind.run``, integer/ops; XLA's
int8 convolution for conv); ``XlaBackend`` runs them all, ``Im2colBackend`` (GPUs, portable
jax.export artifacts), ``VnniBackend`` (the AVX-512 VNNI kernel) and ``OnednnBackend``
(oneDNN's int8 primitives) hold kernels for the layers they accelerate, methods named
after the kind, and inherit the rest. Activations are stored as uint8 or int8 codes
(``storage``); ``arithmetic.recode`` moves between them by flipping the top bit.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax.ops import window_output_size
from f8net_jax.integer import arithmetic, onednn, ops, vnni
from f8net_jax.integer.ops.layers import AccumulatingLayer, xla_conv


class Backend:
    """How an executor computes the program: the storage of 8-bit tensors, the choices and
    weight packing of the layers it accelerates, and its kernels. An op kind runs on the
    backend's method of the kind's name where it has one (its kernel), else on the kind's
    reference semantics (``OpKind.run``, integer/ops); ``table`` dispatches. Unsigned and
    signed 8-bit tensors are both stored as int8 (unsigned ones offset by -128, since both
    operands of an int8 product must be signed) unless a backend says otherwise in
    ``storage``."""

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

    def batch_arrays(self, plan, batch: int) -> dict:
        """Arrays that depend on the batch size (weights packed for the kernel that runs
        the layer at that batch), replacing the plan's own under the same names."""
        return {}

    def implementations(self, plan, batch: int) -> dict:
        """Per layer, what computes it at this batch size."""
        return {op["name"]: self.describe(op, batch) for op in plan.ops
                if ops.kind_of(op).accumulating}

    def describe(self, op: dict, batch: int) -> str:
        return f"xla int8 {'convolution' if op['op'] == 'conv' else 'dot_general'}"

    def kernel(self, kind: str):
        """The backend's own method for op ``kind``, or None (a name of Backend's own
        machinery, such as 'pack', is never a kernel)."""
        return None if hasattr(Backend, kind) else getattr(self, kind, None)

    def table(self) -> dict:
        """Op kind -> (op, its input arrays, the run) -> its output."""
        return {name: self.kernel(name) or kind.run for name, kind in ops.REGISTRY.items()}


class XlaBackend(Backend):
    """XLA's int8 convolution with int32 results (CPU only)."""

    name = "xla"


class Im2colBackend(Backend):
    """Patches by strided slices, then int8 dot_general: for GPUs, whose XLA has no int8
    convolution with int32 results, and for portable jax.export artifacts."""

    name = "im2col"

    def describe(self, op, batch):
        return "int8 dot_general over patches" if op["op"] == "conv" else super().describe(
            op, batch)

    def conv(self, op, args, run):
        return ops.REGISTRY["conv"].run(op, args, run, convolve=_im2col_conv)


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

    def describe(self, op, batch):
        return "vnni kernel (AVX-512 VNNI)" if op["fast"] else super().describe(op, batch)

    def conv(self, op, args, run):
        if not op["fast"]:
            return ops.REGISTRY["conv"].run(op, args, run)
        x, w, b, _ = AccumulatingLayer.layer_inputs(op, args, run)
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
    only below 2^24. The bias add and requantization run in XLA, in integers.

    Which primitive runs a layer is decided per batch size, when the executor first sees
    it (``onednn.choice``), and the weights are packed for it then (``batch_arrays``). A
    layer for which oneDNN offers no exact implementation at that batch runs XLA's int8
    convolution (or dot_general) on the same codes, offset to int8, and says so in
    ``implementations``."""

    name = "onednn"

    def storage(self, kind):
        return "u8" if kind == "unsigned" else "s8"

    def choose(self, op, kind, corrected_bias):
        return True, "u8"

    def pack(self, op, w, bias):
        """The program's weight (packed per batch size, ``batch_arrays``), the padding
        oneDNN applies, and 128 * sum(w): what turns a product of int8 codes (u8 - 128)
        into the uint8 codes' one, for layers oneDNN cannot run exactly."""
        _, padding = self._geometry(op, batch=1)
        wsum = np.sum(w.astype(np.int64), axis=tuple(range(w.ndim - 1)))
        return w, bias, {"kernel_padding": padding, "s8_to_u8": (128 * wsum).astype(np.int32)}

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

    def _choice(self, op, batch):
        impl, exact, layout = onednn.choice(self._geometry(op, batch)[0])
        if not exact and (op["name"], batch) not in _WARNED:
            _WARNED.add((op["name"], batch))
            logging.warning("%s at batch %d: oneDNN offers no exact int8 implementation "
                            "(only %s); XLA's int8 %s computes it", op["name"], batch, impl,
                            op["op"])
        return impl, exact, layout

    def batch_arrays(self, plan, batch):
        cache = plan.cache.setdefault(self.name, {})
        out = {}
        for op in plan.ops:
            if not ops.kind_of(op).accumulating:
                continue
            _, exact, layout = self._choice(op, batch)
            if exact:
                key = (op["name"], layout)
                if key not in cache:
                    w = plan.arrays[f"{op['name']}/weight"]
                    cache[key] = jnp.asarray(onednn.pack_weight(
                        w, self._geometry(op, batch)[0]))
                out[f"{op['name']}/weight"] = cache[key]
        return out

    def describe(self, op, batch):
        impl, exact, _ = self._choice(op, batch)
        if exact:
            return impl
        return f"{super().describe(op, batch)} (oneDNN offers no exact one: {impl})"

    def _fallback(self, op, x, w, contract):
        """The uint8 codes' product by XLA: int8 codes (x - 128), then 128 * sum(w)."""
        return contract(arithmetic.recode(x, "u8", "s8"), w) + op["s8_to_u8"]

    def conv(self, op, args, run):
        x, w, b, c = AccumulatingLayer.layer_inputs(op, args, run)
        p, padding = op["padding"], op["kernel_padding"]
        _, exact, layout = self._choice(op, x.shape[0])
        if p != padding or not exact:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)),
                        constant_values=jnp.uint8(op["pad_code"]))
        if exact:
            y = onednn.conv(x, w, kernel_size=int(op["weight_shape"][0]),
                            strides=op["strides"], padding=padding, groups=op["groups"],
                            out_channels=int(op["weight_shape"][3]), layout=layout)
        else:
            y = self._fallback(op, x, w, lambda x, w: xla_conv(op, x, w))
        return arithmetic.bias_add(y, b, op["saturate"], c)

    def dense(self, op, args, run):
        x, w, b, c = AccumulatingLayer.layer_inputs(op, args, run)
        _, exact, layout = self._choice(op, x.shape[0])
        if exact:
            y = onednn.dense(x, w, out_channels=int(op["weight_shape"][1]), layout=layout)
        else:
            y = self._fallback(op, x, w, lambda x, w: jax.lax.dot_general(
                x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))
        return arithmetic.bias_add(y, b, op["saturate"], c)


_WARNED: set = set()


def _im2col_conv(op, x, w):
    """conv(x, w) of padded int8 x as int8 x int8 -> int32 dot_generals over patches taken
    by strided slices (no arithmetic): [N*OH*OW, KH*KW*C] @ [KH*KW*C, Co], or per channel
    (a batched dot) for depthwise convs."""
    strides, groups = op["strides"], op["groups"]
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
