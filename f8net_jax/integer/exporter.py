"""From a trained fixed-point model to an integer program (docs/METHOD.md 6 and 8).

The eval forward of the simulation reports, per layer, its formats, the folded weight W_f
and the bias already rounded to the accumulator's grid ('formats' and 'folded'
collections). The integer program stores q_w = round(W_f * 2^fl_w) as int8 and the bias
times 2^(fl_in + fl_w) as int32, and wires the layers as the model's own eval forward does,
replaying its record (f8net_jax.recording): requantize each layer's input from its
producer's format to its own, align the operands of a residual add by left shifts, sum for
the average pool (the shift is a change of format, so pooling never rounds: it computes
exactly what the simulation computes). Nothing here knows an architecture.

Static check. Every tensor carries per-channel bounds [lo, hi] of its integers, derived
from the operand ranges (8-bit inputs in their full range, the actual int8 weights and
biases). A layer's accumulator bound is max(|lo|, |hi|) of conv + bias. Below 2^24 the
simulation's float32 arithmetic is exact (products of 8-bit integers, every partial sum an
integer below 2^24); below 2^31 int32 cannot overflow. Where a bound reaches 2^31 the op is
marked 'saturate' and the executor saturates instead of wrapping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import analysis, folding, layers, models, recording
from f8net_jax import fixed_point as fp
from f8net_jax.integer.program import IntegerProgram
from f8net_jax.models import common

FLOAT_EXACT = 2 ** 24
COLLECTIONS = ("params", "batch_stats", "quant_stats")  # what a fixed-point model holds
UNSIGNED, SIGNED = fp.integer_range(signed=False), fp.integer_range(signed=True)


def _quant_config(config) -> layers.QuantConfig:
    quant = _field(config, "quant", None)
    if isinstance(quant, layers.QuantConfig):
        return quant
    if quant is None:
        raise ValueError("config has no 'quant' field: pass the training config")
    return layers.QuantConfig.from_config(quant)


def _field(config, name, default):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _magnitude(lo, hi) -> int:
    """The largest |integer| of per-channel bounds [lo, hi]."""
    return int(max(np.max(np.abs(lo)), np.max(np.abs(hi))))


def _int32(bounds):
    return np.clip(bounds, -fp.INT32_MAX, fp.INT32_MAX)


def _check(name: str, op: str, bound: int, partial: int = 0) -> dict:
    """The static check of one accumulating op: its worst-case magnitude in integer units
    (``partial``: of the product sums before the bias), float32 exactness, int32 safety."""
    return {"layer": name, "op": op, "accumulator_bound": int(bound),
            "float32_exact": bool(max(bound, partial) < FLOAT_EXACT),
            "int32_safe": bool(bound <= fp.INT32_MAX)}


class _Builder:
    """Appends ops and keeps, per tensor, its kind, per-channel fraclen and bounds."""

    def __init__(self, table: dict):
        self.table = table
        self.ops: list = []
        self.tensors: dict = {}
        self.arrays: dict = {}
        self.bounds: dict = {}  # name -> (lo, hi) int64 per channel

    # -- bookkeeping ---------------------------------------------------------------------
    def _tensor(self, name, kind, fraclen, lo, hi):
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} is written twice")
        fraclen = np.asarray(fraclen, np.int64)
        lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
        self.tensors[name] = {"kind": kind, "channels": int(fraclen.size),
                              "fraclen": [int(v) for v in fraclen],
                              "bound": _magnitude(lo, hi)}
        self.bounds[name] = (lo, hi)
        return name

    def fraclen(self, name) -> np.ndarray:
        return np.asarray(self.tensors[name]["fraclen"], np.int64)

    def layer(self, name) -> dict:
        if name not in self.table:
            raise ValueError(f"the model reports no layer {name!r}: is the checkpoint from "
                             f"another architecture?")
        return self.table[name]

    # -- ops -----------------------------------------------------------------------------
    def image(self, channels: int) -> str:
        """Pixels p, 'unsigned' at fl 8 (the value p / 256)."""
        self.ops.append({"op": "image", "in": [], "out": "image"})
        return self._tensor("image", "unsigned", [8] * channels, [0] * channels,
                            [255] * channels)

    def lookup(self, channels: int, stem: str) -> str:
        """A normalized image, straight in the stem's signed input format: per channel and
        pixel value p, round(norm_c(p) * 2^fl) saturated, computed with the simulation's
        own float ops (common.normalize_pixels, fp.quantize)."""
        fl = int(self.layer(stem)["input_fraclen"])
        pixels = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None],
                                 (1, 1, 256, channels))
        value = common.normalize_pixels(jnp.asarray(pixels))
        q = fp.quantize(value, jnp.float32(fl), signed=True, wide=True) * fp.pow2(fl)
        table = np.asarray(q, np.float32)[0, 0].T.astype(np.int8)  # [channels, 256]
        key = f"{stem}/table"
        self.arrays[key] = table
        self.ops.append({"op": "lookup", "in": [], "out": "image", "table": key})
        return self._tensor("image", "signed", [fl] * channels, table.min(1), table.max(1))

    def input(self, src: str, layer: str, signed: bool) -> str:
        """``layer``'s quantized input read from ``src`` (requantized to its format)."""
        fl = int(self.layer(layer)["input_fraclen"])
        kind = "signed" if signed else "unsigned"
        t = self.tensors[src]
        if t["kind"] != "int32":
            if t["kind"] != kind or set(t["fraclen"]) != {fl}:
                raise ValueError(f"{layer} reads the 8-bit tensor {src!r} ({t['kind']}, "
                                 f"fraclen {t['fraclen'][0]}) as {kind} at fraclen {fl}")
            return src
        shift = self.fraclen(src) - fl
        lo, hi = SIGNED if signed else UNSIGNED
        out = f"{layer}/input"
        self.ops.append({"op": "requantize", "in": [src], "out": out, "signed": signed,
                         "shift": [int(s) for s in shift]})
        return self._tensor(out, kind, [fl] * t["channels"], [lo] * t["channels"],
                            [hi] * t["channels"])

    def _accumulate(self, op: dict, name: str, src: str, weight: np.ndarray,
                    reduce_axes: tuple):
        t = self.tensors[src]
        q_w, bias, w_fraclen, bias_saturated = self._weights(name, weight, weight.shape[-1])
        signed = t["kind"] == "signed"
        lo_in, hi_in = SIGNED if signed else UNSIGNED
        w = q_w.astype(np.int64)
        pos = np.sum(np.maximum(w, 0), axis=reduce_axes)
        neg = np.sum(np.minimum(w, 0), axis=reduce_axes)
        raw_hi, raw_lo = hi_in * pos + lo_in * neg, lo_in * pos + hi_in * neg
        lo, hi = raw_lo + bias, raw_hi + bias
        bound, raw = _magnitude(lo, hi), _magnitude(raw_lo, raw_hi)
        saturate = bound > fp.INT32_MAX
        self.arrays[f"{name}/weight"] = q_w.astype(np.int8)
        self.arrays[f"{name}/bias"] = bias.astype(np.int32)
        in_fl = int(t["fraclen"][0])
        acc_fl = in_fl + w_fraclen
        op.update({"name": name, "in": [src], "out": name, "weight": f"{name}/weight",
                   "bias": f"{name}/bias", "saturate": bool(saturate),
                   "input_fraclen": in_fl, "weight_fraclen": [int(v) for v in w_fraclen],
                   "check": dict(_check(name, op["op"], bound, raw),
                                 bias_saturated=bias_saturated)})
        self.ops.append(op)
        return self._tensor(name, "int32", acc_fl, _int32(lo), _int32(hi))

    def _weights(self, name: str, weight: np.ndarray, channels: int):
        entry = self.layer(name)
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
        return q_w, _int32(b).astype(np.int64), w_fl, saturated

    def conv(self, name: str, src: str, *, strides: int, depthwise: bool = False) -> str:
        weight = np.asarray(self.layer(name)["weight"])
        k, _, _, features = weight.shape
        op = {"op": "conv", "strides": int(strides), "padding": k // 2,
              "groups": features if depthwise else 1}
        return self._accumulate(op, name, src, weight, (0, 1, 2))

    def dense(self, name: str, src: str) -> str:
        weight = np.asarray(self.layer(name)["weight"])
        return self._accumulate({"op": "dense"}, name, src, weight, (0,))

    def relu(self, src: str) -> str:
        out = f"{src}/relu"
        self.ops.append({"op": "relu", "in": [src], "out": out})
        lo, hi = self.bounds[src]
        return self._tensor(out, "int32", self.fraclen(src), np.maximum(lo, 0),
                            np.maximum(hi, 0))

    def add(self, name: str, a: str, b: str, *, relu: bool) -> str:
        fa, fb = self.fraclen(a), self.fraclen(b)
        fl = np.maximum(fa, fb)
        (lo_a, hi_a), (lo_b, hi_b) = self.bounds[a], self.bounds[b]
        sa, sb = fl - fa, fl - fb
        lo = lo_a * 2 ** sa + lo_b * 2 ** sb
        hi = hi_a * 2 ** sa + hi_b * 2 ** sb
        bound = _magnitude(lo, hi)
        self.ops.append({"op": "add", "name": name, "in": [a, b], "out": name,
                         "shift": [[int(v) for v in sa], [int(v) for v in sb]],
                         "relu": relu, "saturate": bound > fp.INT32_MAX,
                         "check": _check(name, "add", bound)})
        lo, hi = _int32(lo), _int32(hi)
        if relu:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
        return self._tensor(name, "int32", fl, lo, hi)

    def max_pool(self, src: str, window: int = 3, strides: int = 2, padding: int = 1,
                 name: str = "max_pool") -> str:
        self.ops.append({"op": "max_pool", "in": [src], "out": name, "window": window,
                         "strides": strides, "padding": padding})
        return self._tensor(name, "int32", self.fraclen(src), *self.bounds[src])

    def avg_pool(self, src: str, window: int, name: str = "avg_pool") -> str:
        shift = folding.pool_shift(window)
        lo, hi = self.bounds[src]
        lo, hi = lo * window, hi * window
        bound = _magnitude(lo, hi)
        self.ops.append({"op": "avg_pool", "name": name, "in": [src], "out": name,
                         "shift": shift, "window": window, "saturate": bound > fp.INT32_MAX,
                         "check": _check(name, "avg_pool", bound)})
        return self._tensor(name, "int32", self.fraclen(src) + shift, _int32(lo),
                            _int32(hi))


# --------------------------------------------------------------------------------------
# The program, replayed from the record of the model's own eval forward.


def _replay(b: _Builder, events: list, output: str) -> str:
    """Builds the program from ``recording`` events; returns the logits' tensor name.

    A ReLU read only by unsigned requantizations is left out: their saturation at 0 is
    that ReLU (the value is the same), so it becomes an op only where an int32 consumer (a
    residual add, a pool, a signed reader) needs it.
    """
    names: dict = {}        # record key -> program tensor
    images: dict = {}       # record key -> (normalized, channels), built by its first reader
    relus: dict = {}        # record key -> the key it rectifies, until an op needs it
    counts: dict = {}

    def unique(base):
        counts[base] = counts.get(base, 0) + 1
        return base if counts[base] == 1 else f"{base}_{counts[base]}"

    def tensor(key):
        if key in relus:
            names[key] = b.relu(tensor(relus.pop(key)))
        return names[key]

    for e in events:
        a = e.attrs
        if e.kind == "image":
            images[e.output] = (a["normalized"], a["channels"])
        elif e.kind == "input":
            src = e.inputs[0]
            if src in images:
                normalized, channels = images.pop(src)
                names[src] = (b.lookup(channels, a["layer"]) if normalized
                              else b.image(channels))
            while not a["signed"] and src in relus:
                src = relus[src]
            names[e.output] = b.input(tensor(src), a["layer"], signed=a["signed"])
        elif e.kind == "relu":
            relus[e.output] = e.inputs[0]
        elif e.kind == "conv":
            names[e.output] = b.conv(a["layer"], tensor(e.inputs[0]), strides=a["strides"],
                                     depthwise=a["depthwise"])
        elif e.kind == "dense":
            names[e.output] = b.dense(a["layer"], tensor(e.inputs[0]))
        elif e.kind == "add":
            names[e.output] = b.add(a["name"] or unique("add"), tensor(e.inputs[0]),
                                    tensor(e.inputs[1]), relu=a["relu"])
        elif e.kind == "max_pool":
            names[e.output] = b.max_pool(tensor(e.inputs[0]), a["window"], a["strides"],
                                         a["padding"], name=unique("max_pool"))
        elif e.kind == "avg_pool":
            names[e.output] = b.avg_pool(tensor(e.inputs[0]), a["window"],
                                         name=unique("avg_pool"))
        else:
            raise ValueError(f"the record holds an op of kind {e.kind!r}, which integer "
                             f"programs do not have")
    if output not in names:
        raise ValueError("the model's output is not the classifier's (QuantDense) logits")
    return names[output]


def _shapes(variables) -> dict:
    """'collection/module/.../name' -> shape, over the collections export reads."""
    tree = {c: variables[c] for c in COLLECTIONS if c in variables}
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    return {"/".join(path): tuple(np.shape(v)) for path, v in flat.items()}


def _mismatch(model, variables, image_shape) -> Optional[str]:
    """The first variable where ``variables`` differ from what ``model`` initializes (one
    missing, one the model has not, another shape), or None. The model's are traced
    abstractly, so an error of the model's own code surfaces here as it is."""
    image = jax.ShapeDtypeStruct((1, *image_shape), np.uint8)
    wanted = _shapes(jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), image))
    given = _shapes(variables)
    for path in [*wanted, *(p for p in given if p not in wanted)]:
        if path not in given:
            return f"{path} is missing"
        if path not in wanted:
            return f"{path} is not one of the model's variables"
        if given[path] != wanted[path]:
            return f"{path} has shape {given[path]}, the model's has {wanted[path]}"
    return None


def export(variables: Mapping[str, Any], model, config=None, *,
           image_shape: Optional[tuple] = None) -> IntegerProgram:
    """The integer program of a fixed-point model, built from the record of its own eval
    forward (``f8net_jax.recording``): any model made of this package's layers exports.

    Args:
      variables: the model's 'params', 'batch_stats' and 'quant_stats', each variable
        of the shape the model initializes (else ValueError, naming the first that
        differs).
      model: a linen module built from f8net_jax.layers in fixed-point mode, or the name
        of one of models.MODEL_NAMES (built with ``config``).
      config: for a model name, the training config (a ConfigDict or mapping with 'quant'
        and 'width_multiplier', when the model has one); 'image_size' of a config gives the
        default image shape.
      image_shape: (height, width, channels) the program runs on; the global average pool's
        shift depends on it.
    """
    if isinstance(model, str):
        name = model
        if name not in models.MODEL_NAMES:
            raise ValueError(f"model must be one of {list(models.MODEL_NAMES)}, got {name!r}")
        quant = _quant_config(config)
    else:
        name = type(model).__name__
        quant = model.quant
    if not quant.fixed:
        raise ValueError("quant.mode is 'float': integer inference needs a fixed-point model "
                         "(train with quant.mode='fixed')")
    if quant.bits != 8:
        raise ValueError(f"integer inference runs 8-bit formats, the model uses {quant.bits}")
    missing = [c for c in COLLECTIONS if c not in variables]
    if missing:
        raise ValueError(f"variables lack {missing}: a fixed-point model has params, "
                         f"batch_stats and quant_stats")
    params = variables["params"]
    if "classifier" not in params or "bias" not in params["classifier"]:
        raise ValueError("the variables have no classifier: export needs a model whose "
                         "logits come from a QuantDense named 'classifier'")
    num_classes = int(np.asarray(params["classifier"]["bias"]).shape[0])
    width = float(_field(config, "width_multiplier", 1.0))
    if isinstance(model, str):
        model = models.create(name, num_classes=num_classes, quant=quant,
                              width_multiplier=width)
    model = model.clone(quant=dataclasses.replace(quant, batch_axis_name=None))
    if image_shape is None:
        size = _field(config, "image_size", None)
        if size is None:
            raise ValueError("give image_shape or a config with image_size")
        channels = int(np.asarray(params["stem"]["kernel"]).shape[2]) if "stem" in params \
            else None
        image_shape = (int(size), int(size), channels)
    image_shape = tuple(int(d) for d in image_shape)
    if "stem" in params and len(image_shape) == 3 and \
            image_shape[2] != np.asarray(params["stem"]["kernel"]).shape[2]:
        raise ValueError(f"image_shape must be (height, width, "
                         f"{np.asarray(params['stem']['kernel']).shape[2]}), got {image_shape}")
    stride = getattr(model, "total_stride", 1)
    if len(image_shape) != 3 or image_shape[0] % stride or image_shape[1] % stride:
        raise ValueError(f"image_shape {image_shape}: (height, width, channels) with height "
                         f"and width multiples of {stride} for {name}")
    mismatch = _mismatch(model, variables, image_shape)
    if mismatch:
        raise ValueError(f"the variables are not those of a {name} ({mismatch})")
    table = analysis.layer_formats(model, variables, image_shape,
                                   collections=("formats", "folded"))
    record = recording.record(model, variables, image_shape)
    b = _Builder(table)
    output = _replay(b, record.events, record.output)
    info = {"quant": dataclasses.asdict(quant), "width_multiplier": width}
    info["quant"]["weight_format"] = list(quant.weight_format)
    info["quant"]["input_format"] = list(quant.input_format)
    program = IntegerProgram(model=name, num_classes=num_classes, image_shape=image_shape,
                             ops=b.ops, tensors=b.tensors, arrays=b.arrays, output=output,
                             info=info)
    program.validate()
    return program
