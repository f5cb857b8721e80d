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

Each recorded event is replayed by the op kind that declares it (integer/ops: its
``replay`` and ``build``); here are only the bookkeeping (``_Builder``) and the replay.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np

from f8net_jax import analysis, layers, models, recording
from f8net_jax.integer import ops
from f8net_jax.integer.ops.base import magnitude
from f8net_jax.integer.program import IntegerProgram

COLLECTIONS = ("params", "batch_stats", "quant_stats")  # what a fixed-point model holds


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


class _Builder:
    """The program being built: its ops, tensors (kind, per-channel fraclen, bound) and
    arrays, the per-channel bounds [lo, hi] of every tensor, and the per-layer formats and
    folded weights the simulation reported (``table``). The op kinds' ``build`` methods
    (integer/ops) compute an op and its bounds and ``emit`` it."""

    def __init__(self, table: dict):
        self.table = table
        self.ops: list = []
        self.tensors: dict = {}
        self.arrays: dict = {}
        self.bounds: dict = {}  # name -> (lo, hi) int64 per channel

    def emit(self, op: dict, kind: str, fraclen, lo, hi) -> str:
        """Appends ``op`` and its output tensor op['out'] of ``kind``, per-channel
        ``fraclen`` and bounds [lo, hi]; returns its name."""
        self.ops.append(op)
        name = op["out"]
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} is written twice")
        fraclen = np.asarray(fraclen, np.int64)
        lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
        self.tensors[name] = {"kind": kind, "channels": int(fraclen.size),
                              "fraclen": [int(v) for v in fraclen],
                              "bound": magnitude(lo, hi)}
        self.bounds[name] = (lo, hi)
        return name

    def fraclen(self, name) -> np.ndarray:
        return np.asarray(self.tensors[name]["fraclen"], np.int64)

    def layer(self, name) -> dict:
        if name not in self.table:
            raise ValueError(f"the model reports no layer {name!r}: is the checkpoint from "
                             f"another architecture?")
        return self.table[name]


# --------------------------------------------------------------------------------------
# The program, replayed from the record of the model's own eval forward.


class _Replay:
    """Record keys -> program tensors while the events replay. An op kind may defer an
    event (the image until its first reader picks image or lookup; a ReLU until a reader
    needs it as an op): ``tensor`` then builds it when it is first read."""

    def __init__(self, builder: _Builder):
        self.b = builder
        self.names: dict = {}     # record key -> program tensor
        self._deferred: dict = {}  # record key -> (its OpKind, its event)
        self._counts: dict = {}

    def unique(self, base: str) -> str:
        """``base``, then base_2, base_3, ... (names of ops no module names)."""
        self._counts[base] = self._counts.get(base, 0) + 1
        return base if self._counts[base] == 1 else f"{base}_{self._counts[base]}"

    def defer(self, key: str, kind, event) -> None:
        self._deferred[key] = (kind, event)

    def deferred_kind(self, key: str):
        """The OpKind of a deferred record key, else None."""
        return self._deferred[key][0] if key in self._deferred else None

    def deferred_event(self, key: str):
        return self._deferred[key][1]

    def tensor(self, key: str, reader=None) -> str:
        """The program tensor of a record key, building a deferred one for ``reader`` (the
        event that reads it)."""
        if key in self._deferred:
            kind, event = self._deferred.pop(key)
            self.names[key] = kind.materialize(event, self, reader)
        return self.names[key]


def _replay(b: _Builder, events: list, output: str) -> str:
    """Builds the program from ``recording`` events, each replayed by the op kind that
    declares its event kind (``ops.event_kinds``); returns the logits' tensor name."""
    r, kinds = _Replay(b), ops.event_kinds()
    for e in events:
        if e.kind not in kinds:
            raise ValueError(f"the record holds an op of kind {e.kind!r}, which integer "
                             f"programs do not have")
        name = kinds[e.kind].replay(e, r)
        if name is not None:
            r.names[e.output] = name
    if output not in r.names:
        raise ValueError("the model's output is not the classifier's (QuantDense) logits")
    return r.names[output]


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


def _resolve(variables, model, config, image_shape):
    """(module, name, quant, image shape, number of classes, width multiplier) of what
    ``export`` was given: a module, one of models.MODEL_NAMES or a user model's
    'package.module:factory'; checks the variables have what a fixed-point model needs."""
    spec = model if models.is_user_model(model) else None
    if spec is not None:
        from f8net_jax.models import user
        size = _field(config, "image_size", None) if image_shape is None else image_shape[0]
        model, _, channels = user.rebuild(
            model, variables["params"], quant=_quant_config(config), image_size=int(size),
            num_classes=_field(config, "num_classes", 10), channels=_field(config, "channels", 3))
        image_shape = image_shape or (int(size), int(size), channels)
    if isinstance(model, str):
        name = model
        if name not in models.MODEL_NAMES:
            raise ValueError(f"model must be one of {list(models.MODEL_NAMES)}, got {name!r}")
        quant = _quant_config(config)
    else:
        name = spec or getattr(model, "model_name", type(model).__name__)
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
    # A quantized plain Flax model (f8net_jax.quantize) names its classifier itself.
    classifier = getattr(model, "classifier_path", None)
    if classifier is None:
        classifier = "classifier"
        if classifier not in params or "bias" not in params[classifier]:
            raise ValueError("the variables have no classifier: export needs a model whose "
                             "logits come from a QuantDense named 'classifier'")
        num_classes = int(np.asarray(params[classifier]["bias"]).shape[0])
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
            else _field(config, "channels", None)
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
    if classifier != "classifier":
        bias = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
        num_classes = int(np.shape(bias[f"{classifier(image_shape)}/bias"])[0])
    return model, name, quant, image_shape, num_classes, width


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
    model, name, quant, image_shape, num_classes, width = _resolve(
        variables, model, config, image_shape)
    mismatch = _mismatch(model, variables, image_shape)
    if mismatch:
        raise ValueError(f"the variables are not those of a {name} ({mismatch})")
    table = analysis.layer_formats(model, variables, image_shape,
                                   collections=("formats", "folded"))
    record = recording.record(model, variables, image_shape)
    for event in record.events:  # a model's own normalization, computed from its variables
        if event.kind == "image" and event.attrs.get("normalize") is not None:
            event.attrs["normalize"] = functools.partial(event.attrs["normalize"], variables)
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
