"""F8Net for a model written in plain Flax: ``f8net_jax.quantize(module, quant=...)``.

    model = f8net_jax.quantize(MyResNet(num_classes=10), quant=QuantConfig(mode="fixed"))
    variables = model.init(rng, images, train=False)    # the user's names, plus alphas
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=["batch_stats", "quant_stats"])

The returned module shares the user's module's scope (``flax.linen.share_scope``), so
its variables are the user's own (a float checkpoint loads as it is) plus, under each
conv and the classifier, 'input/alpha' ('params', where the layer owns its chain's
clipping level) and 'input/fraclen' ('quant_stats'). It takes uint8 pixels (as our models:
p / 256, or normalized with ``quant.normalized_input``) or float images, and passes every
other argument to the user's module.

How. A first, abstract pass captures the float forward's graph (``f8net_jax.capture``)
and plans the layers (``f8net_jax.plan``: conv + BatchNorm pairs, input kinds, shared
alphas and consumers by the rules of the scale plan, refusals). The forward then runs the
user's own code under ``flax.linen.intercept_methods``: each nn.Conv call computes
``layers.conv_bn`` (the function our QuantConvBN computes) with its BatchNorm's variables,
its BatchNorm passes the result on and keeps the new running statistics, and the
classifier's nn.Dense computes ``layers.dense``. The ops between the layers are the user's
own jax code (ReLU, adds, max pooling, the mean over a window of 2^n values compute the
same numbers as ``streams``'); the wrapper records them for ``integer.export`` from the
plan, so the integer program is the one our layers would give.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from f8net_jax import layers, recording
from f8net_jax.capture import capture
from f8net_jax.models.common import prepare_image
from f8net_jax.plan import Layer, Plan, make_plan
from f8net_jax.quant_config import QuantConfig


@dataclasses.dataclass(frozen=True)
class _Held:
    """The user's module, unbound, out of sight of Flax's adoption of submodules."""

    module: Any


@functools.lru_cache(maxsize=64)
def _cached_plan(held: _Held, x_shape: tuple, args: tuple, kwargs: tuple, quant,
                 dtype: str) -> Plan:
    return make_plan(capture(held.module, x_shape, args, dict(kwargs), dtype), quant)


def plan_of(module, x_shape: tuple, args: tuple = (), kwargs=None,
            quant: QuantConfig = QuantConfig(), dtype: str = "float32") -> Plan:
    """The plan of ``module`` (unbound) on input of ``x_shape`` and ``dtype`` (float32,
    or uint8 pixels), cached when the arguments are hashable."""
    held, items = _Held(module), tuple(sorted((kwargs or {}).items()))
    try:
        hash((held, args, items))
    except TypeError:
        return make_plan(capture(module, x_shape, args, dict(items), dtype), quant)
    return _cached_plan(held, tuple(x_shape), tuple(args), items, quant, dtype)


class _Stop(Exception):
    """Ends a forward at its first convolution, holding that convolution's input."""


def pixel_values(module, stem: str, image_shape: tuple, args: tuple, kwargs: dict,
                 variables, pixels) -> np.ndarray:
    """What ``module``'s own code computes from uint8 ``pixels`` [..., 256, channels] before
    its first convolution (path ``stem``): one probe forward on images of
    ``image_shape`` in which every pixel value 0..255 appears at several positions, each
    value's results checked equal wherever it appears (the arithmetic must be elementwise
    and per channel, as a table of the integer program is)."""
    h, w, channels = image_shape
    count = -(-512 // (h * w))
    # 0..255, then 255..0 (each value twice, at different positions), then 0, 1, ...
    flat = np.concatenate([np.arange(256), np.arange(255, -1, -1),
                           np.arange(count * h * w - 512) % 256])
    probe = np.broadcast_to(flat.reshape(count, h, w, 1), (count, h, w, channels))
    probe = np.ascontiguousarray(probe, np.uint8)

    def stop(next_fun, call_args, call_kwargs, context):
        if context.method_name == "__call__" and \
                "/".join(str(p) for p in context.module.scope.path) == stem:
            raise _Stop(call_args[0])
        return next_fun(*call_args, **call_kwargs)

    try:
        with nn.intercept_methods(stop):
            module.apply(variables, probe, *args, **kwargs)
    except _Stop as held:
        value = np.asarray(held.args[0], np.float32).reshape(-1, channels)
    else:
        raise RuntimeError(f"the probe forward never reached the convolution {stem!r}")
    table = value[:256]
    if not np.array_equal(value, table[flat]):
        raise ValueError(f"the model's own arithmetic on its pixels before nn.Conv "
                         f"{stem!r} depends on where a pixel is, not only on its value "
                         f"and channel: the integer program reads it as a table per "
                         f"channel")
    return table[np.asarray(pixels, np.int64), np.arange(channels)]


class _Placeholder:
    """The record's name of a value between layers that no array of the forward holds."""


class _Forward:
    """One quantized forward: the plan, the variables as they were at its start (so that
    every layer's consumer scale uses the values before this step's updates, as the scale
    plan does), the record keys of the values between layers, and the BatchNorm updates
    computed by their convs."""

    def __init__(self, plan: Plan, quant: QuantConfig, variables, image, initializing: bool):
        self.plan, self.quant, self.initializing = plan, quant, initializing
        self.flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
        self.keys = {id(plan.image): image}
        self.updates: dict = {}
        self.scales: dict = {}   # id(layer) -> its input scale, computed once
        self.started: set = set()

    def value(self, collection: str, path: str, default):
        return self.flat.get(f"{collection}/{path}", default)

    # -- the scale plan --------------------------------------------------------------
    def own_alpha(self, layer: Layer):
        if not layers.has_alpha(layer.kind, layer.owns_alpha, self.quant):
            return None
        return self.value("params", f"{layer.name}/input/alpha",
                          jnp.asarray(self.quant.alpha_init, jnp.float32))

    def chain_alpha(self, layer: Layer):
        """The alpha a layer is handed (its chain's), as scale_plan hands it."""
        return self.own_alpha(layer.alpha_owner)

    def start(self, layer: Layer) -> None:
        """Computes the scales in the order our models' scale plans do (the gradient of an
        alpha sums its uses in that order): at the first layer, those of the top-level
        readers (the first layer of each module, every layer of the top module); at the
        first layer of a module, those of its other layers."""
        if not self.started:
            seen = set()
            for other in self.plan.layers:
                if other.module == "" or other.module not in seen:
                    self.scale_of(other)
                seen.add(other.module)
        if layer.module not in self.started:
            self.started.add(layer.module)
            for other in self.plan.layers:
                if other.module == layer.module:
                    self.scale_of(other)

    def scale_of(self, layer: Layer):
        """The scale in which ``layer``'s producers deliver its input."""
        known = self.scales.get(id(layer))
        if known is None:
            known = self.scales[id(layer)] = self._scale(layer)
        return known

    def _scale(self, layer: Layer):
        alpha = self.own_alpha(layer)
        alpha = self.chain_alpha(layer) if alpha is None else alpha
        running = self.value("quant_stats", f"{layer.name}/input/fraclen",
                             jnp.asarray(self.quant.input_format[1], jnp.float32))
        return layers.input_scale(layer.kind, alpha, running, self.quant)

    # -- the record of the ops between layers ----------------------------------------
    def key(self, node, final=None):
        """The record's name of ``node`` (``final``: the array that holds it), its op and
        those it reads recorded first."""
        if node.op == "pixels":  # the model's own normalization: the image's table
            return self.key(node.inputs[0], final)
        known = self.keys.get(id(node))
        if known is not None:
            if final is not None and final is not known:
                recording.alias(final, known)
            return known
        out = _Placeholder() if final is None else final
        name = self.plan.add_names.get(id(node))
        if node.op == "relu" and node.inputs[0].op == "add" and \
                self.plan.refcount.get(id(node.inputs[0])) == 1:
            add = node.inputs[0]
            ins = [self.key(n) for n in add.inputs]
            recording.emit("add", ins, out, name=name or self.plan.add_names.get(id(add)),
                           relu=True)
        elif node.op == "add":
            recording.emit("add", [self.key(n) for n in node.inputs], out, name=name,
                           relu=False)
        elif node.op in ("relu", "max_pool", "avg_pool"):
            recording.emit(node.op, [self.key(node.inputs[0])], out, **node.attrs)
        else:
            raise RuntimeError(f"no record of {node.op} {node.where!r}")
        self.keys[id(node)] = out
        return out

    # -- the layers ------------------------------------------------------------------
    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(str(p) for p in module.scope.path)
        layer = self.plan.by_path.get(path)
        if context.method_name != "__call__" or layer is None:
            return next_fun(*args, **kwargs)
        if layer.bn is not None and path == layer.bn.path:
            return self.batch_norm(layer, module, next_fun, args, kwargs)
        x = args[0]
        if self.initializing:
            next_fun(*args, **kwargs)  # the user's variables, as the module makes them
        self.start(layer)
        if layer.fused_relu:  # its producer, which ran before it, keyed its BatchNorm output
            # The quantizer is the ReLU: it reads the BatchNorm's output (the statistic
            # before rectification, as our blocks); the user's ReLU goes unused.
            x = self.keys[id(layer.input.inputs[0])]
            self.key(layer.input.inputs[0], final=x)
        else:
            self.key(layer.input, final=x)
        quantizer = layers.InputQuantizer(kind=layer.kind, owns_alpha=layer.owns_alpha,
                                          quant=self.quant, name="input")
        get = lambda col, name, default: self.value(col, f"{layer.name}/{name}", default) \
            if not self.initializing else module.get_variable(col, name)
        if layer.is_classifier:
            return layers.dense(module, x, quantizer=quantizer,
                                kernel=get("params", "kernel", None),
                                bias=get("params", "bias", None), quant=self.quant,
                                alpha=self.chain_alpha(layer), input_factor=1.0,
                                train=self.plan.train)
        return self.conv(layer, module, x, quantizer, get("params", "kernel", None))

    def conv(self, layer: Layer, module, x, quantizer, kernel):
        bn, features = layer.bn, kernel.shape[-1]
        stat = lambda col, name, init: self.value(col, f"{bn.path}/{name}",
                                                  init((features,), jnp.float32))
        y, new = layers.conv_bn(
            module, x, quantizer=quantizer, kernel=kernel,
            gamma=stat("params", "scale", jnp.ones), beta=stat("params", "bias", jnp.zeros),
            running=(stat("batch_stats", "mean", jnp.zeros),
                     stat("batch_stats", "var", jnp.ones)),
            quant=self.quant, strides=layer.strides, padding=layer.padding,
            groups=layer.groups, alpha=self.chain_alpha(layer),
            out_scale=self.scale_of(layer.consumer), train=bn.train,
            momentum=round(1.0 - bn.module.momentum, 12), eps=bn.module.epsilon)
        self.updates[id(y)] = new
        self.keys[id(layer.output)] = y
        return y

    def batch_norm(self, layer: Layer, module, next_fun, args, kwargs):
        """Its conv has computed conv + BN; the BatchNorm keeps the new statistics."""
        y = args[0]
        if self.initializing:
            next_fun(*args, **kwargs)
            return y
        new = self.updates.pop(id(y), None)
        if new is not None:
            module.put_variable("batch_stats", "mean", new[0])
            module.put_variable("batch_stats", "var", new[1])
        return y


class Quantized(nn.Module):
    """A plain Flax module computing F8Net (see the module docstring); ``quantize`` makes
    it."""

    module: nn.Module
    quant: QuantConfig = QuantConfig()
    original: _Held = None

    def setup(self):
        nn.share_scope(self, self.module)

    def plan(self, x_shape: tuple, *args, **kwargs) -> Plan:
        """The plan on uint8 pixels of ``x_shape`` (the images the integer program takes):
        traced on the pixels where the model normalizes them itself, else on the float
        image it is handed."""
        pixels = plan_of(self.original.module, tuple(x_shape), args, kwargs, self.quant,
                         dtype="uint8")
        if pixels.normalizes:
            return pixels
        return plan_of(self.original.module, tuple(x_shape), args, kwargs, self.quant)

    @property
    def model_name(self) -> str:
        return type(self.original.module).__name__

    def classifier_path(self, image_shape: tuple) -> str:
        """The path of the classifier (its nn.Dense) on images of ``image_shape``."""
        return self.plan((1, *image_shape), train=False).classifier.name

    def __call__(self, x, *args, **kwargs):
        name = type(self.original.module).__name__
        plan = None
        if getattr(x, "dtype", None) == jnp.uint8 and getattr(x, "ndim", 0) == 4:
            plan = self.plan(x.shape, *args, **kwargs)
        if plan is not None and plan.normalizes:
            # The model normalizes its pixels itself: it gets them as they are, and the
            # program reads its normalization as a table (the 'image' event's ``normalize``
            # computes it from the variables, see pixel_values).
            image = _Placeholder()
            stem = next(layer.name for layer in plan.layers
                        if layer.input.op == "pixels")
            recording.emit("image", [], image, normalized=True, channels=int(x.shape[-1]),
                           normalize=functools.partial(
                               pixel_values, self.original.module, stem,
                               tuple(x.shape[1:]), args, dict(kwargs)))
        else:
            x = prepare_image(x, total_stride=1, model=name,
                              normalize=self.quant.normalized_input)
            plan = plan_of(self.original.module, tuple(x.shape), args, kwargs, self.quant)
            image = x
        variables = {} if self.is_initializing() else self.variables
        forward = _Forward(plan, self.quant, variables, image, self.is_initializing())
        with nn.intercept_methods(forward.intercept):
            return self.module(x, *args, **kwargs)


def quantize(module: nn.Module, *, quant: QuantConfig = QuantConfig()) -> Quantized:
    """``module`` (an unbound plain Flax Linen module: nn.Conv(use_bias=False) each
    followed by nn.BatchNorm, ReLU, adds, max pooling, a mean over the spatial axes and one
    nn.Dense classifier whose logits it returns) computing F8Net as our layers do, with
    the same call signature and the same variable names. What F8Net's integer program
    cannot express between the layers is refused at init (``plan.Refused``, a ValueError
    naming the module and the op)."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"quantize takes a flax.linen Module, got {type(module).__name__}")
    if not isinstance(quant, QuantConfig):
        raise ValueError(f"quant must be a QuantConfig, got {type(quant).__name__}")
    return Quantized(module=module, quant=quant, original=_Held(module))
